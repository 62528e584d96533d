"""Grammars and JSON schemas compile, and their masks keep random walks over a real vocabulary inside the language."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from runtime.errors import InvalidRequestError
from runtime.gguf.reader import GGUFFile
from runtime.grammar import INTEGRAL_BOUND, JSON_GBNF, GrammarCache, as_llama_cpp
from runtime.grammar_matcher import GrammarMatcher, apply_bitmask, fill_bitmask
from runtime.sampler import SampleRow, SamplerVocab, new_sampler_state, sample
from runtime.sampling_params import SamplingParams
from runtime.tokenizer import Tokenizer

GRAMMARS = Path(__file__).parent / "data" / "grammars"


def _json_of(kind: type):
    return lambda s: isinstance(json.loads(s), kind)


# Independent checks of each grammar's language (Python regexes, json, ast): text -> ok.
CHECKS = {
    "json": _json_of(dict),
    "json_arr": lambda s: isinstance(v := json.loads(s), list) and all(isinstance(o, dict) for o in v),
    "list": lambda s: re.fullmatch(r"(- [^\n\r*-][^\n\r]{0,23}\n){1,4}", s) is not None,
    "arithmetic": lambda s: re.fullmatch(r"[0-9+\-*/() ]+", s) is not None and bool(ast.parse(s, mode="eval")),
    "chess": lambda s: re.fullmatch(
        r"1\. (M) (M)( [2-4]\. (M) (M)){0,2}".replace(
            "M", r"(?:[KQRBN]?[a-h][1-8]|[KQRBN][a-h]?x[a-h][1-8]|[a-h]x[a-h][1-8]|O-O(?:-O)?)[+#]?"
        ),
        s,
    ) is not None,
    "c": lambda s: re.fullmatch(
        r"int main\(\) \{\n(    (int I = E|I = E|I\+\+);\n){1,3}    return E;\n\}\n".replace(
            "E", r"T( [-+*] T){0,2}"
        ).replace("T", r"(I|[0-9]{1,3}|\(I [-+*] [0-9]{1,3}\))").replace("I", r"[a-z][a-z0-9_]{0,6}"),
        s,
    ) is not None,
    "english": lambda s: re.fullmatch(r"[A-Z][a-z]{0,9}(,? [a-z]{1,10}){1,7}[.!?]( [A-Z][a-z]{0,9}(,? [a-z]{1,10}){1,7}[.!?])?", s)
    is not None,
}
# A text of each language, fed token by token: every token must be allowed.
SAMPLES = {
    "json": '{"name": "Ada", "age": 36, "tags": ["x", 1.5]}',
    "json_arr": '[{"a": 1}, {"b": "two", "c": null}]',
    "list": "- milk\n- eggs, two\n",
    "arithmetic": "12 + (3 * 4) - 7",
    "chess": "1. e4 e5 2. Nf3 Nc6",
    "c": "int main() {\n    int x = 2 + y;\n    x++;\n    return x;\n}\n",
    "english": "The cat sat, on the mat. It slept!",
}

SCHEMAS = {
    "types": {
        "type": "object",
        "properties": {
            "s": {"type": "string", "maxLength": 8}, "i": {"type": "integer", "minimum": -999, "maximum": 999},
            "b": {"type": "boolean"}, "z": {"type": "null"}, "n": {"type": "number"},
        },
        "required": ["s", "i", "b", "z", "n"],
    },
    "enum_const": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "version": {"const": 2}},
        "required": ["color", "version"],
    },
    "optional": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "nick": {"type": "string", "maxLength": 6}},
        "required": ["name"],
    },
    "nested_array": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": -9999, "maximum": 9999},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
                },
                "required": ["id", "tags"],
            }
        },
        "required": ["user"],
    },
    "pattern_format": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "day": {"type": "string", "format": "date"}},
        "required": ["code", "day"],
    },
    "any_one_of": {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "integer", "minimum": -999, "maximum": 999}, {"type": "string", "maxLength": 5}]},
            "flag": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["id", "flag"],
    },
    "ref_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -999, "maximum": 999}, "y": {"type": "integer", "minimum": -999, "maximum": 999}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "no_additional": {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99}, "minItems": 2, "maxItems": 4},
}
DATE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")


def schema_ok(name: str, text: str) -> bool:
    """The text is JSON valid under the schema (formats checked by shape: jsonschema does not check them)."""
    value = json.loads(text)
    jsonschema.validate(value, SCHEMAS[name])
    return name != "pattern_format" or DATE.fullmatch(value["day"]) is not None


@pytest.fixture(scope="module")
def tok(llama3_tiny_path) -> Tokenizer:
    """The real Llama 3 vocabulary (128,256 byte-level BPE tokens)."""
    return Tokenizer(GGUFFile(llama3_tiny_path).metadata)


@pytest.fixture(scope="module")
def cache(tok) -> GrammarCache:
    return GrammarCache(tok)


@pytest.fixture(scope="module")
def short(tok) -> torch.Tensor:
    """(vocab,) a logit penalty growing with the token's length in bytes."""
    return -2.0 * torch.tensor([len(tok.token_to_piece(i, special=False)) or 99 for i in range(tok.vocab_size)])


