"""Rotary position embedding in llama.cpp's two layouts (NORM: adjacent pairs, NEOX: halves)."""

from __future__ import annotations

import torch

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
        """x (T, heads, head_dim) -> same shape, rotated in float32."""
        d = self.cfg.dim
        xf = x.float()
        rot, rest = xf[..., :d], xf[..., d:]
        if self.cfg.neox:
            x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.to(x.dtype)
