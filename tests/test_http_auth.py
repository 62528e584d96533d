"""API keys as llama.cpp checks them: Bearer or X-Api-Key, constant-time compares, public health and model list, CORS."""

import hmac

import httpx
import openai
import pytest

from http_api.app import Gate
from http_api.cli import ServerSettings
from http_api.testing import LiveServer

KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module")
def server(llama3_tiny_path):
    with LiveServer(
        ServerSettings(
            model=str(llama3_tiny_path), n_threads=1, n_ctx=256, n_parallel=1, api_keys=KEYS
        )
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


BODY = {"content": "hello"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-key-but-longer"}, {"x-api-key": "nope"},
     {"Authorization": "Bearer"}, {"Authorization": "Basic Zmlyc3Qta2V5"}],
)  # fmt: skip
def test_missing_or_wrong_keys_are_401(client, headers):
    r = client.post("/tokenize", json=BODY, headers=headers)
    assert r.status_code == 401
    assert r.json() == {
        "error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}
    }


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer first-key"}, {"Authorization": "Bearer second-key"}, {"Authorization": "bearer second-key"},
     {"X-Api-Key": "first-key"}, {"Authorization": "second-key"}],
)  # fmt: skip
def test_any_configured_key_is_accepted(client, headers):
    r = client.post("/tokenize", json=BODY, headers=headers)
    assert r.status_code == 200 and r.json()["tokens"] == [15339]


def test_health_and_models_are_public(client):
    assert client.get("/health").status_code == 200
    assert client.get("/v1/health").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/models").status_code == 200
    assert client.get("/props").status_code == 401
    assert (
        client.get("/nope").status_code == 401
    )  # the key is checked before routing, as in llama.cpp


def test_cors_preflight_needs_no_key_and_answers_the_origin(client):
    r = client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://example.com")
    r = client.post("/tokenize", json=BODY, headers={"Origin": "http://example.com"})
    assert r.status_code == 401 and "access-control-allow-origin" in r.headers


def test_the_openai_sdk_sends_its_key(server):
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="second-key", max_retries=0)
    r = good.completions.create(model="m", prompt="Hi", max_tokens=2)
    assert len(r.choices) == 1
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="Hi", max_tokens=2)


def test_every_key_is_compared_in_constant_time(monkeypatch, server):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("http_api.app.hmac.compare_digest", spy)
    gate = Gate(lambda *a: None, server.state)
    for given in (b"Bearer first-key", b"Bearer wrong", b"Bearer second-key"):
        calls.clear()
        ok = gate._authorized({"headers": [(b"authorization", given)]})
        assert ok == (given != b"Bearer wrong")
        assert [b for _, b in calls] == [k.encode() for k in KEYS]  # no early exit on a match
