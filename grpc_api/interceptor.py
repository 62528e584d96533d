"""The one place exceptions become gRPC status codes, and the API-key check; both as aio interceptors.

InvalidRequestError -> INVALID_ARGUMENT (its message, the same the HTTP API
gives; a busy slot FAILED_PRECONDITION), a queue-full error -> RESOURCE_EXHAUSTED, a server
shutting down -> UNAVAILABLE, a feature the server was not
started for -> UNIMPLEMENTED, EngineError and anything
unexpected -> INTERNAL; the servicer raises RpcError for the rest (UNAVAILABLE
while loading, UNIMPLEMENTED, ...). Nothing reaches grpc as an exception, so
no client error ever shows up as UNKNOWN.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc import aio

from runtime import errors

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/gguf_serve.v1.Inference/"
# Health answers without a key, so load balancers and grpc_health_probe need none.
AUTH_EXEMPT = ("/grpc.health.v1.Health/",)


class RpcError(Exception):
    """Raised by the servicer to end a call with this status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Most specific first.
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.SlotBusyError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (errors.NotSupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.EngineError, grpc.StatusCode.INTERNAL),
    (errors.GGUFServeError, grpc.StatusCode.INTERNAL),
]


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a servicer exception ends its call with."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    log.exception("unexpected error in a gRPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _map_unary(
    fn: Callable[[Any, aio.ServicerContext], Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except aio.AbortError:
            raise
        except Exception as e:
            await context.abort(*status_for(e))

    return call


def _map_stream(
    fn: Callable[[Any, aio.ServicerContext], AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as e:
            await context.abort(*status_for(e))

    return call


class ErrorInterceptor(aio.ServerInterceptor):
    """Wraps the Inference service's handlers so their exceptions end the call with the mapped status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):  # type: ignore[attr-defined]
            return handler
        h: Any = handler
        if h.unary_unary is not None:
            return h._replace(unary_unary=_map_unary(h.unary_unary))
        if h.unary_stream is not None and inspect.isasyncgenfunction(h.unary_stream):
            return h._replace(unary_stream=_map_stream(h.unary_stream))
        return handler


def _bearer(metadata: Iterable[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _deny(handler: Any, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED."""

    async def abort(_request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return kind(abort, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(aio.ServerInterceptor):
    """`authorization: Bearer KEY` metadata must carry one of the API keys (constant-time compare)."""

    def __init__(self, api_keys: Sequence[str], exempt: Sequence[str] = AUTH_EXEMPT) -> None:
        self._keys = [k.encode() for k in api_keys if k]
        self._exempt = tuple(exempt)

    def authorized(self, metadata: Iterable[Any] | None) -> tuple[bool, str]:
        token = _bearer(metadata)
        if token is None:
            return False, "missing API key: send metadata 'authorization: Bearer <key>'"
        given = token.encode()
        ok = False
        for key in self._keys:  # every key is compared, so timing says nothing about which matched
            ok |= hmac.compare_digest(given, key)
        return ok, "" if ok else "invalid API key"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if not self._keys or method.startswith(self._exempt):
            return await continuation(handler_call_details)
        ok, why = self.authorized(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if ok:
            return await continuation(handler_call_details)
        return _deny(await continuation(handler_call_details), why)
