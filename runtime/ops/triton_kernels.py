"""Triton kernels for weights in GGUF blocks (CUDA): dequantize-in-registers matmul and dequantization.

One kernel serves decode and prefill: each program decodes a (BLOCK_N, BLOCK_K) tile
of W from its blocks and multiplies it with a (BLOCK_M, BLOCK_K) tile of x with
tl.dot, so the weight bytes are read once per BLOCK_M rows of x. `_decode` is the
per-type decoding, the same formulas as runtime/gguf/quants (the reference). The
kernels are tested against the reference on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from runtime.gguf.quants.iquants import KVALUES


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """Two little-endian bytes at p -> float32."""
    bits = (_u8(p, mask) | (_u8(p + 1, mask) << 8)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_min_k4(s, g, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block g (0-7) from the 12 bytes at s."""
    lo = g < 4
    gm = tl.where(lo, g + 4, g - 4)  # the other byte each half needs
    a = _u8(s + g, mask)  # g < 4: scale byte; g >= 4: unused
    b = _u8(s + gm, mask)  # g < 4: min byte (g + 4); g >= 4: high bits of the scale (g - 4)
    c = _u8(s + g + 4, mask)  # g >= 4: low bits of scale and min (g + 4)
    d = _u8(s + g, mask)  # g >= 4: high bits of the min (g)
    sc = tl.where(lo, a & 63, (c & 15) | ((b >> 6) << 4))
    mn = tl.where(lo, b & 63, (c >> 4) | ((d >> 6) << 4))
    return sc, mn


