"""Embedding pooling as llama.cpp does it: the type (GGUF `{arch}.pooling_type` or --pooling), pooling and normalization."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import torch

from runtime.errors import InvalidRequestError


class Pooling(enum.Enum):
    """llama.cpp's llama_pooling_type; the value is its number in GGUF metadata."""

    NONE = 0  # one vector per token
    MEAN = 1
    CLS = 2  # the first token's
    LAST = 3  # the last token's
    RANK = 4  # reranking heads: not supported

    @classmethod
    def parse(cls, name: str) -> Pooling:
        """--pooling's spelling: none | mean | cls | last | rank."""
        try:
            return cls[name.upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in cls)
            raise InvalidRequestError(f"unknown pooling type {name!r}; one of {names}") from None

    @classmethod
    def of_model(cls, metadata: Mapping[str, Any], arch: str) -> Pooling:
        """The model's own pooling type; none when it declares none (llama.cpp's default)."""
        v = metadata.get(f"{arch}.pooling_type")
        if isinstance(v, bool) or not isinstance(v, int):
            return cls.NONE
        try:
            return cls(v)
        except ValueError:  # -1 (unspecified) or unknown
            return cls.NONE


def pool(hidden: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(T, hidden) final-norm states of one sequence -> (1, hidden) pooled, or (T, hidden) for NONE."""
    if pooling is Pooling.NONE:
        return hidden
    if pooling is Pooling.MEAN:
        return hidden.mean(dim=0, keepdim=True)
    if pooling is Pooling.CLS:
        return hidden[:1]
    if pooling is Pooling.LAST:
        return hidden[-1:]
    raise InvalidRequestError("rank pooling (reranking) is not supported")


def normalize(vec: torch.Tensor, norm: int) -> torch.Tensor:
    """llama.cpp's common_embd_normalize on each row: -1 none, 0 max-abs to int16 range,
    1 taxicab, 2 Euclidean (the default), p > 2 the p-norm. A zero vector stays zero."""
    v = vec.double()
    if norm == -1:
        return vec.float()
    if norm == 0:
        scale = v.abs().amax(dim=-1, keepdim=True) / 32760.0
    elif norm == 2:
        scale = v.pow(2).sum(dim=-1, keepdim=True).sqrt()
    elif norm > 0:
        scale = v.abs().pow(norm).sum(dim=-1, keepdim=True).pow(1.0 / norm)
    else:
        raise InvalidRequestError(f"embd_normalize must be >= -1, got {norm}")
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (v * inv).float()
