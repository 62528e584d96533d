"""POST /completion on a live server: llama.cpp's greedy output, its result fields, prompt forms, SSE streaming."""

import json

import httpx
import pytest

from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from tests.reference import aligned_steps, greedy_cases

CASES = greedy_cases("llama3_tiny")
FINAL_FIELDS = {
    "index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
    "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word",
    "tokens_cached", "timings",
}  # fmt: skip
TIMINGS = {
    "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}  # fmt: skip


@pytest.fixture(scope="module")
def server(llama3_tiny_path):
    with LiveServer(
        ServerSettings(model=str(llama3_tiny_path), n_threads=1, n_ctx=1024, n_parallel=4)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client, **body):
    r = client.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(client, path, body):
    """The JSON payloads of an SSE response, in order."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_greedy_content_and_tokens_equal_llama_cpp(client):
    case = CASES[0]
    res = complete(client, prompt=case["prompt"], n_predict=32, temperature=0, n_probs=10)
    assert res["content"] == case["content"]
    assert res["tokens"] == case["tokens"]
    assert FINAL_FIELDS <= set(res) and set(res["timings"]) == TIMINGS
    assert res["stop"] is True and res["stop_type"] == "limit" and res["stopping_word"] == ""
    assert res["tokens_predicted"] == 32 and res["timings"]["predicted_n"] == 32
    assert res["tokens_evaluated"] == 6  # <|begin_of_text|> + 5 tokens
    assert res["prompt"] == "<|begin_of_text|>" + case["prompt"]
    assert (
        res["generation_settings"]["n_predict"] == 32
        and res["generation_settings"]["temperature"] == 0
    )
    probs = res["completion_probabilities"]
    assert [p["id"] for p in probs] == case["tokens"]
    errors = []
    for k, step in aligned_steps(case):  # llama.cpp's float32 kernels differ in the last digits
        p = probs[k]
        assert set(p) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        errors.append(abs(p["logprob"] - step["top"][0][1]))
        assert {t[0] for t in step["top"][:3]} <= {t["id"] for t in p["top_logprobs"]}
        assert bytes(p["bytes"]).decode("utf-8", "ignore").startswith(p["token"])
        for t in p["top_logprobs"]:
            assert set(t) == {"id", "token", "bytes", "logprob"}
    assert max(errors) < 0.05 and sum(errors) / len(errors) < 0.005


def test_an_array_of_prompts_gives_one_result_per_prompt(client):
    cases = CASES[1:3]
    r = client.post(
        "/completion",
        json={"prompt": [c["prompt"] for c in cases], "n_predict": 32, "temperature": 0},
    )
    results = r.json()
    assert isinstance(results, list) and len(results) == 2
    for i, (res, case) in enumerate(zip(results, cases)):
        assert res["index"] == i
        assert res["content"] == case["content"] and res["tokens"] == case["tokens"]


def test_token_ids_and_mixed_prompts_equal_the_text_prompt(client):
    case = CASES[0]
    ids = client.post("/tokenize", json={"content": case["prompt"], "add_special": True}).json()[
        "tokens"
    ]
    want = case["tokens"][:8]
    assert complete(client, prompt=ids, n_predict=8, temperature=0)["tokens"] == want
    # Mixed: a text element after the first gets no BOS, so [BOS id, text] is the same prompt.
    assert (
        complete(client, prompt=[ids[0], case["prompt"]], n_predict=8, temperature=0)["tokens"]
        == want
    )
    assert complete(client, prompt=[ids], n_predict=8, temperature=0)["tokens"] == want


def test_stream_concatenation_equals_the_whole_result(client):
    body = {"prompt": CASES[4]["prompt"], "n_predict": 16, "temperature": 0, "n_probs": 2}
    whole = complete(client, **body)
    evs = events(client, "/completion", {**body, "stream": True})
    partial, final = evs[:-1], evs[-1]
    assert "".join(e["content"] for e in partial) == whole["content"]
    assert [t for e in partial for t in e["tokens"]] == whole["tokens"]
    assert all(e["stop"] is False and e["index"] == 0 for e in partial)
    assert [p["id"] for e in partial for p in e["completion_probabilities"]] == whole["tokens"]
    assert final["stop"] is True and final["content"] == "" and final["tokens"] == []
    assert final["stop_type"] == "limit" and final["tokens_predicted"] == 16
    assert set(final["timings"]) == TIMINGS and "completion_probabilities" not in final


def test_streaming_several_prompts_keeps_them_apart(client):
    prompts = [CASES[0]["prompt"], CASES[1]["prompt"]]
    evs = events(
        client,
        "/completions",
        {"prompt": prompts, "n_predict": 8, "temperature": 0, "stream": True},
    )
    for i, case in enumerate(CASES[:2]):
        mine = [e for e in evs if e["index"] == i]
        assert [t for e in mine for t in e["tokens"]] == case["tokens"][:8]
        assert mine[-1]["stop"] is True


def test_a_stop_string_cuts_the_content(client):
    case = CASES[0]
    res = complete(client, prompt=case["prompt"], n_predict=32, temperature=0, stop=["country"])
    assert res["content"] == case["content"][: case["content"].index("country")]
    assert res["stop_type"] == "word" and res["stopping_word"] == "country"
    evs = events(client, "/completion", {"prompt": case["prompt"], "n_predict": 32, "temperature": 0,
                                         "stop": ["country"], "stream": True})  # fmt: skip
    assert "".join(e["content"] for e in evs) == res["content"]
    assert evs[-1]["stop_type"] == "word"


def test_response_fields_picks_nested_values(client):
    res = complete(
        client,
        prompt="Hello",
        n_predict=2,
        response_fields=["content", "generation_settings/n_predict", "nope"],
    )
    assert set(res) == {"content", "generation_settings/n_predict"}
    assert res["generation_settings/n_predict"] == 2


def test_unknown_fields_are_ignored_and_known_ones_used(client):
    res = complete(client, prompt="Hello", n_predict=3, temperature=0.7, seed=5, top_k=3, foo={"bar": 1},
                   cache_prompt=False, return_tokens=True, id_slot=1)  # fmt: skip
    assert res["tokens_predicted"] == 3 and res["id_slot"] == 1
    again = complete(client, prompt="Hello", n_predict=3, temperature=0.7, seed=5, top_k=3)
    assert again["content"] == res["content"]  # same seed, same text
    gs = res["generation_settings"]
    assert gs["seed"] == 5 and gs["top_k"] == 3 and gs["temperature"] == 0.7


def test_logit_bias_forms_reach_the_sampler(client):
    first = CASES[0]["tokens"][0]
    for bias in ([[first, False]], {str(first): -100}, [[first, -1e9]]):
        res = complete(
            client, prompt=CASES[0]["prompt"], n_predict=1, temperature=0, logit_bias=bias
        )
        assert res["tokens"] != [first]
