"""Tokenization against llama.cpp's recorded ids (1012 cases), decoding, streaming detokenization, bad metadata."""

import json
from pathlib import Path

import pytest

from runtime.errors import GGUFError, UnsupportedModelError
from runtime.gguf.reader import GGUFFile
from runtime.tokenizer import IncrementalDetokenizer, Tokenizer

DATA = Path(__file__).parent / "data"


def cases(name):
    with open(DATA / f"{name}_tokenize.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def metadata(default_model_path, llama3_tiny_path):
    return {"gemma3": GGUFFile(default_model_path).metadata, "llama3_tiny": GGUFFile(llama3_tiny_path).metadata}


@pytest.fixture(scope="module")
def toks(metadata):
    return {name: Tokenizer.from_metadata(md) for name, md in metadata.items()}


@pytest.mark.parametrize("name", ["gemma3", "llama3_tiny"])
def test_every_reference_tokenization_matches_llama_cpp(toks, name):
    tok, all_cases = toks[name], cases(name)
    assert len(all_cases) == 506
    bad = [
        (c["text"][:60], c["parse_special"])
        for c in all_cases
        if tok.encode(c["text"], add_special=c["add_special"], parse_special=c["parse_special"]) != c["tokens"]
    ]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]}"


def test_special_tokens_are_parsed_only_when_asked(toks):
    tok = toks["llama3_tiny"]
    text = "<|start_header_id|>user<|end_header_id|>"
    assert tok.encode(text, add_special=False, parse_special=True)[0] == 128006
    assert 128006 not in tok.encode(text, add_special=False, parse_special=False)
    gemma = toks["gemma3"]
    assert gemma.encode("<start_of_turn>", add_special=False, parse_special=True) == [105]


@pytest.mark.parametrize("name,bos", [("gemma3", 2), ("llama3_tiny", 128000)])
def test_add_special_adds_bos(toks, name, bos):
    tok = toks[name]
    assert tok.bos_id == bos and tok.add_bos
    assert tok.encode("Hello world") == [bos] + tok.encode("Hello world", add_special=False)
    assert tok.encode("") == [bos] and tok.encode("", add_special=False) == []


def test_eog_ids_as_llama_cpp_finds_them(toks):
    assert toks["gemma3"].eog_ids == {1, 106}  # <eos>, <end_of_turn>
    assert toks["llama3_tiny"].eog_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>


@pytest.mark.parametrize("name", ["gemma3", "llama3_tiny"])
def test_decode_round_trips_and_hides_control_tokens_when_asked(toks, name):
    tok = toks[name]
    for text in ["Hello, world!", "  two  spaces\n\nnew lines\ttab", "Ünïcödé – 日本語 🙂", "x = f(y) + 3.14"]:
        assert tok.decode(tok.encode(text, add_special=False)) == text
    ids = tok.encode("hi")
    assert tok.decode(ids, skip_special=True) == "hi"
    assert tok.decode(ids).endswith("hi") and len(tok.decode(ids)) > 2


@pytest.mark.parametrize("name", ["gemma3", "llama3_tiny"])
def test_streaming_detokenization_equals_llama_cpp_content(toks, name):
    tok = toks[name]
    with open(DATA / f"{name}_greedy.jsonl") as f:
        greedy = [json.loads(line) for line in f]
    for case in greedy:
        d = IncrementalDetokenizer(tok, special=False)
        parts = [d.push(t) for t in case["tokens"] if t not in tok.eog_ids]
        text = "".join(parts) + d.flush()
        assert text == tok.decode([t for t in case["tokens"] if t not in tok.eog_ids], skip_special=True)
        assert text == case["content"]


def test_a_character_split_over_byte_tokens_is_held_until_complete(toks):
    tok = toks["llama3_tiny"]
    ids = tok.encode("🙂🙂", add_special=False)
    assert len(ids) > 2  # the emoji takes several byte-level tokens
    d = IncrementalDetokenizer(tok)
    outs = [d.push(t) for t in ids]
    assert "".join(outs) == "🙂🙂" and all(o in ("", "🙂") for o in outs)
    d.push(ids[0])
    assert d.flush() == "\ufffd"  # an unfinished character at the end


def test_unknown_model_or_pre_and_inconsistent_metadata(metadata):
    md = dict(metadata["llama3_tiny"])
    with pytest.raises(UnsupportedModelError, match="'bert'.*llama, gpt2"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="'nonesuch'.*llama-bpe"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "nonesuch"})
    with pytest.raises(GGUFError, match="bos_token_id"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.bos_token_id": 10**9})
    with pytest.raises(GGUFError, match="token_type"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.token_type": [1, 1]})
    gemma = dict(metadata["gemma3"])
    with pytest.raises(GGUFError, match="scores has 3 entries"):
        Tokenizer.from_metadata({**gemma, "tokenizer.ggml.scores": [0.0, 0.0, 0.0]})
    with pytest.raises(GGUFError, match="tokens is missing"):
        Tokenizer.from_metadata({k: v for k, v in gemma.items() if k != "tokenizer.ggml.tokens"})
