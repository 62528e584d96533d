"""Streaming detokenization that never emits half a UTF-8 character."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Token ids in, text out as soon as it is whole.

    A character split across tokens (an emoji in SentencePiece byte-fallback tokens, a CJK
    character in byte-level BPE) is held back until its last byte arrives. Invalid bytes
    become U+FFFD, one per maximal invalid sequence, exactly as the final decode (and
    llama-server's JSON output) shows them, so the pieces joined equal `decode` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = True) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_to_piece(token_id, self._special))

    def flush(self) -> str:
        """What is still held (an unfinished character becomes U+FFFD); the stream can go on after."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
