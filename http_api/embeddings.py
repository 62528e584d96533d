"""POST /embedding, /embeddings (llama.cpp's shape) and /v1/embeddings (OpenAI's), over the engine's embedding requests."""

from __future__ import annotations

import base64
from typing import Any

import torch
from fastapi import APIRouter, Request
from starlette.responses import Response

from http_api import openapi as oa
from http_api.completion import model_of
from http_api.errors import JSON, bad_request
from http_api.generation import until_disconnected
from http_api.params import get, is_token, parse_body, tokenize_prompts
from http_api.state import Loaded, ServerState
from runtime.pooling import Pooling, normalize
from runtime.request import RequestOutput

router = APIRouter()

_SHAPES = (
    '"{}" must be a string, a list of token ids, a list of mixed strings & token ids, '
    "or a list of those"
)


def _is_one(x: object) -> bool:
    return isinstance(x, str) or (
        isinstance(x, list) and all(isinstance(t, str) or is_token(t) for t in x)
    )


def embedding_inputs(loaded: Loaded, value: Any, field: str) -> list[list[int]]:
    """`input` / `content` -> one token list per input (llama.cpp's tokenize_input_prompts, specials on)."""
    if isinstance(value, list) and not value:
        raise bad_request(f'"{field}" must not be empty')
    if not (_is_one(value) or (isinstance(value, list) and all(_is_one(v) for v in value))):
        raise bad_request(_SHAPES.format(field))
    prompts = tokenize_prompts(loaded.tokenizer, value, add_special=True, parse_special=True)
    if any(not p for p in prompts):  # a model that adds no BOS leaves an empty text empty
        raise bad_request("Input content cannot be empty")
    return prompts


def vectors(out: RequestOutput, pooling: Pooling, embd_normalize: int) -> torch.Tensor:
    """The result rows as llama.cpp sends them: pooled ones normalized, per-token ones raw."""
    assert out.embedding is not None
    if pooling is Pooling.NONE:
        return out.embedding
    return normalize(out.embedding, embd_normalize)


@router.post("/embedding", openapi_extra=oa.body(oa.EMBEDDING))
@router.post("/embeddings", openapi_extra=oa.body(oa.EMBEDDING))
async def embeddings(request: Request) -> Response:
    return await _embeddings(request, oai=False)


@router.post("/v1/embeddings", openapi_extra=oa.body(oa.EMBEDDING))
async def embeddings_oai(request: Request) -> Response:
    return await _embeddings(request, oai=True)


async def _embeddings(request: Request, oai: bool) -> Response:
    state: ServerState = request.app.state.server
    loaded = state.require()
    pooling = loaded.engine.engine.embedding_pooling()  # 501 without --embeddings
    if oai and pooling is Pooling.NONE:
        raise bad_request(
            "Pooling type 'none' is not OAI compatible. Please use a different pooling type"
        )
    body = parse_body(await request.body())
    if body.get("input") is not None:
        field = "input"
    elif body.get("content") is not None:
        field, oai = (
            "content",
            False,
        )  # "content" is not OpenAI's: llama.cpp answers in its own shape
    else:
        raise bad_request('"input" or "content" must be provided')
    fmt = get(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise bad_request("The format to return the embeddings in. Can be either float or base64")
    embd_normalize = get(body, "embd_normalize", int, 2)
    if embd_normalize < -1:
        raise bad_request(f"embd_normalize: must be >= -1, got {embd_normalize}")
    prompts = embedding_inputs(loaded, body[field], field)
    outs = await until_disconnected(
        request, loaded.engine.embed_many(prompts, state.settings.n_parallel)
    )
    rows = [vectors(o, pooling, embd_normalize) for o in outs]
    if not oai:
        return JSON([{"index": i, "embedding": v.tolist()} for i, v in enumerate(rows)])
    data = []
    for i, v in enumerate(rows):
        item: dict[str, Any] = {"embedding": v[0].tolist(), "index": i, "object": "embedding"}
        if fmt == "base64":
            raw = v[0].to(torch.float32).numpy().astype("<f4").tobytes()
            item.update(embedding=base64.b64encode(raw).decode("ascii"), encoding_format="base64")
        data.append(item)
    n_tokens = sum(o.num_prompt_tokens for o in outs)
    return JSON({
        "model": model_of(body, state),
        "object": "list",
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        "data": data,
    })  # fmt: skip