def walk(m: GrammarMatcher, tok: Tokenizer, short: torch.Tensor, seed: int, steps: int = 300) -> tuple[str, bool]:
    """Random logits (short tokens favoured, so walks end), masked, argmax: the text and whether the grammar finished."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(steps):
        mask = fill_bitmask([m], [out], tok.vocab_size)
        assert mask is not None
        x = apply_bitmask(torch.randn(1, tok.vocab_size, generator=g) + short, mask)
        t = int(x.argmax())
        if t in tok.eog_ids:
            return tok.decode(out), True
        out.append(t)
        m.sync(out)
        assert not m.failed
        if m.is_done():
            return tok.decode(out), True
    return tok.decode(out), False


def allowed(m: GrammarMatcher, out: list[int], vocab: int, token: int) -> bool:
    mask = fill_bitmask([m], [out], vocab)
    assert mask is not None
    return bool(apply_bitmask(torch.zeros(1, vocab), mask)[0, token] == 0)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_gbnf_grammar_compiles_and_constrains(name, tok, cache, short):
    text = (GRAMMARS / f"{name}.gbnf").read_text()
    params = SamplingParams(grammar=text)
    assert CHECKS[name](SAMPLES[name])
    m = cache.matcher(params)
    assert m is not None
    ids = tok.encode(SAMPLES[name], add_special=False)
    for i, t in enumerate(ids):
        assert allowed(m, ids[:i], tok.vocab_size, t), (name, tok.decode(ids[: i + 1]))
    m.sync(ids)
    eog = min(tok.eog_ids)
    assert m.is_done() or allowed(m, ids, tok.vocab_size, eog)
    for seed in range(2):
        out, finished = walk(cache.matcher(params), tok, short, seed)  # type: ignore[arg-type]
        assert finished and CHECKS[name](out), (name, seed, out)


def test_gbnf_refuses_what_it_does_not_allow(tok, cache):
    m = cache.matcher(SamplingParams(grammar=(GRAMMARS / "arithmetic.gbnf").read_text()))
    assert m is not None
    assert not allowed(m, [], tok.vocab_size, tok.encode("x", add_special=False)[0])
    assert not allowed(m, [], tok.vocab_size, min(tok.eog_ids))  # the empty text is no expression


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_compiles_and_constrains(name, tok, cache, short):
    params = SamplingParams(json_schema=SCHEMAS[name])
    for seed in range(2):
        m = cache.matcher(params)
        assert m is not None
        out, finished = walk(m, tok, short, seed)
        assert finished and schema_ok(name, out), (name, seed, out)


def test_unconstrained_schema_is_any_json(tok, cache, short):
    for schema, kind in (({}, object), ({"type": "object"}, dict)):
        m = cache.matcher(SamplingParams(json_schema=schema))
        assert m is not None
        out, finished = walk(m, tok, short, 0)
        assert finished and isinstance(json.loads(out), kind), out
    assert "root    ::= value" in JSON_GBNF


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"grammar": 'root ::= "a'}, "^Failed to parse grammar: "),
        ({"grammar": "root ::= foo"}, "^Failed to parse grammar: .*foo"),
        ({"grammar": 'item ::= "a"'}, "^Failed to parse grammar: .*root"),
        ({"json_schema": {"type": "bogus"}}, "^Failed to parse json_schema: Invalid type: bogus"),
        ({"json_schema": {"$ref": "#/$defs/none"}}, "^Failed to parse json_schema: "),
    ],
)
def test_invalid_grammar_or_schema_is_a_clean_error(kw, message, cache):
    with pytest.raises(InvalidRequestError, match=message):
        cache.compile(SamplingParams(**kw))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"grammar": 5}, "^grammar: must be a string"),
        ({"json_schema": "{nope"}, "^json_schema: not valid JSON"),
        ({"json_schema": [1]}, "^json_schema: must be a JSON object"),
        ({"grammar": "root ::= x", "json_schema": {}}, 'Either "json_schema" or "grammar"'),
    ],
)
def test_sampling_params_validate_the_constraint(kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kw)


def test_sampling_params_normalize_the_constraint():
    assert SamplingParams(grammar="").grammar is None
    p = SamplingParams(json_schema={"type": "object", "required": ["a"]})
    assert p.json_schema == '{"type": "object", "required": ["a"]}'
    assert SamplingParams(json_schema=p.json_schema) == p
    assert GrammarCache.key(SamplingParams()) is None


def test_cache_keeps_the_last_grammars_by_text(tok):
    c = GrammarCache(tok, size=2)
    grammars = [f'root ::= "{w}"' for w in ("a", "b", "c")]
    first = c.get("gbnf", grammars[0])
    assert c.get("gbnf", grammars[0]) is first
    c.get("gbnf", grammars[1])
    c.get("gbnf", grammars[2])
    assert len(c) == 2 and c.get("gbnf", grammars[0]) is not first


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
        {"temperature": 1.5, "samplers": "kpxt", "top_k": 5, "xtc_probability": 1.0},
        {"temperature": 1.0, "mirostat": 2},
        {"temperature": 0.8, "repeat_penalty": 1.3, "dry_multiplier": 0.8, "n_probs": 3},
    ],
)
def test_every_sampler_draws_only_allowed_tokens(kw, tok, cache):
    """Two rows, one constrained: the constrained row keeps to the grammar whatever the chain; the other is untouched."""
    vocab = SamplerVocab.from_tokenizer(tok)
    params = SamplingParams(seed=3, grammar='root ::= [0-9]{2} "." [0-9]', **kw)
    free = SamplingParams(seed=3, **kw)
    m = cache.matcher(params)
    rows = [new_sampler_state(params, [1, 2], vocab), new_sampler_state(free, [1, 2], vocab)]
    g = torch.Generator().manual_seed(0)
    out: list[int] = []
    for _ in range(8):
        logits = torch.randn(2, tok.vocab_size, generator=g)
        ids, lps = sample(logits, [SampleRow(rows[0], out, (), m), SampleRow(rows[1], [], (), None)])
        if ids[0] in tok.eog_ids:
            break
        out.append(ids[0])
        if kw.get("n_probs"):  # log-probs stay the raw model's
            assert lps[0] is not None and lps[0].logprob == pytest.approx(float(logits[0].log_softmax(0)[ids[0]]), abs=1e-4)
        assert m is not None
        m.sync(out)
        if m.is_done():
            break
    assert re.fullmatch(r"[0-9]{2}\.[0-9]", tok.decode(out)), tok.decode(out)


def test_schemas_are_read_as_llama_cpp_reads_them():
    schema = {
        "type": "object",
        "properties": {
            "type": {"type": "integer"},  # a property named "type" is not a keyword
            "n": {"type": ["number", "null"], "minimum": 0},
            "k": {"const": {"type": "integer"}},  # a value, left alone
        },
        "$defs": {"x": {"type": "integer", "exclusiveMaximum": 5}},
    }
    got = as_llama_cpp(schema)
    assert got["additionalProperties"] is False  # listed properties only
    assert as_llama_cpp({"properties": {}, "additionalProperties": {"type": "string"}})["additionalProperties"] == {
        "type": "string"
    }
    assert "additionalProperties" not in as_llama_cpp({"type": "object", "patternProperties": {"^a": {}}})
    assert got["properties"]["type"] == {"type": "integer", "minimum": -INTEGRAL_BOUND, "maximum": INTEGRAL_BOUND}
    assert got["properties"]["n"] == {"type": ["number", "null"], "minimum": 0, "maximum": INTEGRAL_BOUND}
    assert got["properties"]["k"] == {"const": {"type": "integer"}}
    assert got["$defs"]["x"] == {"type": "integer", "exclusiveMaximum": 5, "minimum": -INTEGRAL_BOUND}
    assert schema["properties"]["type"] == {"type": "integer"}  # a copy: the request's schema is kept


def test_digits_stop_at_sixteen(tok, cache):
    """An unbounded integer ends by 16 digits (llama.cpp's bound; here 2**53 - 1 at most)."""
    m = cache.matcher(SamplingParams(json_schema={"type": "array", "items": {"type": "integer"}}))
    assert m is not None
    out = tok.encode("[" + "9" * 15, add_special=False)
    m.sync(out)
    assert not m.failed
    assert not allowed(m, out, tok.vocab_size, tok.encode("9", add_special=False)[0])
    assert allowed(m, out, tok.vocab_size, tok.encode("]", add_special=False)[0])


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 60},  # outlines-core: over 5 minutes to index
        {"type": "array", "items": {"type": "object"}, "maxItems": 3},  # outlines-core: 72 s
        {"anyOf": [{"type": "integer"}, {}]},
        {"type": "string", "minLength": 300, "maxLength": 400},
    ],
)
def test_schemas_that_took_minutes_to_index_compile_and_constrain(schema, tok, cache, short):
    m = cache.matcher(SamplingParams(json_schema=schema))
    assert m is not None
    out, finished = walk(m, tok, short, 0, steps=600)
    if finished:
        jsonschema.validate(json.loads(out), schema)
    else:  # a long string: still a prefix of one
        assert out.startswith('"') and '"' not in out[1:]


