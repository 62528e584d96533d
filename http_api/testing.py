"""LiveServer: the real app under uvicorn on a free loopback port, in a background thread (for tests and embedding)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from types import TracebackType

import torch
import uvicorn

from http_api.app import create_app
from http_api.cli import ServerSettings
from http_api.server import uvicorn_config
from http_api.state import ServerState


class LiveServer:
    """`with LiveServer(settings) as srv:` serves at srv.url until the block ends."""

    def __init__(
        self, settings: ServerSettings, state: ServerState | None = None, wait_loaded: bool = True
    ) -> None:
        # A free port, handed to uvicorn by number: a pre-bound socket given to uvicorn loses
        # TCP_NODELAY, and every reused connection then waits 40 ms for a delayed ACK.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.settings = replace(settings, host="127.0.0.1", port=self.port)
        self.state = state or ServerState(self.settings)
        self.state.settings = self.settings
        self.app = create_app(self.state)
        self.server = uvicorn.Server(uvicorn_config(self.settings, self.app))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.wait = wait_loaded

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.ssl_cert_file else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self._torch_threads = torch.get_num_threads()  # -t sets it process-wide: put it back after
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        if self.wait and not self.state.wait_loaded(300):
            raise RuntimeError(f"the model did not load: {self.state.error}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        torch.set_num_threads(self._torch_threads)
