"""Logit adjustments by token id: logit bias, repetition/presence/frequency penalties and DRY, per row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.samplers.dry import dry_penalties
from runtime.samplers.filters import Cands
from runtime.samplers.state import SamplerState


def _columns(c: Cands, row: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `tokens` (T,) sit among a row's candidates -> (columns (H,), indices into tokens (H,))."""
    if c.ids is None:
        return tokens, torch.arange(tokens.shape[0], device=tokens.device)
    ids_sorted, order = c.ids[row].sort()
    at = torch.searchsorted(ids_sorted, tokens).clamp(max=ids_sorted.shape[0] - 1)
    hit = ids_sorted[at] == tokens
    return order[at[hit]], hit.nonzero().squeeze(1)


def apply_bias(x: torch.Tensor, state: SamplerState) -> None:
    """x (V,) in place: add logit_bias (and the end-of-generation bans of ignore_eos); -inf bans."""
    if state.bias_ids is not None and state.bias_values is not None:
        x.index_add_(0, state.bias_ids.to(x.device), state.bias_values.to(x.device))


def penalties(c: Cands, states: Sequence[SamplerState]) -> Cands:
    """llama.cpp's penalties over the last repeat_last_n tokens: a seen token's logit is divided by
    repeat_penalty (multiplied when <= 0), then count * frequency_penalty + presence_penalty is subtracted."""
    x = c.logits if c.owned else c.logits.clone()
    for row, st in enumerate(states):
        if not st.counts:
            continue
        p = st.params
        tokens = torch.tensor(list(st.counts), dtype=torch.int64, device=x.device)  # (T,)
        counts = torch.tensor(list(st.counts.values()), dtype=torch.float32, device=x.device)
        cols, which = _columns(c, row, tokens)
        counts = counts[which]
        old = x[row, cols]
        new = torch.where(old <= 0, old * p.repeat_penalty, old / p.repeat_penalty)
        new = new - counts * p.frequency_penalty - (counts > 0).float() * p.presence_penalty
        if st.newline_ids is not None:  # penalize_nl off: newlines keep their logit
            new = torch.where(torch.isin(tokens[which], st.newline_ids.to(x.device)), old, new)
        x[row, cols] = new
    return Cands(x, c.ids, False, True)


def dry(c: Cands, states: Sequence[SamplerState]) -> Cands:
    """Subtract DRY's penalty from each token that would extend a repeat of the context's end."""
    x = c.logits if c.owned else c.logits.clone()
    for row, st in enumerate(states):
        p = st.params
        assert st.repeats is not None
        pen = dry_penalties(
            st.repeats, p.dry_penalty_last_n, st.breakers, p.dry_multiplier, p.dry_base, p.dry_allowed_length
        )
        if not pen:
            continue
        tokens = torch.tensor(list(pen), dtype=torch.int64, device=x.device)
        amounts = torch.tensor(list(pen.values()), dtype=torch.float32, device=x.device)
        cols, which = _columns(c, row, tokens)
        x[row, cols] -= amounts[which]
    return Cands(x, c.ids, False, True)
