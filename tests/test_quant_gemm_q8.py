"""--gemm-dtype int8: prompt rows through the int8 GEMM (qgemm_q8), qmatmul_q8's quantity."""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from runtime import ops
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import BOS_ID, write_tiny_gguf
from tests.test_quant_ops import TYPES, weight
from tests.test_quant_q8 import check_q8_rows

# the types quant_gemm_q8.h has a kernel for (the others take the bfloat16 GEMM)
GEMM_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qgemm_q8_matches_reference(qt, isa):
    """Any row count (tiles of 4 rows and their remainders; a partial panel of 32 weight rows,
    whole ones and a partial one): x_hat @ W_hat^T, each row the same alone."""
    # 32-value blocks per row: 3 (a half-filled last chunk), 5, 20
    for k in (512,) if GGML_QUANT_SIZES[qt][0] == 256 else (96, 160, 640):
        for n in (21, 70):
            check_q8_rows(ops.qgemm_q8, qt, n, k, (1, 3, 4, 6, 13, 64))


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q6_K], ids=lambda q: q.name)
def test_qgemm_q8_wide_rows(qt, isa):
    """Rows of 4096 values: gathers across 16 decoded rows 4 KB apart."""
    check_q8_rows(ops.qgemm_q8, qt, 40, 4096, (5,))


def test_prompt_rows_take_the_int8_gemm_where_it_has_a_kernel(kernels):
    """Under gemm_precision("int8") qmatmul_prompt is qgemm_q8 for 1 row as for 64 where the
    CPU and the type have its kernel; otherwise what "bfloat16" takes. The flags are restored."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    q5, q2 = weight(T.Q5_0, 64, 256, seed=7), weight(T.Q2_K, 64, 256, seed=7)
    assert kernels.int8_kernel(int(T.Q5_0)) == kernels.int8_dot() and not kernels.int8_kernel(int(T.Q2_K))
    with ops.gemm_precision("bfloat16"):
        bf16_q2 = ops.qmatmul_prompt(x, q2, int(T.Q2_K), 256)
        bf16_q5 = ops.qmatmul_prompt(x, q5, int(T.Q5_0), 256)
        with ops.gemm_precision("int8"):
            for t in (1, 3, 64):
                got = ops.qmatmul_prompt(x[:t], q5, int(T.Q5_0), 256)
                want = ops.qgemm_q8(x[:t], q5, int(T.Q5_0), 256) if kernels.int8_dot() else bf16_q5[:t]
                assert torch.equal(got, want)
            assert torch.equal(ops.qmatmul_prompt(x, q2, int(T.Q2_K), 256), bf16_q2)
            kernels.allow_int8_dot(False)
            try:
                assert not kernels.int8_kernel(int(T.Q5_0))
                assert torch.equal(ops.qmatmul_prompt(x, q5, int(T.Q5_0), 256), bf16_q5)
            finally:
                kernels.allow_int8_dot(True)
        assert kernels.gemm_bf16() and not kernels.gemm_q8()


def _first_steps(engine: Engine, prompts: list[list[int]]) -> list[list[tuple]]:
    """Each prompt's 3 greedy tokens with their top-5 log-probs, all prompts added at once."""
    params = SamplingParams(temperature=0.0, n_predict=3, ignore_eos=True, n_probs=5)
    ids = [engine.add_request(p, params) for p in prompts]
    got: dict = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs]
    return [got[i] for i in ids]


def test_an_engine_with_int8_prompts(tmp_path, kernels):
    """--gemm-dtype int8 end to end: a prompt's log-probs are the same alone or beside others
    (chunks of mixed lengths in one step), and they are not the bfloat16 GEMM's."""
    path = write_tiny_gguf(tmp_path / "q5.gguf", "llama", "Q5_0")
    g = torch.Generator().manual_seed(3)
    prompts = [[BOS_ID] + torch.randint(3, 200, (n,), generator=g).tolist() for n in (40, 7, 23)]

    def engine(gemm_dtype: str) -> Engine:
        return Engine(EngineConfig(model_path=str(path), n_ctx=256, n_parallel=3, gemm_dtype=gemm_dtype))

    int8 = engine("int8")
    together = _first_steps(int8, prompts)
    assert together == [_first_steps(int8, [p])[0] for p in prompts]
    bf16 = _first_steps(engine("bfloat16"), prompts)
    first = [(s[0][1], b[0][1]) for s, b in zip(together, bf16)]  # each prompt's first log-prob
    if kernels.int8_kernel(int(T.Q5_0)):
        assert all(a != b for a, b in first)
    assert max(abs(a - b) for a, b in first) < 0.05  # rounding noise, not another model
