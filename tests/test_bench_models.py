"""Benchmark tools: make_tiny_gguf.py's full-size presets with fast random weights, the HTTP bench client."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.ops import reference
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import PRESETS, main, tiny_vocab
from scripts.random_tensors import FAST_VALUES, encode


def test_the_vocabulary_generator_reaches_llama3_size():
    n = PRESETS["llama3-8b"]["vocab_size"]
    tokens, scores, types = tiny_vocab(n)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == n


def test_a_preset_refuses_another_architecture(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.gguf"), "--preset", "llama3-8b", "--arch", "qwen2"])
    assert "contradicts" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_big_matrices_are_uniform_random_quants_with_the_right_spread(qtype):
    rows, cols = FAST_VALUES // 4096, 4096
    data = encode(qtype, rows, cols, np.random.default_rng(0))
    assert data.dtype == np.uint8 and data.shape[0] == rows
    w = reference.dequantize(torch.from_numpy(data[:512].copy()), int(qtype), cols)
    std = 1 / cols**0.5
    assert abs(w.std().item() / std - 1) < 0.02  # as gguf-py's quantized random floats have
    assert abs(w.mean().item()) < 0.15 * std


@pytest.mark.slow
def test_a_cut_down_preset_loads_and_generates(tmp_path):
    """Full-width layers (hidden 4096, ffn 14336) of the preset, one of them, a small vocabulary."""
    path = tmp_path / "l3.gguf"
    assert main([str(path), "--preset", "llama3-8b", "--type", "Q4_0", "--layers", "1", "--vocab", "4096"]) == 0
    engine = Engine(EngineConfig(model_path=str(path), n_ctx=256, n_threads=2))
    cfg = engine.loaded.config
    assert (cfg.hidden, cfg.ffn, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers) == (4096, 14336, 32, 8, 128, 1)
    out = engine.generate([[1, 300, 301, 302]], SamplingParams(temperature=0.0, n_predict=4, ignore_eos=True))
    assert len(out[0]) == 4


def test_the_http_bench_client_measures_a_live_server(llama3_tiny_path):
    """scripts/bench_http.py: what it reports comes from the server's own counts."""
    from http_api.cli import ServerSettings
    from http_api.testing import LiveServer
    from scripts.bench_http import round_of

    settings = ServerSettings(model=str(llama3_tiny_path), n_threads=1, n_ctx=1024, n_parallel=2)
    with LiveServer(settings) as srv:
        got = round_of(srv.url, 2, 5, 12, random.Random(0))
    assert set(got) == {"tok_s", "ttft_ms", "ttft_max_ms", "per_client_tok_s"}
    assert got["tok_s"] > 0 and 0 < got["ttft_ms"] <= got["ttft_max_ms"]
