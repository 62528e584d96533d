"""The plain-torch reference of every custom op: quantized ones dequantize the blocks, then ordinary torch math.

Runs on any device; the compiled kernels (CPU, CUDA) are tested against it.
"""

from __future__ import annotations

import torch

from runtime.gguf.quants import quant_type


def dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """w (n, row_bytes) uint8 GGUF blocks -> (n, k) float32."""
    qt = quant_type(qtype)
    n = w.shape[0]
    blocks = w.contiguous().view(n * (k // qt.block_size), qt.type_size)
    return qt.dequantize_blocks(blocks).reshape(n, k)


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with W (n, row_bytes) in GGUF blocks -> (t, n) float32."""
    return torch.nn.functional.linear(x.float(), dequantize(w, qtype, k))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,), in float32; returns x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x (T, H, D) rotated on its first 2 * half channels by cos/sin (T, 1, half), in float32.

    NEOX pairs channel i with i + half, NORM pairs 2i with 2i + 1; the rest is kept.
    """
    d = 2 * cos.shape[-1]
    xf = x.float()
    rot, rest = xf[..., :d], xf[..., d:]
    if neox:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rest.shape[-1]:
        out = torch.cat((out, rest), dim=-1)
    return out.to(x.dtype)
