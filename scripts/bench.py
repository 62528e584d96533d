"""Measures load time, prompt and decode speed, and resident memory of the engine on a GGUF model."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from runtime.config import EngineConfig  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(engine: Engine, prompt, clients: int, n_out: int, n_prompt: int) -> dict:
    """`clients` concurrent streams through AsyncEngine, as a server would run them.

    Each client sends one request (a fresh random prompt, so no prefix hits);
    reports aggregate generated tok/s, mean time to first token and mean
    inter-token latency.
    """
    import asyncio

    from runtime.async_engine import AsyncEngine

    params = SamplingParams(temperature=0.0, n_predict=n_out, ignore_eos=True)
    ae = AsyncEngine(engine)
    ae.start()

    async def client(p: list[int]) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        stamps = []
        async for o in ae.generate(p, params):
            stamps += [time.perf_counter()] * len(o.new_token_ids)
        return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]

    async def run() -> dict:
        ps = [prompt(n_prompt) for _ in range(clients)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*(client(p) for p in ps))
        wall = time.perf_counter() - t0
        itl = [x for _, gaps in res for x in gaps]
        return {
            "tok_s": round(clients * n_out / wall, 1),
            "ttft_ms": round(1e3 * sum(t for t, _ in res) / clients, 1),
            "itl_ms": round(1e3 * sum(itl) / max(1, len(itl)), 1),
        }

    try:
        return asyncio.run(run())
    finally:
        ae.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-m", "--model", help="GGUF file (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--weights", default="quant", choices=["quant", "dense"])
    ap.add_argument("--gemm-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1, help="parallel decode streams")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--clients", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 8, 32],
        help="concurrency levels of the served run (comma-separated; empty to skip)",
    )
    ap.add_argument("--prompt-tokens-served", type=int, default=64)
    args = ap.parse_args()

    from runtime.default_model import default_model_path

    path = args.model or str(default_model_path())
    rss0 = rss_mb()
    t0 = time.perf_counter()
    most = max([args.concurrency, *args.clients])
    n_ctx = max(4096, (max(args.prompt_tokens, args.prompt_tokens_served) + args.decode_tokens + 16) * most)
    cfg = EngineConfig(
        model_path=path, dtype=args.dtype, weights=args.weights, gemm_dtype=args.gemm_dtype,
        n_threads=args.threads, n_ctx=n_ctx,
        n_parallel=most, n_batch=max(2048, args.prompt_tokens),
    )
    engine = Engine(cfg)
    load_s = time.perf_counter() - t0
    vocab = engine.loaded.config.vocab_size
    g = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0, n_predict=1, ignore_eos=True)

    def prompt(n: int) -> list[int]:
        return torch.randint(100, min(vocab, 20000), (n,), generator=g).tolist()

    engine.generate([prompt(32)], greedy)  # warm-up
    pp = []
    for _ in range(args.repeats):
        p = prompt(args.prompt_tokens)
        t = time.perf_counter()
        engine.generate([p], greedy)
        pp.append(args.prompt_tokens / (time.perf_counter() - t))
    tg = []
    for _ in range(args.repeats):
        params = SamplingParams(temperature=0.0, n_predict=args.decode_tokens + 1, ignore_eos=True)
        rids = [engine.add_request(prompt(16), params) for _ in range(args.concurrency)]
        while any(engine.requests[r].num_computed_tokens < 16 for r in rids):
            engine.step()  # prompts in; decode timing starts with all streams running
        t, n = time.perf_counter(), 0
        while engine.has_unfinished():
            n += sum(len(o.new_token_ids) for o in engine.step())
        tg.append(n / (time.perf_counter() - t))
    served = {}
    for c in args.clients:
        served[f"c{c}"] = serve(engine, prompt, c, args.decode_tokens, args.prompt_tokens_served)
    result = {
        "model": Path(path).name,
        "dtype": args.dtype,
        "weights": args.weights,
        "gemm_dtype": args.gemm_dtype,
        "weight_mb": round(engine.loaded.weight_bytes / 1e6, 1),
        "file_tensor_mb": round(engine.loaded.gguf.tensor_bytes / 1e6, 1),
        "threads": args.threads,
        "load_s": round(load_s, 2),
        f"prompt_tok_s_pp{args.prompt_tokens}": round(max(pp), 1),
        f"decode_tok_s_c{args.concurrency}": round(max(tg), 1),
        "rss_mb": round(rss_mb(), 1),
        "rss_model_mb": round(rss_mb() - rss0, 1),
        "kv_cache_mb": round(engine.runner.cache.nbytes / 2**20, 1),
        "served": served,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
