"""The engine end to end on the llama3-tiny model: batching, prefix caching, preemption, stop strings, counters."""

import random

import pytest

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.errors import InvalidRequestError
from runtime.sampling_params import SamplingParams
from tests.reference import greedy_cases

GREEDY = SamplingParams(temperature=0.0, n_predict=12, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(llama3_tiny_path):
    from runtime.loader import load_model

    return load_model(llama3_tiny_path)


def engine(loaded, **kw) -> Engine:
    cfg = dict(model_path=str(loaded.path), n_ctx=4096, block_size=16, n_parallel=16, n_batch=2048)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), loaded=loaded)


def prompts(loaded, n=16, seed=0):
    """Mixed lengths; half of them share a long prefix so the prefix cache is exercised."""
    rng = random.Random(seed)
    tok = loaded.tokenizer
    shared = tok.encode("You are a helpful assistant. Answer in one short sentence, please. " * 3)
    out = []
    for i in range(n):
        tail = [rng.randrange(200, 20000) for _ in range(rng.randint(1, 60))]
        out.append(shared + tail if i % 2 else [tok.bos_id] + tail)
    return out


@pytest.fixture(scope="module")
def alone(loaded):
    """Each prompt alone, no prefix cache, no chunking: the reference."""
    e = engine(loaded, n_parallel=1, prefix_caching=False)
    return [e.generate([p], GREEDY)[0] for p in prompts(loaded)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # everything in one batch (blocks are named only once computed: no hits)
        dict(n_batch=40),  # chunked prefill beside decodes; later prompts hit the shared prefix
        dict(n_ctx=256, n_batch=64, n_parallel=8),  # a tight pool: preemption and recompute
    ],
    ids=["batched", "chunked", "preempting"],
)
def test_concurrent_equals_alone(loaded, alone, kw):
    e = engine(loaded, **kw)
    together = e.generate(prompts(loaded), GREEDY)
    assert together == alone
    st = e.stats()
    assert (st.prefix_cache_hit_tokens > 0) == bool(kw)
    assert e.num_free_blocks == e.blocks.num_blocks and st.requests_processing == 0
    if "n_ctx" in kw:
        assert st.preemptions_total > 0


def test_prefix_cache_hit_recomputes_only_the_tail(loaded):
    e = engine(loaded)
    p = prompts(loaded)[1]
    first = e.generate([p], GREEDY)[0]
    rid = e.add_request(p, GREEDY)
    outs = []
    while e.has_unfinished():
        outs += [o for o in e.step() if o.request_id == rid]
    assert [t for o in outs for t in o.new_token_ids] == first
    cached = outs[-1].num_cached_tokens
    assert cached == (len(p) - 1) // 16 * 16 and cached > 0
    assert outs[-1].timings.prompt_n == len(p) - cached


def test_stop_string_cuts_text_and_frees_blocks(loaded):
    e = engine(loaded)
    case = next(c for c in greedy_cases("llama3_tiny") if len(c["content"]) > 40)
    ids = loaded.tokenizer.encode(case["prompt"])
    full = SamplingParams(temperature=0.0, n_predict=32)
    text = "".join(o.text for o in _run(e, ids, full))
    assert text == case["content"]  # the same text llama.cpp produced
    stop = text[20:26]
    outs = _run(e, ids, SamplingParams(temperature=0.0, n_predict=32, stop=("zzz-never", stop)))
    streamed = "".join(o.text for o in outs)
    assert streamed == text[: text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_word == stop
    assert e.num_free_blocks == e.blocks.num_blocks


def test_n_predict_zero_and_invalid_requests(loaded):
    e = engine(loaded)
    assert e.generate([[1, 2, 3]], SamplingParams(temperature=0.0, n_predict=0)) == [[]]
    with pytest.raises(InvalidRequestError):
        e.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError):
        e.add_request([loaded.config.vocab_size], GREEDY)
    with pytest.raises(InvalidRequestError):
        e.add_request([1] * 5000, GREEDY)
    e.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(InvalidRequestError):
        e.add_request([1, 2], GREEDY, request_id="x")
    assert e.abort("x") and not e.has_unfinished()


