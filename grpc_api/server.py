"""The grpc.aio server: Inference + grpc.health.v1 + reflection, on whatever asyncio loop runs it.

Start it from a running loop (the HTTP server's lifespan, or asyncio.run for gRPC alone):

    grpc_server = await start_grpc(provider, host="0.0.0.0", port=50051, api_keys=keys)
    ...
    await grpc_server.stop(grace=5.0)

`provider()` returns the AsyncEngine, or None while the model loads. Health
follows it: NOT_SERVING until it returns a running engine, SERVING then, for
"" (the whole server) and "gguf_serve.v1.Inference"; Inference calls end
UNAVAILABLE ("the model is loading") meanwhile. A provider that raises (say,
after a failed load) ends calls with the status interceptor.py maps its error to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc
from grpc_api.interceptor import AuthInterceptor, ErrorInterceptor
from grpc_api.servicer import AsyncEngineProvider, InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "gguf_serve.v1.Inference"
DEFAULT_PORT = 50051
HEALTH_POLL_S = 0.25  # how often health re-reads the provider

# Large enough for a batch of embeddings both ways: 256 MiB holds e.g. 8192 vectors of 4096
# float32 (128 MiB) with room to spare; grpc's default (4 MiB receive) would not. Embed refuses
# a batch whose answer would not fit (INVALID_ARGUMENT naming the most it takes).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Keepalive: the server pings an idle connection every 60 s and drops it when no ack comes
# within 20 s (dead peers behind NAT or load balancers free their streams); it accepts client
# pings as often as every 10 s, also on connections with no call in flight, so clients may
# set grpc.keepalive_time_ms >= 10000 without being sent GOAWAY "too_many_pings".
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass
class TlsFiles:
    """PEM files for TLS (the same --ssl-key-file / --ssl-cert-file as HTTP)."""

    key_file: str
    cert_file: str

    def credentials(self) -> grpc.ServerCredentials:
        key, cert = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)])


class GrpcServer:
    """A bound grpc.aio server, its health servicer and the task that keeps health in step with the engine."""

    def __init__(
        self,
        server: aio.Server,
        health_servicer: health.aio.HealthServicer,
        provider: AsyncEngineProvider,
        address: str,
        port: int,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.address = address
        self.port = port  # the bound port (the one asked for, or the one picked for port 0)
        self._provider = provider
        self._serving: bool | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._update_health()  # the health servicer starts out SERVING: correct it first
        await self.server.start()
        self._follow = asyncio.create_task(self._follow_provider(), name="grpc-health")
        log.info("gRPC listening on %s", self.address)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Health goes NOT_SERVING, new calls are refused, calls in flight get `grace` seconds."""
        await self.not_serving()
        await self.server.stop(grace)

    async def not_serving(self) -> None:
        """Health NOT_SERVING for good (draining before a stop); calls are still served."""
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        await self.health.enter_graceful_shutdown()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()

    def _engine_ready(self) -> bool:
        try:
            ae = self._provider()
        except Exception:
            return False
        return ae is not None and ae.is_running

    async def _update_health(self) -> None:
        serving = self._engine_ready()
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)
        log.info("gRPC health: %s", "SERVING" if serving else "NOT_SERVING")

    async def _follow_provider(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._update_health()


def build_grpc_server(
    async_engine_provider: AsyncEngineProvider,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_keys: Sequence[str] = (),
    model_alias: str | None = None,
    chat_template: str | None = None,
    tls: TlsFiles | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> GrpcServer:
    """Build and bind (not start) the server; call it on the loop that will run it.

    async_engine_provider() returns the AsyncEngine, or None while the model loads.
    api_keys: empty = no auth; else every call but health needs `authorization: Bearer KEY`.
    model_alias / chat_template: --alias and --chat-template (a built-in name or a Jinja
    template), as HTTP takes them. port 0 binds a free port (GrpcServer.port says which).
    """
    server = aio.server(
        interceptors=[AuthInterceptor(api_keys), ErrorInterceptor()],  # auth runs first
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *KEEPALIVE_OPTIONS,
        ],
    )
    servicer = InferenceServicer(
        async_engine_provider,
        model_alias=model_alias,
        chat_template=chat_template,
        max_message_bytes=max_message_bytes,
    )
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_name, reflection.SERVICE_NAME), server
    )
    address = _address(host, port)
    try:
        if tls is not None:
            bound = server.add_secure_port(address, tls.credentials())
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:  # newer grpcio raises where older ones returned 0
        raise OSError(f"gRPC: cannot listen on {address}: {e}") from e
    if bound == 0:
        raise OSError(f"gRPC: cannot listen on {address}")
    return GrpcServer(server, health_servicer, async_engine_provider, _address(host, bound), bound)


async def start_grpc(async_engine_provider: AsyncEngineProvider, **kwargs: Any) -> GrpcServer:
    """build_grpc_server(...) and start it on the running loop; same arguments."""
    grpc_server = build_grpc_server(async_engine_provider, **kwargs)
    await grpc_server.start()
    return grpc_server


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
