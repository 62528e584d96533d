"""Writes small random-weight GGUF models (llama, qwen2, qwen3, gemma2, gemma3) in the common tensor types."""

from __future__ import annotations

import argparse
import itertools
import string
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from scripts.random_tensors import encode  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
QTYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# Token ids of the tiny SentencePiece-style vocabulary.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
N_BYTE_TOKENS = 256
FIRST_PIECE_ID = 3 + N_BYTE_TOKENS

# general.file_type as llama.cpp's quantizer records it (K-quants: their _M mixes).
_FILE_TYPES = {
    q: LlamaFileType.ALL_F32
    if q == "F32"
    else LlamaFileType[f"MOSTLY_{q}" + ("_M" if q[1] in "345" and q.endswith("K") else "")]
    for q in QTYPES
}

@dataclass(frozen=True)
class TinySpec:
    """Hyper-parameters of a tiny model; row lengths are multiples of 256 so K-quants fit."""

    arch: str = "llama"
    n_layers: int = 2
    hidden: int = 256
    ffn: int = 512
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 512
    context_length: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    sliding_window: int = 0  # gemma2/gemma3 only
    sliding_window_pattern: int = 0  # gemma3: written only when > 0 (llama.cpp assumes 6)
    rope_base_swa: float = 0.0  # gemma3: written only when > 0 (llama.cpp assumes 10000)
    attn_softcap: float = 0.0  # gemma2
    final_softcap: float = 0.0  # gemma2 (gemma3: written only when > 0)
    tied: bool = False  # no output.weight: the head reuses token_embd

    @property
    def q_out(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.n_kv_heads * self.head_dim


# Per-architecture defaults chosen like the real models (gemma: head_dim 256, so HF's
# default query_pre_attn_scalar of 256 is right; qwen3: head_dim 128, HF's default).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"rope_base": 1e6, "norm_eps": 1e-6},
    "qwen3": {"head_dim": 128, "rope_base": 1e6, "norm_eps": 1e-6},
    "gemma2": {
        "head_dim": 256, "norm_eps": 1e-6, "sliding_window": 8,
        "attn_softcap": 50.0, "final_softcap": 30.0, "tied": True,
    },
    # 6 layers: llama.cpp's (and HF's) default pattern makes layer 5 the one global layer.
    "gemma3": {
        "n_layers": 6, "head_dim": 256, "rope_base": 1e6, "norm_eps": 1e-6,
        "sliding_window": 8, "tied": True,
    },
}  # fmt: skip


# Full-size shapes for benchmarks (random weights): `--preset llama3-8b`.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "arch": "llama", "n_layers": 32, "hidden": 4096, "ffn": 14336, "n_heads": 32,
        "n_kv_heads": 8, "head_dim": 128, "vocab_size": 128256, "context_length": 8192,
        "rope_base": 500000.0,
    },
}  # fmt: skip


