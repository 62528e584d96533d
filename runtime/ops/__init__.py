"""Custom torch ops: quantized matmul and dequantization of GGUF blocks, fused RMS norm and rotary.

Importing this package defines the ops (runtime/ops/schema.py, reference fallback on
every device); `use_cpu_kernels()` compiles or loads the C++ CPU kernels and registers
them. Callers use `qmatmul` and `dequantize`, whichever implementation is behind them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from runtime.config import GEMM_DTYPES
from runtime.ops import reference
from runtime.ops import schema as _schema  # noqa: F401  (defines torch.ops.gguf_serve.*)
from runtime.ops.cpu_extension import KernelBuildError, load


def use_cpu_kernels() -> str:
    """Register the compiled CPU kernels (building them the first time); returns the ISA picked."""
    return str(load().isa())


def int8_dot() -> bool:
    """Whether the CPU kernels multiply int8 activations on AVX512-VNNI (qmatmul_q8's fast path)."""
    return bool(load().int8_dot())


def set_num_threads(n: int) -> None:
    """Threads the compiled CPU kernels use, apart from torch's own (0: follow torch's)."""
    load().set_num_threads(n)


@contextmanager
def gemm_precision(dtype: str) -> Iterator[None]:
    """The CPU kernels' GEMMs inside the block: "float32", "bfloat16" or "int8".

    "bfloat16": prompt rows (qmatmul_prompt) take qgemm_bf16 where the CPU has AVX512-BF16;
    qmatmul's products over 8 rows let oneDNN compute its float32 GEMMs on the bfloat16 dot-product units
    (fp32_precision "bf16", set around each GEMM only): float32 in and out, each operand
    split into bfloat16 parts, so results stay within ~1e-6 of IEEE float32 (measured:
    8e-7 vs 4e-7 relative) at ~2.5x the speed where the CPU has AVX512-BF16 or AMX;
    other CPUs run IEEE float32. "int8": as "bfloat16", but prompt rows of the types
    qgemm_q8 has a kernel for (on AVX512-VNNI) take qgemm_q8 instead: x quantized to int8
    per 32 values, as llama.cpp's CPU kernels compute prompts. The flags are process-wide,
    hence restored on exit.
    """
    if dtype not in GEMM_DTYPES:
        raise ValueError(f"gemm dtype must be one of {GEMM_DTYPES}, got {dtype!r}")
    kernels = load()
    before = kernels.gemm_bf16(), kernels.gemm_q8()
    kernels.set_gemm_bf16(dtype != "float32")
    kernels.set_gemm_q8(dtype == "int8")
    try:
        yield
    finally:
        kernels.set_gemm_bf16(before[0])
        kernels.set_gemm_q8(before[1])


def qmatmul_prompt(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Prompt rows' product, by gemm_precision: under "int8", qgemm_q8 where the CPU and type
    have its kernel; under "bfloat16" (and "int8" otherwise), qgemm_bf16 on a CPU with
    AVX512-BF16. Each of these computes a row the same whatever the batch. Else qmatmul
    (CPUs without them keep oneDNN's GEMM: rounded operands would gain nothing there)."""
    if x.device.type == "cpu":
        kernels = load()
        if kernels.gemm_q8() and kernels.int8_kernel(qtype):
            return qgemm_q8(x, w, qtype, k)
        if kernels.gemm_bf16() and kernels.bf16_dot():
            return qgemm_bf16(x, w, qtype, k)
    return qmatmul(x, w, qtype, k)


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T for W (n, row_bytes) uint8 GGUF blocks -> (t, n) float32."""
    return torch.ops.gguf_serve.qmatmul(x, w, qtype, k)


def qmatmul_bf16(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with both operands rounded to bfloat16 and float32 sums -> (t, n) float32.

    The output head's product under --head-dtype bfloat16: about 2.6x the speed of the
    float32 kernel at 8 rows where the CPU has AVX512-BF16 (vdpbf16ps), the same speed
    elsewhere (it is memory-bound at one row). Each row's result is independent of t.
    """
    return torch.ops.gguf_serve.qmatmul_bf16(x, w, qtype, k)


def qgemm_bf16(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """qmatmul_bf16's quantity through the prompt GEMM (qmatmul_prompt's under
    gemm_precision("bfloat16")): panels of W decoded, packed and multiplied by AVX512-BF16
    register tiles. Each row's result is independent of t, but not the row kernels' bits.
    """
    return torch.ops.gguf_serve.qgemm_bf16(x, w, qtype, k)


def qmatmul_q8(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with x's rows quantized to int8 per 32 values first -> (t, n) float32.

    Decode rows under --decode-dtype int8, as llama.cpp's CPU kernels compute every
    product: the AVX512-VNNI kernels take 4-5x fewer instructions per weight than the
    float32 ones at one row. Each row's result is independent of t.
    """
    return torch.ops.gguf_serve.qmatmul_q8(x, w, qtype, k)


def qgemm_q8(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """qmatmul_q8's quantity through the prompt GEMM (qmatmul_prompt's under
    gemm_precision("int8")): panels of W decoded to bytes, packed and multiplied by
    AVX512-VNNI register tiles. Each row's result is independent of t, but not the row kernels' bits.
    """
    return torch.ops.gguf_serve.qgemm_q8(x, w, qtype, k)


def qmatmul_q8_many(x: torch.Tensor, ws: list[torch.Tensor], qtypes: list[int], k: int) -> list[torch.Tensor]:
    """qmatmul_q8 of one x with several matrices (a layer's q, k, v; gate, up): x quantized
    once, every matrix's rows in one job of the kernel threads; the same numbers."""
    return list(torch.ops.gguf_serve.qmatmul_q8_many(x, ws, qtypes, k))


def quantize_q8(x: torch.Tensor) -> torch.Tensor:
    """x (t, k) float with each 32-value block of a row rounded to int8 levels (qmatmul_q8's x)."""
    return reference.quantize_q8(x)


def dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """W (n, row_bytes) uint8 GGUF blocks -> (n, k) float32."""
    return torch.ops.gguf_serve.dequantize(w, qtype, k)


def apply_bitmask_(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """logits (rows, vocab) float32, in place: -inf where the token's bit in mask (rows, words) int32 is 0."""
    torch.ops.gguf_serve.apply_bitmask_(logits, mask)


def gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up (T, F), act the tanh-approximated gelu (gelu=True) or silu: one pass on
    the CPU (AVX-512 exp), the chain of torch ops elsewhere."""
    return torch.ops.gguf_serve.gated(gate, up, gelu)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,), computed in float32, in x's dtype."""
    return torch.ops.gguf_serve.rms_norm(x, weight, eps)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q (B, H, D) attending to keys [lo_b, hi_b) of blocks (B, W) of the paged cache -> (B, H, Dv)."""
    return torch.ops.gguf_serve.paged_decode(q, k_cache, v_cache, blocks, lo, hi, scale, softcap)


def prompt_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    start: int,
    window: int,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """A prompt chunk q (n, H, D) of the sequence whose blocks (W,) hold its keys: query i is
    key start + i and sees the keys up to its own (the last `window` when > 0) -> (n, H, Dv)."""
    return torch.ops.gguf_serve.prompt_attention(q, k_cache, v_cache, blocks, start, window, scale, softcap)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x (T, H, D) rotated by cos/sin (T, 1, half) on its first 2 * half channels, in x's dtype."""
    return torch.ops.gguf_serve.rope(x, cos, sin, neox)


def decode_layer(*args: object) -> torch.Tensor:
    """A transformer layer for decode rows x (B, hidden) with int8 products: on the CPU one op
    instead of ~17 dispatches, the same numbers. The arguments are reference.decode_layer's
    (x, norms, ws, qtypes, cos, sin, k_cache, v_cache, slots, blocks, lo, hi, heads, params,
    neox, gelu); the schema checks their types."""
    return torch.ops.gguf_serve.decode_layer(*args)


__all__ = [
    "GEMM_DTYPES", "KernelBuildError", "decode_layer", "dequantize", "gated", "gemm_precision", "int8_dot", "paged_decode",
    "prompt_attention", "qgemm_bf16", "qgemm_q8", "qmatmul", "qmatmul_bf16", "qmatmul_prompt", "qmatmul_q8", "qmatmul_q8_many", "quantize_q8", "rms_norm", "rope", "set_num_threads",
    "use_cpu_kernels",
]  # fmt: skip
