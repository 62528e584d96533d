"""The two subword algorithms GGUF vocabularies use: SentencePiece-style merges by score, and byte-level BPE."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from runtime.errors import UnsupportedModelError

# llama.cpp's pre-tokenizer regexes by tokenizer.ggml.pre (src/llama-vocab.cpp). A list is
# applied in turn, each splitting the pieces the previous one left, keeping the gaps.
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...], bool], ...] = (
    # (pre names, regexes, ignore_merges)
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3,), True),
    (("qwen2", "stablelm2", "hunyuan"), (_QWEN2,), False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais"), (_GPT2,), False),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2),
        False,
    ),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False),
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    name: (regexes, ignore) for names, regexes, ignore in _GROUPS for name in names
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class Gpt2Model:
    """Byte-level BPE on the `tokenizers` library: llama.cpp's regex split, byte mapping, ranked merges."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], pre: str) -> None:
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        regexes, ignore_merges = PRE_TOKENIZERS[pre]
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab, pairs, ignore_merges=ignore_merges)  # type: ignore[arg-type]
        self._hf = HFTokenizer(bpe)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids if text else []


class SpmModel:
    """llama.cpp's SentencePiece-style tokenizer: repeatedly merge the adjacent pair whose
    joined text is the highest-scoring token (leftmost on ties), then fall back to bytes.

    Written out rather than on `tokenizers`: its BPE ranks merges by a list, and
    deriving one from scores cannot reproduce llama.cpp's tie-breaking exactly.
    """

    def __init__(self, token_to_id: dict[str, int], scores: Sequence[float], byte_ids: Sequence[int | None], unk_id: int | None) -> None:
        self.token_to_id = token_to_id
        self.scores = scores
        self.byte_ids = byte_ids
        self.unk_id = unk_id

    def encode(self, text: str) -> list[int]:
        """`text` already has spaces escaped to U+2581 (and the prefix space added when asked)."""
        if not text:
            return []
        sym = list(text)  # one symbol per character; merged symbols grow, absorbed ones become ""
        prev = list(range(-1, len(sym) - 1))
        nxt = list(range(1, len(sym) + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []
        rev: dict[str, tuple[str, str]] = {}

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            joined = sym[left] + sym[right]
            tid = self.token_to_id.get(joined)
            if tid is None:
                return
            heapq.heappush(heap, (-self.scores[tid], left, right, joined))
            rev[joined] = (sym[left], sym[right])

        for i in range(1, len(sym)):
            add(i - 1, i)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            # Stale entries: one side was merged away or has grown since this pair was queued.
            if not sym[left] or not sym[right] or sym[left] + sym[right] != joined:
                continue
            sym[left], sym[right] = joined, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out: list[int] = []
        i = 0
        while i >= 0:
            self._resegment(sym[i], rev, out)
            i = nxt[i]
        return out

    def _resegment(self, text: str, rev: dict[str, tuple[str, str]], out: list[int]) -> None:
        tid = self.token_to_id.get(text)
        if tid is not None:
            out.append(tid)
            return
        parts = rev.get(text)
        if parts is None:  # not a token, not a merge: byte fallback
            for b in text.encode("utf-8"):
                bid = self.byte_ids[b]
                if bid is not None:
                    out.append(bid)
                elif self.unk_id is not None:
                    out.append(self.unk_id)
            return
        self._resegment(parts[0], rev, out)
        self._resegment(parts[1], rev, out)
