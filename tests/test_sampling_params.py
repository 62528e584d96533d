"""SamplingParams: llama.cpp's defaults, its wire forms (samplers, logit_bias), and loud validation."""

import math

import pytest

from runtime.errors import InvalidRequestError
from runtime.sampling_params import (
    DEFAULT_SAMPLERS,
    SamplingParams,
    parse_samplers,
    resolve_logit_bias,
)


def test_defaults_are_llama_cpp_servers():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p, p.tfs_z) == (0.8, 40, 0.95, 0.05, 1.0, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.presence_penalty, p.frequency_penalty) == (1.0, 64, 0.0, 0.0)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta, p.seed, p.n_predict, p.n_probs) == (0, 5.0, 0.1, -1, -1, 0)
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == (0.0, 1.75, 2, -1)
    assert p.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert (p.xtc_probability, p.xtc_threshold, p.top_n_sigma, p.dynatemp_range, p.dynatemp_exponent) == (
        0.0, 0.1, -1.0, 0.0, 1.0,
    )  # fmt: skip
    assert p.samplers == DEFAULT_SAMPLERS == tuple(
        "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature".split(";")
    )
    assert p.logit_bias == () and p.min_keep == 0 and not p.ignore_eos


def test_sequences_are_stored_as_tuples():
    p = SamplingParams(
        samplers=["top_k", "temperature"],
        stop=["a"],
        dry_sequence_breakers=["\n"],
        logit_bias=[[5, -1], [6, -math.inf]],
        penalty_prompt_tokens=[1, 2],
        temperature=1,
    )
    assert p.samplers == ("top_k", "temperature") and p.stop == ("a",) and p.dry_sequence_breakers == ("\n",)
    assert p.logit_bias == ((5, -1.0), (6, -math.inf)) and p.penalty_prompt_tokens == (1, 2)
    assert isinstance(p.temperature, float)
    hash(p)


@pytest.mark.parametrize(
    "value,want",
    [
        ("kpt", ("top_k", "top_p", "temperature")),
        ("edskypmxt", DEFAULT_SAMPLERS),
        ("top_k;tfs_z;typical_p;top_p;min_p;temperature", ("top_k", "tfs_z", "typ_p", "top_p", "min_p", "temperature")),
        (["top-k", "nucleus", "temp", "min-p", "typical"], ("top_k", "top_p", "temperature", "min_p", "typ_p")),
        ("top_k", ("top_k",)),
        ([], ()),
    ],
)
def test_sampler_order_forms(value, want):
    assert parse_samplers(value) == want
    assert SamplingParams(samplers=value).samplers == want


@pytest.mark.parametrize("value,msg", [(["top_k", "bogus"], "unknown sampler 'bogus'"), ("kz", "unknown sampler 'z'"),
                                       (["infill"], "not supported"), (5, "must be a string or a list")])
def test_bad_sampler_names_fail(value, msg):
    with pytest.raises(InvalidRequestError, match=msg):
        SamplingParams(samplers=value)


def encode(text):
    return [ord(c) for c in text]


def test_logit_bias_wire_forms():
    assert resolve_logit_bias([[15, 1.5], [16, False]], encode) == ((15, 1.5), (16, -math.inf))
    assert resolve_logit_bias([["ab", -2]], encode) == ((97, -2.0), (98, -2.0))
    assert resolve_logit_bias([["12", 1]], encode) == ((49, 1.0), (50, 1.0))  # a list's string is text
    assert resolve_logit_bias({"12": 3, "hi": False}, encode) == ((12, 3.0), (104, -math.inf), (105, -math.inf))
    assert resolve_logit_bias(None, encode) == ()
    p = SamplingParams(logit_bias=resolve_logit_bias({"7": -100}, encode, vocab_size=10))
    assert p.logit_bias == ((7, -100.0),)


INT_FIELDS = ("top_k", "repeat_last_n", "mirostat", "n_probs", "min_keep", "dry_allowed_length",
              "dry_penalty_last_n", "n_predict", "n_discard", "n_keep")  # fmt: skip


@pytest.mark.parametrize("name", INT_FIELDS)
def test_integers_past_64_bits_are_refused(name):
    """min_keep = 2**63 passed validation and then overflowed torch.tensor in the sampler, failing
    the whole engine step (found by the HTTP fuzz); every count is a signed 64-bit integer."""
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams(**{name: 2**63})
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams(**{name: -(2**63) - 1})


