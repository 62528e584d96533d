"""`gguf-serve` command line: llama.cpp's server flags, spellings and defaults, parsed into ServerSettings."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config import DECODE_DTYPES, DTYPES, GEMM_DTYPES, HEAD_DTYPES, WEIGHTS

log = logging.getLogger("gguf_serve")

MAX_BODY_BYTES = 16 << 20  # request bodies above this answer 413


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs from its command line (and nothing from the environment)."""

    model: str | None = None  # None: the bundled default model
    alias: str | None = None
    n_ctx: int = 4096  # 0: the model's training context
    n_parallel: int = 4
    n_batch: int = 512  # tokens per engine step: llama.cpp's physical batch (-ub, capped by -b)
    n_threads: int = 0
    n_threads_batch: int = 0  # 0: n_threads
    n_predict: int = -1
    dtype: str = "float32"
    weights: str = "quant"
    use_mmap: bool = True  # quant weights as views of the file's memory map (--no-mmap: copies)
    mlock: bool = False  # keep the weights' pages in RAM
    warmup: bool = True  # run a short prompt through the model before serving (llama.cpp's --warmup)
    shutdown_timeout: float = 30.0  # SIGTERM: seconds requests in flight get before they are aborted
    gemm_dtype: str = "bfloat16"
    head_dtype: str = "auto"  # the output head's products: bfloat16 or float32 (auto: bfloat16 for a quantized CPU head)
    decode_dtype: str = "auto"  # decode rows' products: int8 activations as llama.cpp's CPU kernels, or float32
    device: str = "cpu"
    n_gpu_layers: int | None = None  # -ngl: the last N layers on --device, the rest on the CPU; None: all
    main_gpu: int | None = None  # -mg: rank 0's GPU (rank r uses main_gpu + r)
    tensor_split: str | None = None  # -ts: an even split, one part per torchrun process
    host: str = "127.0.0.1"
    port: int = 8080
    static_path: str | None = None
    api_keys: tuple[str, ...] = ()
    ssl_key_file: str | None = None
    ssl_cert_file: str | None = None
    timeout: int = 600
    metrics: bool = False
    slots: bool = True
    chat_template: str | None = None  # a built-in name or Jinja source
    log_format: str = "text"
    log_disable: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    grpc_port: int = 0  # 0: no gRPC server (the command line's default is 50051)
    embedding: bool = False  # --embedding(s): the embedding routes answer
    pooling: str | None = None  # --pooling; None: the model's own
    max_queue: int = 0  # waiting requests at most; 0: no limit (the flag defaults to 1024)
    slot_save_path: str | None = None  # POST /slots/{id}?action=... files live here; None: off
    http: bool = True  # False: gRPC only


# flag -> why it stops the start: features not built yet, or impossible on these machines.
_NOT_SUPPORTED = {
    "model_url": "-mu/--model-url: gguf-serve does not download models; pass a local file with -m",
    "hf_repo": "-hf/--hf-repo: gguf-serve does not download models; pass a local file with -m",
    "hf_file": "-hff/--hf-file: gguf-serve does not download models; pass a local file with -m",
    "lora": "--lora is not supported yet",
    "lora_base": "--lora-base is not supported yet",
    "mmproj": "--mmproj is not supported yet (no multimodal models)",
    "grp_attn_n": "--grp-attn-n (self-extend) is not supported yet",
    "grp_attn_w": "--grp-attn-w (self-extend) is not supported yet",
    "system_prompt_file": "-spf/--system-prompt-file is not supported (removed from llama.cpp's server too)",
    "no_cont_batching": "-nocb/--no-cont-batching: continuous batching cannot be turned off",
    "numa": "--numa is not supported yet",
}


