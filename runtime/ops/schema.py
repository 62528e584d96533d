"""The torch.library schemas of the quantized ops, with the reference as every device's fallback.

`torch.ops.gguf_serve.qmatmul(x, w, qtype, k)`: x (t, k) float @ W^T, W (n, row_bytes)
uint8 rows of GGUF blocks of type `qtype` (a GGMLQuantizationType id), k values per
row -> (t, n) float32; `qmatmul_bf16` is the same product with both operands rounded to
bfloat16 first (float32 sums), `qgemm_bf16` that quantity through the prompt GEMM (another
order of sums), `qmatmul_q8` with x's rows quantized to int8 per 32 values (`qmatmul_q8_many`: one x, several
matrices; `qgemm_q8`: that quantity through the prompt GEMM).
`torch.ops.gguf_serve.dequantize(w, qtype, k)` -> (n, k) float32.
Device kernels register themselves for their dispatch key (CPU: csrc/quant_cpu.cpp,
CUDA: triton_kernels.py) and win over the CompositeExplicitAutograd reference, which
is what MPS and other devices run; fake kernels let torch.compile trace through them.
"""

from __future__ import annotations

import torch

from runtime.ops import reference

LIB = torch.library.Library("gguf_serve", "DEF")
LIB.define("qmatmul(Tensor x, Tensor w, int qtype, int k) -> Tensor")
LIB.define("dequantize(Tensor w, int qtype, int k) -> Tensor")
LIB.define("qmatmul_bf16(Tensor x, Tensor w, int qtype, int k) -> Tensor")
LIB.define("qmatmul_q8(Tensor x, Tensor w, int qtype, int k) -> Tensor")
LIB.define("qgemm_bf16(Tensor x, Tensor w, int qtype, int k) -> Tensor")
LIB.define("qgemm_q8(Tensor x, Tensor w, int qtype, int k) -> Tensor")
LIB.define("qmatmul_q8_many(Tensor x, Tensor[] ws, int[] qtypes, int k) -> Tensor[]")
LIB.impl("qmatmul", reference.qmatmul, "CompositeExplicitAutograd")
LIB.impl("qmatmul_bf16", reference.qmatmul_bf16, "CompositeExplicitAutograd")
LIB.impl("qmatmul_q8", reference.qmatmul_q8, "CompositeExplicitAutograd")
LIB.impl("qgemm_bf16", reference.qmatmul_bf16, "CompositeExplicitAutograd")
LIB.impl("qgemm_q8", reference.qmatmul_q8, "CompositeExplicitAutograd")
LIB.impl("qmatmul_q8_many", reference.qmatmul_q8_many, "CompositeExplicitAutograd")
LIB.impl("dequantize", reference.dequantize, "CompositeExplicitAutograd")
# The small per-token ops of a step, fused on the CPU (csrc/fused_cpu.cpp); the reference
# (a chain of torch ops) runs everywhere else.
LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
LIB.define("rope(Tensor x, Tensor cos, Tensor sin, bool neox) -> Tensor")
LIB.define("gated(Tensor gate, Tensor up, bool gelu) -> Tensor")
LIB.impl("gated", reference.gated, "CompositeExplicitAutograd")
LIB.impl("rms_norm", reference.rms_norm, "CompositeExplicitAutograd")
LIB.impl("rope", reference.rope, "CompositeExplicitAutograd")
LIB.define(
    "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, Tensor lo, Tensor hi, "
    "float scale, float softcap) -> Tensor"
)
LIB.impl("paged_decode", reference.paged_decode, "CompositeExplicitAutograd")
# A prompt chunk's attention over its sequence's cached keys (csrc/prompt_attention.cpp).
LIB.define(
    "prompt_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, int start, int window, "
    "float scale, float softcap) -> Tensor"
)
LIB.impl("prompt_attention", reference.prompt_attention, "CompositeExplicitAutograd")
# A whole layer of a decode step (csrc/decode_layer.cpp: the ops above without a dispatch each).
LIB.define(
    "decode_layer(Tensor x, Tensor?[] norms, Tensor[] ws, int[] qtypes, Tensor cos, Tensor sin, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor blocks, Tensor lo, Tensor hi, "
    "int[] heads, float[] params, bool neox, bool gelu) -> Tensor"
)
LIB.impl("decode_layer", reference.decode_layer, "CompositeExplicitAutograd")
# Constrained decoding's token bitmask (runtime/grammar_matcher.py), applied in place.
LIB.define("apply_bitmask_(Tensor(a!) logits, Tensor mask) -> ()")
LIB.impl("apply_bitmask_", reference.apply_bitmask_, "CompositeExplicitAutograd")


def use_cuda_kernels() -> bool:
    """Register the Triton kernels for CUDA tensors (Triton ships with CUDA builds of torch)."""
    try:
        from runtime.ops import triton_attention, triton_kernels
    except ImportError:
        return False
    LIB.impl("qmatmul", triton_kernels.qmatmul, "CUDA")
    LIB.impl("dequantize", triton_kernels.dequantize, "CUDA")
    LIB.impl("paged_decode", triton_attention.paged_decode, "CUDA")
    return True


if torch.cuda.is_available():
    use_cuda_kernels()


@torch.library.register_fake("gguf_serve::qmatmul")
def _qmatmul_fake(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("gguf_serve::qmatmul_bf16")
def _qmatmul_bf16_fake(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("gguf_serve::qgemm_bf16")
def _qgemm_bf16_fake(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("gguf_serve::qgemm_q8")
def _qgemm_q8_fake(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("gguf_serve::qmatmul_q8_many")
def _qmatmul_q8_many_fake(x: torch.Tensor, ws: list[torch.Tensor], qtypes: list[int], k: int) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32) for w in ws]


@torch.library.register_fake("gguf_serve::qmatmul_q8")
def _qmatmul_q8_fake(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("gguf_serve::dequantize")
def _dequantize_fake(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return w.new_empty((w.shape[0], k), dtype=torch.float32)


@torch.library.register_fake("gguf_serve::apply_bitmask_")
def _apply_bitmask_fake(logits: torch.Tensor, mask: torch.Tensor) -> None:
    return None


@torch.library.register_fake("gguf_serve::rms_norm")
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("gguf_serve::gated")
def _gated_fake(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    return torch.empty_like(gate)


@torch.library.register_fake("gguf_serve::rope")
def _rope_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("gguf_serve::paged_decode")
def _paged_decode_fake(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *args: object) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


@torch.library.register_fake("gguf_serve::prompt_attention")
def _prompt_attention_fake(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *args: object) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


@torch.library.register_fake("gguf_serve::decode_layer")
def _decode_layer_fake(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(x)
