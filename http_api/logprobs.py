"""Token log-probabilities in llama.cpp's completion_probabilities format and in OpenAI's two formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runtime.request import TokenLogprob
from runtime.tokenizer import Tokenizer


def _valid_utf8_prefix(data: bytes) -> str:
    """llama.cpp's validate_utf8: an incomplete multi-byte sequence at the end is cut."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":
            return data[: e.start].decode("utf-8")
        return data.decode("utf-8", errors="replace")


def _entry(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    piece = tok.token_to_piece(token_id, special=True)
    return {
        "id": token_id,
        "token": _valid_utf8_prefix(piece),
        "bytes": list(piece),
        "logprob": logprob,
    }


def llama_probs(
    tok: Tokenizer, logprobs: Sequence[TokenLogprob], n_top: int | None = None
) -> list[dict[str, Any]]:
    """[{id, token, bytes, logprob, top_logprobs: [{id, token, bytes, logprob}]}] per generated token."""
    out = []
    for lp in logprobs:
        top = lp.top if n_top is None else lp.top[:n_top]
        e = _entry(tok, lp.token_id, lp.logprob)
        e["top_logprobs"] = [_entry(tok, t, v) for t, v in top]
        out.append(e)
    return out


def openai_legacy(
    tok: Tokenizer, logprobs: Sequence[TokenLogprob], n_top: int, offset: int = 0
) -> dict[str, Any]:
    """/v1/completions logprobs: OpenAI's tokens/token_logprobs/top_logprobs/text_offset, plus llama.cpp's content."""
    content = llama_probs(tok, logprobs, n_top)
    offsets, pos = [], offset
    for e in content:
        offsets.append(pos)
        pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in content],
        "token_logprobs": [e["logprob"] for e in content],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in content],
        "text_offset": offsets,
        "content": content,
    }
