"""Broken, truncated and hostile GGUF files: load_model raises a one-line GGUFError, the CLI prints one error line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from runtime.errors import GGUFError, UnsupportedModelError
from runtime.loader import load_model
from scripts.make_tiny_gguf import tiny_vocab, write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid one-layer llama every broken file here is derived from."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("tiny") / "tiny.gguf", "llama", n_layers=1, vocab_size=300
    )


@pytest.fixture(scope="module")
def data_offset(tiny: Path) -> int:
    return int(gguf.GGUFReader(tiny).data_offset)


def expect_error(path: Path, *fragments: str, kind: type[GGUFError] = GGUFError) -> str:
    """load_model(path) must raise `kind` with a one-line message containing every fragment."""
    with pytest.raises(GGUFError) as info:
        load_model(path)
    err = info.value
    msg = str(err)
    assert isinstance(err, kind), f"{type(err).__name__}: {msg}"
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert len(msg) < 300, msg
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in {msg!r}"
    return msg


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tensor_type_offset(data: bytes | bytearray, name: str, n_dims: int) -> int:
    """Byte offset of a tensor's ggml type id in the tensor-info table (name, n_dims, dims, type)."""
    pos = data.rfind(name.encode())
    assert pos > 0
    return pos + len(name) + 4 + 8 * n_dims


# -- not a GGUF file at all ------------------------------------------------------------------


def test_nonexistent_path(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path: Path) -> None:
    expect_error(tmp_path, "directory")


def test_empty_file(tmp_path: Path) -> None:
    expect_error(write_bytes(tmp_path / "empty.gguf", b""), "too small")


def test_text_file(tmp_path: Path) -> None:
    text = b"This is a plain text file, not a model.\n" * 20
    expect_error(write_bytes(tmp_path / "notes.gguf", text), "not a GGUF file")


def test_wrong_magic(tmp_path: Path, tiny: Path) -> None:
    data = tiny.read_bytes()
    expect_error(write_bytes(tmp_path / "magic.gguf", b"GGML" + data[4:]), "not a GGUF file")


def test_unknown_version(tmp_path: Path, tiny: Path) -> None:
    data = tiny.read_bytes()
    expect_error(
        write_bytes(tmp_path / "v99.gguf", data[:4] + (99).to_bytes(4, "little") + data[8:]),
        "version",
    )


# -- truncated files -------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [4, 23])
def test_cut_before_the_header_ends(tmp_path: Path, tiny: Path, cut: int) -> None:
    expect_error(write_bytes(tmp_path / "cut.gguf", tiny.read_bytes()[:cut]), "too small")


def test_cut_anywhere_in_the_header(tmp_path: Path, tiny: Path, data_offset: int) -> None:
    """Every cut between the fixed header and the tensor data: counts, keys, vocabulary, tensor infos."""
    data = tiny.read_bytes()
    cuts = list(range(24, data_offset, 53)) + [data_offset - 1]
    for cut in cuts:
        expect_error(write_bytes(tmp_path / "cut.gguf", data[:cut]), "truncated")


@pytest.mark.parametrize("into", [0, 100, -1])
def test_cut_in_tensor_data(tmp_path: Path, tiny: Path, data_offset: int, into: int) -> None:
    data = tiny.read_bytes()
    cut = len(data) - 1 if into < 0 else data_offset + into
    expect_error(write_bytes(tmp_path / "cut.gguf", data[:cut]), "truncated", "tensor")


# -- architecture, tensors -------------------------------------------------------------------


def test_unknown_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(
        tmp_path / "m.gguf", n_layers=1, metadata={"general.architecture": "mamba9"}
    )
    msg = expect_error(path, "mamba9", kind=UnsupportedModelError)
    for arch in ("llama", "qwen2", "qwen3", "gemma2", "gemma3"):
        assert arch in msg


def test_missing_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", n_layers=1, metadata={"general.architecture": None})
    expect_error(path, "general.architecture")


