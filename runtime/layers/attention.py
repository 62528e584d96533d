"""Attention over the paged KV cache: the plain-torch reference path, one sequence at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    batch: ForwardBatch,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q (T, H, D), new k/v (T, KVH, D) -> (T, H, Dv).

    Writes this step's k/v into the cache first, then each sequence's queries attend
    to its cached keys: causal, and within `sliding_window` tokens when it is set
    (key j is visible from query i when i - window < j <= i, as llama.cpp masks).
    """
    cache.write(layer, batch.slot_mapping, k, v)
    out = torch.empty(q.shape[0], q.shape[1], cache.v[layer].shape[-1], dtype=q.dtype, device=q.device)
    for b, s in enumerate(batch.seqs):
        first_q = s.n_ctx - s.n_new  # cache index of this sequence's first new token
        lo = max(0, first_q - sliding_window + 1) if sliding_window else 0
        ks, vs = cache.gather(layer, batch.block_tables[b], lo, s.n_ctx)  # (S, KVH, D)
        qs = q[s.start : s.start + s.n_new]  # (n, H, D)
        q_idx = torch.arange(first_q, s.n_ctx, device=q.device)[:, None]
        k_idx = torch.arange(lo, s.n_ctx, device=q.device)[None, :]
        mask = k_idx <= q_idx
        if sliding_window:
            mask &= k_idx > q_idx - sliding_window
        out[s.start : s.start + s.n_new] = _attend(qs, ks.to(q.dtype), vs.to(q.dtype), mask, scale, softcap)
    return out


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """q (n, H, D), k/v (S, KVH, D), mask (n, S) bool -> (n, H, Dv)."""
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    if not softcap:
        o = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=kh.shape[0] != qh.shape[0]
        )
        return o.transpose(0, 1)
    group = qh.shape[0] // kh.shape[0]
    kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
    scores = torch.matmul(qh.float(), kh.float().transpose(1, 2)) * scale  # (H, n, S)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.matmul(scores.softmax(-1), vh.float()).to(q.dtype)
    return o.transpose(0, 1)
