"""Gemma 2 (logit soft-capping, alternating sliding window) and Gemma 3 (5 local : 1 global, QK-norm)."""

from __future__ import annotations

import dataclasses
import math

from runtime.config import Metadata, ModelConfig, RopeConfig
from runtime.errors import GGUFError
from runtime.gguf.reader import GGUFFile
from runtime.models.registry import common_fields, register


def _gemma_fields(f: GGUFFile, md: Metadata, pattern: int, big_layers: int) -> dict:
    fields = common_fields(f, neox=True)
    if pattern <= 0:
        raise GGUFError(f"{md.arch}: absurd metadata: sliding_window_pattern={pattern}")
    n_layers, hidden, heads = fields["n_layers"], fields["hidden"], fields["n_heads"]
    # llama.cpp: layer i uses the sliding window unless it closes a group of `pattern`
    sliding = tuple(i % pattern < pattern - 1 for i in range(n_layers))
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models
    # (query_pre_attn_scalar = hidden / heads there), recognised by their layer count.
    scale_dim = hidden / heads if n_layers == big_layers else fields["head_dim"]
    fields.update(
        sliding_window=md.int("attention.sliding_window", 0),
        sliding_layers=sliding,
        attn_scale=1.0 / math.sqrt(scale_dim),
        embed_scale=math.sqrt(hidden),
        sandwich_norm=True,
        activation="gelu_tanh",
    )
    return fields


@register("gemma2")
def gemma2_config(f: GGUFFile) -> ModelConfig:
    md = Metadata(f.metadata, "gemma2")
    fields = _gemma_fields(f, md, pattern=2, big_layers=46)
    fields.update(
        attn_softcap=md.float("attn_logit_softcapping", 50.0),
        final_softcap=md.float("final_logit_softcapping", 30.0),
    )
    return ModelConfig(**fields)


@register("gemma3")
def gemma3_config(f: GGUFFile) -> ModelConfig:
    md = Metadata(f.metadata, "gemma3")
    fields = _gemma_fields(f, md, pattern=md.int("attention.sliding_window_pattern", 6), big_layers=62)
    rope: RopeConfig = fields["rope"]
    # Local layers: their own base (10000 in every Gemma 3) and no position scaling.
    fields["rope_local"] = dataclasses.replace(
        rope, base=md.float("rope.freq_base_swa", 10000.0), linear_factor=1.0, freq_factors=None
    )
    fields.update(qk_norm=True)
    return ModelConfig(**fields)
