"""Client mistakes get a 4xx in the OpenAI error shape (never a 5xx), disabled routes a 501, and the server keeps serving."""

import json
import socket

import httpx
import pytest

from http_api.cli import ServerSettings
from http_api.testing import LiveServer

LIMIT = 64 << 10


@pytest.fixture(scope="module")
def server(llama3_tiny_path):
    settings = ServerSettings(
        model=str(llama3_tiny_path),
        n_threads=1,
        n_ctx=256,
        n_parallel=2,
        slots=False,
        max_body_bytes=LIMIT,
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def still_healthy(client):
    yield
    assert client.get("/health").status_code == 200


def assert_error(r, status, type_="invalid_request_error"):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "type"}
    assert body["error"]["code"] == status and body["error"]["type"] == type_
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize(
    "raw",
    [b"{bad", b"[1, 2]", b'"text"', b"NaN", b'{"prompt": NaN}', b'{"prompt": "x", "n_predict": Infinity}',
     b"\xff\xfe{}", b"[" * 50_000, b'{"prompt": "x", "temperature": 1e999}', b'{"prompt": "x", "seed": 100000000000000000000000000000}'],
)  # fmt: skip
@pytest.mark.parametrize(
    "path", ["/completion", "/v1/chat/completions", "/v1/completions", "/tokenize"]
)
def test_malformed_json_is_400(client, raw, path):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


# A lone UTF-16 surrogate escape is no character: it could not be encoded as UTF-8 later (a 500
# once, found by tests/test_http_fuzz.py); llama.cpp's JSON parser refuses it, and so do we.
@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "a", "stop": ["\\udfff"], "n_predict": 1}', b'{"prompt": "\\ud800", "n_predict": 1}',
     b'{"prompt": "a", "n_predict": 1, "\\uDBFF": 1}', b'{"messages": [{"role": "user", "content": "x\\ud83d"}]}',
     b'{"content": "\\ud83d\\u0041"}', b'{"input": ["ok", {"deep": ["\\udc00"]}]}'],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions", "/tokenize", "/apply-template"])
def test_lone_surrogate_escapes_are_400(client, raw, path):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert "surrogate" in assert_error(r, 400)


