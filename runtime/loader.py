"""GGUF file -> ModelConfig -> model with its weights on the device."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import ModelConfig
from runtime.errors import GGUFError
from runtime.gguf.quants import dequantize
from runtime.gguf.reader import GGUFFile, _short, printable
from runtime.models import model_config
from runtime.models.transformer import Transformer
from runtime.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """Everything the engine needs from one GGUF file."""

    path: Path
    gguf: GGUFFile
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    load_seconds: float


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Read, validate and dequantize a GGUF model; errors are one-line GGUFErrors."""
    t0 = time.perf_counter()
    f = GGUFFile(path)
    cfg = model_config(f)
    try:
        tokenizer = Tokenizer.from_metadata(f.metadata)
    except GGUFError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
        # Missing or ill-typed tokenizer.* keys: a broken file, reported in one line.
        raise GGUFError(f"{path}: unusable tokenizer metadata ({_short(e)})") from e
    if tokenizer.vocab_size != cfg.vocab_size:
        raise GGUFError(
            f"vocabulary has {tokenizer.vocab_size} tokens but token_embd.weight has {cfg.vocab_size} rows"
        )
    dev = torch.device(device)
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = f.tensor(name)
        if tuple(t.shape) != shape:
            raise GGUFError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        used.add(name)
        # Norm weights stay float32: rms_norm multiplies in float32 anyway.
        out_dtype = torch.float32 if name.endswith("norm.weight") else dtype
        try:
            return dequantize(t.data, t.qtype, shape, dtype=out_dtype, device=dev)
        except GGUFError as e:  # name the tensor: the type or size is the file's problem
            raise type(e)(f"tensor {printable(name)}: {e}") from e

    model = Transformer(cfg, get, dev)
    ignored = {"rope_freqs.weight"}  # read into the config
    unknown = sorted(set(f.tensors) - used - ignored)
    if unknown:
        raise GGUFError(
            f"{cfg.arch}: {len(unknown)} tensors this architecture does not use, e.g. {printable(unknown[0])}"
        )
    return LoadedModel(
        Path(path), f, cfg, model, tokenizer, dtype, dev, time.perf_counter() - t0
    )
