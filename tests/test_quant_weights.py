"""Weights kept in GGUF blocks (--weights quant): the same model as dense weights, in the file's bytes."""

from __future__ import annotations

import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.layers.linear import Linear, QuantLinear, QuantWeight
from runtime.loader import load_model
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import BOS_ID, write_tiny_gguf

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16"]


def _projections(model) -> list:
    return [getattr(layer, n) for layer in model.layers for n in ("q", "k", "v", "o", "gate", "up", "down")]


def _decode_logits(
    path, weights: str, head_dtype: str = "float32", decode_dtype: str = "float32", gemm_dtype: str = "float32"
) -> torch.Tensor:
    """Logits of 6 decode steps of 3 sequences at once: the small-batch (matrix-vector) kernels.
    Rows 0-2 are the prompts' step, then 3 per decode step. Prompts in float32 unless told."""
    cfg = EngineConfig(
        model_path=str(path), n_ctx=256, n_parallel=3, weights=weights, head_dtype=head_dtype,
        decode_dtype=decode_dtype, gemm_dtype=gemm_dtype,
    )  # fmt: skip
    engine = Engine(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = [[BOS_ID] + torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 19, 11)]
    seen: list[torch.Tensor] = []
    logits = engine.runner.model.logits

    def spy(x):
        out = logits(x)
        seen.append(out.clone())
        return out

    engine.runner.model.logits = spy  # type: ignore[method-assign]
    engine.generate(prompts, SamplingParams(temperature=0.0, n_predict=6, ignore_eos=True))
    return torch.cat(seen)


@pytest.mark.parametrize("qtype", TYPES)
def test_quant_equals_dense_on_tiny_models(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", "llama", qtype)
    quant, dense = _decode_logits(path, "quant"), _decode_logits(path, "dense")
    assert quant.shape == dense.shape and quant.shape[0] >= 6
    err = ((quant - dense).abs().max() / dense.abs().max()).item()
    assert err < 1e-5, f"{qtype}: quant vs dense relative error {err:.2e}"


@pytest.mark.parametrize("head_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F16"])
def test_rounded_head_same_for_quant_and_dense(tmp_path, qtype, head_dtype):
    """--head-dtype bfloat16 / int8 mean the same product for blocks (qmatmul_bf16 / qmatmul_q8)
    and dense weights, each row's logits the same bits alone as in the batch."""
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", "llama", qtype)
    runs = (("quant", head_dtype), ("dense", head_dtype), ("dense", "float32"))
    models = [Engine(EngineConfig(model_path=str(path), n_ctx=64, weights=w, head_dtype=h)).runner.model for w, h in runs]
    # The same hidden states into each head: the final-norm rows of a few decode steps. (Through
    # whole runs the layers' float32 differences would move a hidden value across a bfloat16
    # rounding boundary now and then, and that row's logits by one bfloat16 step of it.)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, models[0].cfg.hidden, generator=g)
    quant, dense, exact = (m.logits(x) for m in models)
    scale = dense.abs().max()
    # only the order of the float32 sums differs (measured 1.6-2.6e-7 of the largest logit)
    assert ((quant - dense).abs().max() / scale).item() < 1e-5
    assert ((dense - exact).abs().mean() / scale).item() > 1e-4  # the rounding is there
    assert all(torch.equal(models[0].logits(x[i : i + 1])[0], quant[i]) for i in range(9))


def test_quant_mode_keeps_the_blocks(tmp_path):
    path = write_tiny_gguf(tmp_path / "q.gguf", "gemma3", "Q4_K")
    q, d = load_model(path, weights="quant"), load_model(path, weights="dense")
    assert all(isinstance(p, QuantLinear) for p in _projections(q.model))
    assert all(isinstance(p, Linear) for p in _projections(d.model))
    emb = q.model.embed.weight
    assert isinstance(emb, QuantWeight) and emb.data.dtype == torch.uint8
    assert q.model.output.weight is emb  # tied head: the same bytes, not a copy
    assert q.weight_bytes < d.weight_bytes


def test_mmap_views_or_copies(tmp_path):
    """Quant weights are views of the file's map, or private copies with use_mmap=False (--no-mmap)."""
    import numpy as np

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    for use_mmap in (True, False):
        loaded = load_model(path, weights="quant", use_mmap=use_mmap)
        mapped = loaded.gguf.tensor("token_embd.weight").data
        emb = loaded.model.embed.weight
        assert isinstance(emb, QuantWeight)
        assert np.shares_memory(emb.data.numpy(), mapped) == use_mmap


def test_default_model_resident_weights_fit_the_file(default_model_path):
    """Quant mode holds at most 1.1x the GGUF file's tensor bytes (the issue's bound)."""
    loaded = load_model(default_model_path, weights="quant")
    file_bytes = loaded.gguf.tensor_bytes
    assert loaded.weight_bytes <= 1.1 * file_bytes, (loaded.weight_bytes, file_bytes)
    big = [p.weight for p in _projections(loaded.model)] + [loaded.model.embed.weight]
    assert all(isinstance(w, QuantWeight) for w in big)


def test_weights_option_is_validated():
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="weights must be one of"):
        EngineConfig(model_path="x.gguf", weights="int4")
