"""The server as a whole: startup and warm-up, loading in the background, disconnects freeing KV, concurrency, /metrics, /props, /slots."""

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from http_api.cli import ServerSettings, parse_args
from http_api.state import ServerState
from http_api.testing import LiveServer
from runtime.errors import GGUFError
from tests.reference import greedy_cases

ROOT = Path(__file__).parent.parent


def test_gguf_serve_runs_until_interrupted(llama3_tiny_path, tmp_path):
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "http_api.server", "-m", str(llama3_tiny_path), "-c", "256", "-t", "1",
            "--port", str(port), "--log-format", "json"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/completion", json={"prompt": "Hi", "n_predict": 2})
        assert r.json()["tokens_predicted"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e.get("path") == "/completion" and e.get("status") == 200 for e in logs)


# -- loading --------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_500_when_the_load_fails():
    release = threading.Event()

    def slow_broken_loader(settings):
        release.wait(30)
        raise GGUFError("model.gguf: tensor blk.0.attn_q.weight is truncated")

    settings = ServerSettings(model="model.gguf")
    state = ServerState(settings, loader=slow_broken_loader)
    with (
        LiveServer(settings, state=state, wait_loaded=False) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        loading = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
        for path in ("/health", "/v1/health", "/props"):
            r = c.get(path)
            assert r.status_code == 503 and r.json() == loading
        assert c.post("/completion", json={"prompt": "x"}).json() == loading
        assert c.get("/v1/models").status_code == 200  # answered while loading, as llama.cpp does
        release.set()
        state.wait_loaded(30)
        r = c.get("/health")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "truncated" in r.json()["error"]["message"]
        assert c.post("/completion", json={"prompt": "x"}).status_code == 500


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_ssl_key_and_cert_files(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = parse_args(["--ssl-key-file", str(key), "--ssl-cert-file", str(cert)])
    release = threading.Event()

    def never_loads(settings):
        release.wait(30)
        raise GGUFError("not loaded")

    state = ServerState(settings, loader=never_loads)
    with LiveServer(settings, state=state, wait_loaded=False) as srv:
        assert srv.url.startswith("https://")
        r = httpx.get(srv.url + "/health", verify=False)
        release.set()
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"


# -- a working server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama3_tiny_path, tmp_path_factory):
    static = tmp_path_factory.mktemp("static")
    (static / "index.html").write_text("<html>hello</html>")
    settings = ServerSettings(
        static_path=str(static),
        model=str(llama3_tiny_path),
        n_threads=1,
        n_ctx=2048,
        n_parallel=4,
        metrics=True,
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def wait_idle(server, timeout=10.0):
    """Until no request runs and every KV block is free again; returns the engine's stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.state.loaded.engine.stats()
        if (
            stats.requests_processing == 0
            and stats.requests_deferred == 0
            and stats.kv_cache_usage_ratio == 0
        ):
            return stats
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.02)


def test_a_client_leaving_a_stream_frees_its_kv(server, client):
    before = wait_idle(server).generation_tokens_total
    body = {
        "prompt": "Once upon a time",
        "n_predict": 2000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with client.stream("POST", "/completion", json=body) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break
        assert server.state.loaded.engine.stats().requests_processing == 1
    stats = wait_idle(server)  # closing the response closed the connection
    assert stats.generation_tokens_total - before < 200


def test_a_client_leaving_a_non_streamed_request_frees_its_kv(server):
    before = wait_idle(server).generation_tokens_total
    with (
        httpx.Client(base_url=server.url, timeout=0.3) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post(
            "/completion",
            json={"prompt": "Once upon a time", "n_predict": 2000, "ignore_eos": True},
        )
    stats = wait_idle(server)
    assert stats.generation_tokens_total - before < 1000


def test_concurrent_requests_get_what_each_gets_alone(client):
    cases = greedy_cases("llama3_tiny")[:6]

    def one(case):
        return client.post(
            "/completion", json={"prompt": case["prompt"], "n_predict": 16, "temperature": 0}
        ).json()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, cases))
    assert [r["tokens"] for r in results] == [c["tokens"][:16] for c in cases]
    assert {r["id_slot"] for r in results} <= {0, 1, 2, 3}


def test_the_server_n_predict_caps_requests(server):
    from http_api.params import sampling_params

    tok = server.state.loaded.tokenizer
    capped = ServerState(ServerSettings(n_predict=40)).defaults
    assert sampling_params({"n_predict": 10_000}, tok, capped).n_predict == 40
    assert sampling_params({}, tok, capped).n_predict == 40
    assert sampling_params({"max_tokens": 7}, tok, capped).n_predict == 7


def test_metrics_use_llama_cpp_names(client):
    client.post("/completion", json={"prompt": "Hello there", "n_predict": 4})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    for name in ("prompt_tokens_total", "tokens_predicted_total", "prompt_tokens_seconds", "predicted_tokens_seconds",
                 "kv_cache_usage_ratio", "kv_cache_tokens", "requests_processing", "requests_deferred"):  # fmt: skip
        assert f"llamacpp:{name}" in values
    assert (
        values["llamacpp:prompt_tokens_total"] > 0
        and values["llamacpp:tokens_predicted_total"] >= 4
    )
    assert "# TYPE llamacpp:prompt_tokens_total counter" in r.text


def test_props_health_and_slots(client, server):
    props = client.get("/props").json()
    assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 2048
    assert props["default_generation_settings"]["params"]["n_predict"] == -1
    assert props["chat_template"].startswith("{% set loop_messages")
    assert props["bos_token"] == "<|begin_of_text|>" and props["model_path"].endswith(
        "llama3_tiny_f32.gguf"
    )
    health = client.get("/health", params={"include_slots": 1}).json()
    assert health["status"] == "ok" and health["slots_idle"] == 4 and len(health["slots"]) == 4
    slots = client.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and not any(s["is_processing"] for s in slots)


def test_path_serves_static_files_at_the_root(client):
    assert client.get("/").text == "<html>hello</html>"
    assert client.get("/index.html").status_code == 200
    assert client.get("/missing.js").json()["error"]["code"] == 404
    assert client.get("/health").json()["status"] == "ok"  # the routes still win


def test_log_lines_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="gguf_serve.http"):
        client.post("/completion", json={"prompt": "Hi", "n_predict": 2})
        time.sleep(0.05)
    lines = [r for r in caplog.records if r.name == "gguf_serve.http"]
    assert any(
        r.path == "/completion" and r.status == 200 and r.tokens == 2 and r.method == "POST"
        for r in lines
    )


def test_the_json_log_format():
    from http_api.server import JsonFormatter

    record = logging.LogRecord(
        "gguf_serve.http", logging.INFO, __file__, 1, "POST %s", ("/x",), None
    )
    record.status = 200
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "POST /x" and out["level"] == "INFO" and out["status"] == 200


# -- the default model ----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_end_to_end(default_model_path):
    """No -m: the bundled Gemma 3 270M; greedy /completion's first 8 tokens are llama.cpp's."""
    case = greedy_cases("gemma3")[0]
    with (
        LiveServer(ServerSettings(n_ctx=1024, n_parallel=2)) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as c,
    ):
        assert c.get("/health").json()["status"] == "ok"
        res = c.post(
            "/completion", json={"prompt": case["prompt"], "n_predict": 8, "temperature": 0}
        ).json()
        assert res["tokens"] == case["tokens"][:8]
        assert case["content"].startswith(res["content"])
        chat = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 4
    assert sys.modules["http_api.state"].ServerState  # the module stayed importable after shutdown


def test_warm_up_runs_before_serving_and_leaves_nothing_behind(llama3_tiny_path, caplog):
    """llama.cpp's warm-up: the model runs before /health is 200; no counters, cache or slot state remain."""
    from http_api.state import load_engine

    settings = ServerSettings(model=str(llama3_tiny_path), n_ctx=256, n_parallel=2)
    with caplog.at_level(logging.INFO, logger="gguf_serve"):
        engine = load_engine(settings)
    assert any("warmed up in" in r.getMessage() for r in caplog.records)
    stats = engine.stats()
    assert (stats.prompt_tokens_total, stats.generation_tokens_total, stats.steps_total) == (0, 0, 0)
    assert engine.num_free_blocks == engine.blocks.num_blocks and stats.kv_cache_tokens == 0
    assert all(not t for t in engine.scheduler.slot_tokens.values())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gguf_serve"):
        load_engine(replace(settings, warmup=False))
    assert not any("warmed up" in r.getMessage() for r in caplog.records)
