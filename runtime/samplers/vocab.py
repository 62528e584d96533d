"""What the samplers need from a vocabulary (size, end-of-generation ids, token texts), computed once per model."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from runtime.samplers.dry import Breakers, build_breakers


class TokenizerLike(Protocol):
    """The part of runtime.tokenizer.Tokenizer this module uses."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eog_ids(self) -> frozenset[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def encode(self, text: str, add_special: bool = ..., parse_special: bool = ...) -> list[int]: ...


_CACHE: weakref.WeakKeyDictionary[object, SamplerVocab] = weakref.WeakKeyDictionary()


class SamplerVocab:
    """Vocabulary facts for the samplers; the expensive ones (all token texts) are built lazily and cached.

    `encode(text)` tokenizes without special tokens; DRY uses it for sequence
    breakers that span tokens, as llama.cpp does.
    """

    def __init__(
        self,
        size: int,
        token_text: Callable[[int], str],
        eog_ids: Iterable[int] = (),
        encode: Callable[[str], list[int]] | None = None,
    ) -> None:
        self.size = size
        self.token_text = token_text
        self.eog_ids = frozenset(eog_ids)
        self.encode = encode
        self._texts: list[str] | None = None
        self._newline_ids: tuple[int, ...] | None = None
        self._breakers: dict[tuple[str, ...], Breakers] = {}

    @classmethod
    def from_tokenizer(cls, tok: TokenizerLike) -> SamplerVocab:
        """One SamplerVocab per tokenizer object (cached), so its lazy tables are built once."""
        try:
            return _CACHE[tok]
        except (KeyError, TypeError):
            pass

        def encode(text: str) -> list[int]:
            return list(tok.encode(text, add_special=False, parse_special=False))

        v = cls(tok.vocab_size, tok.token_text, tok.eog_ids, encode)
        try:
            _CACHE[tok] = v
        except TypeError:  # not weak-referenceable: no cache
            pass
        return v

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self.token_text(i) for i in range(self.size)]
        return self._texts

    def newline_ids(self) -> tuple[int, ...]:
        """Tokens that are a newline (llama.cpp's linefeed token, and any other token spelled "\\n")."""
        if self._newline_ids is None:
            ids = {i for i, t in enumerate(self.texts()) if t == "\n"}
            if self.encode is not None:
                enc = self.encode("\n")
                if len(enc) == 1:
                    ids.add(enc[0])
            self._newline_ids = tuple(sorted(ids))
        return self._newline_ids

    def dry_breakers(self, breakers: tuple[str, ...]) -> Breakers:
        if breakers not in self._breakers:
            self._breakers[breakers] = build_breakers(self.texts(), breakers, self.encode)
        return self._breakers[breakers]
