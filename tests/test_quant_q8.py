"""--decode-dtype int8: decode rows' activations quantized to int8 per 32 values (qmatmul_q8), as llama.cpp does."""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from runtime import ops
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.forward_batch import ForwardBatch
from runtime.ops import reference
from runtime.ops.cpu_extension import load
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import BOS_ID, write_tiny_gguf
from tests.test_quant_ops import TYPES, weight
from tests.test_quant_weights import _decode_logits


def _paths() -> list[bool]:
    """The AVX512-VNNI kernels where this build and CPU have them, and the path other CPUs take."""
    return [True, False] if load().int8_dot() else [False]


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qmatmul_q8_matches_reference(qt, isa):
    """Only the order of the float32 sums may differ from x_hat @ W_hat^T; a row never depends on its batch."""
    # 32-value blocks: 3 (a half-filled last chunk), 7, 5 and 6 per row
    for k in (512,) if GGML_QUANT_SIZES[qt][0] == 256 else (96, 224, 160, 192):
        check_q8_rows(ops.qmatmul_q8, qt, 45, k, (1, 2, 3, 4, 5, 8, 9, 17))  # the 1-4 row groups, remainders


def check_q8_rows(matmul, qt: T, n: int, k: int, ts: tuple[int, ...]) -> None:
    """matmul(x, W) against x_hat @ W_hat^T (x_hat: x's rows quantized to int8 per 32 values),
    t rows at a time, and each row alone giving the same bits, on each path this CPU has."""
    w = weight(qt, n, k, seed=3)
    wd = reference.dequantize(w, int(qt), k).double()
    for native in _paths():
        load().allow_int8_dot(native)
        try:
            for t in ts:
                x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)) * 3
                xh = reference.quantize_q8(x).double()
                want, scale = xh @ wd.T, xh.abs() @ wd.abs().T
                got = matmul(x, w, int(qt), k)
                assert got.shape == (t, n) and got.dtype == torch.float32
                err = ((got - want).abs() / scale.clamp_min(1e-30)).max().item()
                assert err < 1e-6, f"{qt.name} k={k} t={t} native={native}: error {err:.2e} of the products' magnitude"
                alone = torch.cat([matmul(x[i : i + 1], w, int(qt), k) for i in range(t)])
                assert torch.equal(alone, got), f"{qt.name} t={t}: a row changed with the batch"
        finally:
            load().allow_int8_dot(True)


@pytest.mark.parametrize("qt", [T.Q8_0, T.Q6_K], ids=lambda q: q.name)
def test_qmatmul_q8_wide_rows_in_panels(qt, isa):
    """Rows of 4-8 KB: W is taken in panels of a few rows (each against every group of 4
    rows of x), which must not change any row's result."""
    check_q8_rows(ops.qmatmul_q8, qt, 45, 4096, (1, 2, 3, 4, 5, 8, 9, 17))


def test_quantize_q8_is_per_block_int8():
    x = torch.randn(3, 80) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(80).view(3, 80)
    x[1, 32:64] = 0  # a block of zeros stays zeros
    xh = reference.quantize_q8(x)
    for row, qrow in zip(x, xh):
        for b0 in range(0, 80, 32):  # the last block holds 16 values
            blk, q = row[b0 : b0 + 32], qrow[b0 : b0 + 32]
            amax = blk.abs().max()
            if amax == 0:
                assert torch.equal(q, blk)
                continue
            levels = torch.round(q * 127 / amax)
            assert (levels - q * 127 / amax).abs().max() < 1e-3 and levels.abs().max() == 127
            assert (q - blk).abs().max() <= amax / 254 * (1 + 1e-5)  # half a level
    assert torch.equal(ops.quantize_q8(x), xh)


def test_quantize_q8_rounds_the_true_quotient(kernels):
    """x * (127 / amax) exactly half way between two levels goes to the even one: -5.3944325 in a
    block whose amax is 8.406049 is level -81.5 by the true quotient (the kernels', llama.cpp's)
    but -81.49999 by 127 * (1 / amax), which would round to -81."""
    amax, v = 8.406048774719238, -5.394432544708252  # both exact float32 values
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = amax, v
    assert torch.equal(reference.quantize_q8(x)[0, :2], torch.tensor([127.0, -82.0]) * (torch.tensor(amax) / 127))
    w = weight(T.Q8_0, 16, 32)
    want = reference.qmatmul_q8(x, w, int(T.Q8_0), 32)
    for native in _paths():
        load().allow_int8_dot(native)
        try:
            for f in (ops.qmatmul_q8, ops.qgemm_q8):
                torch.testing.assert_close(f(x, w, int(T.Q8_0), 32), want, rtol=1e-6, atol=1e-5)
        finally:
            load().allow_int8_dot(True)


