"""Linear layers and the token embedding, over dense weights or weights kept in GGUF blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime import ops


@dataclass(frozen=True)
class QuantWeight:
    """A (n, k) weight as llama.cpp stores it: n rows of GGUF blocks, (n, row_bytes) uint8."""

    data: torch.Tensor
    qtype: int  # GGMLQuantizationType id
    shape: tuple[int, int]  # (n, k) in values

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())


Weight = torch.Tensor | QuantWeight


class Linear:
    """y = x @ W^T + b with W (out, in) as llama.cpp stores it (ggml ne reversed)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self._exact = weight  # set_products("bfloat16") swaps in a rounded copy
        self.round_input = False

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def set_products(self, dtype: str) -> None:
        """"bfloat16": x and W rounded to bfloat16 before the product (a rounded copy of W); "float32": exact."""
        self.round_input = dtype == "bfloat16"
        self.weight = self._exact.to(torch.bfloat16).to(self._exact.dtype) if self.round_input else self._exact

    def __call__(self, x: torch.Tensor, q8_rows: int = 0) -> torch.Tensor:
        """x (T, in) -> (T, out); rows [0, q8_rows) quantized to int8 per 32 values first."""
        if self.round_input:
            x = x.to(torch.bfloat16).to(x.dtype)
        if q8_rows:
            x = torch.cat([ops.quantize_q8(x[:q8_rows]).to(x.dtype), x[q8_rows:]])
        return F.linear(x, self.weight, self.bias)


class QuantLinear:
    """y = x @ W^T + b with W in GGUF blocks, through the gguf_serve::qmatmul op (float32 math)
    or, after set_products("bfloat16"), qmatmul_bf16 (bfloat16 operands, float32 sums); decode
    rows under --decode-dtype int8 through qmatmul_q8 (x quantized to int8 per 32 values)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.bf16_products = False

    def set_products(self, dtype: str) -> None:
        self.bf16_products = dtype == "bfloat16"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, q8_rows: int = 0) -> torch.Tensor:
        """x (T, in) -> (T, out) in x's dtype; rows [0, q8_rows) through qmatmul_q8."""
        w = self.weight
        matmul = ops.qmatmul_bf16 if self.bf16_products else ops.qmatmul
        t = x.shape[0]
        if q8_rows == 0:
            y = matmul(x, w.data, w.qtype, w.shape[1])
        elif q8_rows == t:
            y = ops.qmatmul_q8(x, w.data, w.qtype, w.shape[1])
        else:  # a step with decode and prompt rows
            q8 = ops.qmatmul_q8(x[:q8_rows], w.data, w.qtype, w.shape[1])
            y = torch.cat([q8, matmul(x[q8_rows:], w.data, w.qtype, w.shape[1])])
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


def linear(weight: Weight, bias: torch.Tensor | None = None) -> Linear | QuantLinear:
    """The layer for `weight`: dense or quantized."""
    if isinstance(weight, QuantWeight):
        return QuantLinear(weight, bias)
    return Linear(weight, bias)


class Embedding:
    """Row lookup in the (vocab, hidden) table; doubles as the output head when tied."""

    def __init__(self, weight: Weight, dtype: torch.dtype = torch.float32) -> None:
        self.weight = weight
        self.dtype = dtype  # of the looked-up rows when the table is quantized

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> (T, hidden)."""
        w = self.weight
        if isinstance(w, QuantWeight):
            # Only the rows asked for are dequantized: the table stays in its blocks.
            return ops.dequantize(w.data.index_select(0, ids), w.qtype, w.shape[1]).to(self.dtype)
        return F.embedding(ids, w)

    def as_linear(self) -> Linear | QuantLinear:
        return linear(self.weight)
