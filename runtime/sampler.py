"""Turns a batch of logits into token ids: greedy rows batched, the rest through llama.cpp's chain."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.request import TokenLogprob
from runtime.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator, so a seed gives the same draws whatever the batch holds."""
    g = torch.Generator(device=device)
    if seed < 0:
        g.seed()
    else:
        g.manual_seed(seed % 2**64)
    return g


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits (V,) float32 -> logits with filtered-out tokens at -inf, then divided by temperature.

    Order as llama.cpp's default chain: top_k, top_p, min_p, temperature.
    """
    x = logits.clone()
    if p.top_k > 0 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x[x < kth] = float("-inf")
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        cum = probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        drop = (cum - probs) >= p.top_p
        drop[0] = False
        x[idx[drop]] = float("-inf")
    if p.min_p > 0.0:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = float("-inf")
    return x / p.temperature


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (N, V) float32, one row per request -> N token ids and optional log-probs.

    Reported log-probs are the raw model distribution (before any sampler), as
    llama.cpp's server reports them.
    """
    n = logits.shape[0]
    ids = [0] * n
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        picks = logits[greedy_rows].argmax(-1).tolist()
        for i, t in zip(greedy_rows, picks):
            ids[i] = int(t)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p).softmax(-1)
        ids[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    logprobs: list[TokenLogprob | None] = [None] * n
    want = [i for i, p in enumerate(params) if p.n_probs > 0]
    if want:
        lp = logits[want].log_softmax(-1)
        for row, i in enumerate(want):
            top = torch.topk(lp[row], params[i].n_probs)
            logprobs[i] = TokenLogprob(
                ids[i],
                float(lp[row, ids[i]]),
                tuple(zip(top.indices.tolist(), top.values.tolist())),
            )
    return ids, logprobs