@triton.jit
def _decode(row, j, mask, table, QT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr):
    """Values j of the rows starting at byte pointers `row`: (BLOCK_N, 1) x (1, BLOCK_K) -> float32."""
    e = j % BS
    b = row + (j // BS) * TS  # each value's block
    if QT == 2:  # Q4_0
        q = (_u8(b + 2 + e % 16, mask) >> (4 * (e // 16))) & 15
        v = _f16(b, mask) * (q - 8).to(tl.float32)
    elif QT == 3:  # Q4_1
        q = (_u8(b + 4 + e % 16, mask) >> (4 * (e // 16))) & 15
        v = _f16(b, mask) * q.to(tl.float32) + _f16(b + 2, mask)
    elif QT == 6:  # Q5_0
        q = (_u8(b + 6 + e % 16, mask) >> (4 * (e // 16))) & 15
        q = q | (((_u8(b + 2 + e // 8, mask) >> (e % 8)) & 1) << 4)
        v = _f16(b, mask) * (q - 16).to(tl.float32)
    elif QT == 7:  # Q5_1
        q = (_u8(b + 8 + e % 16, mask) >> (4 * (e // 16))) & 15
        q = q | (((_u8(b + 4 + e // 8, mask) >> (e % 8)) & 1) << 4)
        v = _f16(b, mask) * q.to(tl.float32) + _f16(b + 2, mask)
    elif QT == 8:  # Q8_0
        q = tl.load(b + 2 + e, mask=mask, other=0).to(tl.int8, bitcast=True)
        v = q.to(tl.float32) * _f16(b, mask)
    elif QT == 10:  # Q2_K
        sc = _u8(b + e // 16, mask)
        q = (_u8(b + 16 + (e // 128) * 32 + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        dl = _f16(b + 80, mask) * (sc & 15).to(tl.float32)
        ml = _f16(b + 82, mask) * (sc >> 4).to(tl.float32)
        v = dl * q.to(tl.float32) - ml
    elif QT == 11:  # Q3_K
        i = e // 16
        low = (_u8(b + 96 + i % 8, mask) >> (4 * (i // 8))) & 15
        high = (_u8(b + 104 + i % 4, mask) >> (2 * (i // 4))) & 3
        dl = _f16(b + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        ql = (_u8(b + 32 + (e // 128) * 32 + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        qh = (_u8(b + e % 32, mask) >> (e // 32)) & 1
        v = dl * (ql - ((qh ^ 1) << 2)).to(tl.float32)
    elif QT == 12 or QT == 13:  # Q4_K, Q5_K
        g = e // 32
        sc, mn = _scale_min_k4(b + 4, g, mask)
        qs = b + 16 if QT == 12 else b + 48
        q = (_u8(qs + (g // 2) * 32 + e % 32, mask) >> (4 * (g % 2))) & 15
        if QT == 13:
            q = q | (((_u8(b + 16 + e % 32, mask) >> g) & 1) << 4)
        d = _f16(b, mask) * sc.to(tl.float32)
        m = _f16(b + 2, mask) * mn.to(tl.float32)
        v = d * q.to(tl.float32) - m
    elif QT == 14:  # Q6_K
        r = e % 128
        lo = (_u8(b + (e // 128) * 64 + r % 64, mask) >> (4 * (r // 64))) & 15
        hi = (_u8(b + 128 + (e // 128) * 32 + r % 32, mask) >> (2 * (r // 32))) & 3
        sc = tl.load(b + 192 + e // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        f = _f16(b + 208, mask) * sc.to(tl.float32)
        v = f * ((lo | (hi << 4)) - 32).to(tl.float32)
    elif QT == 20:  # IQ4_NL
        idx = (_u8(b + 2 + e % 16, mask) >> (4 * (e // 16))) & 15
        v = _f16(b, mask) * tl.load(table + idx, mask=mask, other=0)
    elif QT == 23:  # IQ4_XS
        s = e // 32
        low = (_u8(b + 4 + s // 2, mask) >> (4 * (s % 2))) & 15
        sh = _u8(b + 2, mask) | (_u8(b + 3, mask) << 8)
        high = (sh >> (2 * s)) & 3
        dl = _f16(b, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        k = e % 32
        idx = (_u8(b + 8 + s * 16 + k % 16, mask) >> (4 * (k // 16))) & 15
        v = dl * tl.load(table + idx, mask=mask, other=0)
    elif QT == 1:  # F16
        v = _f16(b, mask)
    else:  # BF16 (30)
        bits = (_u8(b, mask) | (_u8(b + 1, mask) << 8)) << 16
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _qmatmul_kernel(
    x, w, y, table, T, N, K, row_bytes,
    QT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = w + rn[:, None].to(tl.int64) * row_bytes  # (BLOCK_N, 1) byte pointers
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < T) & (rk[None, :] < K), other=0.0)
        wmask = (rn[:, None] < N) & (rk[None, :] < K)
        wt = _decode(rows, rk[None, :], wmask, table, QT, BS, TS)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
    tl.store(y + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < T) & (rn[None, :] < N))


@triton.jit
def _dequant_kernel(
    w, y, table, N, K, row_bytes,
    QT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    v = _decode(w + rn[:, None].to(tl.int64) * row_bytes, rk[None, :], mask, table, QT, BS, TS)
    tl.store(y + rn[:, None] * K + rk[None, :], v, mask=mask)


_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    if device not in _TABLES:
        _TABLES[device] = torch.tensor(KVALUES, dtype=torch.float32, device=device)
    return _TABLES[device]


def _sizes(w: torch.Tensor, qtype: int, k: int) -> tuple[int, int]:
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if qtype not in SUPPORTED:
        raise ValueError(f"no Triton kernel for GGUF tensor type {qtype}")
    if w.dtype != torch.uint8 or w.dim() != 2 or k % bs or w.shape[1] != k // bs * ts or w.stride(1) != 1:
        raise ValueError(f"weight rows of {tuple(w.shape)} bytes do not hold {k} values of GGUF type {qtype}")
    return bs, ts


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T, W (n, row_bytes) GGUF blocks -> (t, n) float32."""
    bs, ts = _sizes(w, qtype, k)
    x = x.float().contiguous()
    t, n = x.shape[0], w.shape[0]
    y = torch.empty((t, n), dtype=torch.float32, device=x.device)
    block_m = 16 if t <= 16 else 64
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, 64))
    _qmatmul_kernel[grid](
        x, w, y, _table(x.device), t, n, k, w.stride(0), qtype, bs, ts,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
    )  # fmt: skip
    return y


def dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """W (n, row_bytes) GGUF blocks -> (n, k) float32."""
    bs, ts = _sizes(w, qtype, k)
    n = w.shape[0]
    y = torch.empty((n, k), dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 64))
    _dequant_kernel[grid](w, y, _table(w.device), n, k, w.stride(0), qtype, bs, ts, BLOCK_N=32, BLOCK_K=64)
    return y


SUPPORTED = frozenset(int(t) for t in (
    GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
    GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS,
))  # fmt: skip