def test_qmatmul_q8_is_not_float32_in_disguise(kernels):
    w = weight(T.Q4_K, 64, 256, seed=4)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    wd = reference.dequantize(w, int(T.Q4_K), 256).double()
    got = ops.qmatmul_q8(x, w, int(T.Q4_K), 256).double()
    exact = x.double() @ wd.T
    scale = exact.abs().max()
    assert ((got - reference.quantize_q8(x).double() @ wd.T).abs().max() / scale).item() < 1e-6
    assert 1e-4 < ((got - exact).abs().max() / scale).item() < 3e-2  # the rounding shows, at 8 bits' size


@pytest.mark.parametrize("name", ["qmatmul_q8", "qgemm_q8"])
def test_schema_and_bad_input(kernels, name):
    op, w = getattr(ops, name), weight(T.Q8_0, 8, 64)
    torch.library.opcheck(getattr(torch.ops.gguf_serve, name), (torch.randn(2, 64), w, int(T.Q8_0), 64))
    with pytest.raises(RuntimeError, match="x must be"):
        op(torch.randn(2, 32), w, int(T.Q8_0), 64)
    with pytest.raises(RuntimeError, match="no CPU kernel"):
        op(torch.randn(2, 64), w, 99, 64)
    with pytest.raises(RuntimeError, match="do not hold"):
        op(torch.randn(2, 128), w, int(T.Q8_0), 128)


def test_decode_rows_come_first():
    """Sequences flagged as decode rows are laid out first; seqs, logits rows and slots keep their meaning."""
    plain = ForwardBatch.build([[5, 6, 7], [8], [9, 10], [11]], [0, 40, 3, 9], [[2], [4, 5, 6], [7], [1]], 16)
    b = ForwardBatch.build(
        [[5, 6, 7], [8], [9, 10], [11]], [0, 40, 3, 9], [[2], [4, 5, 6], [7], [1]], 16, decode=[False, True, False, True]
    )
    assert b.decode_rows == 2 and plain.decode_rows == 0
    assert b.token_ids.tolist() == [8, 11, 5, 6, 7, 9, 10]
    assert [(s.start, s.n_new, s.n_ctx) for s in b.seqs] == [(2, 3, 3), (0, 1, 41), (5, 2, 5), (1, 1, 10)]
    assert b.logits_indices.tolist() == [4, 0, 6, 1]  # each sequence's last row, in sequence order
    for s, p in zip(b.seqs, plain.seqs):
        rows, prow = slice(s.start, s.start + s.n_new), slice(p.start, p.start + p.n_new)
        assert torch.equal(b.slot_mapping[rows], plain.slot_mapping[prow])
        assert torch.equal(b.positions[rows], plain.positions[prow])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K"])
def test_int8_decode_is_the_same_for_quant_and_dense(tmp_path, qtype):
    """The kernels and the dense path (quantize_q8 + linear) compute the same decode rows;
    prompt rows stay float32."""
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", "llama", qtype)
    quant = _decode_logits(path, "quant", decode_dtype="int8")
    dense = _decode_logits(path, "dense", decode_dtype="int8")
    exact = _decode_logits(path, "dense")
    scale = dense.abs().max()
    assert torch.equal(quant[:3], _decode_logits(path, "quant")[:3])  # the prompts' step: no int8 rows
    # The first decode step (later ones follow the greedy tokens, which may part ways). The
    # two paths differ by float32 rounding, which can move an activation across a rounding
    # boundary of its block, a level of 8 bits: measured 1e-7 of the largest logit on average
    # without such a flip, 3e-4 with one (Q5_0), against 1.3-3e-3 for the int8 rounding itself.
    first = slice(3, 6)
    paths = ((quant - dense)[first].abs().mean() / scale).item()
    rounding = ((dense - exact)[first].abs().mean() / scale).item()
    assert rounding > 5e-4 and paths < rounding / 5, (paths, rounding)


