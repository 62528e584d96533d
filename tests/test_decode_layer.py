"""ops.decode_layer: a decode step's layer as one op, the same numbers as the layer loop's ops one by one."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from runtime import ops
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.ops import reference
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import BOS_ID, write_tiny_gguf
from tests.test_quant_ops import weight


def _generate(path, fused: bool) -> tuple[torch.Tensor, list[list[int]], int, int]:
    """Logits of a prompt step and 5 decode steps of 3 sequences (int8 decode rows), their
    tokens, how many decode_layer calls the steps made, and the model's layer count."""
    cfg = EngineConfig(model_path=str(path), n_ctx=256, n_parallel=3, decode_dtype="int8", gemm_dtype="float32")
    engine = Engine(cfg)
    model = engine.runner.model
    if not fused:
        model.fused = [False] * len(model.fused)
    seen: list[torch.Tensor] = []
    calls = [0]
    logits, layer_op = model.logits, ops.decode_layer

    def spy_logits(x):
        out = logits(x)
        seen.append(out.clone())
        return out

    def spy_layer(*args):
        calls[0] += 1
        return layer_op(*args)

    model.logits = spy_logits  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(1)
    prompts = [[BOS_ID] + torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 19, 11)]
    ops.decode_layer = spy_layer
    try:
        out = engine.generate(prompts, SamplingParams(temperature=0.0, n_predict=6, ignore_eos=True))
    finally:
        ops.decode_layer = layer_op
    return torch.cat(seen), out, calls[0], len(model.layers)


# llama: silu, no q/k norms; qwen3: q/k norms; gemma2: sandwich norms, softcaps, a sliding
# window of 8 (shorter than the prompts); gemma3: q/k and sandwich norms, gelu, windows
@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("qwen3", "Q8_0"), ("gemma2", "Q5_0"), ("gemma3", "Q4_K")])
def test_fused_decode_steps_equal_the_op_by_op_loop(tmp_path, arch, qtype):
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, qtype)
    fused, fused_tokens, calls, n_layers = _generate(path, fused=True)
    loop, loop_tokens, none, _ = _generate(path, fused=False)
    assert calls == 5 * n_layers and none == 0  # 6 tokens: the prompt step's, then 5 decode steps
    assert torch.equal(fused, loop), f"{arch}: the fused layers changed the logits"
    assert fused_tokens == loop_tokens


def test_layers_with_biases_or_float32_rows_stay_op_by_op(tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", "Q8_0")  # q/k/v biases
    model = Engine(EngineConfig(model_path=str(path), n_ctx=64, decode_dtype="int8")).runner.model
    assert model.layers and not any(model.fused)
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama", "Q8_0")
    assert not any(Engine(EngineConfig(model_path=str(path), n_ctx=64, decode_dtype="float32")).runner.model.fused)
    assert all(Engine(EngineConfig(model_path=str(path), n_ctx=64, decode_dtype="int8")).runner.model.fused)


def _layer_case(qk_norm: bool, sandwich: bool, b: int = 3, seed: int = 0):
    """Random inputs for a layer of hidden 128, 4 heads of 32 over 2 KV heads, ffn 256."""
    g = torch.Generator().manual_seed(seed)
    hidden, nh, nkv, hd, ffn, bs, nb = 128, 4, 2, 32, 256, 16, 12

    def vec(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=g)

    shapes = [(nh * hd, hidden), (nkv * hd, hidden), (nkv * hd, hidden), (hidden, nh * hd), (ffn, hidden),
              (ffn, hidden), (hidden, ffn)]  # fmt: skip
    qts = [T.Q4_0, T.Q8_0, T.Q5_1, T.Q5_0, T.Q8_0, T.Q4_1, T.Q6_K]  # K-quants need k % 256 == 0
    ws = [weight(qt, n, k, seed=seed + i) for i, (qt, (n, k)) in enumerate(zip(qts, shapes))]
    norms = [vec(hidden), vec(hd) if qk_norm else None, vec(hd) if qk_norm else None,
             vec(hidden) if sandwich else None, vec(hidden), vec(hidden) if sandwich else None]  # fmt: skip
    pos = torch.tensor([5, 20, 33][:b])
    angles = pos[:, None].float() * (10000.0 ** (-torch.arange(0, hd, 2).float() / hd))[None, :]
    k_cache = torch.randn(nb, bs, nkv, hd, generator=g)
    v_cache = torch.randn(nb, bs, nkv, hd, generator=g)
    blocks = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])[:b]
    slots = blocks[torch.arange(b), pos // bs] * bs + pos % bs  # each row's own position
    lo = torch.tensor([0, 4, 30][:b])  # the last row sees only a window
    args = [torch.randn(b, hidden, generator=g) * 2, norms, ws, [int(q) for q in qts],
            angles.cos()[:, None, :], angles.sin()[:, None, :], k_cache, v_cache, slots, blocks, lo, pos + 1,
            [nh, nkv, hd, hd], [1e-6, hd**-0.5, 0.0], True, True]  # fmt: skip
    return args


@pytest.mark.parametrize("qk_norm,sandwich", [(True, True), (False, False)])
def test_decode_layer_matches_reference(qk_norm, sandwich):
    ops.use_cpu_kernels()
    args = _layer_case(qk_norm, sandwich)
    mine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = ops.decode_layer(*mine)
    want = reference.decode_layer(*args)
    assert got.shape == want.shape == args[0].shape
    # int8 products: the kernels' exact integer sums vs float32 ones (1.5e-7 and 2.8e-7 here)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"decode_layer vs reference: relative error {err:.2e}"
    before = _layer_case(qk_norm, sandwich)
    for c in (6, 7):  # this step's keys and values were written where the slots say, nothing else
        assert torch.allclose(mine[c], args[c], rtol=1e-4, atol=1e-5)
        slots = args[8]
        assert not torch.allclose(mine[c].flatten(0, 1)[slots], before[c].flatten(0, 1)[slots])
        kept = torch.ones(mine[c].shape[0] * mine[c].shape[1], dtype=torch.bool)
        kept[slots] = False
        assert torch.equal(mine[c].flatten(0, 1)[kept], before[c].flatten(0, 1)[kept])


def test_decode_layer_rows_do_not_depend_on_the_batch():
    ops.use_cpu_kernels()
    args = _layer_case(True, True)
    together = ops.decode_layer(*args)
    for i in range(3):
        one = _layer_case(True, True)
        for j in (0, 4, 5, 8, 9, 10, 11):
            one[j] = one[j][i : i + 1]
        assert torch.equal(ops.decode_layer(*one)[0], together[i])


def test_decode_layer_opcheck_and_bad_input():
    ops.use_cpu_kernels()
    torch.library.opcheck(torch.ops.gguf_serve.decode_layer, tuple(_layer_case(True, True)))
    args = _layer_case(True, True)
    with pytest.raises(RuntimeError, match="6 norms"):
        ops.decode_layer(*args[:1], args[1][:5], *args[2:])
    bad = list(args)
    bad[8] = torch.tensor([0, 1, 10_000])  # past the cache's 192 slots
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.decode_layer(*bad)
    bad = list(args)
    bad[0] = args[0].double()
    with pytest.raises(RuntimeError, match="float32"):
        ops.decode_layer(*bad)
