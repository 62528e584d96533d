"""The web page at /: the bundled UI (http_api/webui/) or --path's directory, for paths no API route takes."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

# Package data (pyproject's [tool.setuptools.package-data]): index.html, app.js, completion.js, style.css.
WEBUI_DIR = Path(__file__).parent / "webui"


class Pages:
    """The router's fallback: static files for GET/HEAD, a 404 for anything else.

    Sitting where the router's 404 would (not mounted at "/"), it leaves the API's
    own answers alone: a POST to an unknown path is a 404 and a GET to a POST route a 405.
    """

    def __init__(self, directory: str | os.PathLike[str], routes: Sequence[BaseRoute]) -> None:
        self.files = StaticFiles(directory=directory, html=True)
        self.routes = routes  # the app's routes, read at request time (they win over files)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(status_code=404)
        await self.files(scope, receive, send)

    def serves(self, scope: Scope) -> bool:
        """Whether the request is for one of the page's files: those load without an API key
        and while the model loads, as llama.cpp serves its web UI."""
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return False
        if any(route.matches(scope)[0] is not Match.NONE for route in self.routes):
            return False
        try:
            path = self.files.get_path(scope)
            _, found = self.files.lookup_path(path)
            if found is not None and stat.S_ISDIR(found.st_mode):
                _, found = self.files.lookup_path(os.path.join(path, "index.html"))
        except (OSError, ValueError):  # a name too long, a NUL byte: no file of ours
            return False
        return found is not None and stat.S_ISREG(found.st_mode)
