"""Per-request generation parameters in llama.cpp's names and defaults, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """The sampler chain's settings for one request (llama.cpp's server defaults).

    temperature <= 0 means greedy. seed = -1 draws a random seed per request.
    n_predict = -1 generates until an end-of-generation token or the context is full.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1
    n_predict: int = -1
    ignore_eos: bool = False
    n_probs: int = 0  # top log-probs reported per generated token

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}: {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        for name in ("top_k", "seed", "n_predict", "n_probs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if not 0.0 <= self.top_p <= 1.0:
            raise bad("top_p", "must be in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.n_predict < -1:
            raise bad("n_predict", "must be -1 (unlimited) or >= 0")
        if not 0 <= self.n_probs <= 100:
            raise bad("n_probs", "must be in [0, 100]")
        if not -1 <= self.seed < 2**64:
            raise bad("seed", "must be -1 (random) or in [0, 2^64)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
