"""Proto <-> runtime conversions: only set fields reach SamplingParams; deltas merge into Complete's message."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import struct_pb2

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import sampling_pb2 as spb
from grpc_api import conversions as conv
from runtime.errors import InvalidRequestError
from runtime.request import RequestOutput, Timings, TokenLogprob
from runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(llama3_tiny_path):
    from runtime.gguf.reader import GGUFFile
    from runtime.tokenizer import Tokenizer

    return Tokenizer.from_metadata(GGUFFile(llama3_tiny_path).metadata)


def test_unset_fields_keep_the_runtime_defaults(tok):
    assert conv.sampling_params(spb.SamplingParams(), tok) == SamplingParams()


def test_zero_is_not_unset(tok):
    sp = conv.sampling_params(
        spb.SamplingParams(temperature=0.0, top_k=0, min_p=0.0, seed=0, n_predict=0), tok
    )
    assert (sp.temperature, sp.top_k, sp.min_p, sp.seed, sp.n_predict) == (0.0, 0, 0.0, 0, 0)


def test_every_field_reaches_sampling_params(tok):
    msg = spb.SamplingParams(
        temperature=0.5, dynatemp_range=0.1, dynatemp_exponent=1.5, top_k=7, top_p=0.9, min_p=0.1, tfs_z=0.9,
        typical_p=0.8, repeat_penalty=1.1, repeat_last_n=32, penalize_nl=False, presence_penalty=0.2,
        frequency_penalty=0.3, mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2, n_probs=5, min_keep=2, seed=42,
        ignore_eos=True, samplers=["top_k", "t"], dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3,
        dry_penalty_last_n=16, dry_sequence_breakers=["\n"], xtc_probability=0.5, xtc_threshold=0.2,
        top_n_sigma=1.5, n_predict=9, stop=["END"], n_keep=4, n_discard=2,
        penalty_prompt=spb.PenaltyPrompt(token_ids=spb.TokenIds(ids=[1, 2])),
    )  # fmt: skip
    sp = conv.sampling_params(msg, tok)
    assert sp == SamplingParams(
        temperature=0.5, dynatemp_range=0.1, dynatemp_exponent=1.5, top_k=7, top_p=0.9, min_p=0.1, tfs_z=0.9,
        typical_p=0.8, repeat_penalty=1.1, repeat_last_n=32, penalize_nl=False, presence_penalty=0.2,
        frequency_penalty=0.3, mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2, n_probs=5, min_keep=2, seed=42,
        ignore_eos=True, samplers=("top_k", "temperature"), dry_multiplier=0.8, dry_base=2.0,
        dry_allowed_length=3, dry_penalty_last_n=16, dry_sequence_breakers=("\n",), xtc_probability=0.5,
        xtc_threshold=0.2, top_n_sigma=1.5, n_predict=9, stop=("END",), n_keep=4, n_discard=2,
        penalty_prompt_tokens=(1, 2),
    )  # fmt: skip


def test_logit_bias_by_id_text_and_ban(tok):
    hello = tok.encode("Hello", add_special=False)
    msg = spb.SamplingParams(
        logit_bias=[
            spb.LogitBias(token_id=5, bias=2.5),
            spb.LogitBias(text="Hello", bias=-1.0),
            spb.LogitBias(token_id=9, ban=True),
            spb.LogitBias(token_id=11, ban=False),  # asks for nothing
        ]
    )
    assert conv.sampling_params(msg, tok).logit_bias == (
        (5, 2.5),
        *((t, -1.0) for t in hello),
        (9, -math.inf),
    )
    with pytest.raises(InvalidRequestError, match="out of range"):
        conv.sampling_params(
            spb.SamplingParams(logit_bias=[spb.LogitBias(token_id=10**9, bias=1)]), tok
        )
    with pytest.raises(InvalidRequestError, match="needs bias or ban"):
        conv.sampling_params(spb.SamplingParams(logit_bias=[spb.LogitBias(token_id=1)]), tok)


def test_grammar_and_json_schema_carry_over(tok):
    assert conv.sampling_params(spb.SamplingParams(grammar='root ::= "a"'), tok).grammar == 'root ::= "a"'
    schema = struct_pb2.Struct()
    schema.update({"type": "array", "maxItems": 3, "items": {"const": 2.5}})
    p = conv.sampling_params(spb.SamplingParams(json_schema=schema), tok)
    # A Struct's numbers are doubles; integral ones read as JSON integers again (its key order is its own).
    assert p.json_schema is not None
    assert json.loads(p.json_schema) == {"type": "array", "maxItems": 3, "items": {"const": 2.5}}
    assert '"maxItems": 3,' in p.json_schema or p.json_schema.endswith('"maxItems": 3}')
    assert conv.sampling_params(spb.SamplingParams(json_schema=struct_pb2.Struct()), tok).json_schema == "{}"
    with pytest.raises(InvalidRequestError, match='^Either "json_schema" or "grammar"'):
        conv.sampling_params(spb.SamplingParams(grammar="root ::= x", json_schema=schema), tok)


def test_chat_messages_carry_only_set_fields():
    req = pb.ChatRequest(
        messages=[
            pb.ChatMessage(role="user", content="hi"),
            pb.ChatMessage(role="tool", content="4", tool_call_id="c1"),
        ]
    )
    assert conv.chat_messages(req) == [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ]
    with pytest.raises(InvalidRequestError):
        conv.chat_messages(pb.ChatRequest())


def test_deltas_merge_into_one_response(tok):
    outs = [
        RequestOutput("r", (10,), (TokenLogprob(10, -0.5, ((10, -0.5), (11, -1.0))),), text="a", num_prompt_tokens=3, num_output_tokens=1),
        RequestOutput("r", (12, 13), text="bc", truncated=True, num_prompt_tokens=3, num_output_tokens=3),
        RequestOutput(
            "r", (14,), finished=True, finish_reason="stop", text="d", stop_word="X", num_prompt_tokens=3,
            num_output_tokens=4, num_cached_tokens=2, timings=Timings(1, 2.0, 4, 8.0, 2),
        ),
    ]  # fmt: skip
    deltas = [conv.response(o, tok) for o in outs]
    assert deltas[0].logprobs[0].top[1].token_id == 11
    assert deltas[0].logprobs[0].token_bytes == tok.token_to_piece(10)
    assert not deltas[0].HasField("stop_word") and not deltas[0].HasField("timings")
    whole = conv.merge(deltas)
    assert list(whole.token_ids) == [10, 12, 13, 14] and whole.text == "abcd"
    assert len(whole.logprobs) == 1 and whole.truncated
    assert whole.finish_reason == pb.FINISH_REASON_STOP and whole.stop_word == "X"
    assert (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.cached_tokens,
    ) == (3, 4, 2)
    assert whole.timings.predicted_n == 4 and whole.timings.predicted_per_second == pytest.approx(
        500.0
    )
