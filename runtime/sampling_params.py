"""Per-request generation parameters in llama.cpp's server names and defaults, validated once."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from runtime.errors import InvalidRequestError

# llama.cpp's default chain (common/common.h); "tfs_z" is accepted too (removed upstream).
DEFAULT_SAMPLERS = (
    "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
)  # fmt: skip
SAMPLER_NAMES = frozenset(DEFAULT_SAMPLERS) | {"tfs_z"}
# llama.cpp's alternative spellings (common_sampler_types_from_names) and the old ones.
_ALT_NAMES = {
    "top-k": "top_k", "top-p": "top_p", "nucleus": "top_p", "top-n-sigma": "top_n_sigma",
    "typical-p": "typ_p", "typical": "typ_p", "typ-p": "typ_p", "typ": "typ_p", "typical_p": "typ_p",
    "min-p": "min_p", "temp": "temperature", "tfs": "tfs_z", "tail_free": "tfs_z",
}  # fmt: skip
# The one-letter form a string value of `samplers` uses (common_sampler_type_to_chr); 'f' was tfs_z.
_CHARS = {
    "e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p",
    "p": "top_p", "m": "min_p", "x": "xtc", "t": "temperature", "f": "tfs_z",
}  # fmt: skip
_UNSUPPORTED = {"infill", "i", "adaptive_p", "adaptive-p", "a"}
# A logit_bias object key that is a token id: ASCII digits only (str.isdigit() also takes '¹',
# which int() refuses, and int() reads other scripts' digits such as '٣' as numbers).
_TOKEN_KEY = re.compile(r"-?[0-9]+")


def parse_samplers(value: str | Sequence[str]) -> tuple[str, ...]:
    """llama.cpp's sampler order -> canonical names: a list of names, "a;b;c", or letters ("edkypmxt")."""
    if isinstance(value, str):
        whole = value.strip().lower()
        named = ";" in value or whole in SAMPLER_NAMES or whole in _ALT_NAMES
        items = value.split(";") if named else list(value)
    elif isinstance(value, Sequence) and all(isinstance(s, str) for s in value):
        items = list(value)
    else:
        raise InvalidRequestError(f"samplers: must be a string or a list of names, got {value!r}")
    out = []
    for s in items:
        name = s.strip().lower()
        name = _CHARS.get(name, name) if len(name) == 1 else _ALT_NAMES.get(name, name)
        if name in _UNSUPPORTED:
            raise InvalidRequestError(f"samplers: {s!r} is not supported")
        if name not in SAMPLER_NAMES:
            raise InvalidRequestError(f"samplers: unknown sampler {s!r}")
        out.append(name)
    return tuple(out)


