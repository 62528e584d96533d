"""DRY ("don't repeat yourself"): penalize tokens that would extend a repeat of the context's end, as llama.cpp does."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# head token -> the token tails that complete a sequence breaker after it; () = the head alone is one.
Breakers = dict[int, tuple[tuple[int, ...], ...]]

MAX_BREAKER_CHARS = 40  # llama.cpp truncates longer breakers
MAX_TAIL_TOKENS = 20
FLOAT_MAX_LOG = 88.7228391  # log(FLT_MAX): caps base ** exponent


def build_breakers(
    texts: Sequence[str], breakers: Sequence[str], encode: Callable[[str], list[int]] | None
) -> Breakers:
    """Sequence-breaker strings -> token heads and tails (llama.cpp's get_overlapping_token_sequences).

    A token whose text contains a breaker is a breaker by itself. A token whose
    text ends with a proper prefix of a breaker starts one, completed by the
    tokens of the breaker's rest (tokenized by `encode`; skipped without one).
    """
    found: dict[int, list[tuple[int, ...]]] = {}

    def add(tok: int, tail: tuple[int, ...]) -> None:
        tails = found.setdefault(tok, [])
        if tail not in tails:
            tails.append(tail)

    for b in breakers:
        b = b[:MAX_BREAKER_CHARS]
        if not b:
            continue
        for tok in [i for i, w in enumerate(texts) if b in w]:
            add(tok, ())
        if len(b) == 1 or encode is None:
            continue
        for tok, w in enumerate(texts):
            if b[0] not in w or b in w:
                continue
            pos = w.find(b[0])
            while pos != -1:
                if b.startswith(w[pos:]):
                    add(tok, tuple(encode(b[len(w) - pos :])[:MAX_TAIL_TOKENS]))
                pos = w.find(b[0], pos + 1)
    return {tok: tuple(tails) for tok, tails in found.items()}


def _repeat_limit(window: np.ndarray, breakers: Breakers) -> int:
    """How far back a repeat may reach: up to the most recent complete sequence breaker."""
    n = window.shape[0]
    if not breakers:
        return n
    heads = np.fromiter(breakers, dtype=np.int64, count=len(breakers))
    for at in np.nonzero(np.isin(window, heads))[0][::-1].tolist():  # latest head first
        i = n - 1 - at  # tokens after the head
        longest = -1
        for tail in breakers[int(window[at])]:  # the tail follows the head
            if longest < len(tail) <= i and all(int(window[at + 1 + o]) == t for o, t in enumerate(tail)):
                longest = len(tail)
        if longest >= 0:
            return i - longest
    return n


def repeat_lengths(tokens: np.ndarray) -> np.ndarray:
    """tokens (n,) int64 -> (n - 1,): at each position f, how many tokens ending at f equal the
    history's last tokens (the end's suffix, repeated there)."""
    n = tokens.shape[0]
    out = np.zeros(max(n - 1, 0), dtype=np.int64)
    if n < 2:
        return out
    f = np.nonzero(tokens[:-1] == tokens[-1])[0]  # positions where a repeat of length >= 1 ends
    length = 1
    while f.size:
        out[f] = length
        prev = f - length
        f, prev = f[prev >= 0], prev[prev >= 0]
        f = f[tokens[prev] == tokens[n - 1 - length]]
        length += 1
    return out


class RepeatTracker:
    """A request's history for DRY and its repeat lengths, updated in O(n) per token.

    After appending t, a repeat of the new end ends at f exactly when
    tokens[f] == t and a repeat of the old end ended at f - 1, one longer.
    """

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)  # (n,)
        self.lengths = repeat_lengths(self.tokens)  # (n - 1,)

    def push(self, token: int) -> None:
        eq = self.tokens == token  # (n,)
        lengths = np.zeros(eq.shape[0], dtype=np.int64)
        if eq.shape[0]:
            lengths[0] = eq[0]
            lengths[1:] = np.where(eq[1:], self.lengths + 1, 0)
        self.tokens = np.append(self.tokens, token)
        self.lengths = lengths


def dry_penalties(
    history: RepeatTracker,
    last_n: int,
    breakers: Breakers,
    multiplier: float,
    base: float,
    allowed_length: int,
) -> dict[int, float]:
    """token id -> amount to subtract from its logit: multiplier * base ** (repeat length - allowed_length),
    for each token that would extend a repeat of at least allowed_length of the last `last_n` tokens."""
    n = history.tokens.shape[0]
    width = n if last_n <= 0 else min(last_n, n)
    if width <= allowed_length:
        return {}
    start = n - width
    window = history.tokens[start:]  # (width,)
    limit = _repeat_limit(window, breakers)
    if limit < allowed_length:
        return {}
    # Repeats stay inside the window and stop at the latest sequence breaker.
    lengths = np.minimum(history.lengths[start:], np.arange(1, width))  # (width - 1,)
    lengths = np.minimum(lengths, limit)
    at = np.nonzero(lengths >= allowed_length)[0]
    if at.size == 0:
        return {}
    tokens, inverse = np.unique(window[at + 1], return_inverse=True)  # the token after each repeat
    longest = np.zeros(tokens.shape[0], dtype=np.int64)
    np.maximum.at(longest, inverse, lengths[at])
    max_exp = int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out = {}
    for tok, length in zip(tokens.tolist(), longest.tolist()):
        if () in breakers.get(tok, ()):  # a breaker token is never penalized
            continue
        e = length - allowed_length
        if max_exp > 0 and e > max_exp:
            e = max_exp
        out[tok] = multiplier * _pow(base, e)
    return out


def _pow(base: float, e: int) -> float:
    """base ** e as C's pow() gives it: inf past the double range (Python's ** raises there, and
    a base beyond log(FLT_MAX) leaves max_exp 0, no cap)."""
    try:
        return base**e
    except OverflowError:
        return math.inf