@pytest.mark.parametrize("decode_dtype", ["int8", "float32"])
def test_a_decode_row_computes_the_same_beside_a_prompt(tmp_path, decode_dtype):
    """Decode rows and prompt rows are picked by kind, not by the step's size: request A's
    log-probs are bit for bit the same whether B's 40-token prompt shares its steps or not."""
    path = write_tiny_gguf(tmp_path / "q4k.gguf", "llama", "Q4_K")
    g = torch.Generator().manual_seed(2)
    prompt_a = [BOS_ID] + torch.randint(3, 200, (9,), generator=g).tolist()
    prompt_b = [BOS_ID] + torch.randint(3, 200, (40,), generator=g).tolist()
    params = SamplingParams(temperature=0.0, n_predict=8, ignore_eos=True, n_probs=4)

    def run(with_b: bool) -> tuple[list, list]:
        cfg = EngineConfig(model_path=str(path), n_ctx=256, n_parallel=2, n_batch=16, decode_dtype=decode_dtype)
        engine = Engine(cfg)
        steps: list[tuple[int, int]] = []
        hidden_states = engine.runner.model.hidden_states

        def spy(batch, cache):
            steps.append((batch.num_tokens, batch.decode_rows))
            return hidden_states(batch, cache)

        engine.runner.model.hidden_states = spy  # type: ignore[method-assign]
        a = engine.add_request(prompt_a, params)
        got = []
        while engine.has_unfinished():
            if with_b and len(got) == 2:
                engine.add_request(prompt_b, params)
                with_b = False
            got += [(lp.token_id, lp.logprob, lp.top) for o in engine.step() if o.request_id == a for lp in o.logprobs]
        return got, steps

    alone, alone_steps = run(False)
    mixed, mixed_steps = run(True)
    assert all(q8 == (n == 1) for n, q8 in alone_steps[1:])
    assert any(q8 == 1 and n > 9 for n, q8 in mixed_steps)  # A's decode row beside a prompt chunk (GEMM path)
    assert len(alone) == 8 and mixed == alone


def test_auto_decode_dtype_is_int8_only_where_it_gains(tmp_path):
    """--decode-dtype auto (the default): int8 for weights in blocks on a CPU with AVX512-VNNI,
    float32 for dense weights (int8 rows there are quantize_q8 + a float product: no gain)."""
    path = write_tiny_gguf(tmp_path / "q4k.gguf", "llama", "Q4_K")
    quant = Engine(EngineConfig(model_path=str(path), n_ctx=64))
    assert quant.runner.decode_dtype == ("int8" if ops.int8_dot() else "float32")
    assert all(layer.down.decode_int8 == (quant.runner.decode_dtype == "int8") for layer in quant.runner.model.layers)
    dense = Engine(EngineConfig(model_path=str(path), n_ctx=64, weights="dense"))
    assert dense.runner.decode_dtype == "float32"
    assert not any(layer.q.decode_int8 for layer in dense.runner.model.layers)


def test_qmatmul_q8_many_is_separate_calls_in_one(kernels):
    """One x, several matrices (types with and without an offset, a b term, one without an
    int8 kernel): the same bits as one qmatmul_q8 call each."""
    for qts in ([T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K], [T.Q4_1, T.Q2_K]):
        ws = [weight(qt, n, 512, seed=n) for qt, n in zip(qts, (40, 17, 64, 9))]
        for t in (1, 3):
            x = torch.randn(t, 512, generator=torch.Generator().manual_seed(t))
            many = ops.qmatmul_q8_many(x, ws, [int(q) for q in qts], 512)
            assert len(many) == len(ws)
            for y, w, qt in zip(many, ws, qts):
                assert torch.equal(y, ops.qmatmul_q8(x, w, int(qt), 512)), (qt.name, t)
    w = weight(T.Q8_0, 8, 64)
    torch.library.opcheck(torch.ops.gguf_serve.qmatmul_q8_many, (torch.randn(2, 64), [w, w], [int(T.Q8_0)] * 2, 64))
    with pytest.raises(RuntimeError, match="one type per weight"):
        ops.qmatmul_q8_many(torch.randn(2, 64), [w], [int(T.Q8_0)] * 2, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.qmatmul_q8_many(torch.randn(2, 32), [w], [int(T.Q8_0)], 64)
