"""AsyncEngine: the engine thread serves concurrent asyncio callers, and cancelled streams free their blocks."""

import asyncio

import pytest

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.errors import EngineError, InvalidRequestError, ShuttingDownError
from runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, n_predict=10, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(llama3_tiny_path):
    from runtime.loader import load_model

    return load_model(llama3_tiny_path)


@pytest.fixture
def aengine(loaded):
    ae = AsyncEngine(Engine(EngineConfig(model_path=str(loaded.path), n_ctx=2048), loaded=loaded))
    ae.start()
    yield ae
    ae.shutdown()


def prompts(loaded):
    tok = loaded.tokenizer
    return [tok.encode(t) for t in ("Hello there", "The quick brown fox", "1, 2, 3, 4,", "Once upon a time")]


def test_concurrent_callers_get_what_the_sync_engine_gives(loaded, aengine):
    expected = Engine(EngineConfig(model_path=str(loaded.path), n_ctx=2048), loaded=loaded).generate(
        prompts(loaded), GREEDY
    )

    async def one(p):
        ids, text, last = [], "", None
        async for o in aengine.generate(p, GREEDY):
            ids += o.new_token_ids
            text += o.text
            last = o
        return ids, text, last

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts(loaded)))

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected
    for ids, text, last in results:
        assert last.finished and last.finish_reason == "length"
        assert text == loaded.tokenizer.decode(ids)
        assert last.timings.predicted_n == GREEDY.n_predict


def test_leaving_a_stream_aborts_the_request(loaded, aengine):
    long = SamplingParams(temperature=0.0, n_predict=500, ignore_eos=True)

    async def main():
        n = 0
        async for _ in aengine.generate(prompts(loaded)[0], long, request_id="leaver"):
            n += 1
            if n == 3:
                break  # a client disconnecting
        # The abort is applied by the engine thread before its next step.
        for _ in range(200):
            if not aengine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return await aengine.call(lambda e: (e.has_unfinished(), e.num_free_blocks, e.blocks.num_blocks))

    busy, free, total = asyncio.run(main())
    assert not busy and free == total


def test_cancelled_before_the_request_id_came_back_still_aborts(loaded, aengine):
    """A client gone while its request is being added (the id not yet known) leaks nothing."""
    long = SamplingParams(temperature=0.0, n_predict=500, ignore_eos=True)
    gate = __import__("threading").Event()

    async def main():
        # Hold the engine thread so the add command waits in its queue, then cancel the caller.
        aengine._submit(gate.wait)

        async def consume():
            async for _ in aengine.generate(prompts(loaded)[1], long, request_id="early-leaver"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()  # now the add runs, and right after it the abort
        for _ in range(200):
            if not aengine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return await aengine.call(lambda e: (e.has_unfinished(), e.num_free_blocks, e.blocks.num_blocks))

    busy, free, total = asyncio.run(main())
    assert not busy and free == total and aengine.in_flight == 0


def test_abort_all_ends_every_stream_with_the_reason(loaded, aengine):
    long = SamplingParams(temperature=0.0, n_predict=500, ignore_eos=True)

    async def main():
        async def consume(p):
            n = 0
            async for _ in aengine.generate(p, long):
                n += 1
            return n

        tasks = [asyncio.create_task(consume(p)) for p in prompts(loaded)[:2]]
        while aengine.in_flight < 2:
            await asyncio.sleep(0.01)
        aengine.abort_all("the server is shutting down")
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    # 503 / UNAVAILABLE for the clients, not a server fault
    assert all(isinstance(r, ShuttingDownError) and "shutting down" in str(r) for r in results)
    assert aengine.in_flight == 0 and not aengine.engine.has_unfinished()


def test_invalid_request_raises_and_the_engine_keeps_serving(loaded, aengine):
    async def main():
        with pytest.raises(InvalidRequestError):
            async for _ in aengine.generate([], GREEDY):
                pass
        return [o async for o in aengine.generate(prompts(loaded)[1], GREEDY)]

    outs = asyncio.run(main())
    assert outs[-1].finished


def test_a_failing_step_fails_its_requests_not_the_loop(loaded, aengine, monkeypatch):
    real = aengine.engine.runner.execute
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(sched)

    monkeypatch.setattr(aengine.engine.runner, "execute", flaky)

    async def main():
        with pytest.raises(EngineError, match="boom"):
            async for _ in aengine.generate(prompts(loaded)[0], GREEDY):
                pass
        return [o async for o in aengine.generate(prompts(loaded)[0], GREEDY)]

    assert asyncio.run(main())[-1].finished
    assert aengine.engine.num_free_blocks == aengine.engine.blocks.num_blocks


def test_generate_after_shutdown_is_an_error(loaded):
    ae = AsyncEngine(Engine(EngineConfig(model_path=str(loaded.path), n_ctx=256), loaded=loaded))

    async def main():
        async for _ in ae.generate([1, 2], GREEDY):
            pass

    with pytest.raises(EngineError):
        asyncio.run(main())


def test_a_failing_request_fails_its_own_stream_only(loaded):
    """A sampling error reaches its caller as EngineError; the others' streams are untouched."""
    e = Engine(EngineConfig(model_path=str(loaded.path), n_ctx=2048), loaded=loaded)
    expected = e.generate(prompts(loaded), GREEDY)
    add = e.add_request

    def add_with_a_bad_processor(ids, params, **kw):
        rid = add(ids, params, **kw)
        if ids == prompts(loaded)[1]:
            e.requests[rid].logits_processors.append(lambda out, x: x.flip(0)[:-1])  # wrong shape
        return rid

    e.add_request = add_with_a_bad_processor  # type: ignore[method-assign]
    ae = AsyncEngine(e)
    ae.start()

    async def one(p):
        return [t async for o in ae.generate(p, GREEDY) for t in o.new_token_ids]

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts(loaded)), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        ae.shutdown()
    assert isinstance(results[1], EngineError) and "sampling failed" in str(results[1])
    assert [results[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert e.num_free_blocks == e.blocks.num_blocks
