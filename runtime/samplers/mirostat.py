"""Mirostat 1 and 2: pick a token while steering the observed surprise toward tau (llama.cpp's versions)."""

from __future__ import annotations

import math

import numpy as np
import torch

from runtime.samplers.state import SamplerState

M = 100  # tokens Mirostat 1 uses to estimate the Zipf exponent


def _draw(logits: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from softmax(logits (C,)) with a uniform u -> column index."""
    w = (logits - logits.max()).exp().double()
    cum = w.cumsum(dim=0)
    total = cum[-1]
    j = int((cum <= u * total).sum())
    return min(j, int((cum < total).sum()))


def _temper(x: torch.Tensor, temp: float) -> torch.Tensor:
    """llama.cpp's plain temperature sampler, which Mirostat's chain starts with: <= 0 keeps the top token."""
    if temp > 0:
        return x / temp
    out = torch.full_like(x, float("-inf"))
    top = int(x.argmax())
    out[top] = x[top]
    return out


def mirostat_pick(x: torch.Tensor, state: SamplerState, u: float) -> int:
    """x (V,) biased logits -> token id; updates state.mu by eta * (observed surprise - tau)."""
    p = state.params
    x = _temper(x, p.temperature)
    if p.mirostat == 1:
        vals, ids = _mirostat1_candidates(x, state.mu)
    else:
        # Keep the tokens whose surprise -log2 p is at most mu (at least the top one).
        logp = x.log_softmax(dim=0)
        keep = -logp / math.log(2) <= state.mu
        keep[int(x.argmax())] = True
        ids = keep.nonzero().squeeze(1)
        vals = x[ids]
    j = _draw(vals, u)
    surprise = -float(vals.log_softmax(dim=0)[j]) / math.log(2)
    state.mu -= p.mirostat_eta * (surprise - p.mirostat_tau)
    return int(ids[j])


def _mirostat1_candidates(x: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with k from the estimated Zipf exponent s of the M best tokens and the target mu."""
    n_vocab = x.shape[0]
    top = x.topk(min(M, n_vocab)).values.double()
    # s_hat: least squares fit of log(p_i / p_i+1) = s * log((i + 2) / (i + 1)); log-ratios from logits.
    i = torch.arange(top.shape[0] - 1, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))
    b = top[:-1] - top[1:]
    with np.errstate(all="ignore"):
        s_hat = np.float64((t * b).sum().item()) / np.float64((t * t).sum().item())
        eps = s_hat - 1
        k = np.power((eps * np.power(2.0, mu)) / (1 - np.power(float(n_vocab), -eps)), 1 / s_hat)
    k_int = 1 if math.isnan(k) else int(min(max(k, 1.0), n_vocab))
    vals, ids = x.topk(k_int)
    return vals, ids