def test_an_escaped_surrogate_pair_is_one_character(client):
    raw = b'{"content": "\\ud83d\\ude00", "with_pieces": true}'  # U+1F600, as ensure_ascii JSON sends it
    r = client.post("/tokenize", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    pieces = [t["piece"] for t in r.json()["tokens"]]  # bytes (a list) where not whole UTF-8
    text = b"".join(bytes(p) if isinstance(p, list) else p.encode() for p in pieces)
    assert text.decode() == "\U0001f600"


@pytest.mark.parametrize(
    "body",
    [
        {}, {"prompt": None}, {"prompt": 5}, {"prompt": {"a": 1}}, {"prompt": [1.5]}, {"prompt": [True]},
        {"prompt": [[1, "a"], {"x": 1}]}, {"prompt": []}, {"prompt": [-1]}, {"prompt": [99_999_999]},
        {"prompt": "x", "temperature": "hot"}, {"prompt": "x", "n_predict": "5"}, {"prompt": "x", "stream": "yes"},
        {"prompt": "x", "top_k": 1.5}, {"prompt": "x", "stop": 5}, {"prompt": "x", "stop": [1]},
        {"prompt": "x", "logit_bias": "x"}, {"prompt": "x", "logit_bias": [[1]]}, {"prompt": "x", "logit_bias": [[999_999_999, 1]]},
        {"prompt": "x", "samplers": 5}, {"prompt": "x", "samplers": ["nope"]}, {"prompt": "x", "n_probs": True},
        {"prompt": "x", "id_slot": 99}, {"prompt": "x", "id_slot": "a"}, {"prompt": "x", "seed": -5},
        {"prompt": "x", "temperature": 10**30}, {"prompt": "x", "response_fields": [1]},
        {"prompt": "x", "dry_sequence_breakers": []}, {"prompt": "x", "system_prompt": 3},
    ],
)  # fmt: skip
def test_wrong_types_are_400(client, body):
    assert_error(client.post("/completion", json=body), 400)


@pytest.mark.parametrize(
    "field,value",
    [("top_p", 2), ("min_p", -1), ("mirostat", 3), ("n_probs", 1000), ("n_predict", -5), ("repeat_penalty", 0),
     ("dry_base", 0.5), ("typical_p", 1.5), ("xtc_threshold", -0.1), ("repeat_last_n", -2), ("n_keep", -2),
     ("min_keep", 2**63), ("top_k", 2**63), ("n_discard", 2**63)],  # 64-bit: the fuzz's min_keep was a 500
)  # fmt: skip
def test_out_of_range_values_are_400_naming_the_field(client, field, value):
    message = assert_error(client.post("/completion", json={"prompt": "x", field: value}), 400)
    assert field in message


@pytest.mark.parametrize(
    "body",
    [
        {"image_data": [{"data": "x", "id": 1}]},
        {"lora": [{"id": 0, "scale": 1}]}, {"post_sampling_probs": True},
    ],
)  # fmt: skip
def test_features_not_built_yet_are_a_clear_400(client, body):
    message = assert_error(client.post("/completion", json={"prompt": "x", **body}), 400)
    assert "not supported" in message


@pytest.mark.parametrize(
    "body, start",
    [
        ({"grammar": 'root ::= "a'}, "Failed to parse grammar: "),
        ({"grammar": "root ::= undefined"}, "Failed to parse grammar: "),
        ({"grammar": 5}, "grammar: must be a string"),
        ({"json_schema": {"type": "bogus"}}, "Failed to parse json_schema: "),
        ({"json_schema": {"properties": {"a": {"$ref": "#/$defs/none"}}}}, "Failed to parse json_schema: "),
        ({"json_schema": {}, "grammar": "root ::= x"}, 'Either "json_schema" or "grammar"'),
    ],
)
def test_invalid_grammar_or_schema_is_400_before_queueing(client, body, start):
    for stream in (False, True):
        message = assert_error(client.post("/completion", json={"prompt": "x", "stream": stream, **body}), 400)
        assert message.startswith(start), message


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/chat/completions", {}), ("/v1/chat/completions", {"messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}), ("/v1/chat/completions", {"messages": [], "n": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
        ("/v1/completions", {"prompt": "x", "grammar": "root ::= ["}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": 5}),
        ("/v1/completions", {}), ("/v1/completions", {"prompt": "x", "echo": True}),
        ("/v1/completions", {"prompt": "x", "best_of": 3}), ("/v1/completions", {"prompt": "x", "suffix": "y"}),
        ("/v1/completions", {"prompt": "x", "logprobs": 1000}), ("/v1/completions", {"prompt": "x", "n": 10_000}),
        ("/tokenize", {"content": 5}), ("/tokenize", {"content": [{"a": 1}]}), ("/tokenize", {"content": "x", "add_special": 1}),
        ("/detokenize", {"tokens": ["a"]}), ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": [10**9]}),
        ("/detokenize", {"tokens": "abc"}), ("/apply-template", {}),
    ],
)  # fmt: skip
def test_bad_requests_on_other_routes_are_400(client, path, body):
    assert_error(client.post(path, json=body), 400)


def test_logit_bias_keys_that_look_numeric_but_are_not_ascii_are_text(client):
    """Found by tests/test_http_fuzz.py: the key '¹' passed str.isdigit() and int() raised (a 500)."""
    body = {"messages": [{"role": "user", "content": "x"}], "n_predict": 1}
    r = client.post("/v1/chat/completions", json={**body, "logit_bias": {"\u00b9": 1, "--5": 2}})
    assert r.status_code == 200, r.text


def test_unknown_fields_are_ignored(client):
    r = client.post(
        "/completion", json={"prompt": "x", "n_predict": 1, "foo": "bar", "nested": {"a": [1]}}
    )
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 1


def test_an_oversized_body_is_413(client):
    big = b'{"prompt": "' + b"a" * LIMIT + b'"}'
    assert_error(
        client.post("/completion", content=big, headers={"content-type": "application/json"}), 413
    )

    def chunks():  # no content-length: the limit is counted as the body arrives
        for _ in range(LIMIT // 1024 + 2):
            yield b" " * 1024

    assert_error(client.post("/completion", content=chunks()), 413)


def test_routes_and_methods_that_do_not_exist(client):
    assert_error(client.get("/nope"), 404, "not_found_error")
    assert_error(client.post("/v1/nope", json={}), 404, "not_found_error")
    assert_error(client.get("/completion"), 405)


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/metrics"), ("GET", "/slots"), ("POST", "/slots/0?action=save"),
     ("POST", "/embedding"), ("POST", "/embeddings"), ("POST", "/v1/embeddings"), ("POST", "/rerank"),
     ("POST", "/props")],
)  # fmt: skip
def test_disabled_or_later_endpoints_are_501(client, method, path):
    assert_error(
        client.request(method, path, json={"content": "x", "input": "x"}),
        501,
        "not_supported_error",
    )


@pytest.mark.parametrize("path", ["/embedding", "/embeddings", "/v1/embeddings"])
def test_embeddings_without_the_flag_answer_as_llama_cpp(client, path):
    r = client.post(path, json={"input": "x"})
    assert r.status_code == 501
    assert r.json()["error"]["message"] == (
        "This server does not support embeddings. Start it with `--embeddings`"
    )


def test_slot_actions_without_the_flag_answer_as_llama_cpp(client):
    r = client.post("/slots/0?action=save", json={"filename": "a.bin"})
    assert r.json()["error"]["message"] == (
        "This server does not support slots action. Start it with `--slot-save-path`"
    )


def test_infill_on_a_model_without_fim_tokens_is_400(client):
    r = client.post("/infill", json={"input_prefix": "a", "input_suffix": "b"})
    assert_error(r, 400)
    assert r.json()["error"]["message"] == (
        "Infill is not supported by this model: "
        "prefix token is missing. suffix token is missing. middle token is missing."
    )


def test_a_rejected_stream_is_a_plain_json_400(client):
    r = client.post("/completion", json={"prompt": [99_999_999], "stream": True})
    assert_error(r, 400)
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "n_predict": 1,
            "logit_bias": [[10**9, 1]],
        },
    )
    assert_error(r, 400)


def test_a_server_fault_is_a_500_on_a_connection_that_stays_open(server, client):
    """An unexpected exception: the OpenAI-shaped 500, and the keep-alive connection serves on."""

    @server.app.get("/test-fault")
    async def fault() -> None:
        raise RuntimeError("a bug")

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        replies = []
        for path in ("/test-fault", "/health"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            replies.append(_read_response(sock))
    (status, body), (status2, _) = replies
    assert status == 500 and json.loads(body)["error"] == {
        "code": 500, "message": "internal error: RuntimeError", "type": "server_error",
    }  # fmt: skip
    assert status2 == 200  # the same socket: not closed after the fault


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from the socket: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = int(next(v for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(lines[0].split()[1]), body