def test_unknown_tensor_type_id(tmp_path: Path, tiny: Path) -> None:
    """Type id 31 (Q4_0_4_4) was removed from GGUF; gguf-py no longer knows it."""
    data = bytearray(tiny.read_bytes())
    pos = tensor_type_offset(data, "blk.0.ffn_up.weight", 2)
    assert int.from_bytes(data[pos : pos + 4], "little") == gguf.GGMLQuantizationType.F32
    data[pos : pos + 4] = (31).to_bytes(4, "little")
    expect_error(
        write_bytes(tmp_path / "t.gguf", bytes(data)),
        "blk.0.ffn_up.weight",
        "31",
        kind=UnsupportedModelError,
    )


def test_non_weight_tensor_type(tmp_path: Path) -> None:
    """Q8_1 exists in ggml only as a matmul intermediate: no model stores weights in it."""
    path = write_tiny_gguf(
        tmp_path / "q81.gguf", n_layers=1, tensor_types={"blk.0.ffn_up.weight": "Q8_1"}
    )
    expect_error(path, "blk.0.ffn_up.weight", "Q8_1", kind=UnsupportedModelError)


def test_iq_tensor_type_loads_or_says_unsupported(tmp_path: Path) -> None:
    """Whether IQ2_XXS is supported is up to the dequantizers; it must never crash otherwise."""
    path = write_tiny_gguf(
        tmp_path / "iq.gguf", n_layers=1, tensor_types={"blk.0.ffn_up.weight": "IQ2_XXS"}
    )
    try:
        load_model(path)
    except GGUFError as e:
        assert isinstance(e, UnsupportedModelError) and "\n" not in str(e) and "IQ2_XXS" in str(e)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "token_embd.weight", "output_norm.weight"])
