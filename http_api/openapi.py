"""Request-body JSON Schemas for the OpenAPI document (/openapi.json): the fields each route reads, typed as its validators check them.

Routes read raw JSON (params.parse_body) so that every client mistake is one 400 in
llama.cpp's shape; these schemas only describe the bodies, for clients and for the
schema-driven fuzz test (tests/test_http_fuzz.py). Sampler fields come from
SamplingParams itself, so a new sampler setting appears here without an edit.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from runtime.sampling_params import SAMPLER_NAMES, SamplingParams

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
# params.parse_body refuses integers outside 64 bits.
INTEGER: Schema = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
# A token id; the vocabulary's size is the model's, so ids past it are the validators' 400.
TOKEN: Schema = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
TOKENS: Schema = {"type": "array", "items": TOKEN}
STRINGS: Schema = {"type": "array", "items": STRING}
MIXED: Schema = {"type": "array", "items": {"anyOf": [STRING, TOKEN]}}
# A prompt: text, token ids, text and ids mixed, or a list of those (several prompts).
PROMPT: Schema = {
    "anyOf": [STRING, TOKENS, MIXED, {"type": "array", "items": {"anyOf": [STRING, TOKENS, MIXED]}}]
}
STRING_OR_STRINGS: Schema = {"anyOf": [STRING, STRINGS]}
MESSAGES: Schema = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {
                "anyOf": [
                    STRING,
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"type": {"const": "text"}, "text": STRING},
                            "required": ["type", "text"],
                        },
                    },
                ]
            },
        },
        "required": ["role", "content"],
    },
}

_BY_TYPE: dict[Any, Schema] = {float: NUMBER, int: INTEGER, bool: BOOLEAN, str: STRING}
# The ranges SamplingParams.__post_init__ accepts (tests/test_http_fuzz.py checks both agree).
RANGES: dict[str, tuple[float | None, float | None]] = {
    **dict.fromkeys(("top_p", "min_p", "tfs_z", "typical_p", "xtc_probability", "xtc_threshold"), (0, 1)),
    **dict.fromkeys(("dynatemp_range", "dynatemp_exponent", "mirostat_tau", "mirostat_eta",
                     "dry_multiplier", "min_keep", "dry_allowed_length", "n_discard"), (0, None)),
    **dict.fromkeys(("repeat_last_n", "dry_penalty_last_n", "n_predict", "n_keep"), (-1, None)),
    "dry_base": (1, None),
    "n_probs": (0, 100),
    "seed": (-1, 2**64 - 1),
}  # fmt: skip
_SAMPLER_LETTERS = "edskypmxtf"  # parse_samplers' one-letter form
# SamplingParams fields whose wire form differs from their stored type.
_WIRE: dict[str, Schema] = {
    "stop": STRING_OR_STRINGS,
    "samplers": {
        "anyOf": [
            {"type": "string", "pattern": f"^[{_SAMPLER_LETTERS}]{{1,10}}$"},
            {"type": "array", "items": {"enum": sorted(SAMPLER_NAMES)}},
        ]
    },
    "dry_sequence_breakers": {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        ]
    },
    "logit_bias": {
        "anyOf": [
            {
                "type": "array",
                "items": {  # [token id or text, bias or false]
                    "type": "array",
                    "items": {"anyOf": [TOKEN, STRING, NUMBER, {"const": False}]},
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            {"type": "object", "additionalProperties": {"anyOf": [NUMBER, {"const": False}]}},
        ]
    },
    "penalty_prompt": {"anyOf": [STRING, TOKENS]},
    "mirostat": {"type": "integer", "enum": [0, 1, 2]},
    "repeat_penalty": {"type": "number", "exclusiveMinimum": 0},
}
_SKIP = frozenset({"penalty_prompt_tokens"})  # sent as penalty_prompt


def sampling_properties() -> dict[str, Schema]:
    """Every SamplingParams setting a request may send, typed from the dataclass, with its range."""
    hints = typing.get_type_hints(SamplingParams)
    out: dict[str, Schema] = {}
    for f in fields(SamplingParams):
        if f.name in _SKIP:
            continue
        hint = hints[f.name]
        plain = [a for a in typing.get_args(hint) if a is not type(None)]  # int | None -> int
        schema = _WIRE.get(f.name) or _BY_TYPE.get(plain[0] if len(plain) == 1 else hint)
        assert schema is not None, f"no schema for SamplingParams.{f.name}: {hint}"
        if f.name in RANGES:
            low, high = RANGES[f.name]
            schema = {**schema, "minimum": low}
            if high is not None:
                schema["maximum"] = high
        out[f.name] = schema
    out["penalty_prompt"] = _WIRE["penalty_prompt"]
    return out


def _object(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    return out


def _completion_fields() -> dict[str, Schema]:
    return {
        **sampling_properties(),
        "stream": BOOLEAN,
        "id_slot": INTEGER,
        "cache_prompt": BOOLEAN,
        "return_tokens": BOOLEAN,
        "timings_per_token": BOOLEAN,
        "response_fields": STRINGS,
        "model": STRING,
    }


COMPLETION = _object(
    {**_completion_fields(), "prompt": PROMPT, "system_prompt": STRING}, required=("prompt",)
)
INFILL = _object(
    {
        **_completion_fields(),
        "input_prefix": {"anyOf": [STRING, MIXED]},
        "input_suffix": {"anyOf": [STRING, MIXED]},
        "prompt": STRING,
        "input_extra": {
            "type": "array",
            "items": _object({"filename": STRING, "text": STRING}, required=("text",)),
        },
    },
    required=("input_prefix", "input_suffix"),
)
_OPENAI = {
    "model": STRING,
    "max_tokens": INTEGER,
    "n": {"type": "integer", "minimum": 1, "maximum": 128},
    "stream": BOOLEAN,
    "stream_options": _object({"include_usage": BOOLEAN}),
    "user": STRING,
}
OPENAI_COMPLETION = _object(
    {
        **sampling_properties(),
        **_OPENAI,
        "prompt": PROMPT,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 100},
        "echo": BOOLEAN,
    },
    required=("prompt",),
)
_CHAT_TEMPLATE = {
    "messages": MESSAGES,
    "add_generation_prompt": BOOLEAN,
    "chat_template_kwargs": {"type": "object"},
}
CHAT = _object(
    {
        **sampling_properties(),
        **_OPENAI,
        **_CHAT_TEMPLATE,
        "max_completion_tokens": INTEGER,
        "logprobs": BOOLEAN,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "response_format": _object({"type": {"type": "string", "enum": ["text"]}}),
    },
    required=("messages",),
)
APPLY_TEMPLATE = _object(_CHAT_TEMPLATE, required=("messages",))
TOKENIZE = _object({
    "content": {"anyOf": [STRING, MIXED]}, "add_special": BOOLEAN, "parse_special": BOOLEAN,
    "with_pieces": BOOLEAN,
})  # fmt: skip
DETOKENIZE = _object({"tokens": TOKENS})
EMBEDDING: Schema = {
    **_object({
        "input": PROMPT, "content": PROMPT, "embd_normalize": {**INTEGER, "minimum": -1},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]}, "model": STRING,
    }),
    "anyOf": [{"required": ["input"]}, {"required": ["content"]}],
}  # fmt: skip
SLOT_ACTION = _object({"filename": STRING})


def body(schema: Schema) -> dict[str, Any]:
    """A route's `openapi_extra` for a JSON body of this schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def query(
    *names: str, required: tuple[str, ...] = (), enums: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """A route's `openapi_extra` for query parameters it reads from request.query_params."""
    params = []
    for name in names:
        schema: Schema = {"type": "string"}
        if enums and name in enums:
            schema["enum"] = enums[name]
        params.append({"name": name, "in": "query", "required": name in required, "schema": schema})
    return {"parameters": params}
