"""Qwen 2 (q/k/v biases) and Qwen 3 (per-head RMS norm on q and k), both with NEOX rope."""

from __future__ import annotations

from runtime.config import ModelConfig
from runtime.gguf.reader import GGUFFile
from runtime.models.registry import common_fields, register


@register("qwen2")
def qwen2_config(f: GGUFFile) -> ModelConfig:
    return ModelConfig(**common_fields(f, neox=True), qkv_bias=True)


@register("qwen3")
def qwen3_config(f: GGUFFile) -> ModelConfig:
    return ModelConfig(**common_fields(f, neox=True), qk_norm=True)
