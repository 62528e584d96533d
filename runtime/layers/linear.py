"""Linear layers and the token embedding, over dense weights or weights kept in GGUF blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

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
        self.quantize_input = False  # set_products("int8"): every row's x quantized per 32 values
        self.decode_int8 = False  # --decode-dtype int8

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def set_products(self, dtype: str) -> None:
        """"bfloat16": x and W rounded to bfloat16 before the product (a rounded copy of W);
        "int8": x quantized to int8 per 32 values (qmatmul_q8's quantity); "float32": exact."""
        self.round_input = dtype == "bfloat16"
        self.quantize_input = dtype == "int8"
        self.weight = self._exact.to(torch.bfloat16).to(self._exact.dtype) if self.round_input else self._exact

    def __call__(self, x: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        """x (T, in) -> (T, out); under --decode-dtype int8 rows [0, decode_rows) are
        quantized to int8 per 32 values first."""
        if self.round_input:
            x = x.to(torch.bfloat16).to(x.dtype)
        if self.quantize_input:
            x = ops.quantize_q8(x).to(x.dtype)
        elif decode_rows and self.decode_int8:
            x = torch.cat([ops.quantize_q8(x[:decode_rows]).to(x.dtype), x[decode_rows:]])
        return F.linear(x, self.weight, self.bias)


class QuantLinear:
    """y = x @ W^T + b with W in GGUF blocks, through the gguf_serve ops: decode rows (the
    first `decode_rows`) through qmatmul (float32 math) or, under --decode-dtype int8,
    qmatmul_q8 (x quantized to int8 per 32 values); the other rows through qmatmul or,
    under gemm_precision("bfloat16"), the prompt GEMM qgemm_bf16, whatever their number,
    so each row's numerics follow its kind. After set_products("bfloat16") (the output
    head) every row takes qmatmul_bf16; after set_products("int8"), qmatmul_q8."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.bf16_products = False
        self.int8_products = False
        self.decode_int8 = False  # --decode-dtype int8

    def set_products(self, dtype: str) -> None:
        """Every row's products (the output head's --head-dtype): "bfloat16", "int8", or by row kind ("float32")."""
        self.bf16_products = dtype == "bfloat16"
        self.int8_products = dtype == "int8"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        """x (T, in) -> (T, out) in x's dtype."""
        w = self.weight
        args = (w.data, w.qtype, w.shape[1])
        if self.bf16_products:
            y = ops.qmatmul_bf16(x, *args)
        elif self.int8_products:
            y = ops.qmatmul_q8(x, *args)
        else:
            d, t = decode_rows, x.shape[0]
            decode = ops.qmatmul_q8 if self.decode_int8 else ops.qmatmul
            if d == t:  # a decode step: no slices (126 of them a step cost ~0.2 ms)
                y = decode(x, *args)
            elif d == 0:
                y = ops.qmatmul_prompt(x, *args)
            else:
                y = torch.cat([decode(x[:d], *args), ops.qmatmul_prompt(x[d:], *args)])
        return self.finish(y, x)

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The product y (T, out) float32 of x -> plus the bias, in x's dtype."""
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_on_cpu(p: Linear | QuantLinear) -> TypeGuard[QuantLinear]:
    """Whether p's decode rows take the int8 kernels: weights in blocks on the CPU, --decode-dtype int8."""
    return (
        isinstance(p, QuantLinear)
        and p.decode_int8
        and not (p.bf16_products or p.int8_products)
        and p.weight.data.device.type == "cpu"
    )


def project(x: torch.Tensor, layers: tuple[Linear | QuantLinear, ...], decode_rows: int) -> list[torch.Tensor]:
    """Each layer's product of the same x (T, in): in a decode step of int8 rows over weights
    in blocks on the CPU, one qmatmul_q8_many call (x quantized once, one job); the same numbers."""
    quant = [p for p in layers if int8_on_cpu(p)]
    if (
        decode_rows == x.shape[0]
        and x.device.type == "cpu"
        and len(quant) == len(layers)
        and len({p.weight.shape[1] for p in quant}) == 1
    ):
        ys = ops.qmatmul_q8_many(x, [p.weight.data for p in quant], [p.weight.qtype for p in quant], x.shape[1])
        return [p.finish(y, x) for p, y in zip(quant, ys)]
    return [p(x, decode_rows) for p in layers]


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
