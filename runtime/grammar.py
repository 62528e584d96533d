"""Grammars for constrained decoding: GBNF and JSON schema through llguidance, compiled once per text.

llguidance reads llama.cpp's GBNF as written (its GBNF-to-Lark conversion; xgrammar
0.2.8 refuses the empty alternative of `ws ::= | " "`) and converts JSON schemas
itself. It builds its lexer lazily, so compiling takes about a millisecond whatever
the schema. Measured on the default model's 262,144-token vocabulary (2 cores,
scripts/bench.py --constrained 1,8): JSON-schema masks 0.09 / 0.19 ms per step on
average at batch 1 / 8, 0.29 / 0.47 ms at worst. outlines-core, used before, indexes
a schema's regex ahead of time against the whole vocabulary: 0.13 / 0.92 ms masks
(0.94 / 3.1 at worst), 3.6 s to compile the bench schema, and minutes for small
schemas: {"type": "string", "maxLength": 60} did not finish in 5 minutes, an array of
free-form objects took 72 s, which any client could have asked for.

JSON output follows llama.cpp's json-schema-to-grammar: ", " and ": " separators with
no free whitespace (a sampler cannot wander in it), unknown `format`s ignored
(llguidance's lenient mode), and integers and numbers without bounds get 16 integral
digits at most (llguidance's bounds are float64: |x| <= 2**53 - 1, 16 digits). An
unconstrained schema ({} or {"type": "object"}, also OpenAI's json_object) takes our
JSON GBNF grammar, whose whitespace may hold newlines.

`GrammarCache` compiles (off the engine thread: AsyncEngine calls it through
asyncio.to_thread) and keeps the last compiled grammars by text; an invalid
grammar or schema raises InvalidRequestError before anything is queued.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from runtime.errors import InvalidRequestError
from runtime.grammar_matcher import GrammarMatcher, LarkMatcher

if TYPE_CHECKING:
    from runtime.sampling_params import SamplingParams
    from runtime.tokenizer import Tokenizer

# Any JSON value, ours: whitespace is bounded so a sampler cannot wander in it forever.
JSON_GBNF = r"""
root    ::= value
value   ::= object | array | string | number | "true" | "false" | "null"
object  ::= "{" ws ( member ( "," ws member )* )? "}"
member  ::= string ws ":" ws value ws
array   ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string  ::= "\"" char* "\""
char    ::= [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number  ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?
ws      ::= ( " " | "\n" [ \t]{0,8} )?
"""
JSON_OBJECT_GBNF = JSON_GBNF.replace("root    ::= value", "root    ::= object")
# llguidance's JSON-schema options (its "x-guidance" key), as llama.cpp's JSON grammars write JSON.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
# For a number without minimum or maximum, as llama.cpp bounds it to 16 integral digits:
# 2**53 - 1 has 16 and is exact as the float64 llguidance reads bounds into (10**16 - 1 is not).
INTEGRAL_BOUND = 2**53 - 1
_LITERALS = frozenset({"const", "enum", "default", "examples"})
_MORE_PROPERTIES = frozenset({"additionalProperties", "patternProperties", "unevaluatedProperties"})


class Grammar:
    """A compiled grammar, shared by every request that sends the same text; `matcher()` starts one."""

    def matcher(self) -> GrammarMatcher:
        raise NotImplementedError


class _LarkGrammar(Grammar):
    def __init__(self, tokenizer: Any, template: Any, eog_ids: frozenset[int]) -> None:
        # template: an LLMatcher at the start, built while compiling; each request gets a copy.
        self.tokenizer, self.template, self.eog_ids = tokenizer, template, eog_ids

    def matcher(self) -> GrammarMatcher:
        return LarkMatcher(self)


class GrammarCache:
    """Compiles a request's grammar or JSON schema for one tokenizer; keeps the last `size` by their text."""

    def __init__(self, tokenizer: Tokenizer, size: int = 64, first_mask_limit: float = 0.25) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self.first_mask_limit = first_mask_limit  # seconds; a slower grammar is refused
        # compiled grammars, and the error of each refused one (a slow refusal is paid once)
        self._cache: OrderedDict[tuple[str, str], Grammar | InvalidRequestError] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._vocab_lock = threading.Lock()  # the vocabularies, built lazily (seconds) by the first compile
        self._pieces: list[bytes] | None = None
        self._llg_tokenizer: Any = None
        self.eog_ids = frozenset(tokenizer.eog_ids)
        eos = tokenizer.eos_id
        self.eos_id = eos if eos is not None else min(self.eog_ids, default=0)

    @staticmethod
    def key(params: SamplingParams) -> tuple[str, str] | None:
        """(kind, text) of the request's constraint, or None when it has none."""
        if params.grammar:
            return ("gbnf", params.grammar)
        if params.json_schema is not None:
            return ("json_schema", params.json_schema)
        return None

    def matcher(self, params: SamplingParams) -> GrammarMatcher | None:
        """A fresh matcher for the request (compiling its grammar unless cached), or None."""
        key = self.key(params)
        return None if key is None else self.get(*key).matcher()

    def compile(self, params: SamplingParams) -> None:
        """Compile the request's grammar into the cache; raises InvalidRequestError when it is invalid."""
        key = self.key(params)
        if key is not None:
            self.get(*key)

    def get(self, kind: str, text: str) -> Grammar:
        key = (kind, text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                if isinstance(hit, InvalidRequestError):  # refused before: as cheap to refuse again
                    raise InvalidRequestError(str(hit))
                return hit
        # Compiled outside the lock: one slow schema does not hold up the others (a race compiles twice).
        try:
            grammar: Grammar | InvalidRequestError = self._gbnf(text) if kind == "gbnf" else self._schema(text)
        except InvalidRequestError as e:
            grammar = e
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        if isinstance(grammar, InvalidRequestError):
            raise InvalidRequestError(str(grammar))
        return grammar

    def __len__(self) -> int:
        return len(self._cache)

    # -- compilation -----------------------------------------------------------------------

    def _gbnf(self, text: str) -> Grammar:
        import llguidance

        try:
            lark = llguidance.grammar_from("gbnf", text)
        except (ValueError, RuntimeError) as e:
            why = _first_line(e).removeprefix("Failed to convert the grammar from GBNF to Lark: ")
            raise InvalidRequestError(f"Failed to parse grammar: {why}") from None
        return self._matcher_template(lark, "grammar")

    def _schema(self, text: str) -> Grammar:
        import llguidance

        schema = json.loads(text)  # SamplingParams stores it as canonical JSON text
        if schema in ({}, True, {"type": "object"}):  # any value / any object: see the docstring
            return self._gbnf(JSON_GBNF if schema != {"type": "object"} else JSON_OBJECT_GBNF)
        schema = as_llama_cpp(schema)
        schema["x-guidance"] = JSON_FORMAT
        try:
            grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidRequestError(f"Failed to parse json_schema: {_first_line(e)}") from None
        return self._matcher_template(grammar, "json_schema")

    def _matcher_template(self, grammar: str, what: str) -> Grammar:
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise InvalidRequestError(f"Failed to parse {what}: {_first_line(messages[0] if messages else '')}")
        tok = self._lark_tokenizer()
        template = llguidance.LLMatcher(tok, grammar, log_level=0)  # builds the parser (GIL released)
        if template.is_error():
            raise InvalidRequestError(f"Failed to parse {what}: {_first_line(template.get_error())}")
        # The first mask is where a lexer state is built, on the engine thread for every
        # request: one that is slow here would stall every stream of the step. Measured
        # off the engine thread on a copy: a pattern like (a{1000}){1000} took 2.2 s,
        # the test grammars and schemas under 1 ms.
        t0 = time.perf_counter()
        template.deep_copy().compute_bitmask()
        took = time.perf_counter() - t0
        if took > self.first_mask_limit:
            raise InvalidRequestError(
                f"Failed to parse {what}: too complex (its first token mask took {took:.2f} s, "
                f"the limit is {self.first_mask_limit} s)"
            )
        return _LarkGrammar(tok, template, self.eog_ids)

    def pieces(self) -> list[bytes]:
        """Each token's bytes as our tokenizer (llama.cpp's) renders it; control tokens are empty."""
        with self._vocab_lock:
            if self._pieces is None:
                tok = self.tokenizer
                self._pieces = [tok.token_to_piece(i, special=False) for i in range(tok.vocab_size)]
            return self._pieces

    def _lark_tokenizer(self) -> Any:
        import llguidance

        pieces = self.pieces()
        with self._vocab_lock:
            if self._llg_tokenizer is None:
                wrapper = llguidance.TokenizerWrapper(_Vocab(self.tokenizer, pieces, self.eos_id))
                self._llg_tokenizer = llguidance.LLTokenizer(
                    wrapper, n_vocab=len(pieces), eos_token=sorted(self.eog_ids) or [self.eos_id]
                )
            return self._llg_tokenizer


class _Vocab:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, and text -> ids."""

    def __init__(self, tokenizer: Tokenizer, pieces: list[bytes], eos_id: int) -> None:
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = pieces
        self.special_token_ids = [i for i, p in enumerate(pieces) if not p]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # TypeError tells TokenizerWrapper to pass str
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


def as_llama_cpp(schema: Any) -> Any:
    """A copy of the schema as llama.cpp's json-schema-to-grammar reads it.

    Every integer or number without a lower or upper bound gets one of 16 integral
    digits, as llama.cpp bounds them (unbounded, a sampler can run on in digits until
    n_predict). An object with `properties` and nothing said of others allows only those
    (JSON Schema would allow any other key; llama.cpp and OpenAI's structured outputs do not).
    """
    if isinstance(schema, list):
        return [as_llama_cpp(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    # values, not schemas, under these keywords: left as they are
    out = {k: v if k in _LITERALS else as_llama_cpp(v) for k, v in schema.items()}
    types = schema.get("type")
    names = types if isinstance(types, list) else [types]
    numeric = {"integer", "number"} & {t for t in names if isinstance(t, str)}
    if numeric and not ({"minimum", "exclusiveMinimum"} & schema.keys()):
        out["minimum"] = -INTEGRAL_BOUND
    if numeric and not ({"maximum", "exclusiveMaximum"} & schema.keys()):
        out["maximum"] = INTEGRAL_BOUND
    if isinstance(schema.get("properties"), dict) and not (_MORE_PROPERTIES & schema.keys()):
        out["additionalProperties"] = False  # llama.cpp: listed properties only, unless the schema says more
    return out


def _first_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]
