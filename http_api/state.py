"""The server's shared state: settings, the model loading in the background, then the engine and its helpers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from http_api.cli import ServerSettings
from http_api.errors import APIError
from runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from grpc_api.server import GrpcServer
    from runtime.async_engine import AsyncEngine
    from runtime.chat_template import ChatTemplate
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.loader import LoadedModel
    from runtime.request import Timings
    from runtime.tokenizer import Tokenizer

log = logging.getLogger("gguf_serve")

BUILD_INFO = "gguf-serve 0.1.0"


@dataclass
class Loaded:
    """What exists once the model is up."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    template: ChatTemplate
    model_path: str
    metadata: dict[str, Any]
    n_ctx: int  # tokens one request may hold (the shared pool, capped by the training context)
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_params: int
    size: int  # bytes of the file


@dataclass
class RequestTotals:
    """Timings summed over finished requests (llama.cpp's prompt/predicted seconds for /metrics)."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0

    def add(self, t: Timings) -> None:
        self.prompt_n += t.prompt_n
        self.prompt_ms += t.prompt_ms
        self.predicted_n += t.predicted_n
        self.predicted_ms += t.predicted_ms


def engine_config(settings: ServerSettings) -> EngineConfig:
    """The engine's settings from the command line (-c 0 resolved once the model is read)."""
    from runtime.config import EngineConfig
    from runtime.default_model import default_model_path

    path = settings.model or str(default_model_path())
    return EngineConfig(
        model_path=path,
        device=settings.device,
        n_gpu_layers=settings.n_gpu_layers,
        dtype=settings.dtype,
        n_ctx=settings.n_ctx or 4096,
        n_parallel=settings.n_parallel,
        n_batch=settings.n_batch,
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads_batch,
        weights=settings.weights,
        use_mmap=settings.use_mmap,
        mlock=settings.mlock,
        gemm_dtype=settings.gemm_dtype,
        head_dtype=settings.head_dtype,
        decode_dtype=settings.decode_dtype,
        embeddings=settings.embedding,
        pooling=settings.pooling,
        max_queue=settings.max_queue,
        slot_save_path=settings.slot_save_path,
    )


def _load(settings: ServerSettings) -> tuple[EngineConfig, LoadedModel]:
    """Read the model (this rank's shard under torchrun) and settle the engine's settings."""
    from runtime import parallel
    from runtime.loader import load_for

    cfg = engine_config(settings)
    loaded = load_for(cfg, parallel.joined())
    if settings.n_ctx == 0:  # llama.cpp's -c 0: the model's training context
        cfg = replace(cfg, n_ctx=loaded.config.context_length)
    return cfg, loaded


def load_engine(settings: ServerSettings) -> Engine:
    """The real loader: resolve the model path, read the file, size the KV pool, build the engine."""
    from runtime.engine import Engine

    engine = Engine(*_load(settings))
    if settings.warmup:  # before /health turns 200, as llama.cpp's server does
        log.info("warmed up in %.2f s (--no-warmup skips it)", engine.warm_up())
    return engine


def serve_tensor_parallel_rank(settings: ServerSettings) -> int:
    """A torchrun rank > 0: load its shard and follow rank 0's steps until it stops (no ports bound)."""
    from runtime.tp_worker import run_worker

    cfg, loaded = _load(settings)
    run_worker(loaded, cfg)
    return 0


@dataclass
class ServerState:
    """Shared by every route; `loaded` is None until the background load finishes."""

    settings: ServerSettings
    loader: Callable[[ServerSettings], Engine] = load_engine
    status: str = "loading"  # "loading" | "ready" | "error"
    error: str = ""
    loaded: Loaded | None = None
    totals: RequestTotals = field(default_factory=RequestTotals)
    started: float = field(default_factory=time.time)
    draining: bool = False  # SIGTERM came: in-flight work finishes, new work is refused
    grpc: GrpcServer | None = None  # the gRPC server beside HTTP, when --grpc-port is set
    _thread: threading.Thread | None = None

    @cached_property
    def defaults(self) -> SamplingParams:
        """Sampler settings of a request that sets none (llama.cpp's defaults, -n from the command line)."""
        return SamplingParams(n_predict=self.settings.n_predict)

    @property
    def model_name(self) -> str:
        """What clients see as the model id: the alias, else the path as given (llama.cpp's choice)."""
        if self.settings.alias:
            return self.settings.alias
        if self.loaded is not None:
            return self.loaded.model_path
        return self.settings.model or "default"

    def start_loading(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._load, name="gguf-serve-load", daemon=True)
            self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status == "ready"

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            engine = self.loader(self.settings)
            self.loaded = _describe(engine, self.settings)
        except Exception as e:  # reported by /health and every route, the process stays up
            log.error("loading the model failed: %s", e, exc_info=not _is_user_error(e))
            self.error = f"loading the model failed: {e}"
            self.status = "error"
            return
        self.status = "ready"
        log.info("model %s loaded in %.1f s", self.loaded.model_path, time.perf_counter() - t0)

    def require(self) -> Loaded:
        """The loaded model, or the error llama.cpp answers while loading / after a failed load."""
        if self.draining:
            from runtime.errors import ShuttingDownError

            raise ShuttingDownError("the server is shutting down")
        if self.loaded is not None and self.status == "ready":
            return self.loaded
        if self.status == "error":
            raise APIError(500, self.error)
        raise APIError(503, "Loading model")

    def shutdown(self) -> None:
        if self.loaded is not None:
            self.loaded.engine.shutdown()


def _is_user_error(e: Exception) -> bool:
    from runtime.errors import GGUFServeError

    return isinstance(e, GGUFServeError)


def _describe(engine: Engine, settings: ServerSettings) -> Loaded:
    from runtime.async_engine import AsyncEngine
    from runtime.chat_template import ChatTemplate

    model = engine.loaded
    metadata = dict(model.gguf.metadata)
    template = ChatTemplate.from_metadata(metadata, settings.chat_template)
    n_params = (
        sum(p.numel() for p in model.model.parameters())
        if hasattr(model.model, "parameters")
        else 0
    )
    path = Path(model.path)
    ae = AsyncEngine(engine)
    ae.start()
    return Loaded(
        engine=ae,
        tokenizer=engine.tokenizer,
        template=template,
        model_path=str(settings.model or path),
        metadata=metadata,
        n_ctx=engine.max_seq_len,
        n_ctx_train=model.config.context_length,
        n_vocab=model.config.vocab_size,
        n_embd=model.config.hidden,
        n_params=int(n_params),
        size=path.stat().st_size if path.is_file() else 0,
    )
