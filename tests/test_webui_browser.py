"""The web page in a real browser (Debian's headless Chromium, driven by Playwright): chat, completion, stop, completion.js."""

import os
import shutil
import time

import httpx
import pytest
from playwright.sync_api import sync_playwright

from http_api.cli import ServerSettings
from http_api.testing import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "browser-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_MS = 60_000


def _need(ok: bool, why: str) -> None:
    """Skip on a developer's machine without the browser; in CI a missing browser is a failure."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: the browser test must run; scripts/test installs it)")
    pytest.skip(f"{why}: scripts/test installs Debian's chromium when run as root")


@pytest.fixture(scope="module")
def browser():
    _need(os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM}")
    with sync_playwright() as pw:
        # --no-sandbox: Chromium's sandbox refuses to start as root (containers, CI).
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(llama3_tiny_path):
    settings = ServerSettings(
        model=str(llama3_tiny_path), n_threads=1, n_ctx=2048, n_parallel=2, api_keys=(KEY,)
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_selector("body[data-ready=true]")
    yield pg
    context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def settle(page, n_predict: int, key: str = KEY, temperature: str = "0") -> None:
    page.fill("#api-key", key)
    page.fill("#temperature", temperature)
    page.fill("#n_predict", str(n_predict))


def record(page, selector: str) -> None:
    """Keep every text the element shows, to count the streamed updates."""
    page.evaluate(
        """(sel) => {
            window.seen = [];
            const el = document.querySelector(sel);
            new MutationObserver(() => window.seen.push(el.textContent))
                .observe(el, {childList: true, characterData: true, subtree: true});
        }""",
        selector,
    )


def wait_done(page) -> str:
    page.wait_for_function(
        "() => document.querySelector('#send').disabled === false"
        " && document.querySelector('#status').textContent !== 'generating…'"
        " && document.querySelector('#status').textContent !== ''"
    )
    return page.text_content("#status")


def test_completion_mode_streams_the_greedy_text(page, api):
    prompt, n = "Once upon a time", 24
    want = api.post(
        "/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0, "stop": []}
    ).json()
    assert want["tokens_predicted"] > 2
    page.click("#mode-completion")
    settle(page, n)
    page.fill("#prompt", prompt)
    record(page, "#output")
    page.click("#send")
    assert wait_done(page).startswith("done")
    assert page.text_content("#output") == want["content"]
    seen = page.evaluate("window.seen")
    assert len(set(seen)) > 2, seen  # streamed: the text grew chunk by chunk


def test_chat_mode_streams_the_assistant_reply(page, api):
    text, n = "Tell me about paged attention.", 20
    want = api.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "temperature": 0, "n_predict": n},
    ).json()
    reply = want["choices"][0]["message"]["content"]
    assert reply
    settle(page, n)
    page.fill("#prompt", text)
    record(page, "#messages")
    page.press("#prompt", "Enter")
    assert wait_done(page).startswith("done")
    assert page.text_content(".msg.user .content") == text
    assert page.text_content(".msg.assistant .content") == reply
    assert page.input_value("#prompt") == ""  # sent: the box is empty again
    assert len(set(page.evaluate("window.seen"))) > 2


def test_a_request_without_the_key_says_so(page):
    settle(page, 4, key="")
    page.fill("#prompt", "Hi")
    page.click("#send")
    status = wait_done(page)
    assert status.startswith("401") and page.get_attribute("#status", "class") == "error"


def test_stop_aborts_the_request_in_the_engine(page, server):
    engine = server.state.loaded.engine
    page.click("#mode-completion")
    settle(page, 1500, temperature="1")
    page.fill("#prompt", "A very long story:")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#output').textContent.length > 0")
    page.click("#stop")
    assert wait_done(page) == "stopped"
    deadline = time.monotonic() + 10
    while engine.stats().requests_processing:  # the disconnect aborted it
        assert time.monotonic() < deadline, "the stopped request still runs"
        time.sleep(0.02)


def test_completion_js_llama_generator(page, api):
    prompt, n = "The capital of France is", 12
    want = api.post(
        "/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0, "stop": []}
    ).json()
    got = page.evaluate(
        """async ([prompt, n, key]) => {
            const { llama, llamaPromise, llamaModelInfo } = await import("/completion.js");
            const chunks = [];
            const params = { n_predict: n, temperature: 0, stop: [], api_key: key };
            for await (const chunk of llama(prompt, params)) chunks.push(chunk.data);
            const whole = await llamaPromise(prompt, params);
            const info = await llamaModelInfo();
            let denied = null;
            try {
                for await (const _ of llama(prompt, { n_predict: 1 })) {}
            } catch (e) {
                denied = { message: e.message, code: e.code };
            }
            return { chunks, whole, info, denied };
        }""",
        [prompt, n, KEY],
    )
    chunks = got["chunks"]
    assert len(chunks) > 2 and chunks[-1]["stop"] is True
    assert "".join(c["content"] for c in chunks) == want["content"] == got["whole"]
    assert got["info"]["n_predict"] == n  # the last request's settings, as llama.cpp's does
    assert got["denied"] == {"message": "Invalid API Key", "code": 401}
