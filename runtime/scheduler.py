"""Token-level scheduling: which requests run this step and how many tokens each; no torch.

Each request has `num_computed_tokens` and `num_tokens`; a step gives it
min(remaining, budget) tokens, so prefill chunks and decodes are one code path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.block_manager import BlockManager
from runtime.request import Request, RequestOutput, Status, TokenLogprob


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    num_new: int  # tokens fed to the model this step
    sample: bool  # True when this step reaches the end of the known tokens: sample one


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...] = ()


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


class Scheduler:
    """Waiting queue + running list under slot (`max_running`) and token (`token_budget`) limits."""

    def __init__(
        self,
        blocks: BlockManager,
        max_running: int,
        token_budget: int,
        max_seq_len: int,
        eog_ids: frozenset[int],
    ) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.token_budget = token_budget
        self.max_seq_len = max_seq_len
        self.eog_ids = eog_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, "abort")
                    return req
        return None

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        out: list[ScheduledSeq] = []
        preempted: list[str] = []
        for req in list(self.running):
            if budget == 0 or req not in self.running:
                continue
            n = min(req.num_remaining, budget)
            while not self._reserve(req, n):
                victim = self.running[-1]  # the latest admitted gives way
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req in self.running:
                out.append(ScheduledSeq(req, n, req.num_computed_tokens + n == req.num_tokens))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running and not preempted:
            req = self.waiting[0]
            if not self._admit(req, budget):
                break
            n = min(req.num_remaining, budget)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(ScheduledSeq(req, n, req.num_computed_tokens + n == req.num_tokens))
            budget -= n
        return SchedulerOutput(tuple(out), tuple(preempted))

    def _admit(self, req: Request, budget: int) -> bool:
        """Give a waiting request its cached prefix and the blocks for its first chunk, or nothing."""
        bm = self.blocks
        # At least one token must be computed to get logits, so a prompt that is
        # entirely cached still recomputes its last token (in a fresh block).
        bm.hashes(req.all_token_ids, req.block_hashes)
        hit = bm.match_prefix(req.block_hashes[: (req.num_tokens - 1) // bm.block_size])
        start = len(hit) * bm.block_size
        n = min(req.num_tokens - start, budget)
        need = bm.blocks_needed(start + n, len(hit))
        if need > bm.num_free_after_taking(hit):
            return False
        bm.take(hit)
        req.block_ids = hit + bm.allocate(need)
        req.num_computed_tokens = start
        req.num_registered_blocks = len(hit)
        if req.num_cached_tokens == 0:  # a preempted request keeps its first figure
            req.num_cached_tokens = start
            bm.hit_tokens += start
            bm.query_tokens += len(req.prompt_token_ids)
        return True

    def _register(self, req: Request) -> None:
        """Name the blocks this step filled, so later requests can share them."""
        full = req.num_computed_tokens // self.blocks.block_size
        if full <= req.num_registered_blocks:
            return
        self.blocks.hashes(req.all_token_ids, req.block_hashes)
        for j in range(req.num_registered_blocks, full):
            self.blocks.cache(req.block_ids[j], req.block_hashes[j])
        req.num_registered_blocks = full

    def _reserve(self, req: Request, n: int) -> bool:
        need = self.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        if need > self.blocks.num_free:
            return False
        req.block_ids += self.blocks.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        """Free its blocks and requeue it at the front; it recomputes from scratch later."""
        self.running.remove(req)
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def update(
        self, sched: SchedulerOutput, sampled: Sequence[SampledToken | None]
    ) -> list[RequestOutput]:
        """Advance each scheduled request by its step; `sampled[i]` is set where seq i sampled."""
        outputs: list[RequestOutput] = []
        for seq, tok in zip(sched.seqs, sampled):
            req = seq.request
            req.num_computed_tokens += seq.num_new
            if req.status is not Status.RUNNING:
                continue
            self._register(req)
            if tok is None:
                continue
            if req.params.n_predict == 0:
                # llama.cpp evaluates the prompt (warming the cache) and generates nothing.
                new: tuple[int, ...] = ()
                reason: str | None = "length"
            else:
                req.output_token_ids.append(tok.token_id)
                new, reason = (tok.token_id,), self._stop_reason(req, tok.token_id)
            if reason:
                self.running.remove(req)
                self._finish(req, reason)
            outputs.append(
                RequestOutput(
                    req.request_id,
                    new,
                    (tok.logprob,) if tok.logprob and new else (),
                    finished=reason is not None,
                    finish_reason=reason,
                    num_prompt_tokens=len(req.prompt_token_ids),
                    num_output_tokens=len(req.output_token_ids),
                    num_cached_tokens=req.num_cached_tokens,
                )
            )
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        if token in self.eog_ids and not req.params.ignore_eos:
            return "stop"
        n_predict = req.params.n_predict
        if 0 <= n_predict <= len(req.output_token_ids) or req.num_tokens >= self.max_seq_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = reason
