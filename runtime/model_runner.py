"""ForwardBatch -> model -> sampler -> sampled tokens, over the KV cache it owns."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from runtime import ops
from runtime.config import EngineConfig
from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache
from runtime.loader import LoadedModel
from runtime.pooling import accumulate, pooled
from runtime.sampler import SampleRow, SamplerVocab, new_sampler_state, sample
from runtime.scheduler import SampledToken, SchedulerOutput

# Steps of at most this many tokens run torch on one thread when the kernels have their own.
SMALL_STEP = 16


class ModelRunner:
    """Owns the model and its paged KV cache; executes one scheduled step at a time."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = cfg.block_size
        self.cache = KVCache(loaded.config, cfg.num_blocks, cfg.block_size, loaded.dtype, self.device)
        # llama.cpp's -t (generation) and -tb (prompt batches).
        self.threads = torch.get_num_threads()
        self.threads_batch = cfg.n_threads_batch or self.threads
        # With weights in blocks on the CPU, a small step's time is the quantized kernels',
        # which run on their own threads; torch's many tiny ops then run on one thread,
        # since each of its parallel regions waits for every thread (slow on a busy machine).
        self.kernel_threads = loaded.weights == "quant" and self.device.type == "cpu"
        self.gemm_dtype = cfg.gemm_dtype  # the kernels' prompt GEMMs: IEEE or on the bfloat16 units

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
        for m in sched.kv_moves:  # context shifts: before anything this step writes
            src = torch.tensor(m.src, dtype=torch.int64, device=self.device)
            dst = torch.tensor(m.dst, dtype=torch.int64, device=self.device)
            self.model.move_kv(self.cache, src, dst, m.delta)
        if not sched.seqs:
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
        batch = ForwardBatch.build(new_tokens, computed, tables, self.block_size, want, self.device)
        self._set_threads(len(batch.token_ids))
        with self._gemm_precision():
            hidden = self.model.hidden_states(batch, self.cache)  # (T, hidden)
            pooled = self._pool(sched, batch, hidden)
            logits = self.model.logits(hidden[batch.logits_indices]) if any(want) else None
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
        with torch.inference_mode():  # logits is an inference tensor: written in place
            ids, logprobs = sample(logits, rows, owned=True) if logits is not None else ([], [])
        picked = iter(zip(ids, logprobs))
        out: list[SampledToken | None] = []
        for i, w in enumerate(want):
            if w:
                t, lp = next(picked)
                out.append(SampledToken(t, lp))
            elif i in pooled:
                out.append(SampledToken(-1, embedding=pooled[i]))
            else:
                out.append(None)
        return out

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
        self._set_threads(len(token_ids))
        with self._gemm_precision():
            return self.model.forward(batch, self.cache)
