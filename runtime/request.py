"""Per-request state inside the engine, and the RequestOutput deltas it hands to callers."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from runtime.grammar_matcher import GrammarMatcher
    from runtime.pooling import Pooling
    from runtime.samplers.state import SamplerState

# (output token ids so far, logits (V,)) -> logits (V,); runs before every sampler (constrained decoding).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


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
class Timings:
    """llama.cpp's per-request timings: prompt processing and generation, in tokens and milliseconds."""

    prompt_n: int  # prompt tokens computed (cached ones excluded)
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    cache_n: int = 0  # prompt tokens reused from the prefix cache

    @staticmethod
    def _rate(n: int, ms: float) -> tuple[float, float]:
        return (ms / n if n else 0.0), (1e3 * n / ms if ms > 0 else 0.0)

    def as_dict(self) -> dict[str, float | int]:
        p_tok, p_sec = self._rate(self.prompt_n, self.prompt_ms)
        g_tok, g_sec = self._rate(self.predicted_n, self.predicted_ms)
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": p_tok,
            "prompt_per_second": p_sec,
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": g_tok,
            "predicted_per_second": g_sec,
        }


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a delta, not the whole text."""

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end-of-generation token) | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    slot_id: int = -1  # the slot that ran it (llama.cpp's id_slot)
    truncated: bool = False  # the context was shifted or the prompt truncated (llama.cpp's truncated)
    text: str = ""  # new text: complete UTF-8 only, held back while it may begin a stop string
    stop_word: str | None = None  # the stop string that ended the request, if one did
    timings: Timings | None = None
    # An embedding request's result: (1, hidden) pooled, or (prompt tokens, hidden) for pooling
    # none; final-norm hidden states, float32 on the CPU, not normalized.
    embedding: torch.Tensor | None = None
    error: str | None = None  # finish_reason "error": what went wrong (this request alone failed)


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
    id_slot: int = -1  # a slot asked for by the caller; -1: any idle slot
    finish_reason: str | None = None
    sampler_state: SamplerState | None = None  # runtime.sampler.new_sampler_state, built at admission
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # Set for an embedding request: prompt prefill only (no prefix-cache reuse: every token's
    # hidden state is needed), then its pooled final-norm hidden states instead of a token.
    pooling: Pooling | None = None
    hidden_chunks: list[torch.Tensor] = field(default_factory=list)  # runtime.pooling.accumulate's state
    grammar: GrammarMatcher | None = None  # its grammar or JSON schema (runtime.grammar), built at admission
    # perf_counter() stamps: first scheduled, first token sampled, latest token sampled.
    t_scheduled: float = 0.0
    t_first_token: float = 0.0
    t_last_token: float = 0.0

    def timings(self) -> Timings:
        first = self.t_first_token or self.t_last_token
        prompt_ms = 1e3 * (first - self.t_scheduled) if self.t_scheduled and first else 0.0
        predicted_ms = 1e3 * (self.t_last_token - first) if first else 0.0
        return Timings(
            len(self.prompt_token_ids) - self.num_cached_tokens,
            prompt_ms,
            len(self.output_token_ids),
            predicted_ms,
            self.num_cached_tokens,
        )

    def __post_init__(self) -> None:
        # The context the KV cache holds: the prompt, then each output token, minus
        # whatever context shifts dropped. Position i of the model is token_ids[i].
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_shifted_tokens = 0  # tokens dropped from the context by shifts (llama.cpp's truncated)
        self.needs_shift = False  # the context is full: shift before the next step
        self.slot_id = -1  # the slot it runs in (llama.cpp's id_slot), -1 while waiting

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens not yet in the cache (the whole prompt at first, then 1 per decode)."""
        return self.num_tokens - self.num_computed_tokens
