"""ForwardBatch -> model -> sampler -> sampled tokens, over the KV cache it owns.

Under tensor parallelism (loaded.parallel) every rank has a runner over its shard and its
KV heads; rank 0's broadcasts each forward's inputs, which the others run (runtime/tp_worker.py).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

from runtime import kv_copy, ops
from runtime.config import EngineConfig
from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache
from runtime.loader import LoadedModel
from runtime.pooling import accumulate, pooled
from runtime.request import Request, TokenLogprob
from runtime.sampler import SampleRow, SamplerVocab, new_sampler_state, sample
from runtime.scheduler import SampledToken, SchedulerOutput
from runtime.step_message import Move

log = logging.getLogger(__name__)


# Steps of at most this many tokens run torch on one thread when the kernels have their own.
SMALL_STEP = 16


class ModelRunner:
    """Owns the model and its paged KV cache; executes one scheduled step at a time."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = cfg.block_size
        self.parallel = loaded.parallel
        # model.cfg: this rank's KV heads under tensor parallelism; each layer's KV on its device
        self.cache = KVCache(
            self.model.cfg, cfg.num_blocks, cfg.block_size, loaded.dtype, self.model.devices.layers
        )
        # llama.cpp's -t (generation) and -tb (prompt batches).
        self.threads = torch.get_num_threads()
        self.threads_batch = cfg.n_threads_batch or self.threads
        # With weights in blocks on the CPU, a small step's time is the quantized kernels',
        # which run on their own threads; torch's many tiny ops then run on one thread,
        # since each of its parallel regions waits for every thread (slow on a busy machine).
        self.kernel_threads = loaded.weights == "quant" and self.device.type == "cpu"
        self.gemm_dtype = cfg.gemm_dtype  # the kernels' prompt GEMMs: IEEE or on the bfloat16 units
        self.head_dtype = self.model.set_head_dtype(cfg.head_dtype)  # "auto" resolved
        # Decode rows are laid out first in each batch (ForwardBatch.decode_rows). A row's
        # kind, not the step's size, picks its numerics: a decode row computes the same beside
        # other requests' prompts as alone, and a prompt row the same beside decode rows.
        self.decode_dtype = self.model.set_decode_dtype(cfg.decode_dtype)

    def _gemm_precision(self) -> AbstractContextManager[None]:
        """--gemm-dtype for this forward: it only concerns the quantized CPU kernels."""
        return ops.gemm_precision(self.gemm_dtype) if self.kernel_threads else nullcontext()

    def _set_threads(self, num_tokens: int) -> None:
        small = num_tokens <= SMALL_STEP
        n = self.threads if small else self.threads_batch
        torch_threads = 1 if small and self.kernel_threads else n
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        if self.kernel_threads:
            ops.set_num_threads(n)

    def execute(self, sched: SchedulerOutput) -> list[SampledToken | None]:
        """Run one forward over every scheduled sequence; sample where a sequence asks for it."""
        moves = [(m.src, m.dst, m.delta) for m in sched.kv_moves]
        if not sched.seqs:
            self.forward(moves, None)
            return []
        new_tokens, computed, tables = [], [], []
        for s in sched.seqs:
            req = s.request
            start = req.num_computed_tokens
            new_tokens.append(req.token_ids[start : start + s.num_new])
            computed.append(start)
            tables.append(req.block_ids)
        # Embedding requests want no logits: their rows' hidden states are pooled instead.
        want = [s.sample and s.request.pooling is None for s in sched.seqs]
        # decode rows: the last generated token, fed back alone
        decode = [s.num_new == 1 and _feeds_output(s.request) for s in sched.seqs]
        batch = ForwardBatch.build(new_tokens, computed, tables, self.block_size, want, self.device, decode)
        hidden = self.forward(moves, batch)  # (T, hidden)
        last = hidden[batch.logits_indices]  # (N, hidden): the rows that sample
        with self._gemm_precision():
            pooled = self._pool(sched, batch, hidden)
            logits = self.model.logits(last) if any(want) else None
        rows = []
        for s, w in zip(sched.seqs, want):
            if not w:
                continue
            req = s.request
            if req.sampler_state is None:  # Engine.add_request builds it; lazily until then
                vocab = SamplerVocab.from_tokenizer(self.loaded.tokenizer)
                req.sampler_state = new_sampler_state(req.params, req.prompt_token_ids, vocab)
            rows.append(
                SampleRow(req.sampler_state, req.output_token_ids, req.logits_processors, req.grammar)
            )
        picked = iter(self._sample(last, logits, rows) if logits is not None else [])
        out: list[SampledToken | None] = []
        for i, w in enumerate(want):
            if w:
                got = next(picked)
                out.append(SampledToken(-1, error=got) if isinstance(got, str) else SampledToken(*got))
            elif i in pooled:
                out.append(SampledToken(-1, embedding=pooled[i]))
            else:
                out.append(None)
        return out

    def _sample(
        self, hidden: torch.Tensor, logits: torch.Tensor, rows: list[SampleRow]
    ) -> list[tuple[int, TokenLogprob | None] | str]:
        """Each row's (token, log-probs), or the message of the error that row raised.

        The rows are sampled together; if that raises (a logits processor, a grammar, a
        bug), each row is sampled alone from freshly computed logits (the batched try may
        have written into them) with its generator rewound, so one request's failure
        fails only that request and the others' seeded draws stay as they would be.
        hidden: the rows' final hidden states (N, hidden); logits (N, vocab).
        """
        saved = [(r.state.generator.get_state(), r.state.mu) for r in rows]
        try:
            with torch.inference_mode():  # logits is an inference tensor: written in place
                ids, logprobs = sample(logits, rows, owned=True)
            return list(zip(ids, logprobs))
        except Exception as e:
            if len(rows) == 1:
                log.exception("sampling failed")
                return [f"sampling failed: {type(e).__name__}: {e}"]
        log.warning("sampling %d rows together failed; sampling each alone", len(rows))
        for r, (state, mu) in zip(rows, saved):
            r.state.generator.set_state(state)
            r.state.mu = mu
        with self._gemm_precision():
            fresh = self.model.logits(hidden)
        out: list[tuple[int, TokenLogprob | None] | str] = []
        for i, r in enumerate(rows):
            try:
                with torch.inference_mode():
                    ids, logprobs = sample(fresh[i : i + 1], [r], owned=True)
                out.append((ids[0], logprobs[0]))
            except Exception as e:
                log.exception("sampling failed for request row %d", i)
                out.append(f"sampling failed: {type(e).__name__}: {e}")
        return out

    def forward(self, moves: list[Move], batch: ForwardBatch | None) -> torch.Tensor:
        """Apply the context shifts' KV moves, then run the batch to its final-norm hidden states (T, hidden).

        Rank 0 of a tensor-parallel group first sends both to the other ranks, which call
        this with what they receive.
        """
        if not moves and batch is None:
            return torch.empty(0)
        if self.parallel is not None and self.parallel.is_driver:
            self.parallel.send((moves, batch))  # packed on the CPU (runtime/step_message.py)
        for src, dst, delta in moves:  # context shifts: before anything this step writes
            s = torch.tensor(src, dtype=torch.int64, device=self.device)
            d = torch.tensor(dst, dtype=torch.int64, device=self.device)
            self.model.move_kv(self.cache, s, d, delta)
        if batch is None:
            return torch.empty(0)
        batch = batch.to(self.device)
        self._set_threads(batch.num_tokens)
        with self._gemm_precision():
            return self.model.hidden_states(batch, self.cache)

    def read_blocks(self, blocks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """CPU copies of KV blocks with every KV head of the model, per layer (len(blocks),
        block_size, kv_heads, head_dim): under tensor parallelism, gathered from the ranks."""
        if self.parallel is None:
            return self.cache.read_blocks(blocks)
        return kv_copy.read(self.cache, self.parallel, self.loaded.config, blocks)

    def write_blocks(self, blocks: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Store read_blocks()'s tensors into `blocks` (on every rank, each keeping its heads)."""
        if self.parallel is None:
            self.cache.write_blocks(blocks, k, v)
        else:
            kv_copy.write(self.cache, self.parallel, self.loaded.config, blocks, k, v)

    def close(self) -> None:
        """Rank 0 of a tensor-parallel group: let the other ranks leave their loop."""
        if self.parallel is not None:
            self.parallel.stop()

    def _pool(
        self, sched: SchedulerOutput, batch: ForwardBatch, hidden: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """Keep embedding requests' hidden states chunk by chunk; pool those whose prompt is done.

        -> {index in sched.seqs: pooled (1 or T, hidden) float32 on the CPU}.
        """
        out: dict[int, torch.Tensor] = {}
        for i, (s, part) in enumerate(zip(sched.seqs, batch.seqs)):
            req = s.request
            if req.pooling is None:
                continue
            if req.num_computed_tokens == 0:  # a fresh start (or a recompute after preemption)
                req.hidden_chunks = []
            chunk = hidden[part.start : part.start + part.n_new].float()  # (n_new, hidden)
            accumulate(req.hidden_chunks, chunk, req.pooling)
            if s.sample:  # the whole prompt is in
                out[i] = pooled(req.hidden_chunks, req.pooling, req.num_tokens).cpu()
                req.hidden_chunks = []
        return out

    @torch.inference_mode()
    def score(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one sequence (teacher forcing): (len, vocab) float32."""
        batch = ForwardBatch.build([token_ids], [0], [block_ids], self.block_size, None, self.device)
        rows = torch.arange(len(token_ids), device=self.device)
        batch = ForwardBatch(
            batch.token_ids, batch.positions, batch.slot_mapping, batch.block_tables, batch.seqs, rows
        )
        hidden = self.forward([], batch)  # (len, hidden)
        with self._gemm_precision():
            return self.model.logits(hidden)


def _feeds_output(req: Request) -> bool:
    """Whether the request's next token to compute is its latest generated one."""
    return bool(req.output_token_ids) and req.num_computed_tokens == req.num_tokens - 1
