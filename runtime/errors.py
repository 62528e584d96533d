"""The exception types the runtime raises to its callers, each carrying a one-line message."""

from __future__ import annotations


class GGUFServeError(Exception):
    """Base of every error the runtime reports to a user; str(err) is the whole message."""


class GGUFError(GGUFServeError, ValueError):
    """A GGUF file is unreadable, inconsistent or uses something we do not support."""


class UnsupportedModelError(GGUFError):
    """The file is valid GGUF but names an architecture or tensor type we cannot run."""


class InvalidRequestError(GGUFServeError, ValueError):
    """A caller asked for something invalid (bad parameter, prompt too long, ...)."""


class EngineError(GGUFServeError, RuntimeError):
    """The engine failed while running a request (a server-side fault, not the caller's)."""


class NotSupportedError(GGUFServeError):
    """The server was not started for this (embeddings without --embeddings, ...)."""


class QueueFullError(GGUFServeError):
    """Too many requests are waiting for a slot; the caller may retry later."""


class SlotBusyError(InvalidRequestError):
    """A slot action that needs an idle slot found it running a request."""


class ShuttingDownError(GGUFServeError):
    """The server is draining before it stops: it takes no new work (HTTP 503, gRPC UNAVAILABLE)."""
