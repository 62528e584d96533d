"""Gated feed-forward activations: SwiGLU (silu) and GeGLU (tanh-approximated gelu)."""

from __future__ import annotations

import torch

from runtime import ops

KINDS = {"silu": False, "gelu_tanh": True}  # kind -> ops.gated's gelu flag


def gated(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up, both (T, ffn)."""
    if kind not in KINDS:
        raise ValueError(f"unknown activation {kind!r}")
    return ops.gated(gate, up, KINDS[kind])
