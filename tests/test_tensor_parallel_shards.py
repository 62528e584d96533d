"""Tensor parallelism's sharding math: how heads, MLP rows and quantized blocks split across ranks, and its clear errors."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from runtime.gguf.quants import dequantize, quant_type
from runtime.layers.linear import QuantWeight
from runtime.loader import load_model
from runtime.parallel import Cut, Shard, TensorParallelError, slice_weight, tensor_split
from scripts.make_tiny_gguf import write_tiny_gguf


def _cfg(tmp_path, arch="llama", **kw):
    return load_model(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, "F32", **kw)).config


# -- sharding math ----------------------------------------------------------------------


def test_heads_and_mlp_split_evenly(tmp_path):
    cfg = _cfg(tmp_path, n_heads=8, n_kv_heads=4, ffn=512)
    shards = [Shard.of(cfg, r, 2) for r in range(2)]
    assert [s.q_heads for s in shards] == [(0, 4), (4, 8)]
    assert [s.kv_heads for s in shards] == [(0, 2), (2, 4)]
    assert [s.ffn for s in shards] == [(0, 256), (256, 512)]
    local = shards[1].config(cfg)
    assert (local.n_heads, local.n_kv_heads, local.ffn, local.hidden) == (4, 2, 256, cfg.hidden)
    hd = cfg.head_dim
    assert shards[1].cut("blk.3.attn_q.weight", cfg) == Cut(0, 4 * hd, 8 * hd, 8 * hd)
    assert shards[1].cut("blk.0.attn_k.bias", cfg) == Cut(0, 2 * hd, 4 * hd, 4 * hd)
    assert shards[1].cut("blk.0.attn_output.weight", cfg) == Cut(1, 4 * hd, 8 * hd, 8 * hd)
    assert shards[1].cut("blk.0.ffn_down.weight", cfg) == Cut(1, 256, 512, 512)
    assert shards[1].cut("blk.0.ffn_up.weight", cfg) == Cut(0, 256, 512, 512)
    for replicated in (
        "blk.0.attn_norm.weight",
        "blk.0.attn_q_norm.weight",
        "token_embd.weight",
        "output.weight",
    ):
        assert shards[1].cut(replicated, cfg) is None


def test_kv_heads_are_replicated_beyond_their_count(tmp_path):
    """vLLM's rule: with more ranks than KV heads, each rank keeps the KV head its queries read."""
    cfg = _cfg(tmp_path, n_heads=4, n_kv_heads=2)
    assert [Shard.of(cfg, r, 4).kv_heads for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    one = _cfg(tmp_path, "gemma3", n_heads=4, n_kv_heads=1)
    assert [Shard.of(one, r, 2).kv_heads for r in range(2)] == [(0, 1), (0, 1)]
    assert Shard.of(one, 1, 2).config(one).n_kv_heads == 1


@pytest.mark.parametrize(
    "kw, world, message",
    [
        (
            dict(n_heads=4, n_kv_heads=2),
            3,
            "4 attention heads cannot be split evenly across 3 ranks",
        ),
        (
            dict(n_heads=12, n_kv_heads=3, head_dim=32, hidden=384),
            2,
            "3 KV heads cannot be split across 2 ranks",
        ),
        (dict(ffn=518), 4, "feed_forward_length 518 cannot be split evenly across 4 ranks"),
    ],
)
def test_unsplittable_models_are_refused(tmp_path, kw, world, message):
    with pytest.raises(TensorParallelError, match=message):
        Shard.of(_cfg(tmp_path, **kw), 0, world)


def test_dense_shards_put_back_together():
    w = torch.randn(8, 12)
    rows = [slice_weight("x", w, Cut(0, r * 4, r * 4 + 4, 8)) for r in range(2)]
    cols = [slice_weight("x", w, Cut(1, r * 6, r * 6 + 6, 12)) for r in range(2)]
    assert torch.equal(torch.cat(rows, 0), w) and torch.equal(torch.cat(cols, 1), w)
    assert all(c.is_contiguous() for c in cols)


@pytest.mark.parametrize("qtype, k, world", [("Q8_0", 256, 8), ("Q4_K", 512, 2)])
def test_quantized_shards_are_whole_blocks(qtype, k, world):
    qt = quant_type(GGMLQuantizationType[qtype])
    n = 4
    raw = torch.randint(0, 256, (n, k // qt.block_size * qt.type_size), dtype=torch.uint8)
    if qtype == "Q4_K":  # keep the f16 scales finite: zero the two leading d/dmin halves' high bits
        raw.view(n, -1, qt.type_size)[..., 1] &= 0x3B
        raw.view(n, -1, qt.type_size)[..., 3] &= 0x3B
    else:
        raw.view(n, -1, qt.type_size)[..., 1] &= 0x3B
    w = QuantWeight(raw, int(qt.qtype), (n, k))
    whole = dequantize(raw.numpy(), qt.qtype, (n, k))
    step = k // world
    for r in range(world):
        part = slice_weight("x", w, Cut(1, r * step, (r + 1) * step, k))
        assert isinstance(part, QuantWeight) and part.shape == (n, step)
        torch.testing.assert_close(
            dequantize(part.data.numpy(), qt.qtype, (n, step)), whole[:, r * step : (r + 1) * step]
        )
    rows = slice_weight("x", w, Cut(0, 2, 4, n))
    assert isinstance(rows, QuantWeight) and torch.equal(rows.data, raw[2:4])


_GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}  # fmt: skip


@pytest.mark.parametrize("weights", ["quant", "dense"])
@pytest.mark.parametrize(("qtype", "head_dim"), [("Q4_K", 128), ("Q4_K", 64), ("Q8_0", 64), ("F16", 64)])
def test_a_rank_loads_the_slice_of_the_whole(tmp_path, weights, qtype, head_dim):
    """The loader cuts a rank's rows or block columns from the file before placing or
    dequantizing them: the result is the slice of the whole model's weight. (With 64-wide
    heads, attn_output's 256-value Q4_K rows cannot be cut on blocks: dense weights are
    then dequantized whole and cut; blocks are refused.)"""
    from types import SimpleNamespace

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", qtype, head_dim=head_dim)
    if (qtype, head_dim, weights) == ("Q4_K", 64, "quant"):
        par = SimpleNamespace(rank=0, world=2, device=torch.device("cpu"), all_reduce=lambda x: x)
        with pytest.raises(TensorParallelError, match="whole 256-value blocks"):
            load_model(path, weights=weights, parallel=par)  # type: ignore[arg-type]
        return
    whole = load_model(path, weights=weights)
    for rank in range(2):
        par = SimpleNamespace(rank=rank, world=2, device=torch.device("cpu"), all_reduce=lambda x: x)
        part = load_model(path, weights=weights, parallel=par)  # type: ignore[arg-type]
        shard = Shard.of(whole.config, rank, 2)
        for i, (a, b) in enumerate(zip(part.model.layers, whole.model.layers)):
            for attr, gguf in _GGUF_NAMES.items():
                cut = shard.cut(f"blk.{i}.{gguf}.weight", whole.config)
                assert cut is not None
                got, want = getattr(a, attr).weight, slice_weight("x", getattr(b, attr).weight, cut)
                if isinstance(want, QuantWeight):
                    assert isinstance(got, QuantWeight) and got.shape == want.shape
                    assert torch.equal(got.data, want.data), (rank, i, attr)
                else:
                    assert torch.equal(got, want), (rank, i, attr)


def test_a_split_inside_a_block_is_refused():
    qt = quant_type(GGMLQuantizationType.Q4_K)
    w = QuantWeight(
        torch.zeros(2, 512 // 256 * qt.type_size, dtype=torch.uint8), int(qt.qtype), (2, 512)
    )
    with pytest.raises(
        TensorParallelError,
        match=r"blk.0.ffn_down.weight: .*Q4_K rows of 512 values cannot be split on whole 256-value blocks across 4 ranks",
    ):
        slice_weight("blk.0.ffn_down.weight", w, Cut(1, 128, 256, 512))


@pytest.mark.parametrize("spec, world", [("1,1", 2), ("1/1/1/1", 4), ("1", 1)])
def test_even_tensor_split_is_accepted(spec, world):
    tensor_split(spec, world)


@pytest.mark.parametrize(
    "spec, world, message",
    [
        ("3,1", 2, "only an even split"),
        ("1,1", 1, "names 2 devices but 1 process run: launch with torchrun --nproc-per-node 2"),
        ("1,1,1", 2, "names 3 devices but 2 processes"),
        ("a,b", 2, "expected numbers"),
    ],
)
def test_other_tensor_splits_are_refused(spec, world, message):
    with pytest.raises(TensorParallelError, match=message):
        tensor_split(spec, world)
