"""create_app(state): the FastAPI app with llama.cpp's middleware (model state, API keys, body limit, CORS, access log)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from grpc_api.server import GrpcServer, TlsFiles, start_grpc
from http_api import completion, embeddings, infill, llama_routes, metrics, openai_routes
from http_api.errors import APIError, CatchAll, error_response, install
from http_api.pages import WEBUI_DIR, Pages
from http_api.state import ServerState
from runtime.async_engine import AsyncEngine
from runtime.errors import EngineError, ShuttingDownError

access_log = logging.getLogger("gguf_serve.http")

# Open without an API key, as in llama.cpp (tools/server: public_endpoints); the web page's
# files are open too (Pages.serves).
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/models", "/v1/models", "/api/tags"})
# Answered while the model loads (llama.cpp lets the model list through).
WHILE_LOADING = frozenset({"/models", "/v1/models", "/api/tags"})


class Gate:
    """Before any route: the model must be up, the key right, the body within the limit.

    The web page's own files pass without a key and while loading (the page asks for the
    key and sends it with its API calls).
    """

    def __init__(self, app: ASGIApp, state: ServerState, pages: Pages | None = None) -> None:
        self.app = app
        self.state = state
        self.pages = pages
        self.keys = [k.encode() for k in state.settings.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        try:
            waiting = self.state.status != "ready" or self.state.draining
            if waiting and path not in WHILE_LOADING and not self._page(scope):
                self.state.require()
            if (
                self.keys
                and path not in PUBLIC_PATHS
                and not self._authorized(scope)
                and not self._page(scope)
            ):
                raise APIError(401, "Invalid API Key")
            body = await self._read_body(scope, receive)
        except (APIError, ShuttingDownError) as e:
            return await error_response(e)(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _page(self, scope: Scope) -> bool:
        return self.pages is not None and self.pages.serves(scope)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization") or headers.get(b"x-api-key") or b""
        if given[:7].lower() == b"bearer ":
            given = given[7:].strip()
        ok = False
        for key in self.keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(given, key)
        return ok

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.state.settings.max_body_bytes
        too_big = APIError(413, f"the request body exceeds the limit of {limit} bytes")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the route sees an empty body and its disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class AccessLog:
    """One line per request: method, path, status, generated tokens, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ms = 1e3 * (time.perf_counter() - t0)
            extra: dict[str, Any] = {
                "method": scope["method"], "path": scope["path"], "status": status,
                "tokens": scope.get("gguf_tokens", 0), "ms": round(ms, 1),
            }  # fmt: skip
            access_log.info(
                "%s %s %d %d tokens %.1f ms",
                scope["method"],
                scope["path"],
                status,
                extra["tokens"],
                ms,
                extra=extra,
            )


async def start_grpc_beside(state: ServerState) -> GrpcServer | None:
    """The gRPC server on the running loop when --grpc-port is set; it asks `state` for the engine."""
    settings = state.settings
    if not settings.grpc_port:
        return None

    def provider() -> AsyncEngine | None:
        if state.draining:
            raise ShuttingDownError("the server is shutting down")
        if state.status == "error":
            raise EngineError(state.error or "the model failed to load")
        return state.loaded.engine if state.status == "ready" and state.loaded is not None else None

    tls = None
    if settings.ssl_key_file and settings.ssl_cert_file:
        tls = TlsFiles(settings.ssl_key_file, settings.ssl_cert_file)
    grpc_server = await start_grpc(
        provider,
        host=settings.host,
        port=settings.grpc_port,
        api_keys=settings.api_keys,
        model_alias=settings.alias,
        chat_template=settings.chat_template,
        tls=tls,
    )
    access_log.info("gRPC listening on %s:%d", settings.host, settings.grpc_port)
    return grpc_server


def create_app(state: ServerState) -> FastAPI:
    """The HTTP app; starting it (its lifespan) starts loading the model in the background."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        grpc_server = await start_grpc_beside(state)  # same engine, same event loop
        state.grpc = grpc_server
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=5.0)  # before the engine stops: streams may finish
        state.shutdown()

    app = FastAPI(
        title="gguf-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.server = state
    install(app)
    for module in (llama_routes, completion, infill, openai_routes, embeddings, metrics):
        app.include_router(module.router)
    # The web page answers where no route does: --path's files, else the bundled UI.
    pages = Pages(state.settings.static_path or WEBUI_DIR, app.router.routes)
    app.router.default = pages
    app.add_middleware(CatchAll)  # innermost: a route's fault is its 500, the connection stays
    app.add_middleware(Gate, state=state, pages=pages)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
    )
    app.add_middleware(AccessLog)
    return app
