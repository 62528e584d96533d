"""Gated feed-forward activations: SwiGLU (silu) and GeGLU (tanh-approximated gelu)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up, both (T, ffn)."""
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {kind!r}")
