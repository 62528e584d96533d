"""ggml's original 32-value block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from runtime.gguf.quants.base import QuantType, f16, nibbles


def _low4(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32) values: element j < 16 is byte j's low nibble, j >= 16 its high one."""
    return nibbles(qs).reshape(qs.shape[0], 32)


def _high_bit(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32): bit j of it, as the 5th bit of element j."""
    # Shifting (n, 4, 1) by (8,) gives (n, 4, 8) = bit 8k+i at [k, i]: already in element order.
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).reshape(qh.shape[0], 32)


class Q4_0(QuantType, qtype=T.Q4_0):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, qs = f16(blocks[:, :2]), blocks[:, 2:]  # (n, 1), (n, 16)
        return d * (_low4(qs).to(torch.int8) - 8).float()


class Q4_1(QuantType, qtype=T.Q4_1):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m, qs = f16(blocks[:, :2]), f16(blocks[:, 2:4]), blocks[:, 4:]
        return d * _low4(qs).float() + m


class Q5_0(QuantType, qtype=T.Q5_0):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, qh, qs = f16(blocks[:, :2]), blocks[:, 2:6], blocks[:, 6:]
        q = (_low4(qs) | _high_bit(qh)).to(torch.int8) - 16
        return d * q.float()


class Q5_1(QuantType, qtype=T.Q5_1):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m, qh, qs = f16(blocks[:, :2]), f16(blocks[:, 2:4]), blocks[:, 4:8], blocks[:, 8:]
        return d * (_low4(qs) | _high_bit(qh)).float() + m


class Q8_0(QuantType, qtype=T.Q8_0):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # Same item size: a strided view, no copy.  (n, 32) int8
        d, x = f16(blocks[:, :2]), blocks[:, 2:].view(torch.int8)
        return x.float() * d
