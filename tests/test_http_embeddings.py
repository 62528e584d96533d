"""/embedding, /embeddings and /v1/embeddings on a live server (plain HTTP and the `openai` SDK)."""

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from tests.test_embeddings import direct

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Paged attention " * 30]


def settings(path, **kw) -> ServerSettings:
    return ServerSettings(
        model=str(path), n_threads=1, n_ctx=512, n_parallel=4, alias="tiny", embedding=True, **kw
    )


@pytest.fixture(scope="module")
def server(llama3_tiny_path):
    with LiveServer(settings(llama3_tiny_path, pooling="mean")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def expected(loaded, text: str) -> np.ndarray:
    """Mean of the final-norm hidden states, L2-normalized, from one direct forward of the model."""
    ids = loaded.tokenizer.encode(text, add_special=True, parse_special=True)
    mean = direct(loaded, ids).mean(0).double()
    return (mean / mean.norm()).numpy()


def test_llama_cpp_shape_equals_a_direct_computation(client, loaded):
    r = client.post("/embedding", json={"content": TEXTS[1]})
    assert r.status_code == 200, r.text
    (item,) = r.json()
    assert item["index"] == 0 and len(item["embedding"]) == 1  # pooled: one row
    got = np.array(item["embedding"][0])
    assert got.shape == (loaded.config.hidden,)
    np.testing.assert_allclose(got, expected(loaded, TEXTS[1]), rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_a_batch_equals_each_alone_in_order(client):
    alone = [client.post("/embeddings", json={"input": t}).json()[0]["embedding"] for t in TEXTS]
    batch = client.post("/embeddings", json={"input": TEXTS}).json()
    assert [b["index"] for b in batch] == [0, 1, 2]
    for a, b in zip(alone, batch):
        np.testing.assert_allclose(a, b["embedding"], rtol=1e-4, atol=1e-6)


def test_token_ids_mixed_input_and_normalization(client, loaded):
    tok = loaded.tokenizer
    ids = tok.encode(TEXTS[1], add_special=True, parse_special=True)
    by_ids = client.post("/embedding", json={"content": ids}).json()[0]["embedding"]
    by_text = client.post("/embedding", json={"content": TEXTS[1]}).json()[0]["embedding"]
    np.testing.assert_allclose(by_ids, by_text, rtol=1e-6)
    mixed = client.post("/embedding", json={"content": [[ids[0]], ids[1:]]}).json()
    assert len(mixed) == 2  # a list of token lists: two inputs
    raw = client.post("/embedding", json={"content": TEXTS[1], "embd_normalize": -1}).json()
    mean = direct(loaded, ids).mean(0).numpy()
    np.testing.assert_allclose(raw[0]["embedding"][0], mean, rtol=1e-4, atol=1e-5)


def test_openai_sdk_float_and_base64(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = oai.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == "tiny" and [d.index for d in r.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in r.data)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 30
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}
    ).json()
    for d, f in zip(raw["data"], r.data):
        assert d["encoding_format"] == "base64"
        got = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        np.testing.assert_allclose(got, f.embedding, rtol=1e-5, atol=1e-7)
    # the SDK's own default (base64, decoded by the SDK) gives the same vectors
    r2 = oai.embeddings.create(model="tiny", input=TEXTS[0])
    np.testing.assert_allclose(r2.data[0].embedding, r.data[0].embedding, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, '"input" or "content" must be provided'),
        ({"input": []}, '"input" must not be empty'),
        ({"input": 5}, '"input" must be a string'),
        ({"input": [1.5]}, '"input" must be a string'),
        ({"input": [{"text": "x"}]}, '"input" must be a string'),
        ({"content": [["x", [1]]]}, '"content" must be a string'),
        ({"input": [[]]}, "Input content cannot be empty"),
        ({"input": [10**7]}, "token id 10000000 is out of range"),
        ({"input": "x", "encoding_format": "hex"}, "Can be either float or base64"),
        ({"input": "x", "embd_normalize": "2"}, "embd_normalize"),
        ({"input": "word " * 600}, "tokens; the context holds 512"),
    ],
)
def test_bad_input_is_400(client, body, message):
    for path in ("/embedding", "/v1/embeddings"):
        r = client.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert message in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_pooling_none_gives_token_vectors_and_no_openai_route(llama3_tiny_path, loaded):
    # llama3-tiny declares no pooling type: llama.cpp then pools nothing
    with LiveServer(settings(llama3_tiny_path)) as srv:
        r = httpx.post(srv.url + "/embedding", json={"content": TEXTS[0]})
        ids = loaded.tokenizer.encode(TEXTS[0], add_special=True, parse_special=True)
        got = torch.tensor(r.json()[0]["embedding"])
        torch.testing.assert_close(got, direct(loaded, ids), rtol=1e-4, atol=1e-5)  # raw
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (
            "Pooling type 'none' is not OAI compatible. Please use a different pooling type"
        )
