"""Non-linear 4-bit types: IQ4_NL (32-value blocks) and IQ4_XS (256-value super-blocks), via a 16-entry table."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from runtime.gguf.quants.base import QK_K, QuantType, f16, nibbles

# The 16 levels both types index (ggml's kvalues_iq4nl).
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _levels(idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(KVALUES, dtype=torch.float32, device=idx.device)
    return table[idx.long()]


class IQ4_NL(QuantType, qtype=T.IQ4_NL):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs = f16(blocks[:, :2]), blocks[:, 2:]
        return d * _levels(nibbles(qs).reshape(n, 32))


class IQ4_XS(QuantType, qtype=T.IQ4_XS):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks[:, :2])
        scales_h = blocks[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF  # (n, 1)
        scales_l, qs = blocks[:, 4:8], blocks[:, 8:]
        # 8 six-bit scales: low 4 bits two per byte, high 2 bits from a uint16.
        low = nibbles(scales_l.unsqueeze(-1)).reshape(n, 8)
        shifts = torch.arange(0, 16, 2, device=blocks.device, dtype=torch.int32)
        high = ((scales_h >> shifts) & 3).to(torch.uint8)  # (n, 8)
        sc = ((low | (high << 4)).to(torch.int8) - 32).float()
        dl = (d * sc).view(n, 8, 1)
        q = _levels(nibbles(qs.reshape(n, 8, 16)).reshape(n, 8, 32))
        return (dl * q).reshape(n, QK_K)


