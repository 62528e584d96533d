"""Random GGUF tensor data for test and benchmark models: matrices of a chosen spread in any tensor type's storage."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

# gguf-py cannot quantize K-quants, so those blocks are random bytes with chosen f16
# super-block scales: byte offsets of d and (where the type has one) dmin in a block.
_K_SCALE_OFFSETS: dict[GGMLQuantizationType, tuple[int, int | None]] = {
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108, None),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208, None),
}


# Matrices of at least this many values in Q4_0 / Q8_0 are written as uniform random
# quants with one scale (seconds for an 8B model); smaller ones go through gguf-py's
# quantizer of random floats (exact round trips for the tests' tiny models).
FAST_VALUES = 1 << 24
# std of the values of uniform random quants: Q4_0 (n - 8), n in 0..15; Q8_0 int8
_UNIFORM_STD = {
    GGMLQuantizationType.Q4_0: ((16**2 - 1) / 12) ** 0.5,
    GGMLQuantizationType.Q8_0: ((256**2 - 1) / 12) ** 0.5,
}


def _random_kquant(
    rows: int, cols: int, qtype: GGMLQuantizationType, rng: np.random.Generator, std: float
) -> np.ndarray:
    """Random valid K-quant blocks whose values have roughly zero mean and the given std per block."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = rng.integers(0, 256, size=(nb, type_size), dtype=np.uint8)
    d_off, m_off = _K_SCALE_OFFSETS[qtype]

    def set_f16(b: np.ndarray, off: int, v: np.ndarray) -> None:
        b[:, off : off + 2] = np.asarray(v, dtype="<f2").reshape(nb, 1).view(np.uint8)

    def decoded(d: float, dmin: float) -> np.ndarray:
        b = raw.copy()
        set_f16(b, d_off, np.full(nb, d))
        if m_off is not None:
            set_f16(b, m_off, np.full(nb, dmin))
        return gguf_quants.dequantize(b, qtype).reshape(nb, block).astype(np.float64)

    # Dequantization is d * A - dmin * B; pick dmin/d per block so the mean is ~0.
    a = decoded(1.0, 0.0)
    ratio = np.zeros(nb)
    vals = a
    if m_off is not None:
        b_ = -decoded(0.0, 1.0)
        b_mean = b_.mean(1)
        ratio = np.where(b_mean > 0, a.mean(1) / np.maximum(b_mean, 1e-12), 0.0)
        vals = a - ratio[:, None] * b_
    d = np.clip(std / np.maximum(vals.std(1), 1e-12), 1e-7, 1e3)
    set_f16(raw, d_off, d)
    if m_off is not None:
        set_f16(raw, m_off, d * ratio)
    return raw.reshape(rows, cols // block * type_size)


def encode(
    qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator
) -> np.ndarray:
    """A random (rows, cols) matrix with std 1/sqrt(cols) in `qtype`'s storage: floats or uint8 block rows."""
    std = 1.0 / np.sqrt(cols)
    if qtype in _K_SCALE_OFFSETS:
        return _random_kquant(rows, cols, qtype, rng, std)
    if qtype in _UNIFORM_STD and rows * cols >= FAST_VALUES:
        block, type_size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
        raw[:, :2] = np.full((raw.shape[0], 1), std / _UNIFORM_STD[qtype], dtype="<f2").view(np.uint8)
        return raw.reshape(rows, -1)
    w = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return w if qtype == GGMLQuantizationType.F32 else w.astype(np.float16)
    try:
        return np.asarray(gguf_quants.quantize(w, qtype), dtype=np.uint8)
    except NotImplementedError:
        # Types gguf-py cannot write (IQ*, Q8_1, integers): random bytes of the right size,
        # which only the broken-file tests ask for.
        block, type_size = GGML_QUANT_SIZES[qtype]
        return rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
