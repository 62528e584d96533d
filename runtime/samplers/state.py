"""A request's mutable sampler state: its generator and seed, Mirostat's mu, the penalty history, its chain plan."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from runtime.errors import InvalidRequestError
from runtime.samplers.dry import Breakers, RepeatTracker
from runtime.samplers.vocab import SamplerVocab
from runtime.sampling_params import SamplingParams

# Stages that can move the argmax before the temperature stage (the others never drop the top token).
_MOVES_ARGMAX = frozenset({"penalties", "dry", "typ_p", "xtc"})


def stage_active(name: str, p: SamplingParams) -> bool:
    """Whether a stage of the chain does anything with these parameters (llama.cpp's no-op conditions)."""
    if name == "penalties":
        return p.repeat_last_n != 0 and (
            p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        )
    if name == "dry":
        return p.dry_multiplier != 0.0 and p.dry_penalty_last_n != 0
    if name == "top_n_sigma":
        return p.top_n_sigma > 0.0
    if name == "top_k":
        return p.top_k > 0
    if name == "typ_p":
        return p.typical_p < 1.0
    if name == "top_p":
        return p.top_p < 1.0
    if name == "min_p":
        return p.min_p > 0.0
    if name == "tfs_z":
        return p.tfs_z < 1.0
    if name == "xtc":
        return p.xtc_probability > 0.0 and p.xtc_threshold <= 0.5
    assert name == "temperature", name
    return p.temperature != 1.0 or p.dynatemp_range > 0.0


def chain_plan(p: SamplingParams) -> tuple[str, ...]:
    """The stages that run for this request, in order; ("mirostat",) replaces the chain when it is on.

    tfs_z, gone from llama.cpp's default order, runs right after top_k (its old
    place) when it is set but not named in `samplers`.
    """
    if p.mirostat:
        return ("mirostat",)
    order = list(p.samplers)
    if p.tfs_z < 1.0 and "tfs_z" not in order:
        after = [i + 1 for i, s in enumerate(order) if s == "top_k"]
        before = [i for i, s in enumerate(order) if s in ("typ_p", "top_p", "min_p", "temperature")]
        order.insert(after[0] if after else before[0] if before else len(order), "tfs_z")
    return tuple(s for s in order if stage_active(s, p))


def plan_is_greedy(plan: Sequence[str], p: SamplingParams) -> bool:
    """True when one argmax of the (biased) logits gives the token: a temperature stage that keeps only
    the top token comes before anything that could move it."""
    for s in plan:
        if s in _MOVES_ARGMAX or s == "mirostat":
            return False
        if s == "temperature":
            return p.temperature + max(p.dynatemp_range, 0.0) <= 0.0
    return False


@dataclass(eq=False)
class SamplerState:
    """Per-request sampler state; `sample` reads and advances it, one row per step."""

    params: SamplingParams
    seed: int  # the seed in use: params.seed, or the random one drawn for seed = -1
    generator: torch.Generator  # CPU; each step draws a fixed number of uniforms from it
    plan: tuple[str, ...]
    greedy: bool
    mu: float  # Mirostat's surprise threshold, starts at 2 * tau
    bias_ids: torch.Tensor | None = None  # (B,) int64: logit_bias, then end-of-generation bans
    bias_values: torch.Tensor | None = None  # (B,) float32
    newline_ids: torch.Tensor | None = None  # (L,) int64: kept out of the penalties (penalize_nl off)
    breakers: Breakers = field(default_factory=dict)
    # The history is penalty_prompt_tokens or the prompt, then every output token.
    window: deque[int] = field(default_factory=deque)  # penalties: its last repeat_last_n tokens (> 0)
    counts: dict[int, int] = field(default_factory=dict)  # occurrences in that window
    repeats: RepeatTracker | None = None  # DRY: the history and its repeat lengths
    n_outputs: int = 0  # output tokens already accepted into history

    @property
    def n_draws(self) -> int:
        """Uniforms drawn per step: one for the final draw, one for XTC's coin."""
        return 0 if self.greedy else 1 + ("xtc" in self.plan)

    @property
    def tracks_history(self) -> bool:
        return "penalties" in self.plan or "dry" in self.plan

    def accept(self, token_id: int) -> None:
        if self.repeats is not None:
            self.repeats.push(token_id)
        if "penalties" not in self.plan:
            return
        n = self.params.repeat_last_n  # -1: the whole history, nothing leaves the window
        if n > 0:
            if len(self.window) == n:
                old = self.window.popleft()
                self.counts[old] -= 1
                if not self.counts[old]:
                    del self.counts[old]
            self.window.append(token_id)
        self.counts[token_id] = self.counts.get(token_id, 0) + 1

    def sync(self, output_ids: Sequence[int]) -> None:
        """Accept the output tokens appended since the last step (the request's list is the truth)."""
        if self.tracks_history:
            for t in output_ids[self.n_outputs :]:
                self.accept(t)
        self.n_outputs = len(output_ids)

    def draw(self) -> torch.Tensor:
        """This step's uniforms in [0, 1): (n_draws,) float64, on the CPU."""
        return torch.rand(self.n_draws, generator=self.generator, dtype=torch.float64)


def _random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")  # 32 bits, as llama.cpp's seeds


def new_sampler_state(
    params: SamplingParams, prompt_token_ids: Sequence[int], vocab: SamplerVocab
) -> SamplerState:
    """Build a request's sampler state at admission; raises InvalidRequestError for ids outside the vocabulary."""
    seed = _random_seed() if params.seed < 0 else params.seed
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    plan = chain_plan(params)
    state = SamplerState(params, seed, gen, plan, plan_is_greedy(plan, params), 2.0 * params.mirostat_tau)
    bias = list(params.logit_bias)
    if params.ignore_eos:  # llama.cpp bans every end-of-generation token
        bias += [(t, float("-inf")) for t in sorted(vocab.eog_ids)]
    bad = next((t for t, _ in bias if t >= vocab.size), None)
    if bad is not None:
        raise InvalidRequestError(f"logit_bias: token id {bad} is out of range [0, {vocab.size})")
    if bias:
        state.bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.int64)
        state.bias_values = torch.tensor([b for _, b in bias], dtype=torch.float32)
    if "penalties" in plan and not params.penalize_nl:
        state.newline_ids = torch.tensor(vocab.newline_ids(), dtype=torch.int64)
    if "dry" in plan:
        state.breakers = vocab.dry_breakers(params.dry_sequence_breakers)
    if state.tracks_history:
        start = params.penalty_prompt_tokens
        start = tuple(prompt_token_ids) if start is None else start
        bad = next((t for t in start if not 0 <= t < vocab.size), None)
        if bad is not None:
            raise InvalidRequestError(f"penalty_prompt_tokens: token id {bad} is out of range [0, {vocab.size})")
        for t in start if "penalties" in plan else ():
            state.accept(int(t))
        if "dry" in plan:
            state.repeats = RepeatTracker(start)
    return state
