"""The Triton (CUDA) kernels against the plain-torch reference: compiled on a GPU, interpreted without one.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, which runs the same kernel
code with numpy on CPU tensors.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from runtime.ops import reference
from tests.test_dequantize import random_tensor

pytest.importorskip("triton")

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL, T.IQ4_XS, T.F16, T.BF16]  # fmt: skip


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    return importlib.import_module("runtime.ops.triton_kernels")


def weight(qt: T, n: int, k: int, seed: int = 0) -> torch.Tensor:
    bs, _ = GGML_QUANT_SIZES[qt]
    return torch.from_numpy(random_tensor(qt, n * k // bs, seed=seed).copy()).view(n, -1).to(DEVICE)


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_dequantize_bit_exact(kernels, qt):
    k = 512 if GGML_QUANT_SIZES[qt][0] == 256 else 96
    w = weight(qt, 37, k)
    assert torch.equal(kernels.dequantize(w, int(qt), k).cpu(), reference.dequantize(w.cpu(), int(qt), k))


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qmatmul_matches_reference(kernels, qt):
    k = 512 if GGML_QUANT_SIZES[qt][0] == 256 else 96
    w = weight(qt, 45, k, seed=1)
    for t in (1, 3, 17):  # a decode row, a small batch, a prompt tile over two BLOCK_M
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        want = reference.qmatmul(x, w.cpu(), int(qt), k)
        got = kernels.qmatmul(x.to(DEVICE), w, int(qt), k).cpu()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 2e-6, f"{qt.name} t={t}: relative error {err:.2e}"


def test_bad_weights_are_refused(kernels):
    w = weight(T.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="do not hold"):
        kernels.qmatmul(torch.randn(1, 128, device=DEVICE), w, int(T.Q8_0), 128)
    with pytest.raises(ValueError, match="no Triton kernel"):
        kernels.dequantize(w, int(T.Q8_K), 64)


@pytest.mark.parametrize("h,kvh,softcap", [(4, 1, 0.0), (4, 2, 50.0), (2, 2, 0.0)])
def test_paged_decode_matches_reference(h, kvh, softcap):
    """Decode attention over scattered cache blocks, sliding-window starts included."""
    attention = importlib.import_module("runtime.ops.triton_attention")
    g = torch.Generator().manual_seed(h + kvh)
    b, d, dv, bs, nb, w = 3, 32, 16, 8, 12, 3
    q = torch.randn(b, h, d, generator=g)
    kc, vc = torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, dv, generator=g)
    blocks = torch.randperm(nb, generator=g)[: b * w].view(b, w)
    lo, hi = torch.tensor([0, 5, 9]), torch.tensor([24, 13, 10])  # full, mid-block, a single key
    args = [t.to(DEVICE) for t in (q, kc, vc, blocks, lo, hi)]
    got = attention.paged_decode(*args, 0.25, softcap)
    want = reference.paged_decode(q, kc, vc, blocks, lo, hi, 0.25, softcap)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
