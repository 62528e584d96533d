"""Request JSON (llama.cpp's /completion names, OpenAI's names) -> SamplingParams and prompt token ids."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from http_api.errors import bad_request
from runtime.sampling_params import SamplingParams, resolve_logit_bias
from runtime.tokenizer import Tokenizer

# Request keys that are SamplingParams fields under the same name; the rest are translated below.
_SAME_NAME = frozenset(f.name for f in fields(SamplingParams)) - {
    "logit_bias", "stop", "n_predict", "penalty_prompt_tokens",
}  # fmt: skip
# A \uD800-\uDFFF escape in the raw bytes: only then can a string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_PROMPT_SHAPES = '"prompt" must be a string, a list of tokens, a list of mixed strings & tokens, or a list of prompts'


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; anything else (bad JSON, NaN, a list) is a 400."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constants, parse_int=_int64, parse_float=_finite)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"Failed to parse JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        _no_lone_surrogates(body)
    return body


def _no_lone_surrogates(body: dict[str, Any]) -> None:
    # json.loads keeps an unpaired \ud800 as a surrogate code point, which no UTF-8 encode
    # (tokenizer, grammar, response) accepts; llama.cpp's parser refuses such a string too.
    stack: list[Any] = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad_request(
                    f"Failed to parse JSON: invalid string: lone UTF-16 surrogate "
                    f"U+{ord(value[e.start]):04X} (a \\u escape needs its pair)"
                ) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _int64(text: str) -> int:
    # Larger integers are no token id, seed or count; refusing them here keeps float() conversions safe.
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"integer {text[:30]} is out of range")
    return value


def get(
    body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    """body[key] when present and not null, checked against `kind` (bool is never an int here)."""
    v = body.get(key)
    if v is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok:
        names = " or ".join("boolean" if k is bool else k.__name__ for k in kinds)
        raise bad_request(f"{key}: must be {names}, got {json.dumps(v)[:80]}")
    return v


def reject_unsupported(body: Mapping[str, Any]) -> None:
    """Fields whose feature does not exist yet: a clear 400 rather than silently different output."""
    if body.get("image_data") or body.get("multimodal_data"):
        raise bad_request("image input is not supported by this model")
    if body.get("lora"):
        raise bad_request("lora is not supported yet")
    if get(body, "post_sampling_probs", bool, False):
        raise bad_request(
            "post_sampling_probs is not supported yet (probabilities are pre-sampling)"
        )
    if get(body, "n_indent", int, 0) > 0:
        raise bad_request("n_indent is not supported yet")


def sampling_params(
    body: Mapping[str, Any],
    tokenizer: Tokenizer,
    defaults: SamplingParams,
    n_predict_keys: Sequence[str] = ("n_predict", "max_tokens"),
    **overrides: Any,
) -> SamplingParams:
    """The request's sampler settings over the server's defaults; SamplingParams validates them.

    The server's -n caps what a request asks for, as llama.cpp's slot n_predict does.
    """
    kw: dict[str, Any] = {k: v for k, v in body.items() if k in _SAME_NAME and v is not None}
    n_predict = next((body[k] for k in n_predict_keys if body.get(k) is not None), None)
    if n_predict is not None:
        kw["n_predict"] = n_predict
    stop = body.get("stop")
    if stop is not None:
        kw["stop"] = (stop,) if isinstance(stop, str) else stop
    if body.get("logit_bias") is not None:
        kw["logit_bias"] = resolve_logit_bias(
            body["logit_bias"],
            lambda s: tokenizer.encode(s, add_special=False, parse_special=False),
            tokenizer.vocab_size,
        )
    penalty_prompt = body.get("penalty_prompt")
    if penalty_prompt is not None:
        kw["penalty_prompt_tokens"] = (
            tokenizer.encode(penalty_prompt, add_special=False, parse_special=False)
            if isinstance(penalty_prompt, str)
            else penalty_prompt
        )
    if isinstance(kw.get("dry_sequence_breakers"), str):
        kw["dry_sequence_breakers"] = (kw["dry_sequence_breakers"],)
    kw.update(overrides)
    params = replace(defaults, **kw)
    cap = defaults.n_predict
    if cap > 0 and (params.n_predict < 0 or params.n_predict > cap):
        params = replace(params, n_predict=cap)
    return params


def is_token(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_tokens(x: object) -> bool:
    return isinstance(x, list) and all(is_token(t) for t in x)


def _is_mixed(x: object) -> bool:
    return (
        isinstance(x, list)
        and all(isinstance(t, str) or is_token(t) for t in x)
        and any(isinstance(t, str) for t in x)
        and any(is_token(t) for t in x)
    )


def _tokenize_mixed(
    tok: Tokenizer, prompt: str | list[Any], add_special: bool, parse_special: bool
) -> list[int]:
    """llama.cpp's tokenize_mixed: only the first element, when it is text, gets BOS."""
    if isinstance(prompt, str):
        return tok.encode(prompt, add_special=add_special, parse_special=parse_special)
    out: list[int] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out += tok.encode(p, add_special=add_special and i == 0, parse_special=parse_special)
        else:
            out.append(p)
    return out


