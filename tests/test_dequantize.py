"""Torch dequantization is bit-identical to gguf-py's numpy reference for every supported type."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference

from runtime.errors import GGUFError, UnsupportedModelError
from runtime.gguf.quants import REGISTRY, dequantize, quant_type

# Byte offsets of each type's float16 scale fields: random bytes there could be NaN/Inf.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0],
}  # fmt: skip


def random_tensor(qt: T, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes of n_blocks blocks of type qt, with finite scales (uint8, flat)."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[qt]
    if qt == T.F32:
        return rng.standard_normal(n_blocks * bs).astype(np.float32).view(np.uint8)
    if qt == T.F16:
        return rng.standard_normal(n_blocks * bs).astype(np.float16).view(np.uint8)
    if qt == T.BF16:
        f = rng.standard_normal(n_blocks * bs).astype(np.float32).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        raw[:, off : off + 2] = rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


def expected(raw: np.ndarray, qt: T, shape) -> torch.Tensor:
    _, ts = GGML_QUANT_SIZES[qt]
    blocks = raw if qt in (T.F32, T.F16, T.BF16) else raw.reshape(-1, ts)
    return torch.from_numpy(reference(blocks, qt).astype(np.float32).reshape(shape))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("qt", list(REGISTRY), ids=lambda t: t.name)
@pytest.mark.parametrize("n_blocks,rows", [(1, 1), (6, 3), (48, 3), (96, 96)])
def test_bit_identical_to_gguf(qt, n_blocks, rows):
    bs, _ = GGML_QUANT_SIZES[qt]
    raw = random_tensor(qt, n_blocks, seed=n_blocks)
    shape = (rows, n_blocks * bs // rows)
    # A chunk of 5 blocks: chunk boundaries fall inside rows.
    got = dequantize(raw, qt, shape, chunk_elements=5 * bs)
    assert bits_equal(got, expected(raw, qt, shape))


@pytest.mark.parametrize("qt", [T.Q4_K, T.Q8_0, T.BF16], ids=lambda t: t.name)
def test_bfloat16_output_is_the_float32_result_rounded(qt):
    bs, _ = GGML_QUANT_SIZES[qt]
    raw = random_tensor(qt, 8)
    f32 = dequantize(raw, qt, (8 * bs,))
    assert torch.equal(dequantize(raw, qt, (8 * bs,), dtype=torch.bfloat16), f32.to(torch.bfloat16))


def test_read_only_memory_map_views_are_accepted(tmp_path):
    raw = random_tensor(T.Q6_K, 4)
    path = tmp_path / "t.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert bits_equal(dequantize(mm, T.Q6_K, (4, 256)), expected(raw, T.Q6_K, (4, 256)))


def test_wrong_byte_count_and_ragged_rows_are_gguf_errors():
    raw = random_tensor(T.Q4_0, 4)
    with pytest.raises(GGUFError, match="needs 72 bytes, has 71"):
        dequantize(raw[:-1], T.Q4_0, (4, 32))
    with pytest.raises(GGUFError, match="whole blocks"):
        dequantize(raw, T.Q4_0, (8, 16))


@pytest.mark.parametrize("qt", [T.IQ2_XXS, T.TQ1_0, T.Q8_1])
def test_unsupported_types_name_themselves_and_the_supported_ones(qt):
    with pytest.raises(UnsupportedModelError) as e:
        quant_type(qt)
    msg = str(e.value)
    assert qt.name in msg and "Q4_K" in msg and "\n" not in msg


def test_registry_sizes_match_ggml():
    for qt, impl in REGISTRY.items():
        assert (impl.block_size, impl.type_size) == GGML_QUANT_SIZES[qt]


def test_default_model_tensors_of_every_type(default_model_path):
    """One real tensor of each type in the default model (F32, Q5_0, Q8_0, Q4_K, Q6_K)."""
    from runtime.gguf.reader import GGUFFile

    f = GGUFFile(default_model_path)
    seen = {}
    for t in f:
        if t.qtype not in seen and t.n_elements <= 1 << 21:
            seen[t.qtype] = t
    big = {t.qtype: t for t in f if t.qtype not in seen}  # e.g. token_embd (Q8_0) is large
    seen.update({k: v for k, v in big.items() if k not in seen})
    assert {T.F32, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K} <= set(seen)
    for qt, t in seen.items():
        got = dequantize(t.data, qt, t.shape)
        assert bits_equal(got, expected(np.asarray(t.data), qt, t.shape)), t.name
