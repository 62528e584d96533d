"""SIGTERM on a live gguf-serve process: health turns 503 / NOT_SERVING, streams finish (or are cut at the timeout), exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
# Tokens of the stream in flight: still running well after the signal on a fast, idle machine
# (the tiny model makes ~1000 tokens/s), so the checks made during the drain find it draining.
LONG = 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """`python -m http_api.server` on free ports, ready once /health says ok."""

    def __init__(self, model: Path, *flags: str) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "http_api.server", "-m", str(model), "--port", str(self.port),
               "--grpc-port", str(self.grpc_port), "-t", "1", "-c", "1024", *flags]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            if self._up("--no-http" not in flags):
                return
            time.sleep(0.1)
        raise AssertionError("the server did not come up")

    def _up(self, http: bool) -> bool:
        if http:
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        async def check() -> bool:
            async with aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
                try:
                    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                except aio.AioRpcError:
                    return False
                return r.status == health_pb2.HealthCheckResponse.SERVING

        return asyncio.run(check())

    def output(self) -> str:
        self.proc.kill()
        return self.proc.communicate()[0].decode(errors="replace")

    def term(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output()}") from None


def stream(url: str, n_predict: int):
    """The SSE chunks of a /completion stream, parsed, as they arrive."""
    body = {"prompt": "Once upon a time", "n_predict": n_predict, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/completion", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


async def grpc_during_drain(port: int) -> tuple[int, grpc.StatusCode]:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        with pytest.raises(aio.AioRpcError) as e:
            await pb_grpc.InferenceStub(ch).Complete(pb.GenerateRequest(text="hi"))
        return health.status, e.value.code()


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_then_exits_0(llama3_tiny_path):
    srv = Process(llama3_tiny_path, "--shutdown-timeout", "60")
    chunks = stream(srv.url, LONG)
    first = next(chunks)
    assert not first["stop"]
    srv.term()
    time.sleep(0.3)  # the signal is handled on the server's loop
    health = httpx.get(f"{srv.url}/health", timeout=5)
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]
    refused = httpx.post(f"{srv.url}/completion", json={"prompt": "hi", "n_predict": 2}, timeout=5)
    assert refused.status_code == 503
    status, code = asyncio.run(grpc_during_drain(srv.grpc_port))
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING and code == grpc.StatusCode.UNAVAILABLE
    rest = list(chunks)  # the stream in flight is not cut: all its tokens arrive
    assert rest[-1]["stop"] and rest[-1]["stop_type"] == "limit" and rest[-1]["tokens_predicted"] == LONG
    assert srv.wait(30) == 0


@pytest.mark.slow
def test_shutdown_timeout_aborts_what_is_left_and_still_exits_0(llama3_tiny_path):
    srv = Process(llama3_tiny_path, "--shutdown-timeout", "1")
    chunks = stream(srv.url, 100_000)  # would run for minutes
    next(chunks)
    t0 = time.time()
    srv.term()
    with _CutStream():
        for c in chunks:
            if c.get("stop"):
                break
    assert srv.wait(20) == 0
    assert time.time() - t0 < 15  # 1 s of grace, the abort, uvicorn's own close


class _CutStream:
    """The cut stream may end cleanly, with an error event, or with a closed connection."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is None or issubclass(exc[0], httpx.HTTPError)  # type: ignore[arg-type]


@pytest.mark.slow
def test_grpc_only_server_drains_on_sigterm(llama3_tiny_path):
    srv = Process(llama3_tiny_path, "--no-http", "--shutdown-timeout", "30")

    async def generate_through_sigterm() -> tuple[int, int, grpc.StatusCode]:
        async with aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            req = pb.GenerateRequest(text="Once upon a time")
            req.params.n_predict, req.params.ignore_eos, req.params.temperature = LONG, True, 0.0
            call = stub.Generate(req)
            got = [await call.read()]
            srv.term()
            await asyncio.sleep(0.3)
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.Complete(pb.GenerateRequest(text="hi"))
            while (d := await call.read()) != aio.EOF:
                got.append(d)
            return sum(len(d.token_ids) for d in got), health.status, refused.value.code()

    n, status, code = asyncio.run(generate_through_sigterm())
    assert n == LONG  # the stream in flight finished
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING and code == grpc.StatusCode.UNAVAILABLE
    assert srv.wait(30) == 0
