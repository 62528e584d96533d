"""Graceful shutdown: on SIGTERM or SIGINT, refuse new work and let requests in flight finish before stopping.

The first signal starts a drain: /health answers 503 and gRPC health NOT_SERVING at
once (so a load balancer stops sending), new requests get 503 / UNAVAILABLE, and the
requests already running get up to --shutdown-timeout seconds to finish; whatever is
left is then aborted (its stream ends with an error) and the server stops, exiting 0.
A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from http_api.state import ServerState

log = logging.getLogger("gguf_serve")

POLL_S = 0.05
ABORT_GRACE_S = 2.0  # for aborted streams to send their last message


class Drain:
    """Turns the server away from new work and waits for the work in flight."""

    def __init__(self, state: ServerState, timeout: float) -> None:
        self.state = state
        self.timeout = timeout
        self._hurry = asyncio.Event()

    def hurry(self) -> None:
        """Stop waiting: abort what is still running now."""
        self._hurry.set()

    def _in_flight(self) -> int:
        loaded = self.state.loaded
        return loaded.engine.in_flight if loaded is not None else 0

    async def run(self) -> None:
        self.state.draining = True
        if self.state.grpc is not None:
            await self.state.grpc.not_serving()
        log.info(
            "shutting down: %d request(s) in flight get up to %.0f s (--shutdown-timeout)",
            self._in_flight(),
            self.timeout,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self._in_flight() and loop.time() < deadline and not self._hurry.is_set():
            await asyncio.sleep(POLL_S)
        left = self._in_flight()
        if left and self.state.loaded is not None:
            log.warning("shutting down: aborting %d request(s) still running", left)
            self.state.loaded.engine.abort_all("the server is shutting down")
            end = loop.time() + ABORT_GRACE_S
            while self._in_flight() and loop.time() < end:
                await asyncio.sleep(POLL_S)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose first exit signal drains before uvicorn's own shutdown starts."""

    def __init__(self, config: uvicorn.Config, state: ServerState, timeout: float) -> None:
        super().__init__(config)
        self.drain = Drain(state, timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._draining: asyncio.Future[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self.should_exit:  # not serving yet, or already stopping
            return super().handle_exit(sig, frame)
        if self._signalled:  # a second signal: no more waiting
            self._loop.call_soon_threadsafe(self.drain.hurry)
            return
        self._signalled = True
        # Not appended to uvicorn's captured signals: after a drain the process exits 0
        # instead of re-raising the signal.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True
