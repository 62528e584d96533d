"""Command-line entry points: `gguf-serve` (interactive until the HTTP API lands) and `gguf-serve-generate`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from runtime.config import DECODE_DTYPES, DTYPES, GEMM_DTYPES, HEAD_DTYPES, WEIGHTS, EngineConfig
from runtime.errors import GGUFServeError
from runtime.sampling_params import SamplingParams


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate text with a GGUF model.")
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled Gemma 3 270M Q4_K_M)")
    p.add_argument("-p", "--prompt", help="prompt text; without it, read prompts from stdin")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until EOS)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed (-1: random)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="KV cache size in tokens")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("-tb", "--threads-batch", type=int, default=0, help="threads for the prompt (0: -t)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="activation/weight dtype")
    p.add_argument(
        "--gemm-dtype", choices=GEMM_DTYPES, default="bfloat16",
        help="GEMMs of --weights quant on the CPU: prompt rows with bfloat16 operands (default), int8 activations (llama.cpp's numerics, faster) or IEEE",
    )  # fmt: skip
    p.add_argument(
        "--head-dtype", choices=HEAD_DTYPES, default="auto",
        help="the output head's products: bfloat16 operands with float32 sums (auto: for a quantized head on the CPU), int8 activations per 32 values (llama.cpp's numerics; faster single-stream decode for large heads) or float32",
    )  # fmt: skip
    p.add_argument(
        "--decode-dtype", choices=DECODE_DTYPES, default="auto",
        help="decode rows' products: int8 activations per 32 values as llama.cpp's CPU kernels (AVX512-VNNI: faster decode), float32, or auto (int8 where that is fast)",
    )  # fmt: skip
    p.add_argument(
        "--weights", choices=WEIGHTS, default="quant",
        help="quant: keep GGUF blocks and run quantized kernels; dense: dequantize at load",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-special", action="store_true", help="do not parse special tokens in the prompt")
    p.add_argument("--verbose-prompt", action="store_true", help="print the prompt's token ids")
    return p


def _run(args: argparse.Namespace) -> int:
    from runtime.allocator import keep_freed_memory
    from runtime.default_model import default_model_path
    from runtime.engine import Engine
    from runtime.tokenizer import IncrementalDetokenizer

    keep_freed_memory()

    path = args.model or str(default_model_path())
    cfg = EngineConfig(
        model_path=path,
        device=args.device,
        dtype=args.dtype,
        n_ctx=args.ctx_size,
        n_parallel=1,
        n_threads=args.threads,
        n_threads_batch=args.threads_batch,
        weights=args.weights,
        gemm_dtype=args.gemm_dtype,
        head_dtype=args.head_dtype,
        decode_dtype=args.decode_dtype,
    )
    params = SamplingParams(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        n_predict=args.n_predict,
        ignore_eos=args.ignore_eos,
    )
    engine = Engine(cfg)
    tok = engine.tokenizer
    print(f"loaded {path} ({engine.loaded.config.arch}) in {engine.loaded.load_seconds:.1f} s", file=sys.stderr)

    def one(prompt: str) -> None:
        ids = tok.encode(prompt, add_special=True, parse_special=not args.no_special)
        if args.verbose_prompt:
            print(f"prompt ids: {ids}", file=sys.stderr)
        rid = engine.add_request(ids, params)
        detok = IncrementalDetokenizer(tok)
        t0, n = time.perf_counter(), 0
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id != rid:
                    continue
                for t in o.new_token_ids:
                    n += 1
                    if not (o.finished and o.finish_reason == "stop" and t in tok.eog_ids):
                        sys.stdout.write(detok.push(t))
                sys.stdout.flush()
        sys.stdout.write(detok.flush() + "\n")
        dt = time.perf_counter() - t0
        print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)

    if args.prompt is not None:
        one(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            one(line.rstrip("\n"))


def generate_main(argv: Sequence[str] | None = None) -> int:
    args = _parser("gguf-serve-generate").parse_args(argv)
    try:
        return _run(args)
    except GGUFServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """`gguf-serve`: until the HTTP API exists, the same generation front end."""
    return generate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
