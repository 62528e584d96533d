"""Running requests on the AsyncEngine for the routes: several prompts at once, results gathered, clients watched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from http_api.errors import APIError
from http_api.state import RequestTotals
from runtime.async_engine import AsyncEngine
from runtime.request import RequestOutput, Timings, TokenLogprob
from runtime.sampling_params import SamplingParams

T = TypeVar("T")
Job = tuple[Sequence[int], SamplingParams]


@asynccontextmanager
async def closing(items: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """contextlib.aclosing for any async iterator: an async generator left early is closed at once."""
    try:
        yield items
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class Completion:
    """One request's deltas added up: the whole text, tokens, log-probs and how it ended."""

    index: int
    prompt_ids: Sequence[int]
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_word: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    truncated: bool = False
    slot_id: int = -1
    timings: Timings | None = None

    def add(self, o: RequestOutput) -> None:
        self.text += o.text
        self.tokens.extend(o.new_token_ids)
        self.logprobs.extend(o.logprobs)
        self.num_prompt_tokens = o.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = o.num_cached_tokens or self.num_cached_tokens
        self.truncated = self.truncated or o.truncated
        if o.slot_id >= 0:
            self.slot_id = o.slot_id
        if o.timings is not None:
            self.timings = o.timings
        if o.finished:
            self.finish_reason = o.finish_reason
            self.stop_word = o.stop_word

    @property
    def stop_type(self) -> str:
        """llama.cpp's stop_type: "eos", "word" (a stop string), "limit" (n_predict / context) or "none"."""
        return stop_type(self.finish_reason, self.stop_word)

    @property
    def openai_finish_reason(self) -> str:
        return "stop" if self.finish_reason == "stop" else "length"

    @property
    def prompt_tokens(self) -> int:
        return self.num_prompt_tokens or len(self.prompt_ids)


def stop_type(finish_reason: str | None, stop_word: str | None) -> str:
    if finish_reason == "stop":
        return "word" if stop_word else "eos"
    return "limit" if finish_reason == "length" else "none"


async def run_jobs(
    engine: AsyncEngine, jobs: Sequence[Job], totals: RequestTotals | None = None, **kwargs: Any
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(job index, delta) for all jobs as the engine produces them; closing this aborts what still runs."""

    def count(o: RequestOutput) -> None:
        if o.finished and o.timings is not None and totals is not None:
            totals.add(o.timings)

    if len(jobs) == 1:
        ids, params = jobs[0]
        async with closing(engine.generate(ids, params, **kwargs)) as outs:
            async for o in outs:
                count(o)
                yield 0, o
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

    async def pump(i: int, ids: Sequence[int], params: SamplingParams) -> None:
        try:
            async with closing(engine.generate(ids, params, **kwargs)) as outs:
                async for o in outs:
                    await queue.put((i, o))
        except Exception as e:  # handed to the consumer, which stops everything
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    remaining = len(jobs)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            count(item)
            yield i, item
            remaining -= item.finished
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(
    request: Request,
    engine: AsyncEngine,
    jobs: Sequence[Job],
    totals: RequestTotals | None = None,
    **kwargs: Any,
) -> list[Completion]:
    """Run jobs to the end; a client that hangs up cancels them (their KV is freed)."""
    results = [Completion(i, ids) for i, (ids, _) in enumerate(jobs)]

    async def run() -> list[Completion]:
        async with closing(run_jobs(engine, jobs, totals, **kwargs)) as deltas:
            async for i, o in deltas:
                results[i].add(o)
        return results

    return await until_disconnected(request, run())


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work unless the client hangs up first; then work is cancelled and a 499 raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled itself (shutdown)
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "the client closed the connection", "invalid_request_error")
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Primed(Generic[T]):
    """An async iterator whose first item is already here; aclose() closes the source, started or not."""

    def __init__(self, first: T, source: AsyncIterator[T]) -> None:
        self._first: list[T] = [first]
        self._source = source

    def __aiter__(self) -> Primed[T]:
        return self

    async def __anext__(self) -> T:
        if self._first:
            return self._first.pop()
        return await self._source.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()


async def first_then_rest(items: AsyncIterator[T]) -> Primed[T]:
    """Wait for the first item, so an invalid request raises before a 200 goes out; then all of them."""
    try:
        first = await items.__anext__()
    except BaseException:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
        raise
    return Primed(first, items)


class EventStream(Response):
    """Server-sent events from an async iterator of ready-made `data: ...` strings.

    Whatever the ASGI server's spec version, a client that goes away cancels the
    iterator at once and the iterator is closed, so the engine requests behind it abort.
    """

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.events = events
        self.cleanup = cleanup
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        agen: Any = self.events
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await _disconnected(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                async for chunk in agen:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": chunk.encode("utf-8"),
                            "more_body": True,
                        }
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except OSError:  # the socket went away under a send
            pass
        finally:
            await agen.aclose()
            if self.cleanup is not None:  # the source, even if the events never started
                await self.cleanup()
