"""POST /infill: llama.cpp's fill-in-the-middle route, a /completion over the prompt runtime/infill.py assembles."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from http_api import openapi as oa
from http_api.completion import complete
from http_api.errors import bad_request
from http_api.params import get, is_token, parse_body, reject_unsupported
from http_api.state import ServerState
from runtime.infill import ExtraChunk, fim_ids, infill_prompt

router = APIRouter()


def _part(body: dict[str, Any], key: str) -> str | list[str | int]:
    """input_prefix / input_suffix: a string, or a list of strings and token ids (llama.cpp's tokenize_mixed)."""
    v = body.get(key)
    if v is None:
        raise bad_request(f'"{key}" is required')
    if isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) or is_token(x) for x in v)
    ):
        return v
    raise bad_request(f'"{key}" must be a string or a list of strings & token ids')


def _extra(body: dict[str, Any]) -> list[ExtraChunk]:
    chunks = body.get("input_extra")
    if chunks is None:
        return []
    shape = '"input_extra" must be an array of {"filename": string, "text": string}'
    if not isinstance(chunks, list):
        raise bad_request(shape)
    out = []
    for c in chunks:
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise bad_request('extra_context chunk must contain a "text" field with a string value')
        name = c.get("filename", "tmp")
        if not isinstance(name, str):
            raise bad_request('extra_context chunk\'s "filename" field must be a string')
        out.append(ExtraChunk(c["text"], name))
    return out


@router.post("/infill", openapi_extra=oa.body(oa.INFILL))
async def infill(request: Request) -> Response:
    state: ServerState = request.app.state.server
    loaded = state.require()
    tok = loaded.tokenizer
    fim_ids(tok)  # a model without FIM tokens: 400 before the body is looked at
    body = parse_body(await request.body())
    reject_unsupported(body)
    prefix, suffix = _part(body, "input_prefix"), _part(body, "input_suffix")
    extra = _extra(body)
    prompt = get(body, "prompt", str, "")
    ids = infill_prompt(
        tok,
        prefix,
        suffix,
        extra,
        tok.encode(prompt, add_special=False, parse_special=True),
        n_batch=state.settings.n_batch,
        n_predict=state.settings.n_predict,
        n_ctx=loaded.n_ctx,
    )
    return await complete(request, state, loaded, body, [ids])
