"""Architectures by `general.architecture`, and the metadata reading they share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.config import _MAX_LAYERS, Metadata, ModelConfig, RopeConfig
from runtime.errors import GGUFError, UnsupportedModelError
from runtime.gguf.reader import GGUFFile, printable

ConfigBuilder = Callable[[GGUFFile], ModelConfig]
ARCHITECTURES: dict[str, ConfigBuilder] = {}


def register(name: str) -> Callable[[ConfigBuilder], ConfigBuilder]:
    def deco(fn: ConfigBuilder) -> ConfigBuilder:
        ARCHITECTURES[name] = fn
        return fn

    return deco


def model_config(f: GGUFFile) -> ModelConfig:
    """The ModelConfig of a GGUF file, or a one-line error naming what is unsupported."""
    arch = f.architecture
    builder = ARCHITECTURES.get(arch)
    if builder is None:
        raise UnsupportedModelError(
            f"unsupported architecture {printable(arch)!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return builder(f)


def common_fields(f: GGUFFile, *, neox: bool) -> dict[str, Any]:
    """The ModelConfig fields every architecture reads the same way (llama.cpp's LLM_KV names)."""
    md = Metadata(f.metadata, f.architecture)
    hidden = md.int("embedding_length")
    n_heads = md.int("attention.head_count")
    if n_heads <= 0 or hidden <= 0 or hidden % n_heads:
        raise GGUFError(f"{md.arch}: absurd metadata: head_count={n_heads} for embedding_length={hidden}")
    head_dim = md.int("attention.key_length", hidden // n_heads)
    n_layers = md.int("block_count")
    # Checked here as well as in ModelConfig: builders make per-layer tuples before that.
    if not 0 < n_layers <= _MAX_LAYERS:
        raise GGUFError(f"{md.arch}: absurd metadata: block_count={n_layers}")
    embd = f.tensor("token_embd.weight")
    if len(embd.shape) != 2 or embd.shape[1] != hidden:
        raise GGUFError(f"token_embd.weight has shape {embd.shape}, expected (vocab, {hidden})")
    return dict(
        arch=md.arch,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=md.int("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        v_head_dim=md.int("attention.value_length", head_dim),
        ffn=md.int("feed_forward_length"),
        vocab_size=embd.shape[0],
        norm_eps=md.float("attention.layer_norm_rms_epsilon", 1e-5),
        context_length=md.int("context_length", 4096),
        rope=rope_config(f, md, md.float("rope.freq_base", 10000.0), head_dim, neox),
        tied_embeddings="output.weight" not in f.tensors,
    )


def rope_config(f: GGUFFile, md: Metadata, base: float, head_dim: int, neox: bool) -> RopeConfig:
    """Rope of the global layers: base, rotated dims, linear scaling, llama3 frequency factors."""
    kind = md.str("rope.scaling.type", "none")
    factor = md.float("rope.scaling.factor", 0.0)
    if kind not in ("none", "linear", ""):
        raise UnsupportedModelError(f"{md.arch}: rope scaling {printable(kind)!r} is not supported yet")
    factors = None
    if "rope_freqs.weight" in f.tensors:
        t = f.tensor("rope_freqs.weight")
        if t.qtype.name != "F32":
            raise GGUFError(f"rope_freqs.weight should be F32, is {t.qtype.name}")
        factors = tuple(float(x) for x in np.frombuffer(t.data, dtype=np.float32))
        dim = md.int("rope.dimension_count", head_dim)
        # llama.cpp divides each frequency by its factor: one finite, positive value per pair
        if not factors or len(factors) != dim // 2 or not all(np.isfinite(factors)) or min(factors) <= 0:
            raise GGUFError(
                f"rope_freqs.weight should hold {dim // 2} positive factors, has {len(factors)} values"
            )
    return RopeConfig(
        base=base,
        dim=md.int("rope.dimension_count", head_dim),
        neox=neox,
        linear_factor=factor if kind == "linear" and factor > 0 else 1.0,
        freq_factors=factors,
    )
