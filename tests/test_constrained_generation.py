"""Constrained decoding end to end on the default model: every test grammar and schema, greedy and sampled; HTTP and gRPC."""

from __future__ import annotations

import json

import httpx
import pytest

from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sampling_params import SamplingParams
from tests.test_grammar import CHECKS, GRAMMARS, SCHEMAS, schema_ok

N_PREDICT = 64
PROMPTS = {
    "json": "A JSON object describing a cat:\n",
    "json_arr": "A JSON list of two people with their ages:\n",
    "list": "A shopping list:\n",
    "arithmetic": "An arithmetic expression: ",
    "chess": "The first moves of a chess game: ",
    "c": "A small C program:\n",
    "english": "A sentence about the sea: ",
}
SAMPLED = [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]


@pytest.fixture(scope="module")
def loaded(default_model_path):
    from runtime.loader import load_model

    return load_model(default_model_path)


def run_all(engine: Engine, jobs: dict[str, tuple[str, SamplingParams]]) -> dict[str, tuple[str, str | None]]:
    """Every job in one batch: name -> (prompt, params) gives name -> (text, finish reason)."""
    tok = engine.tokenizer
    names = {engine.add_request(tok.encode(p), params): name for name, (p, params) in jobs.items()}
    ids: dict[str, list[int]] = {rid: [] for rid in names}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished():
        for o in engine.step():
            ids[o.request_id] += [t for t in o.new_token_ids if t not in tok.eog_ids]
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    return {names[rid]: (tok.decode(ids[rid]), reasons.get(rid)) for rid in names}


@pytest.mark.slow
def test_every_grammar_and_schema_greedy_and_sampled(loaded):
    """7 grammars and 9 schemas, each greedy and at temperature 1.0 with two seeds (48 streams, one batch)."""
    engine = Engine(EngineConfig(model_path=str(loaded.path), n_ctx=4096, n_parallel=48), loaded=loaded)
    jobs: dict[str, tuple[str, SamplingParams]] = {}
    for i, kw in enumerate(SAMPLED):
        for name in CHECKS:
            grammar = (GRAMMARS / f"{name}.gbnf").read_text()
            jobs[f"gbnf/{name}/{i}"] = (PROMPTS[name], SamplingParams(grammar=grammar, n_predict=N_PREDICT, **kw))
        for name, schema in SCHEMAS.items():
            params = SamplingParams(json_schema=schema, n_predict=N_PREDICT, **kw)
            jobs[f"schema/{name}/{i}"] = (f"A JSON object ({name.replace('_', ' ')}):\n", params)
    bad = []
    for job, (text, reason) in run_all(engine, jobs).items():
        kind, name, _ = job.split("/")
        try:
            ok = reason == "stop" and (CHECKS[name](text) if kind == "gbnf" else schema_ok(name, text))
        except ValueError as e:  # json.JSONDecodeError, jsonschema.ValidationError
            ok, text = False, f"{text!r}: {e}"
        if not ok:
            bad.append((job, reason, text))
    assert not bad, bad


@pytest.fixture(scope="module")
def client(loaded):
    def load(settings):
        return Engine(EngineConfig(model_path=str(loaded.path), n_ctx=1024, n_parallel=4), loaded=loaded)

    from http_api.state import ServerState

    settings = ServerSettings(model=str(loaded.path), n_threads=2, n_ctx=1024, n_parallel=4)
    with LiveServer(settings, ServerState(settings, loader=load)) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            yield c


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["name", "age"],
}


@pytest.mark.slow
def test_completion_streams_a_grammar_with_n_probs(client):
    grammar = (GRAMMARS / "chess.gbnf").read_text()
    body = {"prompt": PROMPTS["chess"], "grammar": grammar, "n_predict": 40, "n_probs": 2, "stream": True}
    with client.stream("POST", "/completion", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    text = "".join(c["content"] for c in chunks)
    assert CHECKS["chess"](text), text
    last = chunks[-1]
    assert last["stop"] and last["stop_type"] == "eos" and last["generation_settings"]["grammar"] == grammar
    assert all(len(p["top_logprobs"]) == 2 for c in chunks for p in c.get("completion_probabilities", []))


@pytest.mark.slow
def test_completion_json_schema_and_a_stop_string(client):
    r = client.post("/completion", json={"prompt": "A person as JSON:\n", "json_schema": PERSON, "n_predict": 40})
    assert r.status_code == 200, r.text
    res = r.json()
    value = json.loads(res["content"])
    assert set(value) == {"name", "age"} and res["stop_type"] == "eos"
    # A stop string still ends the text early (here inside the object): the grammar does not override it.
    r = client.post("/completion", json={"prompt": "A person as JSON:\n", "json_schema": PERSON, "n_predict": 40, "stop": ['"age"']})
    res = r.json()
    assert res["stop_type"] == "word" and res["stopping_word"] == '"age"' and '"age"' not in res["content"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        {"type": "json_object"},
    ],
)
def test_chat_response_format(client, fmt):
    question = 'What is 2+2? Answer as a JSON object with the key "answer".'
    if fmt["type"] == "json_schema":
        question = "Describe Ada Lovelace as JSON with her name and age."
    body = {
        "messages": [{"role": "user", "content": question}],
        "response_format": fmt,
        "max_tokens": 48,
        "temperature": 0,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(choice["message"]["content"])
    assert isinstance(value, dict)
    if fmt["type"] == "json_schema":
        assert set(value) == {"name", "age"}


@pytest.mark.slow
def test_grpc_generate_with_grammar_and_schema(loaded):
    from google.protobuf import struct_pb2

    from gguf_serve.v1 import inference_pb2 as pb
    from gguf_serve.v1 import sampling_pb2 as spb
    from tests.grpc_harness import collect, run, serve

    schema = struct_pb2.Struct()
    schema.update(PERSON)
    grammar = (GRAMMARS / "arithmetic.gbnf").read_text()

    async def main():
        async with serve(loaded) as c:
            out = []
            for params, prompt in (
                (spb.SamplingParams(grammar=grammar, n_predict=32, temperature=1.0, seed=4), PROMPTS["arithmetic"]),
                (spb.SamplingParams(json_schema=schema, n_predict=40, temperature=0.0), "A person as JSON:\n"),
            ):
                chunks = await collect(c.stub.Generate(pb.GenerateRequest(text=prompt, params=params)))
                out.append(("".join(ch.text for ch in chunks), chunks[-1].finish_reason))
            return out

    (expr, r1), (obj, r2) = run(main())
    assert r1 == r2 == pb.FINISH_REASON_STOP
    assert CHECKS["arithmetic"](expr), expr
    assert set(json.loads(obj)) == {"name", "age"}
