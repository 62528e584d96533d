"""Shared by the gRPC tests: a started server on a free loopback port over llama3-tiny, and small helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc
from gguf_serve.v1 import sampling_pb2 as spb
from grpc_api.server import GrpcServer, start_grpc
from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine

DATA = Path(__file__).parent / "data"
N_CTX = 2048


def new_engine(loaded, n_parallel: int = 8, **cfg_kw) -> AsyncEngine:
    cfg = EngineConfig(model_path=str(loaded.path), n_ctx=N_CTX, n_parallel=n_parallel, **cfg_kw)
    return AsyncEngine(Engine(cfg, loaded=loaded))


@dataclass
class Conn:
    stub: pb_grpc.InferenceStub
    channel: aio.Channel
    server: GrpcServer
    ae: AsyncEngine | None


@contextlib.asynccontextmanager
async def serve(
    loaded, *, api_keys: Sequence[str] = (), holder: dict | None = None, **server_kw
) -> AsyncIterator[Conn]:
    """A started server on a free loopback port with a channel to it; `holder["ae"]` is the engine (None: loading)."""
    if holder is None:
        holder = {"ae": new_engine(loaded)}
    if holder["ae"] is not None:
        holder["ae"].start()
    server = await start_grpc(
        lambda: holder["ae"], host="127.0.0.1", port=0, api_keys=api_keys, **server_kw
    )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Conn(pb_grpc.InferenceStub(channel), channel, server, holder["ae"])
    finally:
        await server.stop(None)
        if holder["ae"] is not None:
            holder["ae"].shutdown()


def run(coro):
    return asyncio.run(coro)


def greedy(n: int = 16, **kw) -> spb.SamplingParams:
    return spb.SamplingParams(temperature=0.0, n_predict=n, **kw)


async def collect(call) -> list[pb.GenerateResponse]:
    return [m async for m in call]


async def wait_idle(ae: AsyncEngine) -> tuple[int, int, int]:
    """Poll until the engine has no request; (processing, free blocks, total blocks)."""
    for _ in range(300):
        if ae.stats().requests_processing == 0 and ae.stats().requests_deferred == 0:
            break
        await asyncio.sleep(0.01)
    return await ae.call(
        lambda e: (e.stats().requests_processing, e.num_free_blocks, e.blocks.num_blocks)
    )


def llama_cpp_greedy() -> dict:
    with open(DATA / "llama3_tiny_greedy.jsonl") as f:
        return json.loads(f.readline())