def tiny_spec(arch: str = "llama", **overrides: Any) -> TinySpec:
    """The default spec of `arch` with `overrides` (TinySpec field names) applied."""
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    known = {f.name for f in fields(TinySpec)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown TinySpec fields: {', '.join(bad)}")
    return TinySpec(**{"arch": arch, **ARCH_DEFAULTS[arch], **overrides})


def tiny_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then normal pieces with descending scores."""
    if n <= FIRST_PIECE_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_PIECE_ID}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(N_BYTE_TOKENS)]
    types = [2, 3, 3] + [6] * N_BYTE_TOKENS  # UNKNOWN, CONTROL, BYTE as llama.cpp numbers them
    words = "the of and to in is it that for on with as was he be at by this had not are".split()
    letters = string.ascii_lowercase
    candidates = itertools.chain(
        ["▁"],
        letters,
        (f"▁{c}" for c in letters),
        (f"▁{w}" for w in words),
        string.ascii_uppercase,
        string.digits,
        ".,!?'-:;",
        ("".join(p) for p in itertools.product(letters, repeat=2)),
        ("▁" + "".join(p) for p in itertools.product(letters, repeat=2)),
        ("".join(p) for p in itertools.product(letters, repeat=3)),
        ("".join(p) for p in itertools.product(letters, repeat=4)),  # up to ~476k pieces
    )
    pieces: list[str] = []
    seen: set[str] = set()
    for c in candidates:  # in order, each piece once ("▁of" is a word and a letter pair)
        if len(pieces) == n - FIRST_PIECE_ID:
            break
        if c not in seen:
            seen.add(c)
            pieces.append(c)
    if len(pieces) < n - FIRST_PIECE_ID:
        raise ValueError(f"vocab_size {n} is larger than this generator supports")
    scores = [0.0] * FIRST_PIECE_ID + [-float(i) for i in range(len(pieces))]
    return tokens + pieces, scores, types + [1] * len(pieces)


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute on the row axis: HF's rotate-half order -> adjacent pairs.

    Works on encoded rows too (a quantized row is a whole number of blocks), and
    HF's GGUF loader undoes it after dequantizing.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_plan(spec: TinySpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, torch-order shape, kind) of every tensor, kind in norm / bias / matrix, llama.cpp names."""
    s = spec
    h, q, kv = s.hidden, s.q_out, s.kv_out
    gemma, qwen2 = s.arch.startswith("gemma"), s.arch == "qwen2"
    qk_norm = s.arch in ("qwen3", "gemma3")
    per_layer: list[tuple[str, tuple[int, ...], str, bool]] = [
        ("attn_norm.weight", (h,), "norm", True),
        ("attn_q.weight", (q, h), "matrix", True),
        ("attn_k.weight", (kv, h), "matrix", True),
        ("attn_v.weight", (kv, h), "matrix", True),
        ("attn_q.bias", (q,), "bias", qwen2),
        ("attn_k.bias", (kv,), "bias", qwen2),
        ("attn_v.bias", (kv,), "bias", qwen2),
        ("attn_q_norm.weight", (s.head_dim,), "norm", qk_norm),
        ("attn_k_norm.weight", (s.head_dim,), "norm", qk_norm),
        ("attn_output.weight", (h, q), "matrix", True),
        ("post_attention_norm.weight", (h,), "norm", gemma),
        ("ffn_norm.weight", (h,), "norm", True),
        ("ffn_gate.weight", (s.ffn, h), "matrix", True),
        ("ffn_up.weight", (s.ffn, h), "matrix", True),
        ("ffn_down.weight", (h, s.ffn), "matrix", True),
        ("post_ffw_norm.weight", (h,), "norm", gemma),
    ]
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("token_embd.weight", (s.vocab_size, h), "matrix")
    ]
    out += [
        (f"blk.{i}.{n}", shape, kind)
        for i in range(s.n_layers)
        for n, shape, kind, on in per_layer
        if on
    ]
    out.append(("output_norm.weight", (h,), "norm"))
    if not s.tied:
        out.append(("output.weight", (s.vocab_size, h), "matrix"))
    return out


