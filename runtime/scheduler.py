"""Token-level scheduling: which requests run this step and how many tokens each; no torch.

Each request has `num_computed_tokens` and `num_tokens`; a step gives it
min(remaining, budget) tokens, so prefill chunks and decodes are one code path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.block_manager import BlockManager
from runtime.request import Request, RequestOutput, Status, TokenLogprob


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    num_new: int  # tokens fed to the model this step
    sample: bool  # True when this step reaches the end of the known tokens: sample one


@dataclass(frozen=True)
class KVMove:
    """Copy cache slots src -> dst before this step's forward; keys re-rotated by `delta` positions."""

    src: tuple[int, ...]
    dst: tuple[int, ...]
    delta: int = 0


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...] = ()
    kv_moves: tuple[KVMove, ...] = ()


@dataclass(frozen=True)
class SampledToken:
    token_id: int  # -1 for an embedding request
    logprob: TokenLogprob | None = None
    embedding: Any = None  # an embedding request's pooled hidden states (a torch.Tensor)
    error: str | None = None  # sampling this request failed: it ends with this message


class Scheduler:
    """Waiting queue + running list under slot (`max_running`) and token (`token_budget`) limits."""

    def __init__(
        self,
        blocks: BlockManager,
        max_running: int,
        token_budget: int,
        max_seq_len: int,
        eog_ids: frozenset[int],
        context_shift: bool = True,
        n_keep_bos: int = 0,
    ) -> None:
        self.blocks = blocks
        self.context_shift = context_shift
        self.n_keep_bos = n_keep_bos  # llama.cpp keeps the BOS on top of n_keep when it adds one
        self.max_running = max_running
        self.token_budget = token_budget
        self.max_seq_len = max_seq_len
        self.eog_ids = eog_ids
        self.waiting: deque[Request] = deque()
        self.free_slots = set(range(max_running))  # llama.cpp's slots: the identity /slots shows
        self.running: list[Request] = []
        # The context each slot last held (tokens in the KV cache when its request ended):
        # what slot save writes and a restore fills in (llama.cpp's per-slot prompt cache).
        self.slot_tokens: dict[int, list[int]] = {}

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str, reason: str = "abort") -> Request | None:
        """End a request wherever it is (aborted, or stopped by its text); its blocks are freed now."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, reason)
                    return req
        return None

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        out: list[ScheduledSeq] = []
        preempted: list[str] = []
        moves: list[KVMove] = []
        for req in list(self.running):
            if budget == 0 or req not in self.running:
                continue
            if req.needs_shift:
                moves += self._shift(req)
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
        while budget > 0 and self.free_slots and not preempted:
            # First come, first served, except that a request pinned to a busy slot waits for it.
            nxt = next((r for r in self.waiting if r.id_slot < 0 or r.id_slot in self.free_slots), None)
            if nxt is None or not self._admit(nxt, budget):
                break
            req = nxt
            n = min(req.num_remaining, budget)
            self.waiting.remove(req)
            req.slot_id = req.id_slot if req.id_slot >= 0 else min(self.free_slots)
            self.free_slots.remove(req.slot_id)
            req.t_scheduled = req.t_scheduled or time.perf_counter()
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(ScheduledSeq(req, n, req.num_computed_tokens + n == req.num_tokens))
            budget -= n
        return SchedulerOutput(tuple(out), tuple(preempted), tuple(moves))

    def _admit(self, req: Request, budget: int) -> bool:
        """Give a waiting request its cached prefix and the blocks for its first chunk, or nothing."""
        bm = self.blocks
        # At least one token must be computed to get logits, so a prompt that is
        # entirely cached still recomputes its last token (in a fresh block).
        bm.hashes(req.token_ids, req.block_hashes)
        # An embedding request pools every token's hidden state, so it recomputes them all.
        full = 0 if req.pooling is not None else (req.num_tokens - 1) // bm.block_size
        hit = bm.match_prefix(req.block_hashes[:full])
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

    def _shift(self, req: Request) -> list[KVMove]:
        """llama.cpp's context shift: keep n_keep tokens, drop half of the rest, slide the tail down.

        The kept tail moves into fresh blocks (copy-on-write: the old ones may be
        shared or cached) with its keys re-rotated; when the pool has no room for
        the copy, the shortened context is recomputed instead.
        """
        bm, bs = self.blocks, self.blocks.block_size
        n_past = req.num_computed_tokens
        n_keep, n_discard = self._drop_tokens(req)
        new_len = n_past - n_discard
        j0 = n_keep // bs  # blocks before j0 hold only kept, unmoved tokens
        old = req.block_ids
        req.num_registered_blocks = min(req.num_registered_blocks, j0)
        need = bm.blocks_needed(new_len, j0)
        if need > bm.num_free:
            bm.free(old)
            req.block_ids, req.num_computed_tokens, req.num_registered_blocks = [], 0, 0
            return []
        new = bm.allocate(need)
        req.block_ids = old[:j0] + new
        req.num_computed_tokens = new_len

        def slot(blocks: list[int], first: int, p: int) -> int:
            return blocks[p // bs - first] * bs + p % bs

        # The moves read the old blocks before anything this step writes, so they can be freed now.
        copy = KVMove(
            tuple(slot(old, 0, p) for p in range(j0 * bs, n_keep)),
            tuple(slot(new, j0, p) for p in range(j0 * bs, n_keep)),
        )
        slide = KVMove(
            tuple(slot(old, 0, p + n_discard) for p in range(n_keep, new_len)),
            tuple(slot(new, j0, p) for p in range(n_keep, new_len)),
            -n_discard,
        )
        bm.free(old[j0:])
        return [m for m in (copy, slide) if m.src]

    def _drop_tokens(self, req: Request) -> tuple[int, int]:
        """Remove the discarded span from the request's context; -> (n_keep, n_discard)."""
        req.needs_shift = False
        n_keep = self._n_keep(req)
        n_left = req.num_computed_tokens - n_keep
        n_discard = min(req.params.n_discard or n_left // 2, n_left)
        req.token_ids[n_keep : n_keep + n_discard] = []
        req.num_shifted_tokens += n_discard
        req.block_hashes[n_keep // self.blocks.block_size :] = []
        return n_keep, n_discard

    def _n_keep(self, req: Request) -> int:
        n_keep = req.params.n_keep
        if n_keep is None:
            n_keep = 0
        elif n_keep < 0:
            return min(len(req.prompt_token_ids), req.num_computed_tokens)
        return min(n_keep + self.n_keep_bos, req.num_computed_tokens)

    def _can_shift(self, req: Request) -> bool:
        return self.context_shift and req.num_computed_tokens - self._n_keep(req) >= 2

    def _register(self, req: Request) -> None:
        """Name the blocks this step filled, so later requests can share them."""
        full = req.num_computed_tokens // self.blocks.block_size
        # Re-rotated keys are close to, not equal to, freshly computed ones: a shifted
        # context stays out of the prefix cache.
        if full <= req.num_registered_blocks or req.num_shifted_tokens:
            return
        self.blocks.hashes(req.token_ids, req.block_hashes)
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
        if req.needs_shift:  # shift the tokens now: the recompute does the rest
            self._drop_tokens(req)
        self.running.remove(req)
        self._release_slot(req)
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
            if tok.error is not None:  # only this request fails; its blocks are freed now
                slot = req.slot_id
                self.running.remove(req)
                self._finish(req, "error")
                outputs.append(
                    RequestOutput(
                        req.request_id, (), finished=True, finish_reason="error", error=tok.error,
                        num_prompt_tokens=len(req.prompt_token_ids), slot_id=slot,
                    )
                )  # fmt: skip
                continue
            if req.params.n_predict == 0:
                # llama.cpp evaluates the prompt (warming the cache) and generates nothing.
                new: tuple[int, ...] = ()
                reason: str | None = "length"
            else:
                req.append_output(tok.token_id)
                req.t_last_token = time.perf_counter()
                req.t_first_token = req.t_first_token or req.t_last_token
                new, reason = (tok.token_id,), self._stop_reason(req, tok.token_id)
            slot = req.slot_id
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
                    slot_id=slot,
                    truncated=req.num_shifted_tokens > 0,
                    timings=req.timings(),
                    embedding=tok.embedding,
                )
            )
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        if token in self.eog_ids and not req.params.ignore_eos:
            return "stop"
        if req.grammar is not None:  # a complete grammar ends the request as its EOS would
            req.grammar.sync(req.output_token_ids)
            if req.grammar.is_done():
                return "stop"
        n_predict = req.params.n_predict
        if 0 <= n_predict <= len(req.output_token_ids):
            return "length"
        if req.num_tokens >= self.max_seq_len:
            if not self._can_shift(req):
                return "length"
            req.needs_shift = True
        return None

    def _release_slot(self, req: Request) -> None:
        if req.slot_id >= 0:
            self.free_slots.add(req.slot_id)
            req.slot_id = -1

    def slot_context(self, slot: int) -> list[int]:
        """The tokens a slot holds in the cache: its running request's, else its last one's."""
        for req in self.running:
            if req.slot_id == slot:
                return req.token_ids[: req.num_computed_tokens]
        return self.slot_tokens.get(slot, [])

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot_id >= 0:
            self.slot_tokens[req.slot_id] = req.token_ids[: req.num_computed_tokens]
        self._release_slot(req)
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = reason
