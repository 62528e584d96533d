"""Unquantized tensor types: F32, F16 and BF16 bytes reinterpreted as numbers."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from runtime.gguf.quants.base import QuantType


class F32(QuantType, qtype=T.F32):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32)


class F16(QuantType, qtype=T.F16):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).float()


class BF16(QuantType, qtype=T.BF16):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # bfloat16 -> float32 is exact: the same bits in the high half of a float32.
        return blocks.contiguous().view(torch.bfloat16).float()