def test_abort_midway_frees_blocks_and_spares_the_others(loaded, alone):
    e = engine(loaded)
    ps = prompts(loaded)[:4]
    rids = [e.add_request(p, GREEDY) for p in ps]
    got = {r: [] for r in rids}
    for _ in range(3):
        for o in e.step():
            got[o.request_id] += o.new_token_ids
    assert e.abort(rids[1]) and not e.abort(rids[1])
    while e.has_unfinished():
        for o in e.step():
            got[o.request_id] += o.new_token_ids
    assert [got[r] for r in (rids[0], rids[2], rids[3])] == [alone[0], alone[2], alone[3]]
    assert e.num_free_blocks == e.blocks.num_blocks


def test_a_request_whose_sampling_fails_fails_alone(loaded, alone):
    """A row that raises in the sampler ends its own request (finish_reason "error"); the
    others in that step go on, greedy and seeded ones alike, as if it had never been there."""
    ps = prompts(loaded)[:4]
    seeded = SamplingParams(temperature=1.0, seed=7, n_predict=12, ignore_eos=True)
    ref = engine(loaded, n_parallel=1).generate([ps[3]], seeded)[0]
    e = engine(loaded)
    rids = [e.add_request(p, sp) for p, sp in zip(ps, [GREEDY, GREEDY, GREEDY, seeded])]
    calls = []

    def boom(output_ids, logits):
        calls.append(len(output_ids))
        if len(output_ids) == 2:
            raise ValueError("bad processor")
        return logits

    e.requests[rids[1]].logits_processors.append(boom)
    got = {r: [] for r in rids}
    ends = {}
    while e.has_unfinished():
        for o in e.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                ends[o.request_id] = (o.finish_reason, o.error)
    assert ends[rids[1]] == ("error", "sampling failed: ValueError: bad processor")
    assert got[rids[1]] == alone[1][:2]  # its tokens before the failure
    assert [got[r] for r in rids[::2]] == [alone[0], alone[2]]
    assert got[rids[3]] == ref  # its generator was rewound after the failed batched try
    assert all(ends[r] == ("length", None) for r in (rids[0], rids[2], rids[3]))
    assert e.num_free_blocks == e.blocks.num_blocks
    assert not e.requests
    # alone in its step: the same; and the engine goes on serving
    rid = e.add_request(ps[0], GREEDY)
    e.requests[rid].logits_processors.append(lambda ids, x: x[:3])  # wrong shape
    outs = [o for _ in range(2) for o in e.step()]
    assert [(o.finish_reason, o.error is not None) for o in outs] == [("error", True)]
    assert e.num_free_blocks == e.blocks.num_blocks and not e.has_unfinished()
    assert e.generate([ps[0]], GREEDY) == [alone[0]]


def test_counters(loaded):
    e = engine(loaded)
    ps = prompts(loaded)[:3]
    e.generate(ps, GREEDY)
    st = e.stats()
    assert st.generation_tokens_total == 3 * GREEDY.n_predict
    assert st.prompt_tokens_total == sum(len(p) for p in ps) - st.prefix_cache_hit_tokens
    assert st.prefix_cache_query_tokens == sum(len(p) for p in ps)
    assert st.steps_total > 0 and st.kv_cache_usage_ratio == 0.0


def _run(e, ids, params):
    rid = e.add_request(ids, params)
    outs = []
    while e.has_unfinished():
        outs += [o for o in e.step() if o.request_id == rid]
    return outs


