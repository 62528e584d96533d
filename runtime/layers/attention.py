"""Attention over the paged KV cache in plain torch: decode rows batched, prompt chunks one sequence at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime import ops
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
    plan = decode_plan(batch, cache.block_size, sliding_window)
    if plan is not None and plan.every_row:  # a decode-only step: no rows to pick out
        return _decode(q, cache, layer, plan, scale, softcap)
    out = torch.empty(q.shape[0], q.shape[1], cache.v[layer].shape[-1], dtype=q.dtype, device=q.device)
    if plan is not None:
        out[plan.starts] = _decode(q[plan.starts], cache, layer, plan, scale, softcap)
    for b, s in enumerate(batch.seqs):
        if s.n_new == 1:
            continue
        first_q = s.n_ctx - s.n_new  # cache index of this sequence's first new token
        qs = q[s.start : s.start + s.n_new]  # (n, H, D)
        if q.device.type == "cpu":  # the keys read where they lie in the cache
            out[s.start : s.start + s.n_new] = ops.prompt_attention(
                qs, cache.k[layer], cache.v[layer], batch.block_tables[b], first_q, sliding_window, scale, softcap
            )
            continue
        lo = max(0, first_q - sliding_window + 1) if sliding_window else 0
        ks, vs = cache.gather(layer, batch.block_tables[b], lo, s.n_ctx)  # (S, KVH, D)
        mask = None  # a whole prompt in one chunk, every key in its window: plain causal
        if first_q > 0 or 0 < sliding_window < s.n_new:
            q_idx = torch.arange(first_q, s.n_ctx, device=q.device)[:, None]
            k_idx = torch.arange(lo, s.n_ctx, device=q.device)[None, :]
            mask = k_idx <= q_idx
            if sliding_window:
                mask &= k_idx > q_idx - sliding_window
        out[s.start : s.start + s.n_new] = _attend(qs, ks.to(q.dtype), vs.to(q.dtype), mask, scale, softcap)
    return out


@dataclass(frozen=True)
class DecodePlan:
    """Where the decode rows of a step read their keys; the same for every layer of one window kind."""

    starts: torch.Tensor  # (B,) batch rows of the sequences with one new token
    blocks: torch.Tensor  # (B, W) block ids, from the block of each sequence's first visible key
    lo: torch.Tensor  # (B,) first visible key, counted from the first of those blocks
    hi: torch.Tensor  # (B,) one past the last (the new token's own)
    every_row: bool  # the decode rows are the whole batch, rows 0 .. B-1 in order


def decode_plan(batch: ForwardBatch, block_size: int, window: int) -> DecodePlan | None:
    """The step's decode rows (None if there are none), built once per step and window.

    Each sequence reads whole blocks from the block of its first visible key on and
    sees keys [lo, hi) of them, so its output does not depend on what else is in the batch.
    """
    if window in batch.memo:
        plan: DecodePlan | None = batch.memo[window]
        return plan
    seqs = [s for s in batch.seqs if s.n_new == 1]
    rows = [b for b, s in enumerate(batch.seqs) if s.n_new == 1]
    plan = None
    if seqs:
        bs, dev = block_size, batch.token_ids.device
        lo = [max(0, s.n_ctx - window) if window else 0 for s in seqs]  # first visible key
        first = [x // bs for x in lo]
        width = max(-(-s.n_ctx // bs) - f for s, f in zip(seqs, first))
        tables = batch.block_tables[rows]  # (B, M), padded with block 0
        if tables.shape[1] < max(first) + width:  # room for every window: pad with block 0
            tables = F.pad(tables, (0, max(first) + width - tables.shape[1]))
        cols = torch.tensor(first, device=dev)[:, None] + torch.arange(width, device=dev)

        def ints(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=dev)

        starts = [s.start for s in seqs]
        plan = DecodePlan(
            starts=ints(starts),
            blocks=tables.gather(1, cols),
            lo=ints([x - f * bs for x, f in zip(lo, first)]),
            hi=ints([s.n_ctx - f * bs for s, f in zip(seqs, first)]),
            every_row=len(seqs) == batch.num_tokens and starts == list(range(len(seqs))),
        )
    batch.memo[window] = plan
    return plan


def _decode(
    q: torch.Tensor, cache: KVCache, layer: int, plan: DecodePlan, scale: float, softcap: float
) -> torch.Tensor:
    """One attention call for every sequence with a single new token (decode): q (B, H, D),
    its rows in the plan's order -> (B, H, Dv).

    The keys are read where they lie in the paged cache (a fused kernel on the CPU; the
    reference gathers whole blocks and masks the rest).
    """
    return ops.paged_decode(q, cache.k[layer], cache.v[layer], plan.blocks, plan.lo, plan.hi, scale, softcap)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float
) -> torch.Tensor:
    """q (n, H, D), k/v (S, KVH, D), mask (n, S) bool or None for causal with S == n -> (n, H, Dv)."""
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    if not softcap:
        # 4-D (1, H, n, D) takes the fused kernels; is_causal skips the blocks above the diagonal
        o = F.scaled_dot_product_attention(
            qh[None], kh[None], vh[None], attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=kh.shape[0] != qh.shape[0],
        )
        return o[0].transpose(0, 1)
    if mask is None:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    group = qh.shape[0] // kh.shape[0]
    kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
    scores = torch.matmul(qh.float(), kh.float().transpose(1, 2)) * scale  # (H, n, S)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.matmul(scores.softmax(-1), vh.float()).to(q.dtype)
    return o.transpose(0, 1)
