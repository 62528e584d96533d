"""Per-request state inside the engine, and the RequestOutput deltas it hands to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the top alternatives (raw, pre-sampling)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a delta, not the whole text."""

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end-of-generation token) | "length" | "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass
class Request:
    """A prompt being generated: token ids, how many are in the KV cache, its blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Prefix hashes of the full blocks of all_token_ids known so far, and how many of
    # this request's blocks are registered in the prefix cache.
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens not yet in the cache (the whole prompt at first, then 1 per decode)."""
        return self.num_tokens - self.num_computed_tokens