def tokenize_prompts(
    tok: Tokenizer, prompt: Any, add_special: bool = True, parse_special: bool = True
) -> list[list[int]]:
    """A prompt field -> one token list per prompt (llama.cpp's tokenize_input_prompts)."""
    if isinstance(prompt, str) or _is_mixed(prompt):
        return [_tokenize_mixed(tok, prompt, add_special, parse_special)]
    if _is_tokens(prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt:
        out = []
        for p in prompt:
            if isinstance(p, str) or _is_mixed(p):
                out.append(_tokenize_mixed(tok, p, add_special, parse_special))
            elif _is_tokens(p):
                out.append(list(p))
            else:
                raise bad_request(
                    'element of "prompt" must be a string, a list of tokens, or a list of mixed strings & tokens'
                )
        return out
    raise bad_request(_PROMPT_SHAPES)


def completion_prompts(tok: Tokenizer, body: Mapping[str, Any]) -> list[list[int]]:
    """/completion's prompts, with the old `system_prompt` (a text put before each) honoured."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request('"prompt" is required')
    system = get(body, "system_prompt", str, "")
    if not system:
        return tokenize_prompts(tok, body["prompt"])
    head = tok.encode(system, add_special=True, parse_special=True)
    return [head + p for p in tokenize_prompts(tok, body["prompt"], add_special=False)]


def generation_settings(p: SamplingParams, stream: bool = False) -> dict[str, Any]:
    """llama.cpp's task_params.to_json: the settings a request ran with (/completion, /props, /slots)."""
    return {
        "seed": p.seed,
        "temperature": p.temperature,
        "dynatemp_range": p.dynatemp_range,
        "dynatemp_exponent": p.dynatemp_exponent,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "top_n_sigma": p.top_n_sigma,
        "xtc_probability": p.xtc_probability,
        "xtc_threshold": p.xtc_threshold,
        "typical_p": p.typical_p,
        "tfs_z": p.tfs_z,
        "repeat_last_n": p.repeat_last_n,
        "repeat_penalty": p.repeat_penalty,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "penalize_nl": p.penalize_nl,
        "dry_multiplier": p.dry_multiplier,
        "dry_base": p.dry_base,
        "dry_allowed_length": p.dry_allowed_length,
        "dry_penalty_last_n": p.dry_penalty_last_n,
        "dry_sequence_breakers": list(p.dry_sequence_breakers),
        "mirostat": p.mirostat,
        "mirostat_tau": p.mirostat_tau,
        "mirostat_eta": p.mirostat_eta,
        "stop": list(p.stop),
        "max_tokens": p.n_predict,
        "n_predict": p.n_predict,
        "n_keep": p.n_keep if p.n_keep is not None else 0,
        "n_discard": p.n_discard,
        "ignore_eos": p.ignore_eos,
        "stream": stream,
        "logit_bias": [{"bias": b, "token": t} for t, b in p.logit_bias],
        "n_probs": p.n_probs,
        "min_keep": p.min_keep,
        "grammar": p.grammar or "",
        "samplers": list(p.samplers),
        "timings_per_token": False,
        "post_sampling_probs": False,
        "lora": [],
    }
