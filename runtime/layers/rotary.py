"""Rotary position embedding in llama.cpp's two layouts (NORM: adjacent pairs, NEOX: halves)."""

from __future__ import annotations

import torch

from runtime import ops
from runtime.config import RopeConfig


class Rotary:
    """Rotates the first `dim` channels of each head by position-dependent angles."""

    def __init__(self, cfg: RopeConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        half = cfg.dim // 2
        # inv_freq (dim/2,): base^(-2i/dim), optionally divided by llama3's per-frequency factors
        exponent = torch.arange(0, cfg.dim, 2, dtype=torch.int64).float() / cfg.dim
        inv_freq = 1.0 / (cfg.base**exponent)
        if cfg.freq_factors is not None:
            factors = torch.tensor(cfg.freq_factors, dtype=torch.float32)
            if factors.numel() != half:
                raise ValueError(f"rope_freqs has {factors.numel()} values, expected {half}")
            inv_freq = inv_freq / factors
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, 1, dim/2) in float32, shared by q and k."""
        pos = positions.to(torch.float32) / self.cfg.linear_factor
        angles = pos[:, None] * self.inv_freq[None, :]
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (T, heads, head_dim) -> same shape, rotated in float32 on the first `dim` channels."""
        return ops.rope(x, cos, sin, self.cfg.neox)