def test_unknown_formats_are_ignored_as_llama_cpp_does(tok, cache, short):
    schema = {"type": "object", "properties": {"u": {"type": "string", "format": "made-up", "maxLength": 5}}, "required": ["u"]}
    m = cache.matcher(SamplingParams(json_schema=schema))
    assert m is not None
    out, finished = walk(m, tok, short, 1)
    assert finished and isinstance(json.loads(out)["u"], str)


def test_a_grammar_whose_first_mask_is_slow_is_refused(tok):
    """A first mask is computed on the engine thread for every request using the grammar:
    one that takes long (a lexer state for a million-character pattern) is a 400, not a stall."""
    slow = {"type": "string", "pattern": "^(a{1000}){1000}$"}
    c = GrammarCache(tok, first_mask_limit=0.05)
    with pytest.raises(InvalidRequestError, match="too complex .* first token mask took"):
        c.compile(SamplingParams(json_schema=slow))
    c.compile(SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert len(c) == 2  # the refusal is kept (a second ask costs nothing); an ordinary schema passes
    c._schema = lambda text: pytest.fail("a refused schema was compiled again")  # type: ignore[method-assign]
    with pytest.raises(InvalidRequestError, match="too complex"):
        c.compile(SamplingParams(json_schema=slow))
    assert c.get("gbnf", 'root ::= "a"').matcher() is not None
