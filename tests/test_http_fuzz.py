"""Schema-driven fuzzing of every HTTP route (schemathesis over /openapi.json): never a 5xx, the server healthy after."""

import json
from dataclasses import fields
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from http_api import openapi
from http_api.app import create_app
from http_api.cli import ServerSettings
from http_api.state import ServerState
from http_api.testing import LiveServer
from runtime.errors import InvalidRequestError
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import write_tiny_gguf

# Every operation of the OpenAPI document (built without a model: the routes are fixed).
OPERATIONS = [
    (method.upper(), path)
    for path, ops in create_app(ServerState(ServerSettings())).openapi()["paths"].items()
    for method in ops
]
# Deliberately unimplemented: llama.cpp's 501 (POST /props changes nothing here).
NOT_IMPLEMENTED = {("POST", "/props")}
EXAMPLES = 40  # per operation and model; the whole run stays under a minute
# FIM tokens (the repo-level layout's too), so /infill gets past its 400 on the second model.
FIM = {
    "tokenizer.ggml.fim_pre_token_id": 300, "tokenizer.ggml.fim_suf_token_id": 301,
    "tokenizer.ggml.fim_mid_token_id": 302, "tokenizer.ggml.fim_rep_token_id": 303,
    "tokenizer.ggml.fim_sep_token_id": 304,
}  # fmt: skip


@pytest.fixture(scope="module", params=["llama3-bpe", "spm-fim"])
def server(request, llama3_tiny_path, tmp_path_factory):
    """Each tiny model in turn: the real Llama 3 BPE vocabulary, then a SentencePiece-style
    one with FIM tokens."""
    model = llama3_tiny_path
    if request.param == "spm-fim":
        model = write_tiny_gguf(tmp_path_factory.mktemp("fim") / "fim.gguf", metadata=FIM)
    settings = ServerSettings(
        model=str(model),
        n_threads=1,
        n_ctx=512,
        n_parallel=2,
        n_predict=4,  # the server's cap keeps every generated answer short
        metrics=True,
        embedding=True,
        pooling="mean",
        slot_save_path=str(tmp_path_factory.mktemp("slots")),
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    return value


def integral(case: Any) -> Any:
    """JSON Schema counts 2.0 as an integer; the server, as llama.cpp for token ids, wants 2.
    Valid cases get whole numbers so that most of them reach the engine."""
    if isinstance(case.body, (dict, list)):
        case.body = _ints(case.body)
    return case


def stream_errors(response: Any) -> list[dict[str, Any]]:
    """The `data: {"error": ...}` events of an SSE answer: its 5xx after the 200 went out."""
    if "text/event-stream" not in response.headers.get("content-type", ""):
        return []
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    parsed = [json.loads(e) for e in events if e != "[DONE]"]
    return [e["error"] for e in parsed if isinstance(e, dict) and "error" in e]


@pytest.mark.slow
@pytest.mark.parametrize("method,path", OPERATIONS)
def test_no_route_answers_a_5xx(method, path, api_schema, server):
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE).map(integral),  # bodies the schema allows
        operation.as_strategy(GenerationMode.NEGATIVE),  # and bodies it does not
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=cases)
    def check(case):
        response = case.call(timeout=60)
        if (method, path) in NOT_IMPLEMENTED:
            assert response.status_code == 501, response.text
            return
        where = f"{method} {case.formatted_path} {case.body!r:.300}"
        assert response.status_code < 500, f"{where}: {response.text[:300]}"
        late = [e for e in stream_errors(response) if e.get("code", 500) >= 500]
        assert not late, f"{where}: an error event in the stream: {late}"

    check()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


# -- the schema's ranges are the validators' ------------------------------------------------


@pytest.mark.parametrize("name", sorted(openapi.RANGES))
def test_schema_ranges_are_what_sampling_params_accepts(name):
    low, high = openapi.RANGES[name]
    default = {f.name: f.default for f in fields(SamplingParams)}[name]
    step = 0.01 if isinstance(default, float) else 1
    for ok in (low, high):
        if ok is not None:
            SamplingParams(**{name: type(step)(ok)})
    for bad in (low - step, None if high is None else high + step):
        if bad is not None:
            with pytest.raises(InvalidRequestError, match=name):
                SamplingParams(**{name: bad})


def test_every_sampling_param_is_in_the_completion_schema():
    props = openapi.COMPLETION["properties"]
    sent = {f.name for f in fields(SamplingParams)} - {"penalty_prompt_tokens"} | {"penalty_prompt"}
    assert sent <= set(props)
    assert props["mirostat"]["enum"] == [0, 1, 2]
    with pytest.raises(InvalidRequestError):
        SamplingParams(repeat_penalty=0.0)  # exclusiveMinimum 0
