"""Embedding requests in the engine: pooled final-norm hidden states, batched with generation, KV freed."""

import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.errors import InvalidRequestError, NotSupportedError, QueueFullError
from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache
from runtime.pooling import Pooling, accumulate, normalize, pooled
from runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, n_predict=8, ignore_eos=True)


def engine(loaded, **kw) -> Engine:
    cfg = dict(model_path=str(loaded.path), n_ctx=1024, n_parallel=8, embeddings=True, pooling="mean")
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), loaded=loaded)


def direct(loaded, ids) -> torch.Tensor:
    """Every token's final-norm hidden state, one forward over a fresh cache: (T, hidden)."""
    bs = 16
    blocks = list(range(-(-len(ids) // bs)))
    cache = KVCache(loaded.config, len(blocks), bs, loaded.dtype)
    batch = ForwardBatch.build([ids], [0], [blocks], bs)
    return loaded.model.hidden_states(batch, cache).float()


def embed_all(e: Engine, prompts) -> list[torch.Tensor]:
    rids = [e.add_embedding(p) for p in prompts]
    out = {}
    while e.has_unfinished():
        for o in e.step():
            if o.request_id not in rids:  # a generation request beside them
                continue
            assert o.new_token_ids == ()
            if o.finished:
                out[o.request_id] = o.embedding
    return [out[r] for r in rids]


def texts(loaded):
    tok = loaded.tokenizer
    return [
        tok.encode("Hello"),
        tok.encode("The quick brown fox jumps over the lazy dog. " * 4),
        tok.encode("A"),
        tok.encode("Paged attention with prefix caching " * 9),
    ]


def test_mean_embedding_equals_a_direct_forward(loaded):
    prompts = texts(loaded)
    for ids, got in zip(prompts, embed_all(engine(loaded), prompts)):
        want = direct(loaded, ids).mean(0, keepdim=True)
        assert got.shape == (1, loaded.config.hidden) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        unit = normalize(got, 2)
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize("pooling", ["none", "cls", "last"])
def test_other_poolings(loaded, pooling):
    ids = texts(loaded)[1]
    (got,) = embed_all(engine(loaded, pooling=pooling), [ids])
    states = direct(loaded, ids)
    want = {"none": states, "cls": states[:1], "last": states[-1:]}[pooling]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batched_chunked_and_beside_generation_equal_alone(loaded):
    prompts = texts(loaded)
    alone = [embed_all(engine(loaded, n_parallel=1), [p])[0] for p in prompts]
    # small steps: prefill in chunks, several requests per step, generation alongside
    e = engine(loaded, n_batch=24, n_parallel=4)
    gen = e.add_request(prompts[1], GREEDY)
    together = embed_all(e, prompts + prompts)  # the repeats see cached prefixes: not used
    for a, b in zip(alone + alone, together):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert gen not in e.requests
    assert e.num_free_blocks == e.blocks.num_blocks  # every block released


def test_preempted_embedding_recomputes_correctly(loaded):
    base = loaded.tokenizer.encode("Paged attention with prefix caching " * 20)
    prompts = [base[:40], base[1:41]]
    alone = [embed_all(engine(loaded, n_parallel=1), [p])[0] for p in prompts]
    # a 4-block pool, 8-token steps and two decodes growing beside: embeddings get preempted
    e = engine(loaded, n_ctx=64, n_batch=8, n_parallel=4)
    for _ in range(2):
        e.add_request(base[:10], SamplingParams(temperature=0.0, n_predict=40, ignore_eos=True))
    got = embed_all(e, prompts)
    assert e.stats().preemptions_total > 0
    for a, b in zip(alone, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_errors(loaded):
    with pytest.raises(NotSupportedError, match="--embeddings"):
        engine(loaded, embeddings=False).add_embedding([1, 2])
    e = engine(loaded, n_ctx=64)
    with pytest.raises(InvalidRequestError, match="65 tokens; the context holds 64"):
        e.add_embedding([1] * 65)
    with pytest.raises(InvalidRequestError, match="empty"):
        e.add_embedding([])
    with pytest.raises(InvalidRequestError):
        EngineConfig(model_path="x", pooling="bogus")


def test_queue_limit(loaded):
    e = engine(loaded, n_parallel=2, max_queue=2)
    for _ in range(4):  # 2 take the idle slots, 2 wait
        e.add_request([1, 2, 3], GREEDY)
    with pytest.raises(QueueFullError, match="busy"):
        e.add_request([1, 2, 3], GREEDY)
    with pytest.raises(QueueFullError):
        e.add_embedding([1, 2, 3])
    while e.has_unfinished():
        e.step()
    e.add_request([1, 2, 3], GREEDY)  # room again


def test_pooling_helpers():
    h = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 0.0]])
    for pooling, want in [
        (Pooling.MEAN, [[3.0, 2 / 3]]),
        (Pooling.CLS, [[1.0, -2.0]]),
        (Pooling.LAST, [[5.0, 0.0]]),
        (Pooling.NONE, h.tolist()),
    ]:
        acc: list[torch.Tensor] = []
        for chunk in (h[:2], h[2:]):  # two prefill chunks
            accumulate(acc, chunk, pooling)
        torch.testing.assert_close(pooled(acc, pooling, 3), torch.tensor(want))
    assert Pooling.of_model({"llama.pooling_type": 3}, "llama") is Pooling.LAST
    assert Pooling.of_model({}, "llama") is Pooling.NONE
    v = torch.tensor([[3.0, -4.0]])
    assert normalize(v, 2)[0].tolist() == pytest.approx([0.6, -0.8])
    assert normalize(v, 1)[0].tolist() == pytest.approx([3 / 7, -4 / 7])
    assert normalize(v, 0)[0].tolist() == pytest.approx([3 * 32760 / 4, -32760.0])
    assert normalize(v, -1).tolist() == [[3.0, -4.0]]
    assert normalize(torch.zeros(1, 2), 2).tolist() == [[0.0, 0.0]]
