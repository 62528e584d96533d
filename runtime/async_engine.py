"""The asyncio face of the Engine: its step loop runs in a thread; each request's deltas reach an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from runtime.engine import Engine, EngineStats
from runtime.errors import EngineError, ShuttingDownError
from runtime.grammar import GrammarCache
from runtime.request import RequestOutput
from runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    """Owns the engine thread. Only that thread touches the Engine; callers send it commands.

    The asyncio loop never waits on a forward: commands go through a thread-safe
    queue, outputs come back with `loop.call_soon_threadsafe`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._running = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="gguf-serve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop after its current step; requests still in flight end with a ShuttingDownError."""
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.engine.runner.close()  # tensor-parallel ranks leave their loop
        for rid in list(self._streams):
            self._fail(rid, ShuttingDownError("the server is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the asyncio side ------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas until it finishes; leaving early (cancel, disconnect) aborts it.

        Invalid requests raise here (InvalidRequestError) before anything is yielded; a
        grammar or JSON schema is compiled first, in a worker thread.
        """
        if not self.is_running:
            raise EngineError("the engine is not running")
        if GrammarCache.key(params) is not None:  # compiled here, off the engine thread, and cached
            await asyncio.to_thread(self.engine.grammars.compile, params)
        add = partial(self.engine.add_request, prompt_token_ids, params, request_id=request_id, **kwargs)
        async for o in self._stream(add):
            yield o

    async def embed(self, prompt_token_ids: Sequence[int], request_id: str | None = None) -> RequestOutput:
        """Evaluate an embedding request; its finished output carries `embedding`. Cancelling aborts it."""
        add = partial(self.engine.add_embedding, prompt_token_ids, request_id=request_id)
        outputs = self._stream(add)
        try:
            async for o in outputs:
                if o.finished:
                    return o
        finally:
            await outputs.aclose()
        raise EngineError("the embedding request ended without a result")

    async def embed_many(
        self, prompts: Sequence[Sequence[int]], max_in_flight: int
    ) -> list[RequestOutput]:
        """embed() each prompt, at most max_in_flight at once (a big batch does not fill the queue);
        results in order. The first error cancels (aborts) the others and is raised."""
        gate = asyncio.Semaphore(max(max_in_flight, 1))

        async def one(ids: Sequence[int]) -> RequestOutput:
            async with gate:
                return await self.embed(ids)

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, add_request: Callable[[], str]) -> AsyncGenerator[RequestOutput, None]:
        if not self.is_running:
            raise EngineError("the engine is not running")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        added: asyncio.Future[str] = loop.create_future()

        added_ids: list[str] = []  # written on the engine thread

        def add() -> None:
            try:
                rid = add_request()
            except BaseException as e:  # reported to the caller, the loop goes on
                loop.call_soon_threadsafe(_set_exception, added, e)
                return
            added_ids.append(rid)
            self._streams[rid] = _Stream(loop, out)
            loop.call_soon_threadsafe(_set_result, added, rid)

        self._submit(add)
        try:
            rid = await added
        except BaseException:
            # Cancelled (client gone) before the id came back: the request may be in the
            # engine all the same; commands run in order, so this runs after add().
            def undo() -> None:
                for r in added_ids:
                    self.engine.abort(r)
                    self._streams.pop(r, None)

            self._submit(undo)
            raise
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the request's blocks are freed before the next step."""

        def do() -> None:
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

        self._submit(do)

    def abort_all(self, reason: str) -> None:
        """The server stops: abort every request; their streams end with a ShuttingDownError."""
        self._submit(lambda: self._fail_all(ShuttingDownError(reason)))

    @property
    def in_flight(self) -> int:
        """Requests with a stream still open (a plain read from any thread)."""
        return len(self._streams)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (plain reads; consistent enough for metrics)."""
        return self.engine.stats()

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps (slot save/restore, cache reset...)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def do() -> None:
            try:
                r = fn(self.engine)
            except BaseException as e:
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, r)

        self._submit(do)
        return await fut

    # -- the engine thread -----------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while self._running:
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed forward must not take the server down
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineError(f"generation failed: {type(e).__name__}: {e}"))
                continue
            for o in outputs:
                stream = self._streams.get(o.request_id)
                if stream is None:
                    continue
                if o.finished:
                    del self._streams[o.request_id]
                _deliver(stream, EngineError(o.error) if o.error is not None else o)

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _fail(self, rid: str, err: BaseException) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            _deliver(stream, err)

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._fail(rid, err)
        for rid in self.engine.unfinished_ids():  # requests with no stream (added directly)
            self.engine.abort(rid)


def _deliver(stream: _Stream, item: RequestOutput | BaseException) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the caller's loop is closed: nobody is listening
        pass


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