# (group, flags, argparse keywords); llama.cpp's spellings, defaults and --help grouping.
_Flag = tuple[str, tuple[str, ...], dict[str, Any]]
_COMMON, _SERVER, _OURS = (
    "----- common params -----",
    "----- server params -----",
    "----- gguf-serve params -----",
)
_FLAGS: list[_Flag] = [
    (_COMMON, ("-t", "--threads"), dict(type=int, default=-1, metavar="N", help="CPU threads (default: -1, torch's choice)")),
    (_COMMON, ("-tb", "--threads-batch"), dict(type=int, default=-1, metavar="N", help="threads for prompt batches (default: --threads)")),
    (_COMMON, ("-c", "--ctx-size"), dict(type=int, default=4096, metavar="N", help="KV cache tokens, shared by all slots (default: 4096, 0 = from model)")),
    (_COMMON, ("-n", "--predict", "--n-predict"), dict(dest="n_predict", type=int, default=-1, metavar="N", help="tokens to predict at most (default: -1, -1 = infinity)")),
    (_COMMON, ("-b", "--batch-size"), dict(type=int, default=2048, metavar="N", help="logical maximum batch size (default: 2048)")),
    (_COMMON, ("-ub", "--ubatch-size"), dict(type=int, default=512, metavar="N", help="physical maximum batch size (default: 512)")),
    (_COMMON, ("-np", "--parallel"), dict(type=int, default=4, metavar="N", help="number of slots: parallel requests (default: 4)")),
    (_COMMON, ("-cb", "--cont-batching"), dict(action="store_true", help="continuous batching (always on)")),
    (_COMMON, ("-nocb", "--no-cont-batching"), dict(action="store_true", default=None, help="(not supported)")),
    (_COMMON, ("--warmup",), dict(dest="warmup", action="store_true", default=True, help="run a short prompt through the model before serving (default)")),
    (_COMMON, ("--no-warmup",), dict(dest="warmup", action="store_false", help="serve without the warm-up run")),
    (_COMMON, ("--mlock",), dict(action="store_true", help="keep the model's pages in RAM (mlock; a warning if the limit refuses)")),
    (_COMMON, ("--no-mmap",), dict(action="store_true", help="copy the quantized weights into memory instead of mapping the file")),
    (_COMMON, ("--numa",), dict(metavar="TYPE", help="NUMA optimizations (not supported yet)")),
    (_COMMON, ("-ngl", "--gpu-layers", "--n-gpu-layers"), dict(dest="n_gpu_layers", metavar="N", help="partial offload: the last N layers on --device (cuda), the rest on the CPU; N > n_layers also moves the output head; 0 = CPU only; all/auto/-1 = everything on --device")),
    (_COMMON, ("-mg", "--main-gpu"), dict(type=int, metavar="INDEX", help="GPU index when --device is cuda (under torchrun: rank 0's; rank r uses INDEX + r)")),
    (_COMMON, ("-ts", "--tensor-split"), dict(metavar="SPLIT", help="tensor-parallel split, e.g. 1,1: only even, one part per torchrun process (scripts/launch_torchrun.sh)")),
    (_COMMON, ("-m", "--model"), dict(metavar="FNAME", help="GGUF model path (default: the bundled Gemma 3 270M Q4_K_M)")),
    (_COMMON, ("-mu", "--model-url"), dict(metavar="URL", help="(not supported: no downloads)")),
    (_COMMON, ("-hf", "-hfr", "--hf-repo"), dict(dest="hf_repo", metavar="REPO", help="(not supported: no downloads)")),
    (_COMMON, ("-hff", "--hf-file"), dict(metavar="FILE", help="(not supported: no downloads)")),
    (_COMMON, ("--lora",), dict(metavar="FNAME", help="LoRA adapter (not supported yet)")),
    (_COMMON, ("--lora-base",), dict(metavar="FNAME", help="LoRA base model (not supported yet)")),
    (_COMMON, ("--mmproj",), dict(metavar="FILE", help="multimodal projector (not supported yet)")),
    (_COMMON, ("-gan", "--grp-attn-n"), dict(type=int, metavar="N", help="self-extend factor (not supported yet)")),
    (_COMMON, ("-gaw", "--grp-attn-w"), dict(type=int, metavar="N", help="self-extend width (not supported yet)")),
    (_COMMON, ("--log-disable",), dict(action="store_true", help="disable logging")),
    (_COMMON, ("--log-format",), dict(choices=("json", "text"), default="text", help="log output format (default: text)")),
    (_SERVER, ("--host",), dict(default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")),
    (_SERVER, ("--port",), dict(type=int, default=8080, help="port to listen on (default: 8080)")),
    (_SERVER, ("--path",), dict(metavar="PATH", help="directory of static files to serve at /")),
    (_SERVER, ("-a", "--alias"), dict(metavar="STRING", help="model name shown to clients (default: the model path)")),
    (_SERVER, ("--api-key",), dict(action="append", default=[], metavar="KEY", help="API key (repeatable)")),
    (_SERVER, ("--api-key-file",), dict(metavar="FNAME", help="file with API keys, one per line")),
    (_SERVER, ("--ssl-key-file",), dict(metavar="FNAME", help="PEM private key for TLS")),
    (_SERVER, ("--ssl-cert-file",), dict(metavar="FNAME", help="PEM certificate for TLS")),
    (_SERVER, ("-to", "--timeout"), dict(type=int, default=600, metavar="N", help="idle connection timeout, seconds (default: 600)")),
    (_SERVER, ("--threads-http",), dict(type=int, default=-1, metavar="N", help="accepted: one asyncio loop serves requests")),
    (_SERVER, ("--embedding", "--embeddings"), dict(dest="embedding", action="store_true", help="enable the embedding routes (/embedding, /v1/embeddings)")),
    (_SERVER, ("--pooling",), dict(choices=("none", "mean", "cls", "last", "rank"), help="pooling type for embeddings, use model default if unspecified")),
    (_SERVER, ("--metrics",), dict(action="store_true", help="enable the Prometheus /metrics endpoint")),
    (_SERVER, ("--slots",), dict(dest="slots", action="store_true", default=True, help="enable /slots (default)")),
    (_SERVER, ("--no-slots", "--slots-endpoint-disable"), dict(dest="slots", action="store_false", help="disable /slots")),
    (_SERVER, ("--slot-save-path",), dict(metavar="PATH", help="directory for slot save/restore files (default: slot actions off)")),
    (_SERVER, ("-spf", "--system-prompt-file"), dict(metavar="FNAME", help="(not supported)")),
    (_SERVER, ("--chat-template",), dict(metavar="JINJA_TEMPLATE", help="built-in template name or Jinja source")),
    (_SERVER, ("--chat-template-file",), dict(metavar="FNAME", help="file holding a Jinja chat template")),
    (_OURS, ("--shutdown-timeout",), dict(type=float, default=30.0, metavar="SECONDS", help="on SIGTERM, requests in flight get this long to finish before they are aborted (default: 30)")),
    (_OURS, ("--max-queue",), dict(type=int, default=1024, metavar="N", help="requests waiting for a slot at most; more answer 503 (default: 1024, 0 = no limit)")),
    (_OURS, ("--dtype",), dict(choices=sorted(DTYPES), default="float32", help="activation and dense weight dtype")),
    (_OURS, ("--gemm-dtype",), dict(choices=GEMM_DTYPES, default="bfloat16", help="GEMMs of --weights quant on the CPU: bfloat16 multiplies prompt rows with bfloat16 operands and float32 sums (AVX512-BF16) and runs large decode batches on the bfloat16 units at ~float32 accuracy; int8: the same, but prompt rows with activations quantized to int8 per 32 values and VNNI dot products (llama.cpp's numerics, ~18%% faster prompts); float32: plain IEEE")),
    (_OURS, ("--head-dtype",), dict(choices=HEAD_DTYPES, default="auto", help="the output head's products (the logits): bfloat16 rounds the hidden state and the head's weights to bfloat16 and sums in float32 (~2.6x faster for batches with AVX512-BF16; llama.cpp's head quantizes activations to 8 bits); int8: activations quantized to int8 per 32 values, as llama.cpp's (a Q6_K head of a Llama-3-8B-shaped model: decode 6.0 -> 6.7 tok/s, slower for batches of 4 or more); float32: exact; auto: bfloat16 for a quantized head on the CPU")),
    (_OURS, ("--decode-dtype",), dict(choices=DECODE_DTYPES, default="auto", help="the layers' products for decode rows (a generated token fed back): int8 quantizes their activations per 32 values as llama.cpp's CPU kernels do (AVX512-VNNI dot products: the layers' share of a decode step ~1.8x faster); float32: float32 products; auto (default): int8 for weights in blocks on a CPU with AVX512-VNNI")),
    (_OURS, ("--weights",), dict(choices=WEIGHTS, default="quant", help="quant: weights stay in GGUF blocks (quantized kernels); dense: dequantized to --dtype at load")),
    (_OURS, ("--grpc-port",), dict(type=int, default=50051, help="gRPC port beside HTTP, same engine (default: 50051; 0 disables)")),
    (_OURS, ("--no-http",), dict(dest="http", action="store_false", help="serve gRPC only")),
    (_OURS, ("--device",), dict(default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default: cpu)")),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gguf-serve",
        description="llama.cpp-compatible HTTP server (llama.cpp and OpenAI routes) for GGUF models.",
        allow_abbrev=False,
    )
    groups = {name: p.add_argument_group(name) for name in (_COMMON, _SERVER, _OURS)}
    for group, flags, kw in _FLAGS:
        groups[group].add_argument(*flags, **kw)
    return p


class UsageError(Exception):
    """A flag that cannot be honoured; its message is one line for the user."""


def parse_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """Parse and check the command line; raises UsageError for what cannot run."""
    a = build_parser().parse_args(argv)
    for name, why in _NOT_SUPPORTED.items():
        if getattr(a, name) is not None:
            raise UsageError(why)
    for flag, value in (
        ("-c/--ctx-size", a.ctx_size),
        ("--port", a.port),
        ("--grpc-port", a.grpc_port),
        ("-to/--timeout", a.timeout),
        ("--max-queue", a.max_queue),
        ("--shutdown-timeout", a.shutdown_timeout),
    ):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    for flag, value in (
        ("-np/--parallel", a.parallel),
        ("-b/--batch-size", a.batch_size),
        ("-ub/--ubatch-size", a.ubatch_size),
    ):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if a.n_predict < -1:
        raise UsageError(f"-n/--n-predict must be -1 or >= 0, got {a.n_predict}")
    if a.pooling == "rank":
        raise UsageError("--pooling rank (reranking) is not supported yet")
    if not a.http and not a.grpc_port:
        raise UsageError("--no-http needs a --grpc-port: there would be nothing to serve")
    if bool(a.ssl_key_file) != bool(a.ssl_cert_file):
        raise UsageError("--ssl-key-file and --ssl-cert-file go together")
    if a.model is not None and not Path(a.model).is_file():
        raise UsageError(f"-m/--model: no such file: {a.model}")
    save_dir = Path(a.slot_save_path or ".")
    if a.slot_save_path is not None and (not a.slot_save_path or save_dir.is_file()):
        raise UsageError(f"--slot-save-path: not a directory: {a.slot_save_path!r}")
    if a.path is not None and not Path(a.path).is_dir():
        raise UsageError(f"--path: no such directory: {a.path}")
    if not math.isfinite(a.shutdown_timeout):  # nan would end the drain at once, inf never
        raise UsageError(f"--shutdown-timeout must be a number of seconds, got {a.shutdown_timeout}")
    if a.tensor_split is not None:
        _check_tensor_split(a.tensor_split)
    device = a.device
    if a.main_gpu is not None:
        if device.startswith("cuda") and ":" not in device:
            device = f"cuda:{a.main_gpu}"
        else:
            log.warning("-mg/--main-gpu %d has no effect with --device %s", a.main_gpu, device)
    n_gpu_layers = _gpu_layers(a.n_gpu_layers)
    if a.n_gpu_layers is not None and device == "cpu":
        log.warning(
            "-ngl/--n-gpu-layers %s has no effect: --device is cpu (use --device cuda)",
            a.n_gpu_layers,
        )
        n_gpu_layers = None
    if n_gpu_layers:
        from runtime.device_map import check_device
        from runtime.errors import InvalidRequestError

        try:
            check_device(device)
        except InvalidRequestError as e:
            raise UsageError(f"-ngl/--n-gpu-layers {n_gpu_layers}: {e}") from None
    return ServerSettings(
        model=a.model,
        alias=a.alias,
        n_ctx=a.ctx_size,
        n_parallel=a.parallel,
        n_batch=min(a.batch_size, a.ubatch_size),
        n_threads=max(a.threads, 0),
        n_threads_batch=max(a.threads_batch, 0),
        n_predict=a.n_predict,
        dtype=a.dtype,
        weights=a.weights,
        use_mmap=not a.no_mmap,
        warmup=a.warmup,
        mlock=a.mlock,
        gemm_dtype=a.gemm_dtype,
        head_dtype=a.head_dtype,
        decode_dtype=a.decode_dtype,
        device=device,
        n_gpu_layers=n_gpu_layers,
        main_gpu=a.main_gpu,
        tensor_split=a.tensor_split,
        host=a.host,
        port=a.port,
        static_path=a.path,
        api_keys=tuple(a.api_key) + _read_keys(a.api_key_file),
        ssl_key_file=a.ssl_key_file,
        ssl_cert_file=a.ssl_cert_file,
        timeout=a.timeout,
        shutdown_timeout=a.shutdown_timeout,
        metrics=a.metrics,
        slots=a.slots,
        chat_template=_chat_template(a.chat_template, a.chat_template_file),
        log_format=a.log_format,
        log_disable=a.log_disable,
        grpc_port=a.grpc_port,
        http=a.http,
        embedding=a.embedding,
        pooling=a.pooling,
        max_queue=a.max_queue,
        slot_save_path=a.slot_save_path,
    )


def _gpu_layers(value: str | None) -> int | None:
    """-ngl N: an int >= 0; all, auto and -1 (llama.cpp's spellings of 'everything') give None."""
    if value is None or value.strip().lower() in ("all", "auto", "-1"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"-ngl/--n-gpu-layers: expected a number of layers, all or auto, got {value!r}")
    return n


def _check_tensor_split(spec: str) -> None:
    """-ts on its own: numbers, all equal (whether their count matches the launch is checked at start)."""
    from runtime.parallel import TensorParallelError, tensor_split

    try:
        tensor_split(spec, max(1, len([x for x in spec.replace("/", ",").split(",") if x.strip()])))
    except TensorParallelError as e:
        raise UsageError(str(e)) from None


def _read_keys(path: str | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--api-key-file: cannot read {path}: {e}") from None
    return tuple(k.strip() for k in lines if k.strip())


def _chat_template(value: str | None, path: str | None) -> str | None:
    from runtime.chat_template import BUILTIN_NAMES

    if value is not None and path is not None:
        raise UsageError("give --chat-template or --chat-template-file, not both")
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--chat-template-file: cannot read {path}: {e}") from None
    if value is not None and value not in BUILTIN_NAMES and "{{" not in value and "{%" not in value:
        raise UsageError(
            f"--chat-template: unknown template {value!r}; built-in: {', '.join(BUILTIN_NAMES)}"
        )
    return value
