"""POST /tokenize, /detokenize and /apply-template against llama.cpp's recorded answers on llama3-tiny."""

import json

import httpx
import pytest

from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from tests.reference import DATA


def _jsonl(name):
    with open(DATA / name) as f:
        return [json.loads(line) for line in f if line.strip()]


TOKENIZE = _jsonl("llama3_tiny_tokenize.jsonl")
TEMPLATES = _jsonl("llama3_tiny_apply_template.jsonl")


@pytest.fixture(scope="module")
def client(llama3_tiny_path):
    with LiveServer(
        ServerSettings(model=str(llama3_tiny_path), n_threads=1, n_ctx=256, n_parallel=1)
    ) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            yield c


def test_tokenize_equals_llama_cpp_on_every_case(client):
    wrong = []
    for case in TOKENIZE:
        body = {k: case[k] for k in ("add_special", "parse_special")} | {"content": case["text"]}
        got = client.post("/tokenize", json=body).json()["tokens"]
        if got != case["tokens"]:
            wrong.append(case["text"])
    assert not wrong, f"{len(wrong)}/{len(TOKENIZE)} differ, e.g. {wrong[0]!r}"


def test_detokenize_gives_the_text_back(client):
    for case in TOKENIZE[::7]:
        content = client.post("/detokenize", json={"tokens": case["tokens"]}).json()["content"]
        assert content == case["text"]


def test_tokenize_defaults_and_special_tokens(client):
    text = "<|begin_of_text|>Hi"
    assert client.post("/tokenize", json={"content": "Hi"}).json() == {"tokens": [13347]}
    assert (
        client.post("/tokenize", json={"content": "Hi", "add_special": True}).json()["tokens"][0]
        == 128000
    )
    parsed = client.post("/tokenize", json={"content": text}).json()[
        "tokens"
    ]  # parse_special defaults to true
    raw = client.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert parsed == [128000, 13347] and len(raw) > 2
    assert client.post("/detokenize", json={"tokens": parsed}).json() == {"content": text}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"content": ""}


def test_with_pieces(client):
    res = client.post("/tokenize", json={"content": "Hello world ü", "with_pieces": True}).json()
    pieces = res["tokens"]
    assert all(set(p) == {"id", "piece"} for p in pieces)
    text = b"".join(
        bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces
    )
    assert text.decode() == "Hello world ü"


def test_apply_template_equals_llama_cpp(client):
    for case in TEMPLATES:
        r = client.post("/apply-template", json={"messages": case["messages"]})
        assert r.status_code == 200 and r.json() == {"prompt": case["prompt"]}


def test_apply_template_rejects_bad_messages(client):
    for messages in ("hi", [{"content": "no role"}], [{"role": "user", "content": 5}], None):
        r = client.post("/apply-template", json={"messages": messages})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
