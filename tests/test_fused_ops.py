"""The fused CPU kernels of the per-token ops (RMS norm, rotary, gated activation, decode attention, grammar masks) against their plain-torch reference."""

from __future__ import annotations

import pytest
import torch

from runtime import ops
from runtime.ops import reference


@pytest.fixture(scope="module", autouse=True)
def kernels():
    ops.use_cpu_kernels()


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("shape", [(1, 640), (7, 640), (5, 4, 256), (3, 33), (0, 8)])
def test_rms_norm_matches_reference(shape):
    x, w = rand(*shape), rand(shape[-1], seed=1)
    got, want = ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == x.dtype
    # float32 sums of squares in another order: a few ulps
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_rms_norm_keeps_the_activation_dtype_and_takes_strided_input():
    x, w = rand(6, 64, dtype=torch.bfloat16), rand(64, seed=1)
    got = ops.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-5), rtol=1e-2, atol=1e-2)
    xt = rand(64, 6).t()  # not contiguous
    torch.testing.assert_close(ops.rms_norm(xt, w, 1e-5), reference.rms_norm(xt, w, 1e-5), rtol=2e-6, atol=1e-6)


def test_rms_norm_row_does_not_depend_on_the_batch():
    x, w = rand(300, 640), rand(640, seed=1)  # 300 rows: chunks on several kernel threads
    batch = ops.rms_norm(x, w, 1e-6)
    for r in (4, 250):
        assert torch.equal(batch[r : r + 1], ops.rms_norm(x[r : r + 1], w, 1e-6))


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "norm"])
@pytest.mark.parametrize("t,h,d,rot", [(1, 4, 256, 256), (5, 2, 64, 64), (3, 3, 128, 64), (0, 2, 8, 8)])
def test_rope_is_bit_exact(neox, t, h, d, rot):
    x = rand(t, h, d)
    angles = torch.arange(t, dtype=torch.float32)[:, None] * rand(rot // 2, seed=2).abs()
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    got = ops.rope(x, cos, sin, neox)
    # the same products and sums, each rounded once, with no fused multiply-add
    assert torch.equal(got, reference.rope(x, cos, sin, neox))
    if rot < d:
        assert torch.equal(got[..., rot:], x[..., rot:])


def test_rope_bfloat16_activations():
    x = rand(2, 2, 16, dtype=torch.bfloat16)
    cos, sin = torch.ones(2, 1, 8) * 0.6, torch.ones(2, 1, 8) * 0.8
    got = ops.rope(x, cos, sin, True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, reference.rope(x, cos, sin, True))


@pytest.mark.parametrize("gelu", [True, False], ids=["gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", [(1, 2048), (5, 33), (3, 4, 16), (0, 8)])
def test_gated_matches_reference(gelu, shape):
    gate, up = rand(*shape, seed=2) * 2, rand(*shape, seed=3)  # |gate| up to ~25: exp's far range
    got = ops.gated(gate, up, gelu)
    assert got.shape == gate.shape and got.dtype == gate.dtype
    # the exact activation in float64; the float32 reference (torch) rounds tanh(z) to -1 for
    # z < -8.7, losing gelu's tail (~1e-7) that the kernel's x / (1 + exp(-2z)) keeps
    g64 = gate.double()
    z = 0.7978845608028654 * (g64 + 0.044715 * g64**3)
    exact = (g64 / (1 + torch.exp(-2 * z)) if gelu else g64 * torch.sigmoid(g64)) * up.double()
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, reference.gated(gate, up, gelu), rtol=1e-6, atol=1e-6)
    alone = [ops.gated(gate[i : i + 1], up[i : i + 1], gelu) for i in range(shape[0])]
    assert all(torch.equal(a, got[i : i + 1]) for i, a in enumerate(alone))  # rows do not depend on the batch


def test_gated_keeps_bfloat16_and_checks_shapes():
    gate, up = rand(4, 64, seed=4, dtype=torch.bfloat16), rand(4, 64, seed=5, dtype=torch.bfloat16)
    got = ops.gated(gate, up, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.gated(gate, up, True), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="differ in shape"):
        ops.gated(rand(4, 64), rand(4, 32), True)
    torch.library.opcheck(torch.ops.gguf_serve.gated, (rand(3, 40), rand(3, 40, seed=1), True))


def test_opcheck():
    torch.library.opcheck(torch.ops.gguf_serve.rms_norm, (rand(3, 16), rand(16, seed=1), 1e-6))
    cos, sin = torch.rand(3, 1, 4), torch.rand(3, 1, 4)
    torch.library.opcheck(torch.ops.gguf_serve.rope, (rand(3, 2, 8), cos, sin, False))


def test_bad_shapes_are_errors():
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(rand(2, 8), rand(7), 1e-6)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.rope(rand(2, 8), torch.ones(2, 1, 4), torch.ones(2, 1, 4), True)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rope(rand(2, 1, 8), torch.ones(3, 1, 4), torch.ones(3, 1, 4), True)
    with pytest.raises(RuntimeError, match="exceeds head_dim"):
        ops.rope(rand(2, 1, 8), torch.ones(2, 1, 8), torch.ones(2, 1, 8), True)


def paged_case(b=5, h=4, kvh=1, d=64, dv=64, bs=16, nb=40, w=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g)
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kvh, dv, generator=g).to(dtype)
    blocks = torch.randperm(nb, generator=g)[: b * w].view(b, w)  # scattered, as the pool hands them out
    hi = torch.randint(1, w * bs + 1, (b,), generator=g)
    lo = (hi - torch.randint(1, w * bs + 1, (b,), generator=g)).clamp(min=0)  # sliding windows start later
    return q, kc, vc, blocks, lo, hi


