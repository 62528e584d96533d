"""llama.cpp's byte-level BPE pre-tokenizers (regex splits by tokenizer.ggml.pre) and GPT-2's byte-to-character map."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

# The contractions as llama.cpp spells them (std::regex has no inline (?i:...)).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_TAIL = r"\s*[\r\n]+|\s+(?!\S)|\s+"


def _llama3_like(digits: str) -> str:
    return rf"{_CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|{_TAIL}"


_LLAMA3 = _llama3_like(r"\p{N}{1,3}")
_QWEN2 = _llama3_like(r"\p{N}")
# llama.cpp rewrites \p{Lu}/\p{Ll} classes as "a letter that is not a-z / A-Z"; so do we, to
# split exactly as it does (a non-ASCII letter counts as both cases).
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_LEAD = r"[^\r\n\p{L}\p{N}]?"


def _cased(suffix: str, digits: str) -> str:
    return (
        rf"{_LEAD}{_UPPER}*{_LOWER}+{suffix}|{_LEAD}{_UPPER}+{_LOWER}*{suffix}|{digits}"
        rf"| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|{_TAIL}"
    )


_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_HAN_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before byte-level BPE for one tokenizer.ggml.pre value."""

    regexes: tuple[str, ...]  # applied in turn; each splits the pieces the previous ones left
    ignore_merges: bool = False  # a piece that is itself a token is emitted whole
    add_bos: bool = False  # default of tokenizer.ggml.add_bos_token


_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_GROUPS: dict[PreTokenizer, tuple[str, ...]] = {
    PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")): ("default",),
    _LLAMA3_PRE: (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "jina-v5-nano",
    ),
    PreTokenizer((_LLAMA3,)): ("dbrx", "smaug-bpe"),
    PreTokenizer((_QWEN2,)): (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
        "solar-open", "grok-2",
    ),
    PreTokenizer((_GPT2,)): (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
        "mellum", "modern-bert", "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt",
        "olmo", "jais", "trillion", "granite-docling",
    ),
    PreTokenizer((r"\p{N}", _GPT2)): (
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2",
    ),
    PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")): ("falcon",),
    PreTokenizer((_cased(f"{_CONTRACTIONS}?", r"\p{N}{1,3}"),)): (
        "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2",
    ),
    PreTokenizer((_cased("", r"\p{N}"),), ignore_merges=True, add_bos=True): ("tekken",),
    PreTokenizer((
        rf"{_CONTRACTIONS}|{_LEAD}[\p{{L}}\p{{M}}]+|\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]+[\r\n]*|{_TAIL}",
    )): ("qwen35",),
    PreTokenizer((
        rf"{_CONTRACTIONS}|{_LEAD}\p{{L}}+|\p{{N}}{{1}}| ?[^\s\p{{L}}\p{{N}}\r\n]+|{_TAIL}",
    )): ("seed-coder",),
    PreTokenizer((
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    )): ("bailingmoe", "bailingmoe2", "llada-moe"),
    PreTokenizer((rf"{_LEAD}\p{{L}}+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|{_TAIL}",)): ("ufakzeka",),
    PreTokenizer((r"[^\n]+|[\n]+", _QWEN2)): ("laguna",),
    PreTokenizer((r"\p{N}{1,3}", _llama3_like(r"\p{N}+")), ignore_merges=True): ("minicpm5",),
    PreTokenizer((
        rf"{_CONTRACTIONS}|{_LEAD}(?:\p{{L}}\p{{M}}*(?: \p{{L}}\p{{M}}*)*)+|\p{{N}}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
    )): ("exaone-moe",),
    PreTokenizer((_PORO,)): ("poro-chat", "bloom", "gpt3-finnish"),
    PreTokenizer((_PORO, r"\p{N}")): ("viking",),
    PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")): ("deepseek-coder",),
    PreTokenizer((
        r"\p{N}{1,3}",
        _HAN_KANA,
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        rf"| ?[\p{{P}}\p{{S}}]+[\r\n]*|{_TAIL}",
    )): ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
}  # fmt: skip

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    name: pre for pre, names in _GROUPS.items() for name in names
}


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}
