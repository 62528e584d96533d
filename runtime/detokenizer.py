"""Streaming detokenization that never emits half a UTF-8 character."""

from __future__ import annotations

import codecs
from typing import Protocol


class _Pieces(Protocol):
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes: ...


class IncrementalDetokenizer:
    """Token ids in, text out as soon as it is whole.

    A character split across byte tokens (an emoji from byte fallback, a CJK
    character in byte-level BPE) is held back until its last byte arrives;
    invalid bytes become U+FFFD, as a final decode would show them.
    """

    def __init__(self, tokenizer: _Pieces, special: bool = True) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_to_piece(token_id, self._special))

    def flush(self) -> str:
        """What is still held (an incomplete character becomes U+FFFD); the stream can go on after."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