@pytest.mark.parametrize("h,kvh", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("softcap", [0.0, 50.0])
@pytest.mark.parametrize("d,dv", [(64, 32), (48, 16), (40, 24)])  # AVX-512 path (16s, a 16 after 32s); other sizes
def test_paged_decode_matches_reference(h, kvh, softcap, d, dv):
    q, kc, vc, blocks, lo, hi = paged_case(h=h, kvh=kvh, d=d, dv=dv)
    got = ops.paged_decode(q, kc, vc, blocks, lo, hi, 0.125, softcap)
    want = reference.paged_decode(q, kc, vc, blocks, lo, hi, 0.125, softcap)
    assert got.shape == (5, h, dv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_paged_decode_reads_bfloat16_caches():
    q, kc, vc, blocks, lo, hi = paged_case(dtype=torch.bfloat16)
    got = ops.paged_decode(q, kc, vc, blocks, lo, hi, 0.125)
    torch.testing.assert_close(got, reference.paged_decode(q, kc, vc, blocks, lo, hi, 0.125, 0.0), rtol=1e-5, atol=1e-6)


def test_paged_decode_row_does_not_depend_on_the_batch():
    q, kc, vc, blocks, lo, hi = paged_case(b=8)
    together = ops.paged_decode(q, kc, vc, blocks, lo, hi, 0.125)
    for i in range(8):
        alone = ops.paged_decode(q[i : i + 1], kc, vc, blocks[i : i + 1], lo[i : i + 1], hi[i : i + 1], 0.125)
        assert torch.equal(alone[0], together[i])


def test_paged_decode_same_whatever_the_threads():
    """The query heads of a KV head are taken in shares that depend on the thread count (so
    each thread has work); each head's result must not."""
    q, kc, vc, blocks, lo, hi = paged_case(b=1, h=8, kvh=1)
    outs = []
    try:
        for threads in (1, 2, 4, 8):
            ops.set_num_threads(threads)
            outs.append(ops.paged_decode(q, kc, vc, blocks, lo, hi, 0.125))
    finally:
        ops.set_num_threads(0)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    torch.testing.assert_close(outs[0], reference.paged_decode(q, kc, vc, blocks, lo, hi, 0.125, 0.0), rtol=1e-5, atol=1e-6)


def test_paged_decode_opcheck_and_bad_input():
    q, kc, vc, blocks, lo, hi = paged_case(b=2)
    torch.library.opcheck(torch.ops.gguf_serve.paged_decode, (q, kc, vc, blocks, lo, hi, 0.125, 0.0))
    bad = blocks.clone()
    bad[0, 0] = 99  # past the 40 blocks: refused, never read
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode(q, kc, vc, bad, torch.zeros(2, dtype=torch.int64), hi, 0.125)
    with pytest.raises(RuntimeError, match="outside"):  # lo past hi
        ops.paged_decode(q, kc, vc, blocks, hi + 1, hi, 0.125)
    with pytest.raises(RuntimeError, match="outside"):  # more keys than the blocks hold
        ops.paged_decode(q, kc, vc, blocks, lo, hi + 64, 0.125)
    with pytest.raises(RuntimeError, match="group"):
        ops.paged_decode(torch.randn(2, 3, 64), torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64),
                         torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                         torch.ones(2, dtype=torch.int64), 0.125)


def _mask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """(rows, words) int32 with whole words allowed (-1), banned (0) and mixed, a row unconstrained."""
    g = torch.Generator().manual_seed(seed)
    words = (vocab + 31) // 32
    m = torch.randint(-(2**31), 2**31, (rows, words), generator=g, dtype=torch.int64).to(torch.int32)
    kind = torch.randint(0, 3, (rows, words), generator=g)
    m[kind == 0] = -1
    m[kind == 1] = 0
    m[0] = -1
    return m


@pytest.mark.parametrize(("rows", "vocab"), [(1, 32), (3, 100), (9, 1000), (2, 262144)])
def test_apply_bitmask_matches_reference(rows, vocab):
    x, m = rand(rows, vocab), _mask(rows, vocab, rows)
    got, want = x.clone(), x.clone()
    ops.apply_bitmask_(got, m)
    reference.apply_bitmask_(want, m)
    assert torch.equal(got, want)
    assert torch.equal(got[0], x[0])  # the unconstrained row is untouched
    word, bit = divmod(vocab - 1, 32)  # spot-check the layout: bit t % 32 of word t // 32
    banned = not (int(m[-1, word]) >> bit) & 1
    assert (got[-1, -1] == float("-inf")) == banned and (banned or got[-1, -1] == x[-1, -1])


def test_apply_bitmask_opcheck_and_bad_input():
    x, m = rand(2, 70), _mask(2, 70, 0)
    torch.library.opcheck(torch.ops.gguf_serve.apply_bitmask_, (x, m))
    with pytest.raises(RuntimeError, match="do not cover"):
        ops.apply_bitmask_(rand(2, 70), m[:, :2])
    with pytest.raises(RuntimeError, match="float32"):
        ops.apply_bitmask_(rand(2, 70).double(), m)
    with pytest.raises(RuntimeError, match="int32"):
        ops.apply_bitmask_(rand(2, 70), m.long())
