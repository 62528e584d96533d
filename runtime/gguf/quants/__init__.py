"""Dequantization of GGUF tensors in torch: one small class per tensor type, found through a registry."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from runtime.errors import GGUFError, UnsupportedModelError
from runtime.gguf.quants.base import QuantType
from runtime.gguf.quants.floats import BF16, F16, F32
from runtime.gguf.quants.iquants import IQ4_NL, IQ4_XS
from runtime.gguf.quants.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from runtime.gguf.quants.legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

_TYPES: tuple[type[QuantType], ...] = (
    F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
)  # fmt: skip
REGISTRY: dict[GGMLQuantizationType, QuantType] = {t.qtype: t() for t in _TYPES}

# Output elements per chunk: bounds the temporaries (a few times this, in float32).
CHUNK_ELEMENTS = 1 << 22


def quant_type(qtype: GGMLQuantizationType | int) -> QuantType:
    """The implementation of `qtype`; UnsupportedModelError (one line) if there is none."""
    try:
        return REGISTRY[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        name = getattr(qtype, "name", str(qtype))
        supported = ", ".join(t.name for t in REGISTRY)
        raise UnsupportedModelError(f"tensor type {name} is not supported (supported: {supported})") from None


def dequantize(
    raw: np.ndarray,
    qtype: GGMLQuantizationType | int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Raw GGUF bytes (uint8, often a read-only view of a memory map) -> a `shape` tensor of `dtype`.

    Works a chunk of blocks at a time on `device`, so peak memory stays near the
    size of the output whatever the tensor's size.
    """
    qt = quant_type(qtype)
    n_elements = int(np.prod(shape)) if shape else 1
    if shape and shape[-1] % qt.block_size:
        raise GGUFError(f"{qt.qtype.name} tensor of shape {shape}: rows are not whole blocks of {qt.block_size}")
    n_blocks = n_elements // qt.block_size
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    if flat.nbytes != n_blocks * qt.type_size:
        raise GGUFError(
            f"{qt.qtype.name} tensor of shape {shape} needs {n_blocks * qt.type_size} bytes, has {flat.nbytes}"
        )
    out = torch.empty(n_elements, dtype=dtype, device=device)
    per_chunk = max(1, chunk_elements // qt.block_size)
    for b0 in range(0, n_blocks, per_chunk):
        b1 = min(n_blocks, b0 + per_chunk)
        # A copy of one chunk: torch wants writable memory, and the map is read-only.
        chunk = torch.from_numpy(flat[b0 * qt.type_size : b1 * qt.type_size].copy())
        blocks = chunk.to(device).view(b1 - b0, qt.type_size)
        out[b0 * qt.block_size : b1 * qt.block_size] = qt.dequantize_blocks(blocks).reshape(-1).to(dtype)
    return out.view(shape)
