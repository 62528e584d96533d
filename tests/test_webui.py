"""The bundled web page: served at / from package data, open without a key and while loading, replaced by --path."""

import threading
from pathlib import Path

import httpx
import pytest

from http_api.cli import ServerSettings
from http_api.pages import WEBUI_DIR
from http_api.state import ServerState
from http_api.testing import LiveServer
from runtime.errors import GGUFError

ROOT = Path(__file__).parent.parent
KEY = "page-key"
FILES = {
    "/": "text/html",
    "/index.html": "text/html",
    "/app.js": "text/javascript",
    "/completion.js": "text/javascript",
    "/style.css": "text/css",
}


@pytest.fixture(scope="module")
def client(llama3_tiny_path):
    settings = ServerSettings(
        model=str(llama3_tiny_path), n_threads=1, n_ctx=256, n_parallel=1, api_keys=(KEY,)
    )
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("path,kind", FILES.items())
def test_the_page_loads_without_a_key(client, path, kind):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert client.head(path).status_code == 200


def test_the_api_still_needs_the_key(client):
    assert client.post("/completion", json={"prompt": "x", "n_predict": 1}).status_code == 401
    assert client.get("/props").status_code == 401
    assert client.get("/missing.js").status_code == 401  # not a file of the page: checked first
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/props", headers=auth).json()["webui"] is True
    r = client.get("/missing.js", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_routes_keep_their_own_answers(client):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/completion", headers=auth).status_code == 405  # a POST route
    assert client.post("/index.html", headers=auth).status_code == 404  # files are GET only
    assert client.post("/v1/nope", headers=auth).status_code == 404
    assert client.get("/../pyproject.toml", headers=auth).status_code == 404


def test_completion_js_exports_the_llama_cpp_helpers():
    text = (WEBUI_DIR / "completion.js").read_text()
    assert "export async function* llama(prompt, params = {}, config = {})" in text
    for name in ("llamaPromise", "llamaEventTarget", "llamaModelInfo", "llamaComplete"):
        assert f"export const {name} =" in text


def test_the_page_uses_relative_urls_only():
    """Served from the server itself, also behind a proxy's path prefix: no absolute paths."""
    html = (WEBUI_DIR / "index.html").read_text()
    assert 'src="app.js"' in html and 'href="style.css"' in html
    app = (WEBUI_DIR / "app.js").read_text()
    assert 'from "./completion.js"' in app and 'new URL(".", location.href)' in app


def test_the_files_ship_as_package_data():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"http_api" = ["webui/*"]' in pyproject
    assert "recursive-include http_api/webui" in (ROOT / "MANIFEST.in").read_text()


@pytest.fixture
def never_loaded():
    """A server state whose model is still loading until the test ends."""
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        raise GGUFError("never loads")

    def make(settings):
        return ServerState(settings, loader=slow_loader)

    yield make
    release.set()


def test_the_page_is_served_while_the_model_loads(never_loaded):
    settings = ServerSettings(model="model.gguf", api_keys=(KEY,))
    with (
        LiveServer(settings, state=never_loaded(settings), wait_loaded=False) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        assert c.get("/").status_code == 200 and c.get("/completion.js").status_code == 200
        r = c.post("/completion", json={"prompt": "x"}, headers={"x-api-key": KEY})
        assert r.status_code == 503


def test_path_replaces_the_bundled_page(tmp_path, never_loaded):
    (tmp_path / "index.html").write_text("<html>mine</html>")
    settings = ServerSettings(model="model.gguf", static_path=str(tmp_path), api_keys=(KEY,))
    with (
        LiveServer(settings, state=never_loaded(settings), wait_loaded=False) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        assert c.get("/").text == "<html>mine</html>"
        assert c.get("/completion.js").status_code == 503  # not a file of this page: gated