def resolve_logit_bias(
    value: object, encode: Callable[[str], list[int]], vocab_size: int | None = None
) -> tuple[tuple[int, float], ...]:
    """llama.cpp's wire forms of logit_bias -> ((token_id, bias), ...).

    Accepted: [[id, bias], ...], [["text", bias], ...] (every token of the text),
    {"id": bias, "text": bias}; a bias of false bans the token (-inf). `encode`
    tokenizes a text without special tokens.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):  # keys are token ids when they parse as integers, else texts
        pairs: list[tuple[object, object]] = [
            (int(k) if isinstance(k, str) and _TOKEN_KEY.fullmatch(k) else k, b) for k, b in value.items()
        ]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pairs = []
        for el in value:
            if not (isinstance(el, Sequence) and not isinstance(el, str) and len(el) == 2):
                raise InvalidRequestError(f"logit_bias: entries must be [token, bias] pairs, got {el!r}")
            pairs.append((el[0], el[1]))
    else:
        raise InvalidRequestError(f"logit_bias: must be a list of pairs or an object, got {value!r}")
    out: list[tuple[int, float]] = []
    for key, b in pairs:
        if b is False:
            bias = -math.inf
        elif isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b):
            bias = float(b)
        else:
            raise InvalidRequestError(f"logit_bias: a bias must be a finite number or false, got {b!r}")
        if isinstance(key, str):
            out.extend((t, bias) for t in encode(key))
        elif isinstance(key, int) and not isinstance(key, bool):
            tok = key
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise InvalidRequestError(f"logit_bias: token id {tok} is out of range")
            out.append((tok, bias))
        else:
            raise InvalidRequestError(f"logit_bias: a key must be a token id or a string, got {key!r}")
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """The sampler chain's settings for one request (llama.cpp's server defaults).

    temperature <= 0 means greedy. seed = -1 draws a random seed per request.
    n_predict = -1 generates until an end-of-generation token or the context is full.
    repeat_last_n / dry_penalty_last_n: -1 = the whole context, 0 = off.
    Sequences may be given as lists; they are stored as tuples.
    """

    temperature: float = 0.8
    dynatemp_range: float = 0.0  # 0 = off; else temperature +- range, scaled by the entropy
    dynatemp_exponent: float = 1.0
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    tfs_z: float = 1.0  # tail-free sampling, 1 = off
    typical_p: float = 1.0  # 1 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64
    penalize_nl: bool = True  # current llama.cpp always penalizes newlines
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_prompt_tokens: tuple[int, ...] | None = None  # penalty history instead of the prompt
    mirostat: int = 0  # 0 = off, 1 = Mirostat, 2 = Mirostat 2.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias); -inf bans the token
    n_probs: int = 0  # top log-probs reported per generated token
    min_keep: int = 0  # the truncating samplers keep at least this many tokens
    seed: int = -1
    ignore_eos: bool = False
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    xtc_probability: float = 0.0  # 0 = off
    xtc_threshold: float = 0.1  # > 0.5 = off
    top_n_sigma: float = -1.0  # <= 0 = off
    n_predict: int = -1
    stop: tuple[str, ...] = ()
    n_keep: int | None = None  # context shift / truncation keeps this many prompt tokens (-1 = all)
    n_discard: int = 0  # tokens a context shift drops (0 = half)
    grammar: str | None = None  # GBNF (llama.cpp's grammar syntax); "" = none
    json_schema: str | None = None  # a JSON schema, as JSON text (a dict is accepted and serialized)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}: {why}, got {getattr(self, name)!r}")

        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in (
            "temperature", "dynatemp_range", "dynatemp_exponent", "top_p", "min_p", "tfs_z",
            "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "mirostat_tau",
            "mirostat_eta", "dry_multiplier", "dry_base", "xtc_probability", "xtc_threshold",
            "top_n_sigma",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            put(name, float(v))
        for name in (
            "top_k", "repeat_last_n", "mirostat", "n_probs", "min_keep", "seed",
            "dry_allowed_length", "dry_penalty_last_n", "n_predict", "n_discard",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
            # Counts reach the sampler's int64 tensors; the seed alone is unsigned (checked below).
            if name != "seed" and not -(2**63) <= v < 2**63:
                raise bad(name, "must fit in a signed 64-bit integer")
        for name in ("penalize_nl", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name in ("top_p", "min_p", "tfs_z", "typical_p", "xtc_probability", "xtc_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("dynatemp_range", "dynatemp_exponent", "mirostat_tau", "mirostat_eta", "dry_multiplier"):
            if getattr(self, name) < 0.0:
                raise bad(name, "must be >= 0")
        for name in ("min_keep", "dry_allowed_length", "n_discard"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("repeat_last_n", "dry_penalty_last_n"):
            if getattr(self, name) < -1:
                raise bad(name, "must be -1 (whole context), 0 (off) or positive")
        if self.repeat_penalty <= 0.0:
            raise bad("repeat_penalty", "must be > 0")
        if self.dry_base < 1.0:
            raise bad("dry_base", "must be >= 1")
        if self.mirostat not in (0, 1, 2):
            raise bad("mirostat", "must be 0 (off), 1 or 2")
        if self.n_predict < -1:
            raise bad("n_predict", "must be -1 (unlimited) or >= 0")
        if not 0 <= self.n_probs <= 100:
            raise bad("n_probs", "must be in [0, 100]")
        if not -1 <= self.seed < 2**64:
            raise bad("seed", "must be -1 (random) or in [0, 2^64)")
        if self.n_keep is not None and (
            isinstance(self.n_keep, bool)
            or not isinstance(self.n_keep, int)
            or not -1 <= self.n_keep < 2**63
        ):
            raise bad("n_keep", "must be an integer >= -1 (64-bit)")
        put("samplers", parse_samplers(self.samplers))
        put("stop", self._strings("stop", allow_empty=True))
        put("dry_sequence_breakers", self._strings("dry_sequence_breakers", allow_empty=False))
        if not self.dry_sequence_breakers:
            raise bad("dry_sequence_breakers", "must be a non-empty list of strings")
        if self.penalty_prompt_tokens is not None:
            put("penalty_prompt_tokens", self._token_ids("penalty_prompt_tokens", self.penalty_prompt_tokens))
        put("logit_bias", self._bias_pairs())
        self._check_constraint(put)

    def _check_constraint(self, put: Callable[[str, object], None]) -> None:
        """grammar: a string; json_schema: a JSON object or boolean (or its text); not both."""
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidRequestError(f"grammar: must be a string, got {type(self.grammar).__name__}")
        if self.grammar == "":
            put("grammar", None)
        schema: object = self.json_schema
        if schema is None:
            return
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidRequestError(f"json_schema: not valid JSON: {e}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidRequestError(f"json_schema: must be a JSON object, got {type(schema).__name__}")
        if self.grammar is not None:
            raise InvalidRequestError('Either "json_schema" or "grammar" can be specified, but not both')
        put("json_schema", json.dumps(schema, ensure_ascii=False))

    def _strings(self, name: str, allow_empty: bool) -> tuple[str, ...]:
        v = getattr(self, name)
        if isinstance(v, str) or not isinstance(v, Sequence) or not all(isinstance(s, str) for s in v):
            raise InvalidRequestError(f"{name}: must be a list of strings, got {v!r}")
        if not allow_empty and any(s == "" for s in v):
            raise InvalidRequestError(f"{name}: must not contain empty strings, got {v!r}")
        return tuple(v)

    @staticmethod
    def _token_ids(name: str, v: object) -> tuple[int, ...]:
        if isinstance(v, str) or not isinstance(v, Sequence):
            raise InvalidRequestError(f"{name}: must be a list of token ids, got {v!r}")
        for t in v:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidRequestError(f"{name}: must be a list of token ids, got {t!r} in it")
        return tuple(v)

    def _bias_pairs(self) -> tuple[tuple[int, float], ...]:
        v = self.logit_bias
        if isinstance(v, (str, Mapping)) or not isinstance(v, Sequence):
            raise InvalidRequestError(f"logit_bias: must be (token_id, bias) pairs, got {v!r}")
        out = []
        for el in v:
            if isinstance(el, str) or not isinstance(el, Sequence) or len(el) != 2:
                raise InvalidRequestError(f"logit_bias: must be (token_id, bias) pairs, got {el!r}")
            tok, bias = el
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise InvalidRequestError(f"logit_bias: a token id must be an integer >= 0, got {tok!r}")
            if (
                isinstance(bias, bool)
                or not isinstance(bias, (int, float))
                or math.isnan(bias)
                or bias == math.inf
            ):
                raise InvalidRequestError(f"logit_bias: a bias must be a number or -inf, got {bias!r}")
            out.append((tok, float(bias)))
        return tuple(out)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
