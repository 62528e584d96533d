"""Triton decode attention over the paged KV cache (CUDA): keys read where they lie, online softmax.

One program per (sequence, query head) walks the sequence's cache blocks that hold
visible keys, one block per iteration: scores of the block's keys, a running max and
sum (flash-decoding's online softmax), and the running weighted sum of values. Nothing
is gathered or padded, and a sequence's result does not depend on the batch. Tested
against runtime/ops/reference.py's paged_decode on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, blocks_ptr, lo_ptr, hi_ptr, out_ptr,
    H, KVH, W, D, DV, scale, softcap,
    BS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv = h // (H // KVH)
    lo = tl.load(lo_ptr + b)
    hi = tl.load(hi_ptr + b)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + (b * H + h) * D + d, mask=d < D, other=0.0).to(tl.float32)  # (BLOCK_D,)
    m = tl.max(tl.full((BS,), float("-inf"), tl.float32), 0)
    total = tl.sum(tl.zeros((BS,), tl.float32), 0)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for c in range(lo // BS, (hi + BS - 1) // BS):  # the blocks holding keys [lo, hi)
        blk = tl.load(blocks_ptr + b * W + c).to(tl.int64)
        j = c * BS + tl.arange(0, BS)  # key positions in this block
        valid = (j >= lo) & (j < hi)
        rows = (blk * BS + tl.arange(0, BS)) * KVH + kv  # (BS,) rows of the (slots * KVH, dim) caches
        k = tl.load(k_ptr + rows[:, None] * D + d[None, :], mask=valid[:, None] & (d[None, :] < D), other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale  # (BS,)
        if SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap * tanh(s / softcap)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)  # (BS,), 0 where masked
        v = tl.load(v_ptr + rows[:, None] * DV + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        total = total * alpha + tl.sum(p, 0)
        m = m_new
    tl.store(out_ptr + (b * H + h) * DV + dv, acc / total, mask=dv < DV)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """q (B, H, D); caches (num_blocks, block_size, KVH, D | Dv); keys [lo_b, hi_b) of blocks (B, W) -> (B, H, Dv)."""
    b, h, d = q.shape
    nb, bs, kvh, dv = v_cache.shape
    if bs & (bs - 1) or h % kvh or k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != d:
        raise ValueError(f"paged_decode: unsupported shapes q {tuple(q.shape)}, caches {tuple(k_cache.shape)}")
    # lo/hi and block ids come from the engine's own plan; checking their values here would
    # cost a device-to-host sync per layer, which the decode step must not have.
    out = torch.empty((b, h, dv), dtype=torch.float32, device=q.device)
    if b:
        _paged_decode_kernel[(b, h)](
            q.float().contiguous(), k_cache.contiguous(), v_cache.contiguous(),
            blocks.to(torch.int32).contiguous(), lo.to(torch.int32), hi.to(torch.int32), out,
            h, kvh, blocks.shape[1], d, dv, scale, softcap or 1.0,
            BS=bs, BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv), SOFTCAP=bool(softcap),
        )  # fmt: skip
    return out.to(q.dtype)