def _add_metadata(w: GGUFWriter, s: TinySpec, qtype: str) -> None:
    """The keys llama.cpp's convert_hf_to_gguf.py writes for each architecture."""
    w.add_name(f"tiny-{s.arch}")
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.norm_eps)
    # Converters write key/value_length when the HF config has head_dim (not qwen2's).
    if s.arch != "qwen2":
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_file_type(_FILE_TYPES[qtype])
    if s.arch == "llama":
        w.add_vocab_size(s.vocab_size)
        w.add_rope_dimension_count(s.head_dim)
    if s.arch == "gemma2":
        w.add_attn_logit_softcapping(s.attn_softcap)
        w.add_final_logit_softcapping(s.final_softcap)
        w.add_sliding_window(s.sliding_window)
    if s.arch == "gemma3":
        if s.final_softcap:
            w.add_final_logit_softcapping(s.final_softcap)
        w.add_sliding_window(s.sliding_window)
        if s.sliding_window_pattern:
            w.add_uint32(f"{s.arch}.attention.sliding_window_pattern", s.sliding_window_pattern)
        if s.rope_base_swa:
            w.add_float32(f"{s.arch}.rope.freq_base_swa", s.rope_base_swa)
    w.add_quantization_version(2)

    tokens, scores, types = tiny_vocab(s.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if s.arch.startswith("gemma"):
        w.add_add_space_prefix(False)


def _value_type(v: Any) -> GGUFValueType:
    if isinstance(v, bool):
        return GGUFValueType.BOOL
    if isinstance(v, int):
        if 0 <= v < 1 << 32:
            return GGUFValueType.UINT32
        return GGUFValueType.UINT64 if v > 0 else GGUFValueType.INT64
    if isinstance(v, float):
        return GGUFValueType.FLOAT32
    if isinstance(v, str):
        return GGUFValueType.STRING
    if isinstance(v, list):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot infer a GGUF type for {v!r}; pass (value, GGUFValueType)")


def _override_metadata(w: GGUFWriter, metadata: Mapping[str, Any]) -> None:
    """Set, retype or (value None) delete keys; a value may be (value, type[, array item type])."""
    kv = w.kv_data[0]
    for key, v in metadata.items():
        kv.pop(key, None)
        if v is None:
            continue
        val, vtype, *sub = v if isinstance(v, tuple) else (v, _value_type(v))
        if not sub:
            sub = [_value_type(val[0]) if vtype == GGUFValueType.ARRAY and val else None]
        w.add_key_value(key, val, vtype, sub[0])


def write_tiny_gguf(
    path: str | Path,
    arch: str = "llama",
    qtype: str = "F32",
    seed: int = 0,
    *,
    metadata: Mapping[str, Any] | None = None,
    skip_tensors: Iterable[str] = (),
    tensor_shapes: Mapping[str, tuple[int, ...]] | None = None,
    tensor_types: Mapping[str, str] | None = None,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
    **overrides: Any,
) -> Path:
    """Write a random tiny `arch` model with its matrices in `qtype`; returns the path.

    Norms and biases are F32, as llama.cpp writes them. The test hooks write a
    deliberately broken file: `metadata` sets/deletes keys, `skip_tensors` leaves
    tensors out, `tensor_shapes` / `tensor_types` change a tensor's (torch-order)
    shape or type, `extra_tensors` adds arrays as they are. `overrides` are TinySpec fields.
    """
    if qtype not in QTYPES:
        raise ValueError(f"unknown tensor type {qtype!r}; choose from {', '.join(QTYPES)}")
    spec = tiny_spec(arch, **overrides)
    rng = np.random.default_rng(seed)
    path = Path(path)
    skip = set(skip_tensors)
    shapes = dict(tensor_shapes or {})
    types = dict(tensor_types or {})

    w = GGUFWriter(path, spec.arch)
    _add_metadata(w, spec, qtype)
    _override_metadata(w, metadata or {})

    for name, shape, kind in tensor_plan(spec):
        shape = tuple(shapes.get(name, shape))
        if name in skip:
            continue
        if kind != "matrix":
            # Norms near 1, biases near 0. For gemma the stored norm is what llama.cpp's
            # converter writes, 1 + w (HF's GGUF loader subtracts the 1 again).
            base = 1.0 if kind == "norm" else 0.0
            data = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(name, data)
            continue
        qt = GGMLQuantizationType[types.get(name, qtype)]
        rows, cols = shape[0], int(np.prod(shape[1:]))
        data = encode(qt, rows, cols, rng)
        if spec.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n_head = spec.n_heads if "attn_q" in name else spec.n_kv_heads
            data = _permute_rows(data, n_head)
        if data.dtype == np.uint8:
            w.add_tensor(name, data.reshape(rows, -1), raw_dtype=qt)
        else:
            w.add_tensor(name, data.reshape(shape))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a tiny random-weight GGUF model.")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--arch", choices=ARCHS, help="architecture (default: llama, or the preset's)")
    p.add_argument(
        "--type", dest="qtype", choices=QTYPES, default="F32", help="type of the weight matrices"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, help="block count (default: per arch)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 512)")
    p.add_argument("--sliding-window", type=int, help="gemma sliding window (default 8)")
    p.add_argument(
        "--preset", choices=sorted(PRESETS),
        help="a full-size model's shapes (random weights, for benchmarks; Q4_0 or Q8_0 write fastest)",
    )  # fmt: skip
    args = p.parse_args(argv)
    names = {"layers": "n_layers", "vocab": "vocab_size", "sliding_window": "sliding_window"}
    overrides = dict(PRESETS[args.preset]) if args.preset else {}
    arch = overrides.pop("arch", args.arch or "llama")
    if args.arch is not None and args.arch != arch:
        p.error(f"--preset {args.preset} is a {arch} model; --arch {args.arch} contradicts it")
    overrides.update({f: getattr(args, a) for a, f in names.items() if getattr(args, a) is not None})
    out = write_tiny_gguf(args.out, arch, args.qtype, args.seed, **overrides)
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
