"""The CPU's prompt attention (csrc/prompt_attention.cpp) against its plain-torch reference, on both of its paths."""

import math

import pytest
import torch

from runtime import ops
from runtime.ops import reference
from runtime.ops.cpu_extension import load


@pytest.fixture(params=["avx512", "rows"])
def path(request):
    """The AVX-512 kernel, or the per-row fallback of CPUs without it (both run here when the CPU has AVX-512)."""
    ops.use_cpu_kernels()
    kernels = load()
    kernels.allow_avx512_attention(request.param == "avx512")
    yield request.param
    kernels.allow_avx512_attention(True)


def sequence(n, start, h, kvh, d, dv, bs, dtype=torch.float32, seed=0):
    """A chunk of n queries after `start` cached keys, its blocks scattered over a larger cache."""
    g = torch.Generator().manual_seed(seed)
    width = -(-(start + n) // bs) + 1
    nb = width + 6
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kvh, dv, generator=g).to(dtype)
    blocks = torch.randperm(nb, generator=g)[:width]
    q = torch.randn(n, h, d, generator=g)
    return q, kc, vc, blocks


SHAPES = [  # n, start, heads, kv heads, head dim, v head dim, block size
    (1, 0, 4, 1, 16, 16, 4),
    (7, 0, 4, 1, 256, 256, 16),  # Gemma 3 270M's heads, a short prompt
    (40, 9, 6, 2, 8, 8, 4),  # a second chunk
    (33, 7, 6, 2, 24, 40, 4),  # head dims off the 16 lanes
    (70, 100, 8, 1, 64, 64, 16),  # 70 queries = 512 rows, over several units
    (130, 3, 3, 1, 17, 9, 32),  # 3 heads a KV head: rows padded to the lanes
    (90, 0, 32, 8, 128, 128, 16),  # Llama 3 8B's grouping
    (20, 30, 5, 5, 32, 32, 8),  # no grouping
]


@pytest.mark.parametrize("window", [0, 5, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, window, path):
    q, kc, vc, blocks = sequence(*shape)
    scale = 1 / math.sqrt(q.shape[-1])
    got = ops.prompt_attention(q, kc, vc, blocks, shape[1], window, scale)
    want = reference.prompt_attention(q, kc, vc, blocks, shape[1], window, scale, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("softcap", [5.0, 50.0])
def test_softcap(softcap, path):
    q, kc, vc, blocks = sequence(50, 20, 4, 2, 32, 32, 8)
    got = ops.prompt_attention(q, kc, vc, blocks, 20, 0, 0.5, softcap)
    torch.testing.assert_close(got, reference.prompt_attention(q, kc, vc, blocks, 20, 0, 0.5, softcap), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_caches_and_activations(dtype, path):
    q, kc, vc, blocks = sequence(45, 10, 4, 2, 32, 48, 8, dtype=dtype)
    got = ops.prompt_attention(q.to(dtype), kc, vc, blocks, 10, 7, 0.2)
    assert got.dtype == dtype
    want = reference.prompt_attention(q.to(dtype), kc, vc, blocks, 10, 7, 0.2, 0.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    # float32 queries over the same half-precision keys: as exact as float32 caches
    torch.testing.assert_close(
        ops.prompt_attention(q, kc, vc, blocks, 10, 7, 0.2), reference.prompt_attention(q, kc, vc, blocks, 10, 7, 0.2, 0.0),
        rtol=1e-5, atol=2e-6,
    )


@pytest.mark.parametrize("window", [0, 24])
def test_a_row_does_not_depend_on_the_chunk(window, path):
    """A query's output is the same bits whether it comes in one chunk of 150 or in chunks of
    other sizes (other units around it, at other lanes): its sums run in one order."""
    q, kc, vc, blocks = sequence(150, 0, 4, 1, 64, 64, 16)
    whole = ops.prompt_attention(q, kc, vc, blocks, 0, window, 0.125)
    for cut in ([0, 1, 17, 80, 150], [0, 63, 64, 150]):
        parts = [ops.prompt_attention(q[a:b], kc, vc, blocks, a, window, 0.125) for a, b in zip(cut, cut[1:])]
        assert torch.equal(torch.cat(parts), whole)


def test_same_whatever_the_threads():
    ops.use_cpu_kernels()
    q, kc, vc, blocks = sequence(200, 5, 4, 1, 64, 64, 16)
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            outs.append(ops.prompt_attention(q, kc, vc, blocks, 5, 0, 0.125))
    finally:
        ops.set_num_threads(0)
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_opcheck_and_bad_input():
    ops.use_cpu_kernels()
    q, kc, vc, blocks = sequence(9, 3, 4, 2, 16, 16, 4)
    torch.library.opcheck(torch.ops.gguf_serve.prompt_attention, (q, kc, vc, blocks, 3, 0, 0.25, 0.0))
    assert ops.prompt_attention(q[:0], kc, vc, blocks, 3, 0, 0.25).shape == (0, 4, 16)
    with pytest.raises(RuntimeError, match="block id"):
        ops.prompt_attention(q, kc, vc, blocks + 100, 3, 0, 0.25)
    with pytest.raises(RuntimeError, match="outside the"):
        ops.prompt_attention(q, kc, vc, blocks[:2], 3, 0, 0.25)
    with pytest.raises(RuntimeError, match="do not group"):
        ops.prompt_attention(torch.randn(9, 3, 16), kc, vc, blocks, 3, 0, 0.25)
    with pytest.raises(RuntimeError, match=">= 0"):
        ops.prompt_attention(q, kc, vc, blocks, -1, 0, 0.25)
    with pytest.raises(RuntimeError, match="key dim"):
        ops.prompt_attention(torch.randn(9, 4, 8), kc, vc, blocks, 3, 0, 0.25)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        ops.prompt_attention(q, kc, vc.half(), blocks, 3, 0, 0.25)
