"""`gguf-serve` entry point: parse flags, set up logging, listen at once and load the model in the background."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from http_api.cli import ServerSettings, UsageError, parse_args
from http_api.shutdown import Drain, GracefulServer

if TYPE_CHECKING:
    from http_api.state import ServerState

log = logging.getLogger("gguf_serve")


class JsonFormatter(logging.Formatter):
    """--log-format json: one JSON object per line (llama.cpp's keys: timestamp, level, msg) plus extras."""

    _EXTRA = ("method", "path", "status", "tokens", "ms")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "timestamp": round(record.created, 3),
            "level": record.levelname,
            "function": record.funcName,
            "line": record.lineno,
            "msg": record.getMessage(),
        }
        out.update({k: getattr(record, k) for k in self._EXTRA if hasattr(record, k)})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes (it may be replaced after set-up)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(log_format: str = "text", disable: bool = False) -> None:
    handler = _Stderr()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("gguf_serve", "runtime", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.CRITICAL + 1 if disable else logging.INFO)


def uvicorn_config(settings: ServerSettings, app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_keyfile=settings.ssl_key_file,
        ssl_certfile=settings.ssl_cert_file,
        timeout_keep_alive=settings.timeout,
        access_log=False,  # http_api.app.AccessLog writes one line per request
        log_config=None,
        lifespan="on",
        # after http_api.shutdown's drain: connections still open get this long to close
        timeout_graceful_shutdown=5,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Warnings while parsing (-ngl on CPU, ...) need a handler before the settings exist.
    setup_logging()
    try:
        settings = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    setup_logging(settings.log_format, settings.log_disable)

    from runtime import parallel
    from runtime.allocator import keep_freed_memory

    keep_freed_memory()  # before the model's memory is allocated

    try:  # under torchrun: join the group; rank 0 serves, the others follow it
        par = parallel.from_env(settings.device, settings.main_gpu, settings.tensor_split)
    except parallel.TensorParallelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if par is not None and not par.is_driver:
            from http_api.state import serve_tensor_parallel_rank

            return serve_tensor_parallel_rank(settings)
        return _serve(settings)
    finally:
        if par is not None:
            par.stop()  # rank 0: release the other ranks, whatever happened here


def _serve(settings: ServerSettings) -> int:
    from http_api.app import create_app
    from http_api.state import ServerState

    state = ServerState(settings)
    if not settings.http:
        return asyncio.run(_grpc_only(state))
    app = create_app(state)
    server = GracefulServer(uvicorn_config(settings, app), state, settings.shutdown_timeout)
    scheme = "https" if settings.ssl_cert_file else "http"
    log.info(
        "listening on %s://%s:%d (model %s loading)",
        scheme,
        settings.host,
        settings.port,
        settings.model or "default",
    )
    t0 = time.perf_counter()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    log.info("server stopped after %.0f s", time.perf_counter() - t0)
    return 0 if state.status != "error" else 1


async def _grpc_only(state: ServerState) -> int:
    """--no-http: the gRPC server alone, until SIGINT or SIGTERM."""
    from http_api.app import start_grpc_beside

    state.start_loading()
    grpc_server = await start_grpc_beside(state)
    assert grpc_server is not None  # parse_args refuses --no-http without a gRPC port
    state.grpc = grpc_server
    drain = Drain(state, state.settings.shutdown_timeout)
    stop = asyncio.Event()

    def on_signal() -> None:  # the first starts the drain, a second cuts it short
        if stop.is_set():
            drain.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await drain.run()
    await grpc_server.stop(grace=1.0)
    state.shutdown()
    return 0 if state.status != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
