"""Linear layers and the token embedding over dense weights (quantized ones come with runtime/ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    """y = x @ W^T + b with W (out, in) as llama.cpp stores it (ggml ne reversed)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, out)."""
        return F.linear(x, self.weight, self.bias)


class Embedding:
    """Row lookup in the (vocab, hidden) table; doubles as the output head when tied."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> (T, hidden)."""
        return F.embedding(ids, self.weight)

    def as_linear(self) -> Linear:
        return Linear(self.weight)
