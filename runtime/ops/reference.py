"""The plain-torch reference of every quantized op: dequantize the blocks, then ordinary torch math.

Runs on any device; the compiled kernels (CPU, CUDA) are tested against it.
"""

from __future__ import annotations

import torch

from runtime.gguf.quants import quant_type


def dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """w (n, row_bytes) uint8 GGUF blocks -> (n, k) float32."""
    qt = quant_type(qtype)
    n = w.shape[0]
    blocks = w.contiguous().view(n * (k // qt.block_size), qt.type_size)
    return qt.dequantize_blocks(blocks).reshape(n, k)


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with W (n, row_bytes) in GGUF blocks -> (t, n) float32."""
    return torch.nn.functional.linear(x.float(), dequantize(w, qtype, k))
