"""Engine.step() = schedule -> execute -> update: continuous batching over one loaded model."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch

from runtime.block_manager import BlockManager
from runtime.config import EngineConfig
from runtime.errors import InvalidRequestError
from runtime.loader import LoadedModel, load_model
from runtime.model_runner import ModelRunner
from runtime.request import Request, RequestOutput, Status
from runtime.sampler import make_generator
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler


class Engine:
    """Synchronous core shared by every API: add requests, step, read deltas."""

    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        if cfg.n_threads:
            torch.set_num_threads(cfg.n_threads)
        self.loaded = loaded or load_model(cfg.model_path, cfg.torch_dtype, cfg.device)
        self.tokenizer = self.loaded.tokenizer
        self.runner = ModelRunner(self.loaded, cfg)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        # A sequence may use the whole pool when alone (the pool is shared, paged).
        self.max_seq_len = min(cfg.num_blocks * cfg.block_size, self.loaded.config.context_length)
        self.scheduler = Scheduler(
            self.blocks, cfg.n_parallel, cfg.n_batch, self.max_seq_len, self.tokenizer.eog_ids
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> str:
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range [0, {vocab})")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_seq_len}"
            )
        rid = f"req-{next(self._ids)}"
        gen = None if params.greedy else make_generator(params.seed)
        req = Request(rid, ids, params, generator=gen)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return []
        sampled = self.runner.execute(sched)
        outputs = self.scheduler.update(sched, sampled)
        for o in outputs:
            if o.finished:
                self.requests.pop(o.request_id, None)
        return outputs

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
                out[o.request_id].extend(o.new_token_ids)
        return [out[r] for r in rids]

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def status(self, request_id: str) -> Status | None:
        req = self.requests.get(request_id)
        return req.status if req else None
