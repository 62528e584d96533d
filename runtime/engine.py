"""Engine.step() = schedule -> execute -> update: continuous batching over one loaded model."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from runtime.block_manager import BlockManager
from runtime.config import EngineConfig
from runtime.errors import EngineError, InvalidRequestError, NotSupportedError, QueueFullError
from runtime.grammar import GrammarCache
from runtime.loader import LoadedModel, load_for
from runtime.model_runner import ModelRunner
from runtime.pooling import Pooling
from runtime.request import Request, RequestOutput, Status
from runtime.sampler import SamplerVocab, new_sampler_state
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler
from runtime.slot_store import SlotStore
from runtime.stop_checker import StopChecker

# What an embedding request runs with: its prompt is evaluated, nothing is generated.
EMBEDDING_PARAMS = SamplingParams(n_predict=0)
EMBEDDINGS_OFF = "This server does not support embeddings. Start it with `--embeddings`"


@dataclass(frozen=True)
class EngineStats:
    """Counters the APIs expose (/metrics, /slots, health)."""

    requests_processing: int
    requests_deferred: int
    prompt_tokens_total: int  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens_total: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    kv_cache_usage_ratio: float
    kv_cache_tokens: int  # tokens held by running requests
    kv_cache_capacity_tokens: int
    steps_total: int
    busy_seconds: float  # time spent in step()
    preemptions_total: int


class Engine:
    """Synchronous core shared by every API: add requests, step, read deltas."""

    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        if cfg.n_threads:
            torch.set_num_threads(cfg.n_threads)
        self.loaded = loaded or load_for(cfg)
        self.tokenizer = self.loaded.tokenizer
        self.sampler_vocab = SamplerVocab.from_tokenizer(self.tokenizer)
        self.grammars = GrammarCache(self.tokenizer)  # compiled grammars and schemas, by text
        self.runner = ModelRunner(self.loaded, cfg)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        # A sequence may use the whole pool when alone (the pool is shared, paged).
        self.max_seq_len = min(cfg.num_blocks * cfg.block_size, self.loaded.config.context_length)
        self.scheduler = Scheduler(
            self.blocks,
            cfg.n_parallel,
            cfg.n_batch,
            self.max_seq_len,
            self.tokenizer.eog_ids,
            context_shift=cfg.context_shift,
            n_keep_bos=int(self.tokenizer.add_bos),
        )
        # --pooling, else the model's {arch}.pooling_type, else none (llama.cpp's choice).
        self.pooling = (
            Pooling.parse(cfg.pooling)
            if cfg.pooling is not None
            else Pooling.of_model(self.loaded.gguf.metadata, self.loaded.config.arch)
        )
        self.slot_store = SlotStore(cfg.slot_save_path) if cfg.slot_save_path else None
        self.requests: dict[str, Request] = {}
        self._text: dict[str, StopChecker] = {}
        self._ids = itertools.count()
        self._counters = {"prompt": 0, "generated": 0, "steps": 0, "preempted": 0}
        self._busy = 0.0

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        id_slot: int = -1,
    ) -> str:
        """Queue a prompt; raises InvalidRequestError (nothing queued) when it cannot run.

        id_slot pins the request to one of the n_parallel slots (it waits for that
        slot); -1 takes whichever is idle first.
        """
        if isinstance(id_slot, bool) or not isinstance(id_slot, int) or not -1 <= id_slot < self.cfg.n_parallel:
            raise InvalidRequestError(f"id_slot must be -1 or in [0, {self.cfg.n_parallel}), got {id_slot!r}")
        ids = self._checked_ids(prompt_token_ids, request_id)
        truncated = 0
        if len(ids) >= self.max_seq_len:
            ids, truncated = self._truncate(ids, params)
        state = new_sampler_state(params, ids, self.sampler_vocab)  # validates ids in logit_bias etc.
        rid = self._new_id(request_id)
        # Compiled already (AsyncEngine does it off this thread) unless called directly.
        grammar = self.grammars.matcher(params)
        req = Request(rid, ids, params, sampler_state=state, id_slot=id_slot, grammar=grammar)
        req.num_shifted_tokens = truncated
        return self._queue(req)

    def add_embedding(self, prompt_token_ids: Sequence[int], request_id: str | None = None) -> str:
        """Queue an embedding request: its prompt is evaluated in batches with the others, and its
        one finished RequestOutput carries the pooled final-norm hidden states (`embedding`)."""
        pooling = self.embedding_pooling()
        ids = self._checked_ids(prompt_token_ids, request_id)
        if len(ids) > self.max_seq_len:
            raise InvalidRequestError(
                f"the input has {len(ids)} tokens; the context holds {self.max_seq_len}"
            )
        req = Request(self._new_id(request_id), ids, EMBEDDING_PARAMS, pooling=pooling)
        return self._queue(req)

    def embedding_pooling(self) -> Pooling:
        """The pooling embedding requests get; raises when the server does not do embeddings."""
        if not self.cfg.embeddings:
            raise NotSupportedError(EMBEDDINGS_OFF)
        if self.pooling is Pooling.RANK:
            raise NotSupportedError("rank pooling (reranking) is not supported")
        return self.pooling

    def _checked_ids(self, prompt_token_ids: Sequence[int], request_id: str | None) -> list[int]:
        if request_id is not None and request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range [0, {vocab})")
        if self.cfg.max_queue and self.num_queued >= self.cfg.max_queue:
            raise QueueFullError(
                f"the server is busy: {self.num_queued} requests are waiting for a slot"
            )
        return ids

    def _new_id(self, request_id: str | None) -> str:
        return request_id if request_id is not None else f"req-{next(self._ids)}"

    def _queue(self, req: Request) -> str:
        self._text[req.request_id] = StopChecker(self.tokenizer, req.params.stop)
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def _truncate(self, ids: list[int], params: SamplingParams) -> tuple[list[int], int]:
        """A prompt that fills the context: an error, or llama.cpp's truncation when n_keep asks for it.

        Truncation keeps the first n_keep tokens and drops whole halves of the
        remaining room from what follows, so the prompt ends as it did.
        """
        n_ctx = self.max_seq_len
        too_long = f"the prompt has {len(ids)} tokens; the context holds {n_ctx}"
        if params.n_keep is None or not self.cfg.context_shift:
            raise InvalidRequestError(f"{too_long} (set n_keep to truncate it)")
        n_keep = len(ids) if params.n_keep < 0 else params.n_keep
        block = (n_ctx - n_keep) // 2
        if block <= 0:
            raise InvalidRequestError(f"{too_long}, and n_keep={n_keep} leaves no room to truncate")
        erased = (len(ids) - n_keep - block) // block * block
        return ids[:n_keep] + ids[n_keep + erased :], erased

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        self._text.pop(request_id, None)
        return req is not None

    def unfinished_ids(self) -> list[str]:
        return list(self.requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled batch; the deltas it produced, text included."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self._counters["preempted"] += len(sched.preempted)
        if not sched.seqs:
            return []
        sampled = self.runner.execute(sched)
        outputs = [self._with_text(o) for o in self.scheduler.update(sched, sampled)]
        for seq in sched.seqs:  # prompt tokens computed this step (update() has advanced them)
            after, n_prompt = seq.request.num_computed_tokens, len(seq.request.prompt_token_ids)
            self._counters["prompt"] += max(0, min(after, n_prompt) - (after - seq.num_new))
        self._counters["generated"] += sum(len(o.new_token_ids) for o in outputs)
        self._counters["steps"] += 1
        for o in outputs:
            if o.finished:
                self.requests.pop(o.request_id, None)
                self._text.pop(o.request_id, None)
        self._busy += time.perf_counter() - t0
        return outputs

    def _with_text(self, o: RequestOutput) -> RequestOutput:
        """Decode the delta's tokens; a stop string ends the request here, freeing its blocks."""
        checker = self._text[o.request_id]
        eog_stop = o.finish_reason == "stop"
        last = len(o.new_token_ids) - 1
        text = "".join(
            checker.push(t)
            for i, t in enumerate(o.new_token_ids)
            # The end-of-generation token that stopped the request is not part of the text
            # (a completed grammar stops on its last token, which is).
            if not (eog_stop and i == last and t in self.tokenizer.eog_ids)
        )
        if checker.stopped and not o.finished:
            req = self.scheduler.abort(o.request_id, reason="stop")
            assert req is not None
            o = replace(o, finished=True, finish_reason="stop", timings=req.timings())
        if o.finished:
            text += checker.finish()
        return replace(o, text=text, stop_word=checker.stop_word)

    def stats(self) -> EngineStats:
        bm, sched = self.blocks, self.scheduler
        return EngineStats(
            requests_processing=len(sched.running),
            requests_deferred=len(sched.waiting),
            prompt_tokens_total=self._counters["prompt"],
            generation_tokens_total=self._counters["generated"],
            prefix_cache_hit_tokens=bm.hit_tokens,
            prefix_cache_query_tokens=bm.query_tokens,
            kv_cache_usage_ratio=bm.usage,
            kv_cache_tokens=sum(r.num_computed_tokens for r in sched.running),
            kv_cache_capacity_tokens=bm.num_blocks * bm.block_size,
            steps_total=self._counters["steps"],
            busy_seconds=self._busy,
            preemptions_total=self._counters["preempted"],
        )

    def generate(
        self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Run prompts to completion together; returns each one's generated ids, in order."""
        prompts = list(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        out: dict[str, list[int]] = {r: [] for r in rids}
        while self.has_unfinished():
            for o in self.step():
                if o.error is not None:
                    for r in rids:
                        self.abort(r)
                    raise EngineError(o.error)
                out[o.request_id].extend(o.new_token_ids)
        return [out[r] for r in rids]

    def warm_up(self, prompt_tokens: int = 24) -> float:
        """A short prompt and a one-token step through the model before serving, as llama.cpp
        warms up: first-use costs land here instead of on the first request. Nothing stays
        behind (no cache entries, counters or slot state). Returns the seconds it took."""
        t0 = time.perf_counter()
        first = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0
        for n in (max(1, min(prompt_tokens, self.max_seq_len - 1)), 1):  # the GEMM path, then the row kernels
            blocks = self.blocks.allocate(self.blocks.blocks_needed(n, 0))
            try:
                self.runner.score([first] * n, blocks)
            finally:
                self.blocks.free(blocks)
        return time.perf_counter() - t0

    @property
    def num_queued(self) -> int:
        """Waiting requests beyond the idle slots (those the next step cannot admit)."""
        return max(0, len(self.scheduler.waiting) - len(self.scheduler.free_slots))

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def status(self, request_id: str) -> Status | None:
        req = self.requests.get(request_id)
        return req.status if req else None