def test_missing_tensor(tmp_path: Path, name: str) -> None:
    expect_error(
        write_tiny_gguf(tmp_path / "m.gguf", n_layers=1, skip_tensors=[name]), "missing", name
    )


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("blk.0.attn_k.weight", (256, 256)),
        ("blk.0.attn_norm.weight", (128,)),
        ("token_embd.weight", (300, 128)),
    ],
)
def test_misshaped_tensor(tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    path = write_tiny_gguf(tmp_path / "s.gguf", n_layers=1, tensor_shapes={name: shape})
    expect_error(path, name, "shape")


def test_unused_tensor(tmp_path: Path) -> None:
    extra = {"blk.0.attn_qkv.weight": np.zeros((768, 256), dtype=np.float32)}
    expect_error(
        write_tiny_gguf(tmp_path / "x.gguf", n_layers=1, extra_tensors=extra), "does not use"
    )


@pytest.mark.parametrize("n", [3, 64])
def test_bad_rope_freqs(tmp_path: Path, n: int) -> None:
    """llama3's per-frequency factors: one per rotated pair (32 here), all positive."""
    extra = {"rope_freqs.weight": np.full(n, 1.0, dtype=np.float32)}
    expect_error(
        write_tiny_gguf(tmp_path / "r.gguf", n_layers=1, extra_tensors=extra), "rope_freqs"
    )


# -- absurd metadata -------------------------------------------------------------------------


def _short_vocab(n: int) -> dict[str, Any]:
    tokens, scores, types = tiny_vocab(n)
    arr = GGUFValueType.ARRAY
    return {
        "tokenizer.ggml.tokens": (tokens, arr, GGUFValueType.STRING),
        "tokenizer.ggml.scores": (scores, arr, GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": (types, arr, GGUFValueType.INT32),
    }


ABSURD: list[tuple[str, dict[str, Any], str]] = [
    ("llama", {"llama.block_count": 10**9}, "block_count"),
    ("gemma3", {"gemma3.block_count": 10**9}, "block_count"),
    ("llama", {"llama.attention.head_count": 0}, "head_count"),
    ("llama", {"llama.attention.head_count_kv": 0}, "head_count_kv"),
    ("llama", {"llama.attention.head_count": 3}, "head_count=3"),  # 256 is not a multiple of 3
    ("llama", {"llama.context_length": (-5, GGUFValueType.INT32)}, "context_length"),
    ("llama", {"llama.context_length": 1 << 40}, "context_length"),
    ("llama", {"llama.embedding_length": 0}, "embedding_length"),
    ("llama", {"llama.attention.layer_norm_rms_epsilon": -1.0}, "epsilon"),
    ("llama", {"llama.attention.layer_norm_rms_epsilon": float("nan")}, "epsilon"),
    ("llama", {"llama.rope.freq_base": 0.0}, "freq_base"),
    ("llama", {"llama.rope.dimension_count": 7}, "dimension_count"),
    ("llama", {"llama.attention.key_length": 100000}, "key_length"),
    ("llama", {"llama.block_count": "two"}, "block_count"),
    ("llama", {"llama.block_count": None}, "block_count"),
    ("llama", {"llama.rope.scaling.type": "yarn"}, "yarn"),
    ("gemma3", {"gemma3.attention.sliding_window": (-4, GGUFValueType.INT32)}, "sliding_window"),
    ("gemma3", {"gemma3.attention.sliding_window_pattern": 0}, "sliding_window_pattern"),
    ("llama", _short_vocab(290), "vocabulary"),  # a valid vocabulary, 10 rows short
    ("llama", {"tokenizer.ggml.tokens": None}, "token"),
]


@pytest.mark.parametrize(
    ("arch", "metadata", "fragment"), ABSURD, ids=[f"{a}-{f}" for a, _, f in ABSURD]
)
def test_absurd_metadata(
    tmp_path: Path, arch: str, metadata: dict[str, Any], fragment: str
) -> None:
    path = write_tiny_gguf(tmp_path / "a.gguf", arch, n_layers=1, metadata=metadata)
    t0 = time.perf_counter()
    expect_error(path, fragment)
    # A billion layers must be refused from the metadata, not after building per-layer state.
    assert time.perf_counter() - t0 < 10


def test_huge_string_array_count(tmp_path: Path, tiny: Path) -> None:
    """A vocabulary count of millions in a small file fails at once, not after reading past the end."""
    field = gguf.GGUFReader(tiny).fields["tokenizer.ggml.tokens"]
    key = b"tokenizer.ggml.tokens"
    pos = int(field.offset) + 8 + len(key) + 4 + 4  # key length, key, value type, item type
    data = bytearray(tiny.read_bytes())
    assert int.from_bytes(data[pos : pos + 8], "little") == 300
    data[pos : pos + 8] = (8_000_000).to_bytes(8, "little")
    t0 = time.perf_counter()
    expect_error(write_bytes(tmp_path / "n.gguf", bytes(data)), "truncated")
    assert time.perf_counter() - t0 < 2


def test_corrupted_header_bytes(tmp_path: Path, tiny: Path, data_offset: int) -> None:
    """Random byte damage in the header: the file loads (a harmless spot) or fails with a GGUFError."""
    data = tiny.read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.gguf"
    for _ in range(150):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, data_offset))
            width = int(rng.choice([1, 4, 8]))
            b[pos : pos + width] = rng.integers(0, 256, size=width, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(b[: len(data)]))
        try:
            load_model(path)
        except GGUFError as e:
            msg = str(e)
            assert msg and "\n" not in msg and len(msg) < 300, repr(msg)


# -- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["truncated", "unknown-arch", "missing"])
def test_cli_reports_one_error_line(tmp_path: Path, tiny: Path, broken: str) -> None:
    if broken == "truncated":
        path = write_bytes(tmp_path / "b.gguf", tiny.read_bytes()[:5000])
    elif broken == "unknown-arch":
        path = write_tiny_gguf(
            tmp_path / "b.gguf", n_layers=1, metadata={"general.architecture": "mamba9"}
        )
    else:
        path = tmp_path / "absent.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "-m", str(path), "-p", "hi", "-n", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
