"""A tokenizer built from GGUF metadata alone that reproduces llama.cpp's tokenization token for token."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.detokenizer import IncrementalDetokenizer
from runtime.errors import GGUFError, InvalidRequestError, UnsupportedModelError
from runtime.gguf.reader import printable
from runtime.pretokenizer import PRE_TOKENIZERS, unicode_to_bytes
from runtime.tokenizer_models import Gpt2Model, SpmModel

__all__ = ["IncrementalDetokenizer", "TokenType", "Tokenizer"]

MODELS = ("llama", "gpt2")


class TokenType(enum.IntEnum):
    """tokenizer.ggml.token_type values (llama.cpp reads any other value as UNDEFINED)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 1, 2, 3, 4, 6
_TYPES = frozenset(range(7))

# Special ids as llama.cpp reads them: (attribute, GGUF key stem); the deprecated keys come last.
_ID_KEYS = (
    ("bos", "bos"), ("eos", "eos"), ("eot", "eot"), ("eom", "eom"), ("unk", "unknown"),
    ("sep", "seperator"), ("pad", "padding"), ("mask", "mask"), ("fim_pre", "fim_pre"),
    ("fim_suf", "fim_suf"), ("fim_mid", "fim_mid"), ("fim_pad", "fim_pad"), ("fim_rep", "fim_rep"),
    ("fim_sep", "fim_sep"), ("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle"),
)  # fmt: skip
# llama.cpp finds an id the metadata lacks by the token's text, and makes that token a control token.
_FOUND_BY_TEXT = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
# Tokens that end generation by their text alone (they too become control tokens).
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss
_WS = " \t\n\v\f\r"  # C isspace(), which llama.cpp's lstrip/rstrip use
_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """encode/decode as llama.cpp's llama_tokenize and llama_token_to_piece do, for 'llama' (SPM)
    and 'gpt2' (byte-level BPE) vocabularies, built from the tokenizer.ggml.* metadata."""

    def __init__(self, md: Mapping[str, Any]) -> None:
        def get(key: str, default: Any = None) -> Any:
            return md.get(f"tokenizer.ggml.{key}", default)

        model = get("model")
        if not isinstance(model, str):
            raise GGUFError("tokenizer.ggml.model is missing or not a string")
        if model not in MODELS:
            raise UnsupportedModelError(
                f"tokenizer.ggml.model {printable(model)!r} is not supported (supported: {', '.join(MODELS)})"
            )
        self.model: str = model
        spm = model == "llama"
        self.pre: str = get("pre") or "default"
        if not isinstance(self.pre, str):
            raise GGUFError("tokenizer.ggml.pre is not a string")
        pre = None if spm else PRE_TOKENIZERS.get(self.pre)
        if not spm and pre is None:
            raise UnsupportedModelError(
                f"tokenizer.ggml.pre {printable(self.pre)!r} is not supported "
                f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        self.tokens, self.token_to_id = _vocabulary(get("tokens"))
        n = len(self.tokens)
        self.types = _token_types(get("token_type"), n)
        scores = _array(get("scores"), n, "scores", 0.0)

        # Special ids: the model's defaults (dropped when out of range), then the metadata's.
        ids: dict[str, int | None] = {k: None for k, _ in _ID_KEYS}
        if spm:
            ids.update(bos=1, eos=2, unk=0)
        else:
            ids.update(bos=11, eos=11)
        ids = {k: v if v is not None and v < n else None for k, v in ids.items()}
        for attr, key in _ID_KEYS:
            v = get(f"{key}_token_id")
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                    raise GGUFError(
                        f"tokenizer.ggml.{key}_token_id {v!r} is not a token id in [0, {n})"
                    )
                ids[attr] = v
        self.add_bos = _flag(
            get("add_bos_token"), "add_bos_token", spm or bool(pre and pre.add_bos)
        )
        self.add_eos = _flag(get("add_eos_token"), "add_eos_token", False)
        self.add_space_prefix = _flag(get("add_space_prefix"), "add_space_prefix", spm)
        for flag, key, attr in ((self.add_bos, "add_bos", "bos"), (self.add_eos, "add_eos", "eos")):
            if flag and ids[attr] is None:
                raise GGUFError(
                    f"tokenizer.ggml.{key}_token is true, but tokenizer.ggml.{attr}_token_id is not set"
                )
        self.eog_ids = self._find_special_tokens(ids)
        self.special_ids = ids
        self.bos_id, self.eos_id, self.eot_id = ids["bos"], ids["eos"], ids["eot"]
        self.eom_id, self.unk_id, self.pad_id = ids["eom"], ids["unk"], ids["pad"]

        # Tokens split out of raw text before anything else, longest (in UTF-8 bytes) first.
        marked = (_CONTROL, _USER, _UNKNOWN)
        specials = [i for i in range(n) if self.types[i] in marked]
        specials.sort(key=lambda i: -len(self.tokens[i].encode()))
        self._lstrip, self._rstrip = _strip_attributes(md, self.pre, specials, self.token_to_id)
        self._by_prefix: dict[bool, dict[str, list[tuple[int, int]]]] = {}
        for parse_special in (False, True):
            groups = self._by_prefix[parse_special] = {}
            for rank, i in enumerate(specials):
                if parse_special or self.types[i] == _USER:
                    groups.setdefault(self.tokens[i][:2], []).append((rank, i))

        if spm:
            byte_ids = [self._byte_token(b) for b in range(256)]
            self._impl: SpmModel | Gpt2Model = SpmModel(self.token_to_id, scores, byte_ids)
        else:
            merges = get("merges")
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise GGUFError("tokenizer.ggml.merges is missing or not a list of strings")
            assert pre is not None
            self._impl = Gpt2Model(self.token_to_id, merges, pre)
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        return cls(metadata)

    def _find_special_tokens(self, ids: dict[str, int | None]) -> frozenset[int]:
        """llama.cpp's auto-detection by token text: missing eot/eom/FIM ids, end-of-generation
        tokens and the type changes that come with them. Returns the end-of-generation ids."""
        find, types = self.token_to_id.get, self.types
        # (Where several texts match, llama.cpp takes the first in hash order; we take list order.)
        for attr, texts in _FOUND_BY_TEXT.items():
            if ids[attr] is None:
                found = next((i for i in map(find, texts) if i is not None), None)
                if found is not None:
                    ids[attr], types[found] = found, _CONTROL
        eog = {i for i in (ids["fim_pad"], ids["fim_rep"], ids["fim_sep"]) if i is not None}
        for i in map(find, _EOG_TEXTS):
            if i is not None:
                eog.add(i)
                types[i] = _CONTROL
        for i in map(find, _ALWAYS_RENDERED):
            if i is not None:
                types[i] = _USER
        eog.update(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None)
        by_text = {self.tokens[i]: i for i in eog}
        # gpt-oss ends a turn with <|return|> or <|call|>; its <|end|> only closes a message.
        if "<|end|>" in by_text and ("<|call|>" in by_text or "<|calls|>" in by_text):
            if "<|return|>" in by_text or "<|flush|>" in by_text:
                eog.discard(by_text["<|end|>"])
                types[by_text["<|end|>"]] = _USER
        if "<|tool_response>" in by_text and "</s>" in by_text:  # Gemma 4's </s> is ordinary text
            eog.discard(by_text["</s>"])
            types[by_text["</s>"]] = _NORMAL
        return frozenset(eog)

    def _byte_token(self, b: int) -> int | None:
        """The token llama.cpp's SPM byte fallback uses for byte b: <0xXX>, else the one-byte token."""
        found = self.token_to_id.get(f"<0x{b:02X}>")
        if found is None and b < 0x80:
            found = self.token_to_id.get(chr(b))
        return found if found is not None else self.unk_id  # llama.cpp would fail here instead

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def is_control(self, token_id: int) -> bool:
        return self.types[token_id] == _CONTROL

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`; `add_special` adds BOS/EOS as the metadata says, `parse_special`
        lets control tokens written in the text become those tokens (user-defined ones always do)."""
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates cannot be UTF-8
            text = _SURROGATE.sub("\ufffd", text)
        bos = self.bos_id if add_special and self.add_bos else None  # set whenever add_bos is
        out: list[int] = [] if bos is None else [bos]
        frags = self._partition(text, parse_special) if text else []
        if isinstance(self._impl, SpmModel):
            # SentencePiece's prefix space: at the start and after a special token.
            prev_special = True
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out += self._impl.encode(frag.replace(" ", "\u2581"))
                prev_special = False
        else:
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out += self._impl.encode(frag)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: each special token in turn, longest first, is split
        out of the raw-text fragments the longer ones left (with its lstrip/rstrip, if any)."""
        groups = self._by_prefix[parse_special]
        grams = set(text) | set(map(str.__add__, text, text[1:]))
        candidates = sorted(c for g in grams & groups.keys() for c in groups[g])
        frags: list[str | int] = [text]
        for _, tid in candidates:
            tok = self.tokens[tid]
            if tok not in text:
                continue
            lstrip, rstrip = tid in self._lstrip, tid in self._rstrip
            split: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    split.append(frag)
                    continue
                parts = frag.split(tok)
                for k, part in enumerate(parts):
                    if k:
                        split.append(tid)
                        if rstrip:
                            part = part.lstrip(_WS)
                    if lstrip and k < len(parts) - 1:
                        part = part.rstrip(_WS)
                    if part:
                        split.append(part)
            frags = split
        return frags

    # -- decoding ---------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes llama.cpp's llama_token_to_piece gives (no lstrip); control and unknown
        tokens only when `special`."""
        if not 0 <= token_id < len(self.tokens):
            raise InvalidRequestError(
                f"token id {token_id} is out of range [0, {len(self.tokens)})"
            )
        if self.types[token_id] in (_CONTROL, _UNKNOWN):
            return self.tokens[token_id].encode() if special else b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> bytes:
        text, ty = self.tokens[token_id], self.types[token_id]
        if ty == _USER:
            return text.encode()
        if ty == _BYTE:  # llama.cpp reads the two characters after "<0x" as hex
            digits = re.match("[0-9A-Fa-f]*", text[3:5])
            return bytes([int(digits.group(), 16) if digits and digits.group() else 0])
        if ty != _NORMAL:
            return b""  # unused and undefined tokens render as nothing
        if self.model == "llama":
            return text.replace("\u2581", " ").encode()
        to_byte, out = unicode_to_bytes(), bytearray()
        for c in text:
            b = to_byte.get(c)
            if b is not None:
                out.append(b)
            else:  # not a byte-level character: llama.cpp's marker, with the whole token text
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The token pieces joined (what llama-server's /detokenize and completion text give),
        invalid UTF-8 as U+FFFD; control tokens are left out when `skip_special`."""
        data = b"".join(self.token_to_piece(int(t), special=not skip_special) for t in ids)
        return data.decode("utf-8", errors="replace")


def _vocabulary(tokens: Any) -> tuple[list[str], dict[str, int]]:
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError("tokenizer.ggml.tokens is missing or not a list of strings")
    if not all(tokens):  # llama.cpp names empty tokens after their id
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    token_to_id = dict(zip(tokens, range(len(tokens))))
    if len(token_to_id) != len(tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise GGUFError(
                    f"duplicate token in vocabulary: {printable(t)!r} has ids {seen[t]} and {i}"
                )
            seen[t] = i
    return tokens, token_to_id


def _array(value: Any, n: int, key: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    if not isinstance(value, list) or len(value) != n:
        count = len(value) if isinstance(value, list) else "no"
        raise GGUFError(f"tokenizer.ggml.{key} has {count} entries for {n} tokens")
    return value


def _token_types(value: Any, n: int) -> list[int]:
    types = _array(value, n, "token_type", _NORMAL)
    return [t if t in _TYPES and not isinstance(t, bool) else 0 for t in types]


def _flag(value: Any, key: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GGUFError(f"tokenizer.ggml.{key} is not a boolean")
    return value


def _strip_attributes(
    md: Mapping[str, Any], pre: str, specials: list[int], token_to_id: dict[str, int]
) -> tuple[frozenset[int], frozenset[int]]:
    """llama.cpp's per-model lstrip/rstrip attributes of special tokens (by name, pre and architecture)."""
    name = str(md.get("general.name", "")).lower()
    arch = str(md.get("general.architecture", ""))

    def ids(*texts: str) -> set[int]:
        return {token_to_id[t] for t in texts if t in token_to_id}

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        return frozenset(ids("<mask>")), frozenset()
    if "phi-3" in name or "phi3" in name:
        return frozenset(), frozenset(
            (set(specials) | ids("</s>")) - ids("<unk>", "<s>", "<|endoftext|>")
        )
    if "modern-bert" in name:
        return frozenset(ids("[MASK]")), frozenset()
    return frozenset(), frozenset()
