"""POST /completion (and /completions): llama.cpp's native completion route, whole or streamed as SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from http_api import openapi as oa
from http_api.errors import JSON, bad_request, classify, dumps, error_body
from http_api.generation import (
    Completion,
    EventStream,
    closing,
    collect,
    first_then_rest,
    run_jobs,
    stop_type,
    until_disconnected,
)
from http_api.logprobs import llama_probs
from http_api.params import (
    completion_prompts,
    generation_settings,
    get,
    parse_body,
    reject_unsupported,
    sampling_params,
)
from http_api.state import Loaded, ServerState
from runtime.request import RequestOutput
from runtime.sampling_params import SamplingParams

router = APIRouter()


def sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


async def sse_with_errors(events: AsyncIterator[str], done: bool = False) -> AsyncIterator[str]:
    """Pass events through; an error after the 200 went out becomes a last `data: {"error": ...}` event."""
    try:
        async with closing(events) as it:
            async for e in it:
                yield e
    except Exception as exc:
        yield sse(error_body(*classify(exc)))
        return
    if done:
        yield "data: [DONE]\n\n"


def _nested(fields: list[str], res: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's json_get_nested_values: response_fields "a/b" -> {"a/b": res["a"]["b"]}, absent ones skipped."""
    out: dict[str, Any] = {}
    for path in fields:
        cur: Any = res
        for key in path.split("/"):
            if not isinstance(cur, Mapping) or key not in cur:
                break
            cur = cur[key]
        else:
            out[path] = cur
    return out


class CompletionFormat:
    """Builds llama.cpp's /completion JSON for one request (partial chunks and the final result)."""

    def __init__(
        self, loaded: Loaded, params: SamplingParams, body: Mapping[str, Any], model: str
    ) -> None:
        self.loaded = loaded
        self.params = params
        self.model = model
        self.stream = get(body, "stream", bool, False)
        self.timings_per_token = get(body, "timings_per_token", bool, False)
        fields = get(body, "response_fields", list, [])
        if not all(isinstance(f, str) for f in fields):
            raise bad_request("response_fields: must be a list of strings")
        self.fields: list[str] = fields
        get(
            body, "cache_prompt", bool, True
        )  # always on: prefix caching shares every prompt's blocks
        get(body, "return_tokens", bool, False)  # tokens are always returned

    def partial(self, index: int, c: Completion, o: RequestOutput) -> dict[str, Any]:
        res: dict[str, Any] = {
            "index": index,
            "content": o.text,
            "tokens": list(o.new_token_ids),
            "stop": False,
            "id_slot": c.slot_id,
            "tokens_predicted": len(c.tokens),
            "tokens_evaluated": c.prompt_tokens,
        }
        if self.timings_per_token and c.timings is not None:
            res["timings"] = c.timings.as_dict()
        if o.logprobs:
            res["completion_probabilities"] = llama_probs(self.loaded.tokenizer, o.logprobs)
        return res

    def final(self, c: Completion) -> dict[str, Any]:
        n = len(c.tokens)
        res: dict[str, Any] = {
            "index": c.index,
            "content": "" if self.stream else c.text,
            "tokens": [] if self.stream else c.tokens,
            "id_slot": c.slot_id,
            "stop": True,
            "model": self.model,
            "tokens_predicted": n,
            "tokens_evaluated": c.prompt_tokens,
            "generation_settings": generation_settings(self.params, self.stream),
            "prompt": self.loaded.tokenizer.decode(c.prompt_ids),
            "has_new_line": "\n" in c.text,
            "truncated": c.truncated,
            "stop_type": stop_type(c.finish_reason, c.stop_word),
            "stopping_word": c.stop_word or "",
            "tokens_cached": c.prompt_tokens + max(n - 1, 0),
            "timings": (c.timings.as_dict() if c.timings else {}),
        }
        if not self.stream and c.logprobs:
            res["completion_probabilities"] = llama_probs(self.loaded.tokenizer, c.logprobs)
        return _nested(self.fields, res) if self.fields else res


def model_of(body: Mapping[str, Any], state: ServerState) -> str:
    """The model name a response carries: the request's own when it gave one (llama.cpp echoes it)."""
    m = body.get("model")
    return m if isinstance(m, str) and m else state.model_name


@router.post("/completion", openapi_extra=oa.body(oa.COMPLETION))
@router.post("/completions", openapi_extra=oa.body(oa.COMPLETION))
async def completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    loaded = state.require()
    body = parse_body(await request.body())
    reject_unsupported(body)
    prompts = completion_prompts(loaded.tokenizer, body)
    return await complete(request, state, loaded, body, prompts)


async def complete(
    request: Request,
    state: ServerState,
    loaded: Loaded,
    body: Mapping[str, Any],
    prompts: list[list[int]],
) -> Response:
    """Generate from ready prompt ids with /completion's options and answer in its shape (/infill too)."""
    id_slot = get(body, "id_slot", int, -1)
    params = sampling_params(body, loaded.tokenizer, state.defaults)
    fmt = CompletionFormat(loaded, params, body, model_of(body, state))
    jobs = [(p, params) for p in prompts]
    if not fmt.stream:
        results = await collect(request, loaded.engine, jobs, state.totals, id_slot=id_slot)
        request.scope["gguf_tokens"] = sum(len(r.tokens) for r in results)
        out = [fmt.final(r) for r in results]
        return JSON(out[0] if len(out) == 1 else out)
    deltas = await until_disconnected(
        request, first_then_rest(run_jobs(loaded.engine, jobs, state.totals, id_slot=id_slot))
    )

    async def events() -> AsyncIterator[str]:
        acc = [Completion(i, ids) for i, (ids, _) in enumerate(jobs)]
        async with closing(deltas) as it:
            async for i, o in it:
                c = acc[i]
                c.add(o)
                request.scope["gguf_tokens"] = request.scope.get("gguf_tokens", 0) + len(
                    o.new_token_ids
                )
                if o.new_token_ids or o.text:
                    yield sse(fmt.partial(i, c, o))
                if o.finished:
                    yield sse(fmt.final(c))

    return EventStream(sse_with_errors(events()), cleanup=deltas.aclose)