@pytest.mark.parametrize("key", ["\u00b9", "--5", "\u0663", "5\u00b2", " 5"])
def test_logit_bias_keys_that_only_look_numeric_are_text(key):
    """Only ASCII digits make a token id: str.isdigit() also takes '¹' (found by the HTTP fuzz:
    int() refused it, a 500), and int() would read the Arabic-Indic '٣' as 3."""
    assert resolve_logit_bias({key: 1}, encode) == tuple((ord(c), 1.0) for c in key)


@pytest.mark.parametrize(
    "value,msg",
    [
        ([[1, True]], "finite number or false"),
        ([[1, "x"]], "finite number or false"),
        ([[1]], "pairs"),
        ({"99": 1}, "out of range"),
        ([[-1, 1]], "out of range"),
        ("x", "list of pairs or an object"),
    ],
)
def test_bad_logit_bias_wire_forms_fail(value, msg):
    with pytest.raises(InvalidRequestError, match=msg):
        resolve_logit_bias(value, encode, vocab_size=50)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"temperature": "hot"}, "temperature: must be a finite number"),
        ({"temperature": math.nan}, "temperature: must be a finite number"),
        ({"top_k": 4.5}, "top_k: must be an integer"),
        ({"top_k": True}, "top_k: must be an integer"),
        ({"top_p": 1.5}, r"top_p: must be in \[0, 1\]"),
        ({"min_p": -0.1}, r"min_p: must be in \[0, 1\]"),
        ({"tfs_z": 2.0}, r"tfs_z: must be in \[0, 1\]"),
        ({"typical_p": -1.0}, r"typical_p: must be in \[0, 1\]"),
        ({"xtc_probability": 1.1}, "xtc_probability"),
        ({"xtc_threshold": -0.1}, "xtc_threshold"),
        ({"repeat_penalty": 0.0}, "repeat_penalty: must be > 0"),
        ({"repeat_last_n": -2}, "repeat_last_n: must be -1"),
        ({"dry_penalty_last_n": -5}, "dry_penalty_last_n: must be -1"),
        ({"dry_base": 0.5}, "dry_base: must be >= 1"),
        ({"dry_multiplier": -1.0}, "dry_multiplier: must be >= 0"),
        ({"dry_allowed_length": -1}, "dry_allowed_length: must be >= 0"),
        ({"dry_sequence_breakers": []}, "dry_sequence_breakers: must be a non-empty list"),
        ({"dry_sequence_breakers": ["\n", ""]}, "dry_sequence_breakers: must not contain empty"),
        ({"dry_sequence_breakers": "\n"}, "dry_sequence_breakers: must be a list of strings"),
        ({"dynatemp_range": -0.5}, "dynatemp_range: must be >= 0"),
        ({"mirostat": 3}, "mirostat: must be 0"),
        ({"mirostat_tau": -1.0}, "mirostat_tau: must be >= 0"),
        ({"min_keep": -1}, "min_keep: must be >= 0"),
        ({"penalize_nl": 1}, "penalize_nl: must be true or false"),
        ({"ignore_eos": "yes"}, "ignore_eos: must be true or false"),
        ({"penalty_prompt_tokens": [1, -2]}, "penalty_prompt_tokens: must be a list of token ids"),
        ({"penalty_prompt_tokens": "abc"}, "penalty_prompt_tokens: must be a list of token ids"),
        ({"logit_bias": [(1, math.inf)]}, "logit_bias: a bias must be a number or -inf"),
        ({"logit_bias": [(1.5, 1.0)]}, "logit_bias: a token id must be an integer"),
        ({"logit_bias": {1: 1.0}}, "logit_bias: must be"),
        ({"n_probs": 101}, r"n_probs: must be in \[0, 100\]"),
        ({"n_predict": -2}, "n_predict: must be -1"),
        ({"seed": -2}, "seed: must be -1"),
        ({"stop": "x"}, "stop: must be a list of strings"),
        ({"n_keep": -2}, "n_keep: must be an integer >= -1"),
        ({"n_discard": -1}, "n_discard: must be >= 0"),
    ],
)
def test_bad_values_fail_loudly_naming_the_field(kw, msg):
    with pytest.raises(InvalidRequestError, match=msg) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


def test_edge_values_are_accepted():
    SamplingParams(temperature=-1.0, top_k=-1, top_p=0.0, min_p=1.0, repeat_last_n=-1, dry_penalty_last_n=-1,
                   top_n_sigma=-1.0, seed=2**64 - 1, logit_bias=((3, -math.inf),), n_keep=-1, dry_allowed_length=0)
