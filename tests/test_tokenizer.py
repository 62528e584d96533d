"""Tokenization against llama.cpp's recorded ids (1012 cases), llama.cpp's special-token rules, decoding, streaming, bad metadata."""

import json
from pathlib import Path

import pytest

from runtime.errors import GGUFError, InvalidRequestError, UnsupportedModelError
from runtime.gguf.reader import GGUFFile
from runtime.pretokenizer import PRE_TOKENIZERS, bytes_to_unicode
from runtime.tokenizer import IncrementalDetokenizer, Tokenizer

DATA = Path(__file__).parent / "data"
MODELS = ["gemma3", "llama3_tiny"]


def jsonl(name):
    with open(DATA / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def metadata(default_model_path, llama3_tiny_path):
    return {
        "gemma3": GGUFFile(default_model_path).metadata,
        "llama3_tiny": GGUFFile(llama3_tiny_path).metadata,
    }


@pytest.fixture(scope="module")
def toks(metadata):
    return {name: Tokenizer.from_metadata(md) for name, md in metadata.items()}


# -- llama.cpp's recorded tokenizations --------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_every_reference_tokenization_matches_llama_cpp(toks, name):
    tok, cases = toks[name], jsonl(f"{name}_tokenize")
    assert len(cases) == 506
    bad = []
    for c in cases:
        got = tok.encode(c["text"], add_special=c["add_special"], parse_special=c["parse_special"])
        if got != c["tokens"]:
            bad.append(
                f"{c['text'][:50]!r} parse_special={c['parse_special']}: want {c['tokens'][:12]} got {got[:12]}"
            )
    assert not bad, f"{len(bad)}/{len(cases)} mismatches, first ones:\n" + "\n".join(bad[:5])


def test_special_tokens_are_parsed_only_when_asked(toks):
    tok = toks["llama3_tiny"]
    text = "<|start_header_id|>user<|end_header_id|>"
    assert tok.encode(text, add_special=False, parse_special=True)[0] == 128006
    assert 128006 not in tok.encode(text, add_special=False, parse_special=False)
    gemma = toks["gemma3"]
    assert gemma.encode("<start_of_turn>", add_special=False, parse_special=True) == [105]
    assert 105 not in gemma.encode("<start_of_turn>", add_special=False)
    # Gemma's "\n\n" is a user-defined token: split out of the text whatever parse_special says.
    nn = gemma.token_to_id["\n\n"]
    assert nn in gemma.encode("a\n\nb", add_special=False) and not gemma.is_control(nn)


@pytest.mark.parametrize(("name", "bos"), [("gemma3", 2), ("llama3_tiny", 128000)])
def test_add_special_adds_bos(toks, name, bos):
    tok = toks[name]
    assert tok.bos_id == bos and tok.add_bos and not tok.add_eos
    assert tok.encode("Hello world") == [bos] + tok.encode("Hello world", add_special=False)
    assert tok.encode("") == [bos] and tok.encode("", add_special=False) == []


def test_eog_ids_as_llama_cpp_finds_them(toks):
    # <eos>, <end_of_turn>, and </s> (212): llama.cpp makes any "</s>" token end generation (and
    # a control token) unless the vocabulary also has Gemma 4's <|tool_response>.
    assert toks["gemma3"].eog_ids == {1, 106, 212}
    assert toks["gemma3"].eot_id == 106 and toks["gemma3"].is_control(212)
    # <|end_of_text|>, <|eot_id|>; this is the Llama 3.0 vocabulary, where 128008 is
    # <|reserved_special_token_4|>, not 3.1's <|eom_id|>.
    assert toks["llama3_tiny"].eog_ids == {128001, 128009}
    assert toks["llama3_tiny"].token_text(128008) == "<|reserved_special_token_4|>"


# -- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trips_and_hides_control_tokens_when_asked(toks, name):
    tok = toks[name]
    for text in [
        "Hello, world!",
        "  two  spaces\n\nnew lines\ttab",
        "Ünïcödé – 日本語 🙂 𓀀",
        "x = f(y) + 3.14",
    ]:
        assert tok.decode(tok.encode(text, add_special=False)) == text
    ids = tok.encode("hi")
    assert tok.decode(ids, skip_special=True) == "hi"
    assert tok.decode(ids) == tok.token_text(tok.bos_id) + "hi"
    with pytest.raises(InvalidRequestError, match="out of range"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("name", MODELS)
def test_streaming_detokenization_equals_decode_and_llama_cpp_content(toks, name):
    tok = toks[name]
    for case in jsonl(f"{name}_greedy"):
        ids = [t for t in case["tokens"] if t not in tok.eog_ids]
        d = IncrementalDetokenizer(tok, special=False)
        parts = [d.push(t) for t in ids]
        text = "".join(parts) + d.flush()
        assert text == tok.decode(ids, skip_special=True)
        assert text == case["content"]  # llama-server's content is the pieces joined


@pytest.mark.parametrize(("name", "text"), [("llama3_tiny", "🙂🙂"), ("gemma3", "𓀀ꙮ")])
def test_a_character_split_over_byte_tokens_is_held_until_complete(toks, name, text):
    tok = toks[name]
    ids = tok.encode(text, add_special=False)
    assert len(ids) > len(text)  # several byte tokens per character
    d = IncrementalDetokenizer(tok)
    outs = [d.push(t) for t in ids]
    assert "".join(outs) == text and all(o in ("", *text) for o in outs)
    assert all(o.encode("utf-8") for o in outs if o)  # whole characters only: no lone surrogates
    d.push(ids[0])
    assert d.flush() == "\ufffd"  # an unfinished character at the end
    # The detokenizer goes on after a flush.
    assert d.push(ids[0]) == "" and "".join(d.push(t) for t in ids[1:]) == text


# -- llama.cpp's rules on small made-up vocabularies -------------------------------------------


def spm(pieces, *, control=(), **extra):
    tokens = ["<unk>", "<s>", "</s>", *control, *pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (3 + len(control)) + list(pieces.values()),
        "tokenizer.ggml.token_type": [2, 3, 3] + [3] * len(control) + [1] * len(pieces),
        "tokenizer.ggml.add_space_prefix": False,
        **extra,
    }


def texts(tok, ids):
    return [tok.token_text(i) for i in ids]


def test_spm_merges_the_best_scoring_token_leftmost_first():
    pieces = {"a": 0.0, "b": 0.0, "ab": -1.0, "ba": -1.0, "aa": -1.0, "aaa": -2.0}
    tok = Tokenizer.from_metadata(spm(pieces))
    assert texts(tok, tok.encode("aba", add_special=False)) == ["ab", "a"]  # equal scores: leftmost
    assert texts(tok, tok.encode("aaaa", add_special=False)) == ["aa", "aa"]  # aa beats a+aa / aa+a
    tok = Tokenizer.from_metadata(spm({**pieces, "ba": -0.5}))
    assert texts(tok, tok.encode("aba", add_special=False)) == ["a", "ba"]


def test_spm_prefix_space_at_the_start_and_after_each_special_token():
    md = spm({"▁": -1.0, "a": -2.0, "▁a": -0.5}, **{"tokenizer.ggml.add_space_prefix": True})
    tok = Tokenizer.from_metadata(md)
    assert texts(tok, tok.encode("a</s>a", parse_special=True)) == ["<s>", "▁a", "</s>", "▁a"]
    assert texts(tok, tok.encode("a a", add_special=False)) == ["▁a", "▁a"]
    assert tok.decode(tok.encode("a a", add_special=False)) == " a a"  # as token_to_piece gives it


def test_phi3_special_tokens_swallow_the_whitespace_after_them():
    pieces = {"▁": -1.0, "h": -2.0, "i": -2.0, "hi": -0.5}
    md = spm(pieces, control=["<|user|>"])
    tok = Tokenizer.from_metadata(md)
    assert texts(tok, tok.encode("<|user|> hi", add_special=False, parse_special=True)) == [
        "<|user|>",
        "▁",
        "hi",
    ]
    tok = Tokenizer.from_metadata({**md, "general.name": "Phi-3 mini"})
    assert texts(tok, tok.encode("<|user|> \n hi", add_special=False, parse_special=True)) == [
        "<|user|>",
        "hi",
    ]


def gpt2(extra_tokens, merges, pre="gpt-2", types=None, **extra):
    tokens = [bytes_to_unicode()[b] for b in range(256)] + list(extra_tokens)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 256 + list(types or [1] * len(extra_tokens)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 256,
        **extra,
    }


def test_gpt2_merges_by_rank_and_llama3_emits_whole_words_from_the_vocabulary():
    md = gpt2(["<eos>", "he", "ll", "hell", "hello", "Ġhello"], ["h e", "l l", "he ll"])
    tok = Tokenizer.from_metadata(md)
    assert texts(tok, tok.encode("hello hello")) == ["hell", "o", "Ġ", "hell", "o"]
    # Merges `tokenizers` cannot take (a join that is not a token, no space) are left out.
    odd = Tokenizer.from_metadata(
        {**md, "tokenizer.ggml.merges": ["h e", "q zz", "l l", "oops", "he ll"]}
    )
    assert odd.encode("hello hello") == tok.encode("hello hello")
    tok = Tokenizer.from_metadata(
        {**md, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 256}
    )
    assert tok.add_bos  # llama3-style pre-tokenizers add BOS unless the metadata says otherwise
    assert texts(tok, tok.encode("hello hello", add_special=False)) == ["hello", "Ġhello"]


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_supported_pre_tokenizer_compiles_and_round_trips(pre):
    tok = Tokenizer.from_metadata(
        gpt2(["<eos>"], [], pre=pre, **{"tokenizer.ggml.bos_token_id": 256})
    )
    text = "Hello, World! It's 12345 apples\n\n  über 日本語 🙂\t'LL"
    assert tok.decode(tok.encode(text, add_special=False)) == text


def test_end_of_generation_and_control_tokens_by_text():
    specials = ["<eos>", "<|return|>", "<|call|>", "<|end|>", "<|fim_pad|>", "<|im_end|>", "€x"]
    tok = Tokenizer.from_metadata(gpt2(specials, [], types=[3, 1, 1, 1, 1, 4, 1]))
    ids = {t: tok.token_to_id[t] for t in specials}
    # gpt-oss: with <|return|> and <|call|> present, <|end|> does not end generation and is text.
    assert tok.eog_ids == {
        ids[t] for t in ("<eos>", "<|return|>", "<|call|>", "<|fim_pad|>", "<|im_end|>")
    }
    assert tok.is_control(ids["<|im_end|>"]) and tok.is_control(ids["<|fim_pad|>"])
    assert tok.eot_id == ids["<|im_end|>"] and not tok.is_control(ids["<|end|>"])
    assert tok.encode("a<|end|>b<|im_end|>", add_special=False)[:3] == [
        ord("a"),
        ids["<|end|>"],
        ord("b"),
    ]
    assert (
        tok.decode([ids["<|im_end|>"]]) == "<|im_end|>"
        and tok.decode([ids["<|im_end|>"]], True) == ""
    )
    # A normal token outside the byte-level alphabet renders as llama.cpp's marker.
    assert tok.decode([ids["€x"]]) == "[UNK_BYTE_0xe282ac€x]x"


# -- bad metadata ------------------------------------------------------------------------------


def test_unknown_model_or_pre(metadata):
    md = metadata["llama3_tiny"]
    with pytest.raises(UnsupportedModelError, match="'bert'.*llama, gpt2"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="'nonesuch'.*llama-bpe.*qwen2.*smollm"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "nonesuch"})


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "llama3_tiny",
            {"tokenizer.ggml.bos_token_id": 10**9},
            "bos_token_id 1000000000 is not a token id",
        ),
        ("llama3_tiny", {"tokenizer.ggml.eos_token_id": -1}, "eos_token_id"),
        (
            "llama3_tiny",
            {"tokenizer.ggml.token_type": [1, 1]},
            "token_type has 2 entries for 128256",
        ),
        ("llama3_tiny", {"tokenizer.ggml.merges": None}, "merges is missing"),
        ("gemma3", {"tokenizer.ggml.scores": [0.0, 0.0, 0.0]}, "scores has 3 entries for 262144"),
        ("gemma3", {"tokenizer.ggml.tokens": None}, "tokens is missing"),
        ("gemma3", {"tokenizer.ggml.add_bos_token": "yes"}, "add_bos_token is not a boolean"),
    ],
)
def test_inconsistent_metadata_is_a_one_line_gguf_error(metadata, name, change, message):
    with pytest.raises(GGUFError, match=message) as err:
        Tokenizer.from_metadata({**metadata[name], **change})
    assert "\n" not in str(err.value) and not isinstance(err.value, UnsupportedModelError)


def test_small_vocabulary_errors():
    with pytest.raises(GGUFError, match="duplicate token in vocabulary: 'a' has ids 3 and 4"):
        Tokenizer.from_metadata(
            spm(
                {"a": 0.0, "b": 0.0},
                **{"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "a"]},
            )
        )
    with pytest.raises(
        GGUFError, match="add_bos_token is true, but tokenizer.ggml.bos_token_id is not set"
    ):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
