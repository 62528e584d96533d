"""Paged attention (the plain-torch reference and the compiled CPU kernels) against dense attention written out by hand."""

import math

import pytest
import torch

from runtime import ops
from runtime.config import ModelConfig, RopeConfig
from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache
from runtime.layers.attention import paged_attention
from runtime.ops import reference


@pytest.fixture(params=["reference", "compiled"])
def impl(request, monkeypatch):
    """Decode rows and prompt chunks through the plain-torch references, or through the CPU kernels."""
    if request.param == "compiled":
        ops.use_cpu_kernels()
    else:
        monkeypatch.setattr(ops, "paged_decode", reference.paged_decode)
        monkeypatch.setattr(ops, "prompt_attention", reference.prompt_attention)
    return request.param


def dense(q, k, v, positions_q, window, softcap, scale):
    """q (n, H, D), k/v (S, KVH, D) covering positions 0..S-1."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("nhd,shd->hns", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(k.shape[0])
    mask = kpos[None, :] <= positions_q[:, None]
    if window:
        mask &= kpos[None, :] > positions_q[:, None] - window
    s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("hns,shd->nhd", s.softmax(-1), v)


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0), (3, 50.0)])
def test_paged_matches_dense_over_two_steps(window, softcap, impl):
    torch.manual_seed(0)
    H, KVH, D, bs = 4, 2, 8, 4
    cfg = ModelConfig(
        arch="t", n_layers=1, hidden=32, n_heads=H, n_kv_heads=KVH, head_dim=D, v_head_dim=D,
        ffn=8, vocab_size=10, norm_eps=1e-6, context_length=64, rope=RopeConfig(1e4, D, True),
    )
    cache = KVCache(cfg, num_blocks=16, block_size=bs, dtype=torch.float32)
    lens = [7, 3, 12]
    tables = [[5, 1], [9], [2, 14, 0, 3]]  # scattered, non-contiguous blocks
    full = {i: (torch.randn(n + 1, KVH, D), torch.randn(n + 1, KVH, D), torch.randn(n + 1, H, D))
            for i, n in enumerate(lens)}
    # step 1: prefill every prompt; step 2: one decode token each
    for step in (0, 1):
        new = [list(range(n)) if step == 0 else [0] for n in lens]
        done = [0 if step == 0 else n for n in lens]
        b = ForwardBatch.build(new, done, tables, bs)
        sl = [slice(0, n) if step == 0 else slice(n, n + 1) for n in lens]
        q = torch.cat([full[i][2][sl[i]] for i in range(3)])
        k = torch.cat([full[i][0][sl[i]] for i in range(3)])
        v = torch.cat([full[i][1][sl[i]] for i in range(3)])
        out = paged_attention(q, k, v, cache, 0, b, 0.3, window, softcap)
        for i, s in enumerate(b.seqs):
            kk, vv, qq = full[i]
            end = s.n_ctx
            ref = dense(qq[sl[i]], kk[:end], vv[:end], torch.arange(end - s.n_new, end), window, softcap, 0.3)
            torch.testing.assert_close(out[s.start : s.start + s.n_new], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (3, 50.0)])
@pytest.mark.parametrize("query_block", [4, 128])
def test_prompt_chunks_in_query_blocks_match_dense(window, softcap, query_block, impl, monkeypatch):
    """Prompts prefilled in two chunks (the second attends to the first's cached keys), the
    reference taking `query_block` queries at a time over only the keys they see."""
    monkeypatch.setattr(reference, "QUERY_BLOCK", query_block)
    torch.manual_seed(1)
    H, KVH, D, bs = 6, 2, 8, 4
    cfg = ModelConfig(
        arch="t", n_layers=1, hidden=48, n_heads=H, n_kv_heads=KVH, head_dim=D, v_head_dim=D,
        ffn=8, vocab_size=10, norm_eps=1e-6, context_length=64, rope=RopeConfig(1e4, D, True),
    )  # fmt: skip
    cache = KVCache(cfg, num_blocks=24, block_size=bs, dtype=torch.float32)
    lens, first = [17, 10], [9, 10]  # the second prompt in one chunk, the first in two
    tables = [[5, 1, 7, 11, 20], [9, 2, 14]]
    full = {i: (torch.randn(n, KVH, D), torch.randn(n, KVH, D), torch.randn(n, H, D)) for i, n in enumerate(lens)}
    for chunk in (0, 1):
        spans = [(0, f) if chunk == 0 else (f, n) for n, f in zip(lens, first)]
        live = [i for i, (a, b) in enumerate(spans) if b > a]
        b = ForwardBatch.build([list(range(*spans[i])) for i in live], [spans[i][0] for i in live],
                               [tables[i] for i in live], bs)  # fmt: skip
        q, k, v = (torch.cat([full[i][j][slice(*spans[i])] for i in live]) for j in (2, 0, 1))
        out = paged_attention(q, k, v, cache, 0, b, 0.3, window, softcap)
        for s, i in zip(b.seqs, live):
            kk, vv, qq = full[i]
            lo, hi = spans[i]
            ref = dense(qq[lo:hi], kk[:hi], vv[:hi], torch.arange(lo, hi), window, softcap, 0.3)
            torch.testing.assert_close(out[s.start : s.start + s.n_new], ref, rtol=1e-5, atol=1e-5)
