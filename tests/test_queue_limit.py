"""The bounded wait queue (--max-queue): HTTP answers 503 as llama.cpp does, gRPC RESOURCE_EXHAUSTED."""

import asyncio
import threading
import time

import grpc
import httpx
import pytest
from grpc import aio

from gguf_serve.v1 import inference_pb2 as pb
from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from tests.grpc_harness import collect, greedy, new_engine, run, serve


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details()


def test_a_full_queue_is_503(llama3_tiny_path):
    """One slot and room for one waiting request: a third concurrent request is refused at once."""
    settings = ServerSettings(
        model=str(llama3_tiny_path), n_threads=1, n_ctx=1024, n_parallel=1, max_queue=1
    )
    with LiveServer(settings) as srv:
        long = {"prompt": "Once upon a time", "n_predict": 150, "ignore_eos": True}
        results = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    httpx.post(srv.url + "/completion", json=long, timeout=120)
                )
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        engine = srv.state.loaded.engine
        deadline = time.monotonic() + 30
        while (engine.stats().requests_processing, engine.stats().requests_deferred) != (1, 1):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(srv.url + "/completion", json={"prompt": "x", "n_predict": 1})
        assert r.status_code == 503
        assert (
            r.json()["error"]["type"] == "unavailable_error"
            and "busy" in r.json()["error"]["message"]
        )
        for t in threads:
            t.join()
        assert [x.status_code for x in results] == [200, 200]
        assert (
            httpx.post(srv.url + "/completion", json={"prompt": "x", "n_predict": 1}).status_code
            == 200
        )


def test_a_full_queue_is_resource_exhausted(loaded):
    """One slot and room for one waiting request: a third concurrent call is refused at once."""

    async def main():
        holder = {"ae": new_engine(loaded, n_parallel=1, max_queue=1)}
        async with serve(loaded, holder=holder) as c:
            long = pb.GenerateRequest(text="Once upon a time", params=greedy(1500, ignore_eos=True))
            first = asyncio.ensure_future(collect(c.stub.Generate(long)))
            second = asyncio.ensure_future(c.stub.Complete(long))
            while (c.ae.stats().requests_processing, c.ae.stats().requests_deferred) != (1, 1):
                await asyncio.sleep(0.01)
            refused = await code_of(c.stub.Complete(long))
            embed_refused = await code_of(
                c.stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")]))
            )
            first.cancel()
            second.cancel()
            await asyncio.gather(first, second, return_exceptions=True)
            after = await c.stub.Complete(pb.GenerateRequest(text="Hi", params=greedy(2)))
            return refused, embed_refused, after

    refused, embed_refused, after = run(main())
    assert refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in refused[1]
    # embeddings are off on this server: that is said before the queue is looked at
    assert embed_refused[0] == grpc.StatusCode.UNIMPLEMENTED
    assert len(after.token_ids) == 2
