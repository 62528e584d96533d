"""A tokenizer built from GGUF metadata alone that reproduces llama.cpp's tokenization token for token."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from runtime.detokenizer import IncrementalDetokenizer
from runtime.errors import GGUFError, UnsupportedModelError
from runtime.tokenizer_models import Gpt2Model, SpmModel, bytes_to_unicode

__all__ = ["IncrementalDetokenizer", "TokenType", "Tokenizer"]


class TokenType(enum.IntEnum):
    """tokenizer.ggml.token_type values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Token texts llama.cpp treats as end of generation (and as control tokens) whatever the file says.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
        "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    }
)  # fmt: skip
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MODELS = ("llama", "gpt2")


class Tokenizer:
    """encode/decode as llama.cpp's llama_tokenize / llama_token_to_piece do, for 'llama' and 'gpt2' vocabularies."""

    def __init__(self, md: Mapping[str, Any]) -> None:
        def get(key: str, default: Any = None) -> Any:
            return md.get(f"tokenizer.ggml.{key}", default)

        self.model: str = get("model", "")
        if self.model not in MODELS:
            raise UnsupportedModelError(
                f"tokenizer.ggml.model {self.model!r} is not supported (supported: {', '.join(MODELS)})"
            )
        tokens = get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise GGUFError("tokenizer.ggml.tokens is missing or not a list of strings")
        self.tokens: list[str] = tokens
        n = len(tokens)
        types = get("token_type", [TokenType.NORMAL] * n)
        if not isinstance(types, list) or len(types) != n:
            raise GGUFError(f"tokenizer.ggml.token_type has {_len(types)} entries for {n} tokens")
        self.types = [int(t) for t in types]
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        spm = self.model == "llama"

        def special(key: str, default: int | None) -> int | None:
            v = get(f"{key}_token_id", default)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise GGUFError(f"tokenizer.ggml.{key}_token_id {v!r} is not a token id in [0, {n})")
            return v

        self.bos_id = special("bos", 1 if spm else None)
        self.eos_id = special("eos", 2 if spm else None)
        self.unk_id = special("unknown", 0 if spm else None)
        self.pad_id = special("padding", None)
        self.eot_id = special("eot", None)
        self.eom_id = special("eom", None)
        self.add_bos = bool(get("add_bos_token", spm or get("pre") in ("llama3", "llama-v3", "llama-bpe")))
        self.add_eos = bool(get("add_eos_token", False))
        self.add_space_prefix = bool(get("add_space_prefix", spm)) and spm
        if self.add_bos and self.bos_id is None:
            raise GGUFError("tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        self._find_eog()
        if spm:
            scores = get("scores")
            if not isinstance(scores, list) or len(scores) != n:
                raise GGUFError(f"tokenizer.ggml.scores has {_len(scores)} entries for {n} tokens")
            byte_ids = [self.token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
            self._impl: SpmModel | Gpt2Model = SpmModel(self.token_to_id, scores, byte_ids, self.unk_id)
        else:
            merges = get("merges")
            if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
                raise GGUFError("tokenizer.ggml.merges is missing or malformed")
            self._impl = Gpt2Model(tokens, merges, str(get("pre", "default")))
        # Special tokens split out of raw text, longest first (llama.cpp's tokenizer_st_partition).
        marked = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
        self._specials = sorted(
            (i for i in range(n) if self.types[i] in marked and tokens[i]), key=lambda i: -len(tokens[i])
        )
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        return cls(metadata)

    def _find_eog(self) -> None:
        """llama.cpp recognises end-of-turn tokens by their text and forces them to be control tokens."""
        if self.eot_id is None:
            self.eot_id = next((self.token_to_id[t] for t in _EOT_TEXTS if t in self.token_to_id), None)
        eog = {self.token_to_id[t] for t in _EOG_TEXTS if t in self.token_to_id}
        for i in eog:
            self.types[i] = TokenType.CONTROL
        eog |= {t for t in (self.eos_id, self.eot_id, self.eom_id) if t is not None}
        self.eog_ids = frozenset(eog)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def is_control(self, token_id: int) -> bool:
        return self.types[token_id] == TokenType.CONTROL

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        out: list[int] = []
        if add_special and self.add_bos:
            assert self.bos_id is not None
            out.append(self.bos_id)
        prev_special = True  # SentencePiece adds its prefix space at the start and after a special token
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if isinstance(self._impl, SpmModel):
                piece = (" " + frag if self.add_space_prefix and prev_special else frag).replace(" ", "\u2581")
                out += self._impl.encode(piece)
            else:
                out += self._impl.encode(frag)
            prev_special = False
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Raw text split around special tokens: every special token in turn, longest first."""
        frags: list[str | int] = [text] if text else []
        for tid in self._specials:
            if not parse_special and self.types[tid] != TokenType.USER_DEFINED:
                continue
            tok = self.tokens[tid]
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            split: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    split.append(f)
                    continue
                parts = f.split(tok)
                for k, part in enumerate(parts):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            frags = split
        return frags

    # -- decoding ---------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes llama.cpp's llama_token_to_piece gives; control tokens only when `special`."""
        ty = self.types[token_id]
        if ty in (TokenType.CONTROL, TokenType.UNKNOWN):
            return self.tokens[token_id].encode() if special else b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._piece(token_id, ty)
            self._pieces[token_id] = piece
        return piece

    def _piece(self, token_id: int, ty: int) -> bytes:
        text = self.tokens[token_id]
        if ty == TokenType.USER_DEFINED:
            return text.encode()
        if ty == TokenType.BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        if ty != TokenType.NORMAL:
            return b""  # unused and unknown types render as nothing, as in llama.cpp
        if self.model == "llama":
            return text.replace("\u2581", " ").encode()
        to_byte = self._unicode_to_byte
        return b"".join(bytes([to_byte[c]]) if c in to_byte else c.encode() for c in text)

    @cached_property
    def _unicode_to_byte(self) -> dict[str, int]:
        return {c: b for b, c in bytes_to_unicode().items()}

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        data = b"".join(self.token_to_piece(int(t), special=not skip_special) for t in ids)
        return data.decode("utf-8", errors="replace")


def _len(x: object) -> int | str:
    return len(x) if isinstance(x, list) else "no"
