"""llama.cpp's server routes besides /completion: health, props, slots (and slot actions), tokenize, detokenize, apply-template."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from http_api import openapi as oa
from http_api.errors import JSON, APIError, bad_request, not_supported
from http_api.params import generation_settings, get, is_token, parse_body, tokenize_prompts
from http_api.state import BUILD_INFO, Loaded, ServerState
from runtime.engine import Engine
from runtime.errors import NotSupportedError
from runtime.slot_store import SLOTS_OFF, erase_slot, restore_slot, save_slot

router = APIRouter()


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


async def _slots(state: ServerState, loaded: Loaded) -> list[dict[str, Any]]:
    """One entry per slot (-np), read on the engine thread between steps."""

    def read(engine: Engine) -> list[tuple[int, str, Any, int]]:
        running = getattr(engine.scheduler, "running", [])
        return [
            (r.slot_id, r.request_id, r.params, len(r.output_token_ids))
            for r in running
            if r.slot_id >= 0
        ]

    busy = {slot: (rid, params, n) for slot, rid, params, n in await loaded.engine.call(read)}
    out = []
    for i in range(state.settings.n_parallel):
        rid, params, n_decoded = busy.get(i, (None, state.defaults, 0))
        remain = params.n_predict - n_decoded if params.n_predict >= 0 else -1
        out.append({
            "id": i,
            "id_task": rid if rid is not None else -1,
            "n_ctx": loaded.n_ctx,
            "speculative": False,
            "is_processing": rid is not None,
            "params": generation_settings(params),
            "next_token": {
                "has_next_token": rid is not None,
                "has_new_line": False,
                "n_remain": remain,
                "n_decoded": n_decoded,
                "stopping_word": "",
            },
        })  # fmt: skip
    return out


_HEALTH_QUERY = oa.query("fail_on_no_slot", "include_slots")


@router.get("/health", openapi_extra=_HEALTH_QUERY)
@router.get("/v1/health", openapi_extra=_HEALTH_QUERY)
async def health(request: Request) -> Response:
    state = _state(request)
    loaded = state.require()
    stats = loaded.engine.stats()
    idle = max(state.settings.n_parallel - stats.requests_processing, 0)
    if _flag(request, "fail_on_no_slot") and idle == 0:
        raise APIError(503, "no slot available")
    res: dict[str, Any] = {
        "status": "ok",
        "slots_idle": idle,
        "slots_processing": stats.requests_processing,
    }
    if _flag(request, "include_slots") and state.settings.slots:
        res["slots"] = await _slots(state, loaded)
    return JSON(res)


@router.get("/props")
@router.get("/v1/props")
async def props(request: Request) -> Response:
    state = _state(request)
    loaded = state.require()
    tok = loaded.tokenizer

    def piece(t: int | None) -> str:
        return (
            tok.token_to_piece(t, special=True).decode("utf-8", "replace") if t is not None else ""
        )

    return JSON({
        "default_generation_settings": {"params": generation_settings(state.defaults), "n_ctx": loaded.n_ctx},
        "total_slots": state.settings.n_parallel,
        "model_alias": state.model_name,
        "model_path": loaded.model_path,
        "modalities": {"vision": False, "audio": False},
        "endpoint_slots": state.settings.slots,
        "endpoint_props": False,
        "endpoint_metrics": state.settings.metrics,
        "webui": True,  # the bundled page, or --path's
        "chat_template": loaded.template.source,
        "bos_token": piece(tok.bos_id),
        "eos_token": piece(tok.eos_id),
        "build_info": BUILD_INFO,
    })  # fmt: skip


@router.post("/props")
async def set_props(request: Request) -> Response:
    raise not_supported("changing global properties (POST /props)")


@router.get("/slots", openapi_extra=oa.query("fail_on_no_slot"))
async def slots(request: Request) -> Response:
    state = _state(request)
    if not state.settings.slots:
        raise APIError(501, "This server does not support slots endpoint. Start it with `--slots`")
    loaded = state.require()
    out = await _slots(state, loaded)
    if _flag(request, "fail_on_no_slot") and all(s["is_processing"] for s in out):
        raise APIError(503, "no slot available")
    return JSON(out)


@router.post(
    "/slots/{id_slot}",
    openapi_extra={
        **oa.body(oa.SLOT_ACTION),
        **oa.query("action", required=("action",), enums={"action": ["save", "restore", "erase"]}),
    },
)
async def slot_action(request: Request, id_slot: str) -> Response:
    """llama.cpp's slot actions: ?action=save|restore (body {"filename"}) or erase."""
    loaded = _state(request).require()
    if loaded.engine.engine.slot_store is None:
        raise NotSupportedError(SLOTS_OFF)
    if not re.fullmatch(r"-?[0-9]{1,9}", id_slot):
        raise bad_request("Invalid slot ID")
    slot = int(id_slot)
    action = request.query_params.get("action", "")
    body = parse_body(await request.body())
    filename = body.get("filename")
    if action == "save":
        r = await loaded.engine.call(lambda e: save_slot(e, slot, filename))
        return JSON({
            "id_slot": r.id_slot, "filename": r.filename, "n_saved": r.n_tokens,
            "n_written": r.n_bytes, "timings": {"save_ms": r.ms},
        })  # fmt: skip
    if action == "restore":
        r = await loaded.engine.call(lambda e: restore_slot(e, slot, filename))
        return JSON({
            "id_slot": r.id_slot, "filename": r.filename, "n_restored": r.n_tokens,
            "n_read": r.n_bytes, "timings": {"restore_ms": r.ms},
        })  # fmt: skip
    if action == "erase":
        n = await loaded.engine.call(lambda e: erase_slot(e, slot))
        return JSON({"id_slot": slot, "n_erased": n})
    raise bad_request("Invalid action")


