"""Agreement with llama.cpp's recorded greedy runs: teacher-forced and free-running."""

import pytest

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sampling_params import SamplingParams
from tests.reference import (
    PARTING_NATS,
    greedy_cases,
    parting_gaps,
    teacher_forced,
    teacher_forced_decode,
)

GREEDY = SamplingParams(temperature=0.0, n_predict=32)


@pytest.fixture(scope="module")
def llama3_engine(llama3_tiny_path):
    return Engine(EngineConfig(model_path=str(llama3_tiny_path), n_ctx=1024))


def test_llama3_tiny_teacher_forced(llama3_engine):
    a = teacher_forced(llama3_engine, llama3_engine.tokenizer, greedy_cases("llama3_tiny"))
    print(f"llama3-tiny: top-1 {a.top1}/{a.steps} = {a.top1_rate:.4f}, top-5 err {a.top5_abs_err:.4f}")
    assert a.steps >= 370
    assert a.top1_rate >= 0.99
    assert a.top5_abs_err <= 0.01


@pytest.mark.slow
def test_default_model_teacher_forced(default_engine):
    _agrees(teacher_forced(default_engine, default_engine.tokenizer, greedy_cases("gemma3")), "prompts")


def _agrees(a, what: str) -> None:
    """The default model's 384 teacher-forced steps: top-1 as llama.cpp's in 96%, top-5 log-probs within 0.15."""
    print(f"gemma3-270m {what}: top-1 {a.top1}/{a.steps} = {a.top1_rate:.4f}, top-5 err {a.top5_abs_err:.4f}")
    assert a.steps == 384
    assert a.top1_rate >= 0.96
    assert a.top5_abs_err <= 0.15


@pytest.mark.slow
def test_default_model_teacher_forced_int8_prompts(default_engine):
    """--gemm-dtype int8: prompt rows quantized to int8 per 32 values, as llama.cpp's CPU
    kernels compute them (measured: 371/384, top-5 error 0.107; bfloat16: 377/384, 0.103)."""
    cfg = EngineConfig(model_path=str(default_engine.loaded.path), n_ctx=1024, gemm_dtype="int8")
    engine = Engine(cfg, loaded=default_engine.loaded)
    _agrees(teacher_forced(engine, engine.tokenizer, greedy_cases("gemma3")), "int8 prompts")


@pytest.mark.slow
@pytest.mark.parametrize("decode_dtype", ["float32", "int8"])
def test_default_model_teacher_forced_through_decode_rows(default_engine, decode_dtype):
    """llama.cpp's tokens fed back one per step: the decode rows' products, float32 or
    int8 (measured: 376/384, MAE 0.102 with float32; 370/384, 0.110 with int8)."""
    cfg = EngineConfig(model_path=str(default_engine.loaded.path), n_ctx=1024, decode_dtype=decode_dtype)
    engine = Engine(cfg, loaded=default_engine.loaded)
    _agrees(teacher_forced_decode(engine, engine.tokenizer, greedy_cases("gemma3")), f"decode rows ({decode_dtype})")


@pytest.mark.slow
def test_default_model_free_running_greedy(default_engine):
    """12 prompts generated together, 32 tokens each: a sequence may part from llama.cpp's only
    at a step where llama.cpp's own log-probs put our token within PARTING_NATS of its choice,
    and at least 8 of 12 are identical on their first 8 tokens.

    Our log-probs differ from llama.cpp's by ~0.1 nats a step (top-5 error above: bfloat16
    prompt products against its int8 ones), so any close call can go either way, and which
    ones do is decided by rounding: 1-ulp changes of the attention scale moved the count of
    sequences identical on 8 tokens between 8 and 12 of 12, with the same code (old prompt
    attention 8-12, mean 10.0; the fused kernel 9-12, mean 10.25; 6-8 draws each). Where a
    sequence parted, llama.cpp's gap was at most 0.66 nats in every draw of either. Attention
    scaled by 1.5 in prompts (a bug) leaves 6 of 12 identical on 8 tokens."""
    cases = greedy_cases("gemma3")
    tok = default_engine.tokenizer
    outs = default_engine.generate([tok.encode(c["prompt"]) for c in cases], GREEDY)
    parted = parting_gaps(outs, cases)
    agree8 = sum(out[:8] == c["tokens"][:8] for out, c in zip(outs, cases))
    full = sum(out == c["tokens"] for out, c in zip(outs, cases))
    print(f"gemma3-270m free-running: {agree8}/12 agree on 8 tokens, {full}/12 on all 32; parted at (case, step, gap) {parted}")
    assert all(gap <= PARTING_NATS for _, _, gap in parted), parted
    assert agree8 >= 8


def test_batch_equals_alone_llama3(llama3_engine):
    _batch_equals_alone(llama3_engine, greedy_cases("llama3_tiny")[:8])


@pytest.mark.slow
def test_batch_equals_alone_default_model(default_engine):
    _batch_equals_alone(default_engine, greedy_cases("gemma3")[:8])


def _batch_equals_alone(engine, cases):
    """8 different prompts in one batch give the same greedy tokens as each alone."""
    tok = engine.tokenizer
    prompts = [tok.encode(c["prompt"]) for c in cases]
    assert len({len(p) for p in prompts}) > 1, "mixed lengths exercise the flat batch"
    params = SamplingParams(temperature=0.0, n_predict=16, ignore_eos=True)
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert together == alone
    assert engine.num_free_blocks == engine.blocks.num_blocks
