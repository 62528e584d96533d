"""Our logits against transformers' GGUF loader on tiny random models of every architecture and many tensor types."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.forward_batch import ForwardBatch
from scripts.make_tiny_gguf import ARCHS, BOS_ID, FIRST_PIECE_ID, write_tiny_gguf

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4  # max |ours - HF| / max |HF logit|
CASES = (
    [(arch, "F32") for arch in ARCHS]
    + [("llama", t) for t in ("F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K")]
    + [("gemma3", t) for t in ("Q4_K", "Q8_0")]
)

# Small soft-caps so that tanh actually bends (the real 50 / 30 barely touch a tiny model).
WRITER_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {"attn_softcap": 5.0, "final_softcap": 3.0}
}
# transformers 5.23 reads no gemma2 soft-capping keys from GGUF (its config defaults are
# 50 / 30, what real files hold), so it is told the values the file was written with.
HF_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}
}


def _engine(path: Path) -> Engine:
    # HF computes in float32: so do our head and prompt GEMMs here (the defaults round their
    # operands to bfloat16 on the CPU; tests/test_quant_ops.py checks those products).
    return Engine(
        EngineConfig(model_path=str(path), n_ctx=256, n_parallel=2, head_dtype="float32", gemm_dtype="float32")
    )


def _sequences(vocab: int, lengths: Sequence[int] = (33, 24), seed: int = 0) -> list[list[int]]:
    """BOS + random pieces/bytes; longer than gemma's window (8) and than one KV block (16)."""
    g = torch.Generator().manual_seed(seed)
    return [[BOS_ID] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def _forward(engine: Engine, chunks: Sequence[Sequence[Sequence[int]]]) -> list[torch.Tensor]:
    """Run sequences through the model in steps (chunks[step][seq]); all logits of each sequence.

    Every step is one batched forward over all sequences, appending each one's next
    chunk to what the cache holds, as the scheduler's prefill chunks do.
    """
    n_seqs = len(chunks[0])
    total = [sum(len(step[i]) for step in chunks) for i in range(n_seqs)]
    tables = [engine.blocks.allocate(engine.blocks.blocks_needed(n, 0)) for n in total]
    done = [0] * n_seqs
    out: list[list[torch.Tensor]] = [[] for _ in range(n_seqs)]
    try:
        for step in chunks:
            batch = ForwardBatch.build(
                step, done, tables, engine.cfg.block_size, None, engine.loaded.device
            )
            batch = dataclasses.replace(batch, logits_indices=torch.arange(batch.num_tokens))
            logits = engine.runner.model.forward(batch, engine.runner.cache)
            for i, s in enumerate(batch.seqs):
                out[i].append(logits[s.start : s.start + s.n_new])
                done[i] += s.n_new
    finally:
        for t in tables:
            engine.blocks.free(t)
    return [torch.cat(parts) for parts in out]


def _score_alone(engine: Engine, seq: list[int]) -> torch.Tensor:
    blocks = engine.blocks.allocate(engine.blocks.blocks_needed(len(seq), 0))
    try:
        return engine.runner.score(seq, blocks)
    finally:
        engine.blocks.free(blocks)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def _hf_logits(path: Path, arch: str, seqs: list[list[int]]) -> list[torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        # eager: the reference path, and the only one with gemma2's attention soft-capping
        attn_implementation="eager",
        **HF_OVERRIDES.get(arch, {}),
    )
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float() for s in seqs]


@pytest.mark.parametrize(("arch", "qtype"), CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_logits_match_transformers(tmp_path: Path, arch: str, qtype: str) -> None:
    path = write_tiny_gguf(
        tmp_path / f"tiny-{arch}-{qtype}.gguf", arch, qtype, **WRITER_OVERRIDES.get(arch, {})
    )
    engine = _engine(path)
    assert engine.loaded.config.arch == arch
    seqs = _sequences(engine.loaded.config.vocab_size)

    batched = _forward(engine, [seqs])
    for seq, got in zip(seqs, batched):
        assert got.shape == (len(seq), engine.loaded.config.vocab_size)
        assert torch.isfinite(got).all()
        # Two different sequences in one batch must not see each other.
        assert _rel(got, _score_alone(engine, seq)) <= 1e-5

    for seq, got, ref in zip(seqs, batched, _hf_logits(path, arch, seqs)):
        rel = _rel(got, ref)
        assert rel <= REL_TOL, (
            f"{arch} {qtype}: max |ours - HF| / max |HF| = {rel:.2e} over {len(seq)} tokens"
        )


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_chunked_prefill_matches_one_shot(tmp_path: Path, arch: str) -> None:
    """Chunks of 5 (< the window of 8, not aligned with 16-token blocks) give the one-shot logits."""
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, **WRITER_OVERRIDES.get(arch, {}))
    engine = _engine(path)
    seqs = _sequences(engine.loaded.config.vocab_size, lengths=(30, 30), seed=1)
    one_shot = _forward(engine, [seqs])
    chunked = _forward(engine, [[s[i : i + 5] for s in seqs] for i in range(0, 30, 5)])
    for a, b in zip(one_shot, chunked):
        assert _rel(b, a) <= 1e-5


def test_writer_variants_load(tmp_path: Path) -> None:
    """The writer's other K-quants and knobs produce files our loader reads as intended."""
    for qtype in ("Q2_K", "Q3_K", "Q5_K", "Q4_1", "Q5_0"):
        path = write_tiny_gguf(tmp_path / f"llama-{qtype}.gguf", "llama", qtype, n_layers=1)
        cfg = _engine(path).loaded.config
        assert (cfg.arch, cfg.n_layers, cfg.vocab_size) == ("llama", 1, 512)
    path = write_tiny_gguf(
        tmp_path / "gemma3-pattern.gguf",
        "gemma3",
        n_layers=4,
        sliding_window_pattern=2,
        rope_base_swa=5000.0,
    )
    cfg = _engine(path).loaded.config
    assert cfg.sliding_layers == (True, False, True, False)
    assert cfg.rope_local is not None and cfg.rope_local.base == 5000.0 and cfg.rope.base == 1e6
    assert cfg.vocab_size > FIRST_PIECE_ID
