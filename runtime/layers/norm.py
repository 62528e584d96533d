"""RMS normalization, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,).

    Gemma's (1 + w) is already folded into the GGUF weight by llama.cpp's converter,
    so every architecture multiplies by the stored weight as is.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)
