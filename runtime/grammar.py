"""Grammars for constrained decoding: GBNF through llguidance, JSON schema through outlines-core, compiled once per text.

Why two backends (measured on the default model's 262,144-token vocabulary,
2 busy cores; scripts/bench.py --constrained reports the engine-level cost):

- JSON schema -> outlines-core: `build_regex_from_schema` turns the schema into
  a regex (types, enum, const, required/optional properties, $ref/$defs,
  anyOf/oneOf, pattern, format, minItems/maxItems), and its `Index` compiles the
  regex against the vocabulary ahead of time (0.2-2.3 s for the test schemas),
  after which a mask costs 0.02-0.2 ms (mean) at every step. llguidance compiles
  in ~1 ms but spent ~45 ms on each new lexer state (every new key) in our
  measurement, and xgrammar's own JSON-schema path skips outlines-core, which the
  design asks for.
- GBNF -> llguidance (its GBNF-to-Lark conversion): it reads llama.cpp's GBNF as
  written (xgrammar 0.2.8 refuses the empty alternative of `ws ::= | " "`);
  its masks cost 0.1-1 ms (mean, 3 ms at most) on the test grammars, where
  xgrammar spent ~100 ms on every token inside a JSON string.
- An unconstrained schema ({} or {"type": "object"}, also OpenAI's json_object)
  is the one case outlines-core is slow for (its any-JSON regex takes ~25 s to
  index), so it goes through llguidance as a small JSON GBNF grammar instead.

Two fixes to outlines-core's regex: `\\d` means [0-9] (JSON Schema's ECMA-262
reading; outlines-core's engine takes any Unicode digit), and integers and
numbers get llama.cpp's bounds (16 digits), so sampling cannot run on in digits.

`GrammarCache` compiles (off the engine thread: AsyncEngine calls it through
asyncio.to_thread) and keeps the last compiled grammars by text; an invalid
grammar or schema raises InvalidRequestError before anything is queued.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from runtime.errors import InvalidRequestError
from runtime.grammar_matcher import GrammarMatcher, LarkMatcher, RegexMatcher

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


class Grammar:
    """A compiled grammar, shared by every request that sends the same text; `matcher()` starts one."""

    def matcher(self) -> GrammarMatcher:
        raise NotImplementedError


class _RegexGrammar(Grammar):
    def __init__(self, index: Any, eos_id: int, eog_ids: frozenset[int]) -> None:
        self.index = index
        self.eos_id, self.eog_ids = eos_id, eog_ids
        self.terminal: dict[int, bool] = {}  # state -> only EOS is allowed there

    def matcher(self) -> GrammarMatcher:
        return RegexMatcher(self)

    def is_terminal(self, state: int) -> bool:
        done = self.terminal.get(state)
        if done is None:
            done = self.terminal[state] = set(self.index.get_allowed_tokens(state)) <= {self.eos_id}
        return done


class _LarkGrammar(Grammar):
    def __init__(self, tokenizer: Any, template: Any, eog_ids: frozenset[int]) -> None:
        # template: an LLMatcher at the start, built while compiling; each request gets a copy.
        self.tokenizer, self.template, self.eog_ids = tokenizer, template, eog_ids

    def matcher(self) -> GrammarMatcher:
        return LarkMatcher(self)


class GrammarCache:
    """Compiles a request's grammar or JSON schema for one tokenizer; keeps the last `size` by their text."""

    def __init__(self, tokenizer: Tokenizer, size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._vocab_lock = threading.Lock()  # the vocabularies, built lazily (seconds) by the first compile
        self._pieces: list[bytes] | None = None
        self._outlines_vocab: Any = None
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
        with self._lock:
            hit = self._cache.get((kind, text))
            if hit is not None:
                self._cache.move_to_end((kind, text))
                return hit
        # Compiled outside the lock: one slow schema does not hold up the others (a race compiles twice).
        grammar = self._gbnf(text) if kind == "gbnf" else self._schema(text)
        with self._lock:
            self._cache[(kind, text)] = grammar
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
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
        tok = self._lark_tokenizer()
        template = llguidance.LLMatcher(tok, lark, log_level=0)  # builds the parser (GIL released)
        if template.is_error():
            raise InvalidRequestError(f"Failed to parse grammar: {_first_line(template.get_error())}")
        return _LarkGrammar(tok, template, self.eog_ids)

    def _schema(self, text: str) -> Grammar:
        import outlines_core

        schema = json.loads(text)  # SamplingParams stores it as canonical JSON text
        if schema in ({}, True, {"type": "object"}):  # any value / any object: see the docstring
            return self._gbnf(JSON_GBNF if schema != {"type": "object"} else JSON_OBJECT_GBNF)
        try:
            regex = bounded_numbers(ascii_digits(outlines_core.json_schema.build_regex_from_schema(text)))
            index = outlines_core.Index(regex, self._regex_vocabulary())
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidRequestError(f"Failed to parse json_schema: {_first_line(e)}") from None
        return _RegexGrammar(index, self.eos_id, self.eog_ids)

    def pieces(self) -> list[bytes]:
        """Each token's bytes as our tokenizer (llama.cpp's) renders it; control tokens are empty."""
        with self._vocab_lock:
            if self._pieces is None:
                tok = self.tokenizer
                self._pieces = [tok.token_to_piece(i, special=False) for i in range(tok.vocab_size)]
            return self._pieces

    def _regex_vocabulary(self) -> Any:
        import outlines_core

        pieces = self.pieces()
        with self._vocab_lock:
            if self._outlines_vocab is None:
                by_piece: dict[bytes, list[int]] = {}
                for i, p in enumerate(pieces):
                    if p and i not in self.eog_ids:
                        by_piece.setdefault(p, []).append(i)
                self._outlines_vocab = outlines_core.Vocabulary(self.eos_id, by_piece)
            return self._outlines_vocab

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


def bounded_numbers(regex: str) -> str:
    """outlines-core's integer and number patterns with llama.cpp's bounds (16 integer, 16 fraction digits).

    Unbounded, a sampler can run on in digits until n_predict; llama.cpp's
    json-schema-to-grammar bounds them the same way.
    """
    from outlines_core import json_schema as js

    tail = js.NUMBER.removeprefix(f"({js.INTEGER})")  # the fraction and exponent parts
    if tail != js.NUMBER:
        bounded = tail.replace(r"(\.[0-9]+)", r"(\.[0-9]{1,16})").replace("[0-9]+)?", "[0-9]{1,3})?")
        regex = regex.replace(f"({js.INTEGER}){tail}", f"({js.INTEGER}){bounded}")
    return regex.replace(js.INTEGER, js.INTEGER.replace("[1-9][0-9]*", "[1-9][0-9]{0,15}"))


def ascii_digits(regex: str) -> str:
    r"""\d as JSON Schema means it (ECMA-262: [0-9]); outlines-core's regex engine would take any Unicode digit."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            pair = regex[i : i + 2]
            out.append(("0-9" if in_class else "[0-9]") if pair == "\\d" else pair)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class and out[-1] != "[":
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _first_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]