def test_context_shift_generates_past_the_context_with_rerotated_keys(loaded):
    import torch

    e = engine(loaded, n_ctx=64, block_size=16)
    params = SamplingParams(temperature=0.0, n_predict=100, ignore_eos=True, n_keep=4)
    rid = e.add_request(prompts(loaded)[1][:30], params)
    req = e.requests[rid]
    while not req.num_shifted_tokens:
        e.step()
    # The first shift just happened: layer 0's keys depend only on token and position, so
    # the moved, re-rotated keys must equal those of the shortened context computed afresh.
    n = req.num_computed_tokens
    fresh = engine(loaded, n_ctx=64, block_size=16, prefix_caching=False)
    blocks = fresh.blocks.allocate(fresh.blocks.blocks_needed(n, 0))
    fresh.runner.score(req.token_ids[:n], blocks)
    table = torch.tensor(req.block_ids)
    k_moved, v_moved = e.runner.cache.gather(0, table, 0, n)
    k_fresh, v_fresh = fresh.runner.cache.gather(0, torch.tensor(blocks), 0, n)
    torch.testing.assert_close(k_moved, k_fresh, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_moved, v_fresh)
    outs = []
    while e.has_unfinished():
        outs += e.step()
    assert outs[-1].finish_reason == "length" and outs[-1].truncated
    assert len(req.output_token_ids) == 100 and e.num_free_blocks == e.blocks.num_blocks


def test_long_prompt_is_an_error_unless_n_keep_truncates(loaded):
    e = engine(loaded, n_ctx=64, block_size=16)
    long = list(range(1000, 1100))
    with pytest.raises(InvalidRequestError, match="n_keep"):
        e.add_request(long, GREEDY)
    rid = e.add_request(long, SamplingParams(temperature=0.0, n_predict=4, ignore_eos=True, n_keep=8))
    req = e.requests[rid]
    # n_ctx 64, n_keep 8: halves of 28; (100 - 8 - 28) // 28 = 2 halves (56 tokens) erased.
    assert req.prompt_token_ids == long[:8] + long[64:] and req.num_shifted_tokens == 56
    outs = []
    while e.has_unfinished():
        outs += e.step()
    assert outs[-1].truncated and len(req.output_token_ids) == 4


@pytest.mark.slow
def test_seeded_sampling_is_the_same_alone_and_in_a_batch(default_engine):
    """Each request draws from its own generator, so its tokens do not depend on the batch.

    On the default model: the tiny model's random weights give near-flat distributions,
    where the last-bit differences between batched and single matmuls reorder ties.
    """
    tok = default_engine.tokenizer
    ps = [tok.encode(c["prompt"]) for c in greedy_cases("gemma3")[:8]]
    params = [SamplingParams(temperature=0.8, seed=7 + i, n_predict=24) for i in range(8)]

    def fresh() -> Engine:
        cfg = EngineConfig(model_path=str(default_engine.loaded.path), n_ctx=2048)
        return Engine(cfg, loaded=default_engine.loaded)

    together = fresh().generate(ps, params)
    assert together == [fresh().generate([p], sp)[0] for p, sp in zip(ps, params)]
    assert together[0] != fresh().generate(ps[:1], SamplingParams(temperature=0.8, seed=1, n_predict=24))[0]


@pytest.mark.slow
def test_sixteen_concurrent_chunked_prefix_cached_equal_alone_on_the_default_model(default_engine):
    tok = default_engine.tokenizer
    texts = [c["prompt"] for c in greedy_cases("gemma3")]
    texts += [texts[0] + " And then", texts[0] + " However,", texts[3] + "\n\n", texts[5] + " 1 2 3"]
    ps = [tok.encode(t) for t in texts]
    params = SamplingParams(temperature=0.0, n_predict=12, ignore_eos=True)
    # Small blocks: these prompts are short, and sharing needs whole blocks.
    cfg = EngineConfig(
        model_path=str(default_engine.loaded.path), n_ctx=2048, n_parallel=16, n_batch=48, block_size=4
    )
    e = Engine(cfg, loaded=default_engine.loaded)
    together = e.generate(ps, params)
    plain = Engine(
        EngineConfig(model_path=cfg.model_path, n_ctx=2048, n_parallel=1, prefix_caching=False),
        loaded=default_engine.loaded,
    )
    assert together == [plain.generate([p], params)[0] for p in ps]
    assert e.stats().prefix_cache_hit_tokens > 0 and e.num_free_blocks == e.blocks.num_blocks
