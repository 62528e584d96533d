"""A request's generated text: decoded incrementally, cut at the first stop string, never streaming a stop string's start."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class StopChecker:
    """Feeds tokens through an incremental detokenizer and watches the text for stop strings.

    As llama.cpp's server does: the stop string and what follows it are not part
    of the output, and text that could be the beginning of a stop string is held
    back until the next tokens show whether it is one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), special: bool = False) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, special=special)
        self.stop = tuple(s for s in stop if s)
        self._pending = ""  # decoded, not yet released
        self.stop_word: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_word is not None

    def push(self, token_id: int) -> str:
        """The text that is now safe to release after this token ('' once stopped)."""
        if self.stopped:
            return ""
        self._pending += self._detok.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Generation ended: release everything still held (a partial stop string is just text)."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        hit = min(
            ((i, s) for s in self.stop if (i := text.find(s)) >= 0), default=None, key=lambda x: x[0]
        )
        if hit is not None:
            self._pending = ""
            self.stop_word = hit[1]
            return text[: hit[0]]
        keep = 0 if final else self._partial_suffix(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string begins with."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
