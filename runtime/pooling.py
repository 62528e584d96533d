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


def accumulate(acc: list[torch.Tensor], chunk: torch.Tensor, pooling: Pooling) -> None:
    """Fold one prefill chunk's final-norm states (n, hidden) into `acc`, keeping only what the
    pooling needs: every row for NONE, a running sum for MEAN, the first row for CLS, the latest for LAST."""
    if pooling is Pooling.NONE:
        acc.append(chunk)
    elif pooling is Pooling.MEAN:
        total = chunk.sum(dim=0, keepdim=True)
        acc[:] = [acc[0] + total if acc else total]
    elif pooling is Pooling.CLS:
        if not acc:
            acc.append(chunk[:1])
    elif pooling is Pooling.LAST:
        acc[:] = [chunk[-1:]]
    else:
        raise InvalidRequestError("rank pooling (reranking) is not supported")


def pooled(acc: list[torch.Tensor], pooling: Pooling, n_tokens: int) -> torch.Tensor:
    """The result of accumulate() over a whole prompt of n_tokens: (1, hidden), or (n_tokens, hidden) for NONE."""
    if pooling is Pooling.NONE:
        return torch.cat(acc)
    if pooling is Pooling.MEAN:
        return acc[0] / n_tokens
    return acc[0]


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
