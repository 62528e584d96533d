"""The OpenAI routes: GET /v1/models, POST /v1/completions and /v1/chat/completions (whole or streamed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from http_api import openapi as oa
from http_api.completion import model_of, sse, sse_with_errors
from http_api.errors import JSON, bad_request
from http_api.generation import (
    Completion,
    EventStream,
    Job,
    closing,
    collect,
    first_then_rest,
    run_jobs,
    until_disconnected,
)
from http_api.llama_routes import render_chat
from http_api.logprobs import llama_probs, openai_legacy
from http_api.params import get, parse_body, reject_unsupported, sampling_params, tokenize_prompts
from http_api.state import BUILD_INFO, Loaded, ServerState
from runtime.request import RequestOutput
from runtime.sampling_params import SamplingParams

router = APIRouter()
MAX_N = 128  # choices per request
_N_PREDICT_KEYS = ("max_completion_tokens", "max_tokens", "n_predict")


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    m = state.loaded if state.status == "ready" else None
    meta = None
    if m is not None:
        meta = {
            "vocab_type": 2 if m.tokenizer.model == "gpt2" else 1,
            "n_vocab": m.n_vocab,
            "n_ctx_train": m.n_ctx_train,
            "n_embd": m.n_embd,
            "n_params": m.n_params,
            "size": m.size,
        }
    entry = {
        "id": state.model_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "llamacpp",
        "meta": meta,
    }
    return JSON({"object": "list", "data": [entry]})


def _n(body: Mapping[str, Any]) -> int:
    n = get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n: must be in [1, {MAX_N}], got {n}")
    return n


def _copies(prompts: Sequence[list[int]], params: SamplingParams, n: int) -> list[Job]:
    """n choices per prompt; an explicit seed moves by one per copy so the choices differ."""
    jobs: list[Job] = []
    for p in prompts:
        for j in range(n):
            seeded = (
                params
                if params.seed < 0 or j == 0
                else replace(params, seed=(params.seed + j) % 2**64)
            )
            jobs.append((p, seeded))
    return jobs


def _usage(results: Sequence[Completion], n: int) -> dict[str, Any]:
    firsts = results[::n]  # the prompt counts once however many choices it has
    prompt = sum(r.prompt_tokens for r in firsts)
    completion = sum(len(r.tokens) for r in results)
    return {
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.num_cached_tokens for r in firsts)},
    }


def _stream_options(body: Mapping[str, Any]) -> bool:
    opts = get(body, "stream_options", dict, {})
    return bool(get(opts, "include_usage", bool, False))


class _Kind:
    """What differs between the two routes' response shapes."""

    def __init__(self, chat: bool, loaded: Loaded, n_top: int, model: str) -> None:
        self.chat = chat
        self.loaded = loaded
        self.n_top = n_top
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        return {
            "choices": choices,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": BUILD_INFO,
            "object": self.object + (".chunk" if chunk and self.chat else ""),
            "id": self.id,
        }

    def logprobs(self, lps: Sequence[Any], offset: int = 0) -> dict[str, Any] | None:
        if not lps:
            return None
        tok = self.loaded.tokenizer
        if self.chat:
            return {"content": llama_probs(tok, lps, self.n_top)}
        return openai_legacy(tok, lps, self.n_top, offset)

    def choice(self, c: Completion) -> dict[str, Any]:
        if self.chat:
            out: dict[str, Any] = {
                "finish_reason": c.openai_finish_reason,
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
            }
            out["logprobs"] = self.logprobs(c.logprobs)
            return out
        return {
            "text": c.text,
            "index": c.index,
            "logprobs": self.logprobs(c.logprobs),
            "finish_reason": c.openai_finish_reason,
        }

    def delta(self, c: Completion, o: RequestOutput) -> dict[str, Any]:
        offset = len(c.text) - len(o.text)
        if self.chat:
            return {
                "finish_reason": None,
                "index": c.index,
                "delta": {"content": o.text},
                "logprobs": self.logprobs(o.logprobs),
            }
        return {
            "text": o.text,
            "index": c.index,
            "logprobs": self.logprobs(o.logprobs, offset),
            "finish_reason": None,
        }

    def last(self, c: Completion) -> dict[str, Any]:
        if self.chat:
            return {"finish_reason": c.openai_finish_reason, "index": c.index, "delta": {}}
        return {
            "text": "",
            "index": c.index,
            "logprobs": None,
            "finish_reason": c.openai_finish_reason,
        }


