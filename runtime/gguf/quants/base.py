"""The contract every GGUF tensor type implements: raw blocks of bytes in, float32 values out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # elements per K-quant super-block


class QuantType(ABC):
    """One GGUF tensor type: `type_size` bytes encode `block_size` values.

    Subclasses compute in float32 in the same order as gguf-py's numpy reference,
    so the results are bit-identical to it on any device.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if qtype is not None:
            cls.qtype = qtype
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]

    @abstractmethod
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks (n, type_size) uint8 -> (n, block_size) float32."""


def f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields (n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, ..., k) uint8 -> (n, ..., 2, k): the low nibbles of the k bytes, then the high ones."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def bits(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """(n, ..., k) uint8 -> (n, ..., count, k): fields of `width` bits, lowest first."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << width) - 1)