@router.post("/tokenize", openapi_extra=oa.body(oa.TOKENIZE))
async def tokenize(request: Request) -> Response:
    loaded = _state(request).require()
    body = parse_body(await request.body())
    tok = loaded.tokenizer
    add_special = get(body, "add_special", bool, False)
    parse_special = get(body, "parse_special", bool, True)
    with_pieces = get(body, "with_pieces", bool, False)
    content = body.get("content")
    if content is None:
        return JSON({"tokens": []})
    if (
        isinstance(content, list)
        and content
        and not all(isinstance(c, str) or is_token(c) for c in content)
    ):
        raise bad_request('"content" must be a string or a list of mixed strings & tokens')
    prompts = tokenize_prompts(tok, content, add_special, parse_special)
    if len(prompts) != 1:
        raise bad_request('"content" must be a string or a list of mixed strings & tokens')
    ids = prompts[0]
    bad = next((t for t in ids if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range [0, {tok.vocab_size})")
    if not with_pieces:
        return JSON({"tokens": ids})
    out = []
    for t in ids:
        piece = tok.token_to_piece(t, special=True)
        try:
            out.append({"id": t, "piece": piece.decode("utf-8")})
        except UnicodeDecodeError:  # llama.cpp sends the bytes when a piece is not valid UTF-8
            out.append({"id": t, "piece": list(piece)})
    return JSON({"tokens": out})


@router.post("/detokenize", openapi_extra=oa.body(oa.DETOKENIZE))
async def detokenize(request: Request) -> Response:
    loaded = _state(request).require()
    body = parse_body(await request.body())
    tok = loaded.tokenizer
    ids = get(body, "tokens", list, [])
    for t in ids:
        if not is_token(t) or not 0 <= t < tok.vocab_size:
            raise bad_request(f"tokens: {t!r} is not a token id in [0, {tok.vocab_size})")
    return JSON({"content": tok.decode(ids)})


@router.post("/apply-template", openapi_extra=oa.body(oa.APPLY_TEMPLATE))
async def apply_template(request: Request) -> Response:
    loaded = _state(request).require()
    body = parse_body(await request.body())
    return JSON({"prompt": render_chat(loaded, body)})


def render_chat(loaded: Loaded, body: dict[str, Any]) -> str:
    """The prompt text of a chat request's messages (shared with /v1/chat/completions)."""
    if body.get("messages") is None:
        raise bad_request("'messages' is required")
    if body.get("tools"):
        raise bad_request("tools are not supported yet (tool calling comes in a later release)")
    reserved = {"messages", "add_generation_prompt", "tools"}  # passed by name below
    kwargs = {
        k: v for k, v in get(body, "chat_template_kwargs", dict, {}).items() if k not in reserved
    }
    add_generation_prompt = get(body, "add_generation_prompt", bool, True)
    return loaded.template.render(
        body["messages"], add_generation_prompt=add_generation_prompt, **kwargs
    )


# Routes of llama.cpp's server that later releases fill in.
_LATER = {
    "/rerank": "reranking",
    "/reranking": "reranking",
    "/v1/rerank": "reranking",
    "/v1/reranking": "reranking",
    "/lora-adapters": "LoRA adapters",
}


def _later(what: str) -> Any:
    async def handler(request: Request) -> Response:
        raise not_supported(what)

    return handler


for _path, _what in _LATER.items():
    router.add_api_route(_path, _later(_what), methods=["POST"], include_in_schema=False)
router.add_api_route(
    "/lora-adapters", _later("LoRA adapters"), methods=["GET"], include_in_schema=False
)
