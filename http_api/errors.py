"""The one place that maps exceptions to HTTP status codes and llama.cpp's OpenAI-shaped error bodies."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.errors import (
    EngineError,
    GGUFError,
    InvalidRequestError,
    NotSupportedError,
    QueueFullError,
    ShuttingDownError,
)

log = logging.getLogger("gguf_serve.http")

# llama.cpp's error_type -> (status, type string) (tools/server: format_error_response).
TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


class APIError(Exception):
    """An error the HTTP layer raises on purpose: status, one-line message, llama.cpp type."""

    def __init__(self, status: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or TYPES.get(status, "server_error")


def not_supported(what: str) -> APIError:
    return APIError(501, f"{what} is not supported yet")


def bad_request(message: str) -> APIError:
    return APIError(400, message)


def error_body(status: int, message: str, type_: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "type": type_ or TYPES.get(status, "server_error"),
        }
    }


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, message, type) for any exception; a client's mistake is never a 5xx."""
    if isinstance(exc, APIError):
        return exc.status, exc.message, exc.type
    if isinstance(exc, (InvalidRequestError, json.JSONDecodeError, UnicodeDecodeError)):
        return 400, str(exc) or type(exc).__name__, TYPES[400]
    if isinstance(exc, NotSupportedError):
        return 501, str(exc), TYPES[501]
    if isinstance(exc, (QueueFullError, ShuttingDownError)):
        return 503, str(exc), TYPES[503]
    if isinstance(exc, RequestValidationError):
        return 400, _validation_message(exc), TYPES[400]
    if isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        message = "File Not Found" if status == 404 else str(exc.detail)
        return status, message, TYPES.get(status, TYPES[400] if status < 500 else "server_error")
    if isinstance(exc, (EngineError, GGUFError)):
        return 500, str(exc), TYPES[500]
    log.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}", TYPES[500]


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg"))


def error_response(exc: BaseException) -> JSONResponse:
    status, message, type_ = classify(exc)
    return JSONResponse(error_body(status, message, type_), status_code=status)


def sanitize(value: Any) -> Any:
    """JSON cannot carry inf/nan: -inf log-probs become the lowest float32 (as llama.cpp sends)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return -3.4028234663852886e38 if value < 0 else 3.4028234663852886e38
        return value
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(sanitize(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class JSON(Response):
    """JSON response that survives non-finite floats and keeps non-ASCII text as is."""

    media_type = "application/json; charset=utf-8"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


class CatchAll:
    """An unexpected exception in a route becomes its 500 here, and the connection stays open.

    Starlette's own last-resort handler sends the same 500 but then re-raises, and uvicorn
    closes the keep-alive connection. A response already started (a stream) cannot be
    replaced: then the exception goes on, and the connection ends as it must.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            await error_response(exc)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Route every exception (FastAPI's own included) through classify()."""

    async def handler(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    app.add_exception_handler(APIError, handler)
    app.add_exception_handler(InvalidRequestError, handler)
    app.add_exception_handler(RequestValidationError, handler)
    app.add_exception_handler(StarletteHTTPException, handler)
    app.add_exception_handler(NotSupportedError, handler)
    app.add_exception_handler(QueueFullError, handler)
    app.add_exception_handler(EngineError, handler)
    app.add_exception_handler(GGUFError, handler)
    app.add_exception_handler(Exception, handler)
