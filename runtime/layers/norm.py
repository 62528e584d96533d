"""RMS normalization, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch

from runtime import ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,).

    Gemma's (1 + w) is already folded into the GGUF weight by llama.cpp's converter,
    so every architecture multiplies by the stored weight as is. One fused op on the
    CPU (runtime/ops), the plain-torch reference elsewhere.
    """
    return ops.rms_norm(x, weight, eps)
