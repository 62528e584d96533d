"""K-quants: 256-value super-blocks of 16 or 32-value sub-blocks with their own scales (Q2_K .. Q6_K)."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from runtime.gguf.quants.base import QK_K, QuantType, bits, f16, nibbles


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7,
    bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of scales/mins 4-7.
    """
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


class Q2_K(QuantType, qtype=T.Q2_K):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = f16(blocks[:, 80:82]), f16(blocks[:, 82:84])
        dl = (d * (scales & 0xF).float()).view(n, 16, 1)
        ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
        q = bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()  # (n, 2 halves, 4 shifts, 32)
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(QuantType, qtype=T.Q3_K):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        d = f16(blocks[:, 108:110])
        # 16 six-bit scales: low 4 bits from bytes 0-7 (two per byte), high 2 bits from bytes 8-11.
        low = nibbles(scales[:, :8]).reshape(n, 16)
        high = bits(scales[:, 8:12], 2, 4).reshape(n, 16)
        sc = ((low | (high << 4)).to(torch.int8) - 32).float()
        dl = (d * sc).view(n, 16, 1)
        ql = bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
        qh = bits(hmask.reshape(n, 1, 32), 1, 8).reshape(n, 16, 16)
        # A set hmask bit means no offset; a clear one subtracts 4.
        q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
        return (dl * q).reshape(n, QK_K)


class Q4_K(QuantType, qtype=T.Q4_K):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = f16(blocks[:, :2]), f16(blocks[:, 2:4])
        sc, mn = scale_min_k4(blocks[:, 4:16])
        qs = blocks[:, 16:]
        dl = (d * sc.float()).view(n, 8, 1)
        dm = (dmin * mn.float()).view(n, 8, 1)
        q = nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32).float()
        return (dl * q - dm).reshape(n, QK_K)


class Q5_K(QuantType, qtype=T.Q5_K):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = f16(blocks[:, :2]), f16(blocks[:, 2:4])
        sc, mn = scale_min_k4(blocks[:, 4:16])
        qh, qs = blocks[:, 16:48], blocks[:, 48:]
        dl = (d * sc.float()).view(n, 8, 1)
        dm = (dmin * mn.float()).view(n, 8, 1)
        ql = nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32)
        hb = bits(qh.reshape(n, 1, 32), 1, 8).reshape(n, 8, 32)
        q = (ql | (hb << 4)).float()
        return (dl * q - dm).reshape(n, QK_K)


class Q6_K(QuantType, qtype=T.Q6_K):
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        scales = blocks[:, 192:208].view(torch.int8).float()  # (n, 16)
        d = f16(blocks[:, 208:210])
        dl = (d * scales).view(n, 16, 1)
        low = nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
        high = bits(qh.reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
        q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        return (dl * q).reshape(n, QK_K)
