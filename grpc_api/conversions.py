"""Proto messages <-> runtime types: SamplingParams in, RequestOutput deltas out; no I/O, no engine calls.

Unset proto fields are not passed on, so the runtime's defaults and its
validation (and the messages it raises) are the same as the HTTP API's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import sampling_pb2 as spb
from runtime.errors import InvalidRequestError
from runtime.request import RequestOutput, Timings, TokenLogprob
from runtime.sampling_params import SamplingParams, resolve_logit_bias
from runtime.tokenizer import Tokenizer

# Proto fields copied by name onto SamplingParams when set (scalars with presence, lists when non-empty).
_SCALARS = tuple(
    f.name
    for f in dataclasses.fields(SamplingParams)
    if f.name in spb.SamplingParams.DESCRIPTOR.fields_by_name
)
_LISTS = ("stop", "dry_sequence_breakers")
_SPECIAL = {"logit_bias", "samplers", "penalty_prompt", "grammar", "json_schema"}

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def struct_to_dict(msg: Message) -> dict[str, Any]:
    """google.protobuf.Struct -> dict (numbers come back as floats, as JSON has them)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _integral(value: Any) -> Any:
    """A Struct's numbers are all doubles: 3.0 -> 3 again, so that maxItems, const etc. read as JSON wrote them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def check_token_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Token ids a client sent, checked against the vocabulary (the engine's own message)."""
    out = list(ids)
    bad = next((t for t in out if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is out of range [0, {vocab_size})")
    return out


def sampling_params(msg: spb.SamplingParams, tokenizer: Tokenizer) -> SamplingParams:
    """The proto's set fields -> SamplingParams (validated there); raises InvalidRequestError."""
    kw: dict[str, Any] = {}
    fields: Message = msg  # HasField by a computed name
    for name in _SCALARS:
        if name not in _SPECIAL and name not in _LISTS and fields.HasField(name):
            kw[name] = getattr(msg, name)
    for name in _LISTS:
        if getattr(msg, name):
            kw[name] = list(getattr(msg, name))
    if msg.samplers:  # names or one-letter codes, each element one sampler (as a JSON list)
        kw["samplers"] = list(msg.samplers)
    if msg.HasField("grammar"):
        kw["grammar"] = msg.grammar
    if msg.HasField("json_schema"):
        kw["json_schema"] = _integral(struct_to_dict(msg.json_schema))
    if msg.HasField("penalty_prompt"):
        pp = msg.penalty_prompt
        if pp.WhichOneof("prompt") == "text":
            kw["penalty_prompt_tokens"] = tokenizer.encode(
                pp.text, add_special=False, parse_special=False
            )
        else:
            kw["penalty_prompt_tokens"] = check_token_ids(pp.token_ids.ids, tokenizer.vocab_size)
    if msg.logit_bias:
        pairs: list[list[Any]] = []
        for lb in msg.logit_bias:
            key = lb.WhichOneof("token")
            if key is None:
                raise InvalidRequestError("logit_bias: an entry needs token_id or text")
            value = lb.WhichOneof("value")
            if value is None:
                raise InvalidRequestError("logit_bias: an entry needs bias or ban")
            if value == "ban" and not lb.ban:
                continue  # ban: false asks for nothing
            # resolve_logit_bias takes llama.cpp's JSON forms: a bias of false bans the token.
            bias: float | bool = False if value == "ban" else lb.bias
            pairs.append([lb.token_id if key == "token_id" else lb.text, bias])

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special=False, parse_special=False)

        kw["logit_bias"] = resolve_logit_bias(pairs, encode, tokenizer.vocab_size)
    try:
        return SamplingParams(**kw)
    except InvalidRequestError:
        raise
    except (
        TypeError,
        ValueError,
    ) as e:  # a value no field accepts, reported like the runtime's own
        raise InvalidRequestError(f"invalid sampling parameters: {e}") from e


def prompt_ids(
    oneof: str | None,
    text: str,
    token_ids: Sequence[int],
    tokenizer: Tokenizer,
    add_special: bool,
    parse_special: bool,
) -> list[int]:
    """A `oneof prompt { text; token_ids }` -> token ids; an empty prompt is the engine's to reject."""
    if oneof == "token_ids":
        return check_token_ids(token_ids, tokenizer.vocab_size)
    if oneof is None or not text:
        raise InvalidRequestError("the prompt is empty")
    return tokenizer.encode(text, add_special=add_special, parse_special=parse_special)


def generate_prompt(req: pb.GenerateRequest, tokenizer: Tokenizer) -> list[int]:
    """GenerateRequest's prompt, tokenized as llama.cpp's /completion does (BOS, special tokens parsed)."""
    return prompt_ids(
        req.WhichOneof("prompt"),
        req.text,
        req.token_ids.ids,
        tokenizer,
        req.add_special if req.HasField("add_special") else True,
        req.parse_special if req.HasField("parse_special") else True,
    )


def embed_prompts(req: pb.EmbedRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """EmbedRequest's inputs, tokenized as llama.cpp's /embedding does (BOS, special tokens parsed)."""
    if not req.inputs:
        raise InvalidRequestError("inputs: must be a non-empty list")
    return [
        prompt_ids(i.WhichOneof("input"), i.text, i.token_ids.ids, tokenizer, True, True)
        for i in req.inputs
    ]


def chat_messages(req: pb.ChatRequest) -> list[dict[str, Any]]:
    """ChatMessage protos -> the dicts a chat template renders (only the fields that are set)."""
    if not req.messages:
        raise InvalidRequestError("messages: must be a non-empty list")
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        for name in ("name", "tool_call_id", "reasoning_content"):
            if m.HasField(name):
                d[name] = getattr(m, name)
        if m.tool_calls:
            d["tool_calls"] = [struct_to_dict(c) for c in m.tool_calls]
        out.append(d)
    return out


def _piece(tokenizer: Tokenizer, token_id: int) -> tuple[str, bytes]:
    raw = tokenizer.token_to_piece(token_id)
    return raw.decode("utf-8", errors="replace"), raw


def _logprob(lp: TokenLogprob, tokenizer: Tokenizer) -> pb.TokenLogprob:
    text, raw = _piece(tokenizer, lp.token_id)
    top = []
    for tid, value in lp.top:
        t_text, t_raw = _piece(tokenizer, tid)
        top.append(pb.TopLogprob(token_id=tid, logprob=value, token=t_text, token_bytes=t_raw))
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, token=text, token_bytes=raw, top=top
    )


def timings(t: Timings) -> pb.Timings:
    d: dict[str, Any] = dict(t.as_dict())
    return pb.Timings(**d)


def response(out: RequestOutput, tokenizer: Tokenizer) -> pb.GenerateResponse:
    """One RequestOutput delta -> GenerateResponse."""
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        token_ids=out.new_token_ids,
        text=out.text,
        logprobs=[_logprob(lp, tokenizer) for lp in out.logprobs],
        finish_reason=FINISH_REASONS[out.finish_reason],
        truncated=out.truncated,
        slot_id=out.slot_id,
        usage=pb.Usage(
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
        ),
    )
    if out.stop_word is not None:
        msg.stop_word = out.stop_word
    if out.timings is not None:
        msg.timings.CopyFrom(timings(out.timings))
    return msg


def merge(deltas: Sequence[pb.GenerateResponse]) -> pb.GenerateResponse:
    """A stream of deltas -> the one message Complete returns: lists and text joined, the last's status."""
    if not deltas:
        return pb.GenerateResponse()
    last = deltas[-1]
    out = pb.GenerateResponse()
    out.CopyFrom(last)
    out.ClearField("token_ids")
    out.ClearField("logprobs")
    for d in deltas:
        out.token_ids.extend(d.token_ids)
        out.logprobs.extend(d.logprobs)
    out.text = "".join(d.text for d in deltas)
    out.truncated = any(d.truncated for d in deltas)
    return out
