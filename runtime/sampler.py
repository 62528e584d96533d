"""Logits of the scheduled rows -> token ids (+ raw log-probs), through each request's llama.cpp sampler chain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from runtime.grammar_matcher import GrammarMatcher, apply_bitmask, fill_bitmask
from runtime.request import LogitsProcessor, TokenLogprob
from runtime.samplers import filters as F
from runtime.samplers.filters import Cands
from runtime.samplers.mirostat import mirostat_pick
from runtime.samplers.penalties import apply_bias, dry, penalties
from runtime.samplers.state import SamplerState, new_sampler_state
from runtime.samplers.vocab import SamplerVocab

__all__ = [
    "SampleRow", "SamplerState", "SamplerVocab", "apply_chain", "new_sampler_state", "sample",
]  # fmt: skip


@dataclass(frozen=True)
class SampleRow:
    """One row of logits to sample: its request's sampler state, output so far, logits processors, grammar."""

    state: SamplerState
    output_ids: Sequence[int] = ()
    processors: Sequence[LogitsProcessor] = ()
    grammar: GrammarMatcher | None = None


Stage = Callable[[Cands, list[SamplerState], torch.Tensor], Cands]

# name -> stage(candidates, states, xtc uniforms (n,)); parameters are gathered per row.
_STAGES: dict[str, Stage] = {
    "penalties": lambda c, s, u: penalties(c, s),
    "dry": lambda c, s, u: dry(c, s),
    "top_n_sigma": lambda c, s, u: F.top_n_sigma(c, [x.params.top_n_sigma for x in s]),
    "top_k": lambda c, s, u: F.top_k(c, [x.params.top_k for x in s]),
    "typ_p": lambda c, s, u: F.typical(c, [x.params.typical_p for x in s], [x.params.min_keep for x in s]),
    "top_p": lambda c, s, u: F.top_p(c, [x.params.top_p for x in s], [x.params.min_keep for x in s]),
    "min_p": lambda c, s, u: F.min_p(c, [x.params.min_p for x in s], [x.params.min_keep for x in s]),
    "tfs_z": lambda c, s, u: F.tail_free(c, [x.params.tfs_z for x in s], [x.params.min_keep for x in s]),
    "xtc": lambda c, s, u: F.xtc(
        c,
        [x.params.xtc_probability for x in s],
        [x.params.xtc_threshold for x in s],
        [x.params.min_keep for x in s],
        u,
    ),
    "temperature": lambda c, s, u: F.temperature(
        c,
        [x.params.temperature for x in s],
        [x.params.dynatemp_range for x in s],
        [x.params.dynatemp_exponent for x in s],
    ),
}


def _adjusted(logits: torch.Tensor, rows: Sequence[SampleRow], in_place: bool = False) -> torch.Tensor:
    """Grammar masks (all rows in one pass), then processors and logit bias; a copy only when needed."""
    mask = fill_bitmask([r.grammar for r in rows], [r.output_ids for r in rows], logits.shape[1])
    todo = [i for i, r in enumerate(rows) if r.processors or r.state.bias_ids is not None]
    if mask is None and not todo:
        return logits
    if mask is None:  # (N, V) copy: 8 MB a row-group on a 262k vocabulary
        x = logits if in_place else logits.clone()
    else:
        x = apply_bitmask(logits, mask, in_place)
    for i in todo:
        row = rows[i]
        for proc in row.processors:
            x[i] = proc(list(row.output_ids), x[i])
        apply_bias(x[i], row.state)
    return x


def _run_chain(x: torch.Tensor, plan: tuple[str, ...], states: list[SamplerState], owned: bool) -> list[int]:
    """x (g, V): rows sharing one chain -> their tokens; owned: x is a copy the chain may write into."""
    draws = torch.stack([s.draw() for s in states]).to(x.device)  # (g, n_draws)
    if plan == ("mirostat",):
        return [mirostat_pick(x[j], s, float(draws[j, 0])) for j, s in enumerate(states)]
    c = apply_chain(Cands(x, owned=owned), plan, states, draws[:, 0])  # XTC's coin is the first draw
    return F.pick(c, draws[:, -1]).tolist()


def apply_chain(c: Cands, plan: Sequence[str], states: list[SamplerState], xtc_u: torch.Tensor) -> Cands:
    """Run a chain's stages (no Mirostat) over rows that share it: the candidates the final draw uses."""
    for name in plan:
        c = _STAGES[name](c, states, xtc_u)
    return c


def sample(
    logits: torch.Tensor, rows: Sequence[SampleRow], owned: bool = False
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (N, V) float32, one row per request -> N token ids and optional log-probs.

    owned: the caller gives logits up (the runner's fresh tensor), so masks and biases
    may be applied in place unless a row reports log-probs, which read the raw values.

    Per row, in llama.cpp's order: the grammar's mask, logits processors,
    logit_bias and ignore_eos bans, then the request's chain (`samplers`) or
    Mirostat, then one draw. Rows whose chain keeps only the top token before
    anything could move it share one argmax; the others are grouped by chain,
    each group batched with a per-row parameter for every sampler. A row draws
    only from its own generator, a fixed number of uniforms per step, so a seed
    gives the same tokens alone or in any batch. Advances each row's state.
    Reported log-probs are the raw model distribution (before any sampler), as
    llama.cpp's server reports them.
    """
    n = logits.shape[0]
    assert len(rows) == n, (n, len(rows))
    for r in rows:
        r.state.sync(r.output_ids)
    in_place = owned and all(r.state.params.n_probs == 0 for r in rows)
    x = _adjusted(logits, rows, in_place)
    ids = [0] * n
    greedy = [i for i, r in enumerate(rows) if r.state.greedy]
    if greedy:
        top = F.argmax(x if len(greedy) == n else x[greedy])
        for i, t in zip(greedy, top.tolist()):
            ids[i] = int(t)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(rows):
        if not r.state.greedy:
            groups.setdefault(r.state.plan, []).append(i)
    for plan, idx in groups.items():
        whole = len(idx) == n
        xg = x if whole else x[idx]
        # a chain may write into its rows unless they are the caller's logits, still needed
        writable = not whole or x is not logits or in_place
        for i, t in zip(idx, _run_chain(xg, plan, [rows[i].state for i in idx], writable)):
            ids[i] = int(t)
    return ids, _logprobs(logits, rows, ids)


def _logprobs(logits: torch.Tensor, rows: Sequence[SampleRow], ids: list[int]) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.state.params.n_probs > 0]
    if not want:
        return out
    x = (logits if len(want) == len(rows) else logits[want]).float()  # (W, V)
    lse = torch.logsumexp(x, dim=1, keepdim=True)  # (W, 1)
    k = min(max(rows[i].state.params.n_probs for i in want), x.shape[1])
    vals, top_ids = F.topk(x, k)
    chosen = x.gather(1, torch.tensor([ids[i] for i in want], device=x.device).unsqueeze(1))
    top_lp, chosen_lp = (vals - lse).tolist(), (chosen - lse).squeeze(1).tolist()
    top_ids_l = top_ids.tolist()
    for row, i in enumerate(want):
        n_probs = rows[i].state.params.n_probs
        top = tuple(zip(top_ids_l[row][:n_probs], top_lp[row][:n_probs]))
        out[i] = TokenLogprob(ids[i], chosen_lp[row], top)
    return out