async def _respond(
    request: Request,
    state: ServerState,
    kind: _Kind,
    jobs: list[Job],
    n: int,
    body: Mapping[str, Any],
) -> Response:
    loaded = kind.loaded
    include_usage = _stream_options(body)
    if not get(body, "stream", bool, False):
        results = await collect(request, loaded.engine, jobs, state.totals)
        request.scope["gguf_tokens"] = sum(len(r.tokens) for r in results)
        res = kind.envelope([kind.choice(r) for r in results])
        res["usage"] = _usage(results, n)
        if results and results[0].timings is not None:
            res["timings"] = results[0].timings.as_dict()
        return JSON(res)
    deltas = await until_disconnected(
        request, first_then_rest(run_jobs(loaded.engine, jobs, state.totals))
    )

    async def events() -> AsyncIterator[str]:
        acc = [Completion(i, ids) for i, (ids, _) in enumerate(jobs)]
        if kind.chat:
            for c in acc:
                role = {
                    "finish_reason": None,
                    "index": c.index,
                    "delta": {"role": "assistant", "content": None},
                }
                yield sse(kind.envelope([role], chunk=True))
        async with closing(deltas) as it:
            async for i, o in it:
                c = acc[i]
                c.add(o)
                request.scope["gguf_tokens"] = request.scope.get("gguf_tokens", 0) + len(
                    o.new_token_ids
                )
                if o.text or o.logprobs:
                    yield sse(kind.envelope([kind.delta(c, o)], chunk=True))
                if o.finished:
                    last = kind.envelope([kind.last(c)], chunk=True)
                    if c.timings is not None:
                        last["timings"] = c.timings.as_dict()
                    yield sse(last)
        if include_usage:  # OpenAI's last chunk: no choices, the usage
            usage = kind.envelope([], chunk=True)
            usage["usage"] = _usage(acc, n)
            yield sse(usage)

    return EventStream(sse_with_errors(events(), done=True), cleanup=deltas.aclose)


def _check_openai(body: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse what is not supported; return the SamplingParams fields `response_format` asks for.

    json_object: any JSON object (or its `schema`); json_schema: `json_schema.schema`
    (llama.cpp also takes `schema` beside `type`), any JSON value when absent.
    """
    reject_unsupported(body)
    if get(body, "best_of", int, 1) != 1:
        raise bad_request("best_of is not supported")
    fmt = get(body, "response_format", dict, {})
    kind = fmt.get("type", "text")
    if kind == "json_object":
        return {"json_schema": fmt.get("schema") or {"type": "object"}}
    if kind == "json_schema":
        wrapper = fmt.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        return {"json_schema": schema if schema is not None else fmt.get("schema", {})}
    if kind != "text":
        raise bad_request(f"response_format: unknown type {kind!r}")
    return {}


@router.post("/v1/completions", openapi_extra=oa.body(oa.OPENAI_COMPLETION))
async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    loaded = state.require()
    body = parse_body(await request.body())
    constraint = _check_openai(body)
    if get(body, "echo", bool, False):
        raise bad_request("Only no echo is supported")
    if get(body, "suffix", str, ""):
        raise bad_request("suffix is not supported yet (infill comes in a later release)")
    if body.get("prompt") is None:
        raise bad_request('"prompt" is required')
    n = _n(body)
    n_top = get(body, "logprobs", (int, bool), 0)
    n_top = int(n_top)  # some clients send true: the chosen token's log-prob
    if not 0 <= n_top <= 100:
        raise bad_request(f"logprobs: must be in [0, 100], got {n_top}")
    params = sampling_params(
        body,
        loaded.tokenizer,
        state.defaults,
        _N_PREDICT_KEYS,
        **({"n_probs": n_top} if n_top else {}),
        **constraint,
    )
    prompts = tokenize_prompts(loaded.tokenizer, body["prompt"])
    kind = _Kind(False, loaded, n_top, model_of(body, state))
    return await _respond(request, state, kind, _copies(prompts, params, n), n, body)


@router.post("/v1/chat/completions", openapi_extra=oa.body(oa.CHAT))
@router.post("/chat/completions", openapi_extra=oa.body(oa.CHAT))
async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    loaded = state.require()
    body = parse_body(await request.body())
    constraint = _check_openai(body)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request(
            "tool_choice is not supported yet (tool calling comes in a later release)"
        )
    n = _n(body)
    want = get(body, "logprobs", bool, False)
    n_top = get(body, "top_logprobs", int, 0)
    if body.get("top_logprobs") is not None and not want:
        raise bad_request("top_logprobs requires logprobs to be set to true")
    if not 0 <= n_top <= 20:
        raise bad_request(f"top_logprobs: must be in [0, 20], got {n_top}")
    overrides = {"n_probs": max(n_top, 1), **constraint} if want else constraint
    params = sampling_params(body, loaded.tokenizer, state.defaults, _N_PREDICT_KEYS, **overrides)
    prompt = render_chat(loaded, dict(body))
    ids = loaded.tokenizer.encode(prompt, add_special=True, parse_special=True)
    kind = _Kind(True, loaded, n_top, model_of(body, state))
    return await _respond(request, state, kind, _copies([ids], params, n), n, body)
