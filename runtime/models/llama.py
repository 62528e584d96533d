"""Llama 2/3, Mistral, TinyLlama, SmolLM: GQA, adjacent-pair rope, optional llama3 frequency factors."""

from __future__ import annotations

from runtime.config import ModelConfig
from runtime.gguf.reader import GGUFFile
from runtime.models.registry import common_fields, register


@register("llama")
def llama_config(f: GGUFFile) -> ModelConfig:
    # llama.cpp's converter permutes q/k rows for llama so that its NORM (adjacent-pair)
    # rope equals HF's rotate-half rope on the original weights.
    return ModelConfig(**common_fields(f, neox=False))
