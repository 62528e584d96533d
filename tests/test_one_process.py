"""One gguf-serve process: HTTP and gRPC beside each other on one engine; --no-http refuses to serve nothing."""

import asyncio
import socket

import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc
from gguf_serve.v1 import sampling_pb2 as spb
from http_api.cli import ServerSettings, UsageError, parse_args
from http_api.testing import LiveServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_generate_equals_http_completion_from_one_server(llama3_tiny_path):
    port = free_port()
    settings = ServerSettings(model=str(llama3_tiny_path), n_threads=1, grpc_port=port, api_keys=("k",))
    prompt = "The quick brown fox"
    with LiveServer(settings) as srv:
        r = httpx.post(
            f"{srv.url}/completion",
            json={"prompt": prompt, "n_predict": 16, "temperature": 0},
            headers={"Authorization": "Bearer k"},
            timeout=60,
        )
        assert r.status_code == 200
        http = r.json()

        async def over_grpc():
            async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                # Health follows the loading state on a short poll: allow it a moment to turn.
                for _ in range(100):
                    health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                    if health.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.05)
                req = pb.GenerateRequest(text=prompt, params=spb.SamplingParams(temperature=0.0, n_predict=16))
                deltas = [
                    d async for d in pb_grpc.InferenceStub(ch).Generate(req, metadata=(("authorization", "Bearer k"),))
                ]
                return health.status, deltas

        status, deltas = asyncio.run(over_grpc())
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert [t for d in deltas for t in d.token_ids] == http["tokens"]
        assert "".join(d.text for d in deltas) == http["content"]
        assert srv.state.loaded.engine.stats().requests_processing == 0


def test_grpc_port_flags():
    assert parse_args([]).grpc_port == 50051 and parse_args([]).http
    assert parse_args(["--grpc-port", "0"]).grpc_port == 0
    assert not parse_args(["--no-http"]).http
    with pytest.raises(UsageError, match="--no-http needs a --grpc-port"):
        parse_args(["--no-http", "--grpc-port", "0"])
