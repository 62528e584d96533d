"""Frozen configuration: ModelConfig read from GGUF metadata, EngineConfig from the command line."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.errors import GGUFError, InvalidRequestError

# Sanity bounds: metadata outside them is a corrupt or hostile file, not a model.
_MAX_LAYERS = 1024
_MAX_DIM = 1 << 17
_MAX_HEADS = 1024
_MAX_VOCAB = 1 << 22


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer kind: base, rotated dims, style, scaling."""

    base: float
    dim: int  # rotated dims per head (<= head_dim)
    neox: bool  # True: rotate halves (NEOX); False: rotate adjacent pairs (llama.cpp NORM)
    linear_factor: float = 1.0  # positions divided by this (rope.scaling.type linear)
    # llama3-style per-frequency divisors (the rope_freqs tensor), dim // 2 values
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer, as llama.cpp reads them from GGUF."""

    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    ffn: int
    vocab_size: int
    norm_eps: float
    context_length: int
    rope: RopeConfig
    rope_local: RopeConfig | None = None  # sliding-window layers' rope, when it differs
    sliding_window: int = 0  # 0: none
    # per layer: True when the layer attends through the sliding window
    sliding_layers: tuple[bool, ...] = ()
    attn_scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embed_scale: float = 1.0
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    activation: str = "silu"  # "silu" | "gelu_tanh"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise GGUFError(f"{self.arch}: absurd metadata: {what}")

        check(0 < self.n_layers <= _MAX_LAYERS, f"block_count={self.n_layers}")
        check(0 < self.hidden <= _MAX_DIM, f"embedding_length={self.hidden}")
        check(0 < self.n_heads <= _MAX_HEADS, f"head_count={self.n_heads}")
        check(0 < self.n_kv_heads <= self.n_heads, f"head_count_kv={self.n_kv_heads}")
        check(self.n_heads % self.n_kv_heads == 0, "head_count not a multiple of head_count_kv")
        check(0 < self.head_dim <= 1024 and self.head_dim % 2 == 0, f"key_length={self.head_dim}")
        check(0 < self.v_head_dim <= 1024, f"value_length={self.v_head_dim}")
        check(0 < self.ffn <= 1 << 20, f"feed_forward_length={self.ffn}")
        check(0 < self.vocab_size <= _MAX_VOCAB, f"vocab size {self.vocab_size}")
        check(0 < self.norm_eps < 1, f"layer_norm_rms_epsilon={self.norm_eps}")
        check(0 < self.context_length <= 1 << 24, f"context_length={self.context_length}")
        for name, rope in (("rope", self.rope), ("rope (sliding layers)", self.rope_local)):
            if rope is None:
                continue
            check(rope.base > 0, f"{name}.freq_base={rope.base}")
            # the rotation works on pairs of channels, so an odd count cannot be rotated
            check(
                0 < rope.dim <= self.head_dim and rope.dim % 2 == 0,
                f"rope.dimension_count={rope.dim} for key_length={self.head_dim}",
            )
            check(rope.linear_factor > 0, f"{name} scaling factor {rope.linear_factor}")
        check(self.sliding_window >= 0, f"sliding_window={self.sliding_window}")
        check(len(self.sliding_layers) in (0, self.n_layers), "sliding layer pattern length")
        check(self.activation in ("silu", "gelu_tanh"), f"activation {self.activation}")

    @property
    def scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer] and self.sliding_window > 0

    def rope_for(self, layer: int) -> RopeConfig:
        return self.rope_local if (self.rope_local and self.is_sliding(layer)) else self.rope


class Metadata:
    """Typed access to `{arch}.*` keys with one error style for missing or ill-typed values."""

    def __init__(self, md: Mapping[str, Any], arch: str) -> None:
        self.md = md
        self.arch = arch

    def _raw(self, key: str) -> Any:
        return self.md.get(f"{self.arch}.{key}", self.md.get(key))

    def int(self, key: str, default: int | None = None) -> int:
        v = self._raw(key)
        if v is None:
            if default is None:
                raise GGUFError(f"metadata lacks {self.arch}.{key}")
            return default
        if isinstance(v, list):  # some converters write per-layer arrays; all equal here
            if not v or any(x != v[0] for x in v):
                raise GGUFError(f"{self.arch}.{key}: per-layer values {repr(v[:4])[:60]}... not supported")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(f"metadata {self.arch}.{key} should be an integer, got {repr(v)[:60]}")
        return v

    def float(self, key: str, default: float | None = None) -> float:
        v = self._raw(key)
        if v is None:
            if default is None:
                raise GGUFError(f"metadata lacks {self.arch}.{key}")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GGUFError(f"metadata {self.arch}.{key} should be a finite number, got {repr(v)[:60]}")
        return float(v)

    def str(self, key: str, default: str = "") -> str:
        v = self._raw(key)
        return v if isinstance(v, str) else default


WEIGHTS = ("quant", "dense")
GEMM_DTYPES = ("float32", "bfloat16", "int8")
HEAD_DTYPES = ("auto", "float32", "bfloat16", "int8")
DECODE_DTYPES = ("auto", "float32", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: device, dtype, KV pool size, slots and token budget."""

    model_path: str
    device: str = "cpu"
    # llama.cpp's -ngl: the last N layers on `device`, the rest on the CPU (runtime/device_map.py);
    # None: the whole model on `device`
    n_gpu_layers: int | None = None
    dtype: str = "float32"  # activations and dense weights
    weights: str = "quant"  # "quant": matrices stay in GGUF blocks (runtime/ops); "dense": dequantized
    use_mmap: bool = True  # quant weights are views of the file's memory map; False: copied into RAM
    mlock: bool = False  # keep the weights' pages in RAM (llama.cpp's --mlock)
    # Quantized CPU kernels' GEMMs: "bfloat16" multiplies prompt rows with both operands
    # rounded to bfloat16 and float32 sums (ops.qgemm_bf16 on AVX512-BF16: each row the same
    # whatever the batch), and runs decode rows over 8 on the bfloat16 units at float32
    # accuracy (~1e-6; ops.gemm_precision); "int8": the same, but prompt rows quantized to
    # int8 per 32 values (ops.qgemm_q8 on AVX512-VNNI, llama.cpp's numerics); "float32": IEEE everywhere.
    gemm_dtype: str = "bfloat16"
    # The output head's products (the logits): "bfloat16" rounds the hidden state and the
    # head's weights to bfloat16 and sums in float32 (ops.qmatmul_bf16: ~2.6x faster at 8
    # rows on CPUs with AVX512-BF16, and at llama.cpp's own precision, whose head quantizes
    # activations to 8 bits); "float32": exact products; "auto": bfloat16 for a quantized
    # head on the CPU, float32 otherwise.
    head_dtype: str = "auto"
    # The layers' products for decode rows (a generated token fed back): "int8" quantizes
    # their activations per 32 values as llama.cpp's CPU kernels do (ops.qmatmul_q8: AVX512-VNNI
    # dot products where the CPU has them); "float32": float32 products; "auto": int8 for
    # weights in blocks on a CPU with AVX512-VNNI, float32 otherwise. Rows are routed by kind
    # (ForwardBatch.decode_rows), so either way a request computes the same alone or batched.
    decode_dtype: str = "auto"
    n_ctx: int = 4096  # KV pool, in tokens (all slots share it)
    block_size: int = 16  # tokens per KV block
    n_parallel: int = 8  # slots: concurrent requests
    n_batch: int = 2048  # tokens per step (prefill chunks + decodes)
    n_threads: int = 0  # 0: leave torch's default
    n_threads_batch: int = 0  # threads for steps with many tokens (prompts); 0: n_threads
    prefix_caching: bool = True  # share KV blocks between prompts that start alike
    context_shift: bool = True  # a full context drops half its middle instead of stopping
    embeddings: bool = False  # accept embedding requests (llama.cpp's --embeddings)
    pooling: str | None = None  # --pooling none|mean|cls|last; None: the model's own
    max_queue: int = 0  # requests waiting for a slot at most; 0: no limit
    slot_save_path: str | None = None  # slot save/restore directory; None: slot actions are off

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("n_ctx", "block_size", "n_parallel", "n_batch"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name} must be positive, got {getattr(self, name)}")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise InvalidRequestError(f"gemm_dtype must be one of {list(GEMM_DTYPES)}, got {self.gemm_dtype!r}")
        if self.head_dtype not in HEAD_DTYPES:
            raise InvalidRequestError(f"head_dtype must be one of {list(HEAD_DTYPES)}, got {self.head_dtype!r}")
        if self.decode_dtype not in DECODE_DTYPES:
            raise InvalidRequestError(
                f"decode_dtype must be one of {list(DECODE_DTYPES)}, got {self.decode_dtype!r}"
            )
        if self.weights not in WEIGHTS:
            raise InvalidRequestError(f"weights must be one of {list(WEIGHTS)}, got {self.weights!r}")
        for name in ("n_threads", "n_threads_batch"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < 0:
            raise InvalidRequestError(f"n_gpu_layers must be >= 0, got {self.n_gpu_layers}")
        if self.max_queue < 0:
            raise InvalidRequestError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.pooling is not None:
            from runtime.pooling import Pooling

            Pooling.parse(self.pooling)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_blocks(self) -> int:
        return -(-self.n_ctx // self.block_size)
