"""The two subword algorithms of GGUF vocabularies: SentencePiece-style merges by score, and byte-level BPE."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from runtime.pretokenizer import PreTokenizer


class SpmModel:
    """llama.cpp's 'llama' (SPM) tokenizer: start from single characters, repeatedly merge the
    adjacent pair whose joined text is the highest-scoring token (leftmost on equal scores),
    then spell any leftover character that is not a token in byte tokens.

    Written out rather than put on `tokenizers`: its BPE ranks merge *pairs* strictly by list
    position, while llama.cpp ranks by the *merged token's* score with position breaking ties,
    so two different pairs that make the same token (a+aa, aa+a) would be ordered differently.
    """

    def __init__(
        self,
        token_to_id: Mapping[str, int],
        scores: Sequence[float],
        byte_ids: Sequence[int | None],
    ) -> None:
        self.token_to_id = token_to_id
        self.scores = scores
        self.byte_ids = byte_ids  # <0xXX> (or the one-character token) per byte; None if absent

    def encode(self, text: str) -> list[int]:
        """`text` already has its spaces escaped to U+2581 (and the prefix space when asked)."""
        if not text:
            return []
        lookup, scores = self.token_to_id.get, self.scores
        sym = list(text)  # one symbol per character; merged symbols grow, absorbed ones become ""
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int]] = []  # (-score, left, joined length)
        for i in range(1, n):
            tid = lookup(sym[i - 1] + sym[i])
            if tid is not None:
                heap.append((-scores[tid], i - 1, 2))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, left, size = pop(heap)
            right = nxt[left]
            # Stale: the left symbol was absorbed, or one side has grown since this pair was queued.
            if right < 0 or not sym[left] or len(sym[left]) + len(sym[right]) != size:
                continue
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = after = nxt[right]
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0 and (tid := lookup(sym[before] + sym[left])) is not None:
                push(heap, (-scores[tid], before, len(sym[before]) + len(sym[left])))
            if after >= 0 and (tid := lookup(sym[left] + sym[after])) is not None:
                push(heap, (-scores[tid], left, len(sym[left]) + len(sym[after])))
        out: list[int] = []
        i = 0
        while i >= 0:
            tid = lookup(sym[i])
            if tid is not None:
                out.append(tid)
            else:  # a character that is not a token: its UTF-8 bytes as byte tokens
                out.extend(b for b in (self.byte_ids[c] for c in sym[i].encode()) if b is not None)
            i = nxt[i]
        return out


class Gpt2Model:
    """llama.cpp's 'gpt2' tokenizer on the `tokenizers` library: the pre-tokenizer's regex splits,
    GPT-2's byte-to-character map, then BPE by the rank of each pair in tokenizer.ggml.merges."""

    def __init__(
        self, token_to_id: Mapping[str, int], merges: Sequence[str], pre: PreTokenizer
    ) -> None:
        vocab = dict(token_to_id)
        # Repeated pairs keep their first rank, as in llama.cpp (dict.fromkeys keeps first ones).
        fast: list[Any] = list(
            dict.fromkeys(map(tuple, map(str.split, merges, repeat(" "), repeat(1))))
        )
        try:
            bpe = models.BPE(vocab, fast, ignore_merges=pre.ignore_merges)
        except Exception:  # a merge `tokenizers` refuses: split exactly as llama.cpp, drop the rest
            bpe = models.BPE(vocab, _checked_pairs(merges, vocab), ignore_merges=pre.ignore_merges)
        self._hf = HFTokenizer(bpe)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids if text else []


def _checked_pairs(merges: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges split at the first space after their first character (llama.cpp's rule), keeping
    only those whose halves and join are tokens, which is all `tokenizers` accepts."""
    pairs = ((m[:c], m[c + 1 :]) for m in merges if (c := m.find(" ", 1)) > 0)
    return list(
        dict.fromkeys((a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab)
    )
