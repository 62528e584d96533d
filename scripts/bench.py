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

import runtime  # noqa: E402, F401  (first: it sets OpenMP's wait policy before torch loads it)

# isort: split
import torch  # noqa: E402

from runtime.config import DECODE_DTYPES, GEMM_DTYPES, HEAD_DTYPES, WEIGHTS, EngineConfig  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.grammar import JSON_GBNF  # noqa: E402
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
    reports aggregate generated tok/s, mean and longest time to first token and
    mean inter-token latency.
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
            "ttft_max_ms": round(1e3 * max(t for t, _ in res), 1),
            "itl_ms": round(1e3 * sum(itl) / max(1, len(itl)), 1),
        }

    try:
        return asyncio.run(run())
    finally:
        ae.shutdown()


# At least eight objects (~100 tokens): no stream completes during a short measured run.
BENCH_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "minItems": 8,
}
BENCH_GBNF = r"""
root   ::= "[" ws item ( "," ws item ){7,} "]"
item   ::= "{" ws member ( "," ws member )* "}"
""" + "\n".join(line for line in JSON_GBNF.splitlines() if not line.startswith("root"))


def constrained(engine: Engine, prompt, batches: list[int], n_out: int) -> dict:
    """Per decode step: the grammar masks' cost (fill the bitmask + apply it) against the whole step.

    A JSON schema and the JSON GBNF grammar (both through llguidance);
    every stream is constrained, greedy, and its prompt is in before timing starts.
    """
    from runtime import sampler

    spent = {"fill": 0.0, "apply": 0.0, "fill_max": 0.0}
    fill, apply = sampler.fill_bitmask, sampler.apply_bitmask

    def timed(name, fn):
        def run(*a):
            t = time.perf_counter()
            r = fn(*a)
            took = time.perf_counter() - t
            spent[name] += took
            if name == "fill":
                spent["fill_max"] = max(spent["fill_max"], took)
            return r

        return run

    sampler.fill_bitmask, sampler.apply_bitmask = timed("fill", fill), timed("apply", apply)  # type: ignore[assignment]
    kinds = {
        "json_schema": {"json_schema": BENCH_SCHEMA},
        "gbnf": {"grammar": BENCH_GBNF},
        "none": {},
    }
    out: dict = {}
    try:
        for name, kw in kinds.items():
            for b in batches:
                params = SamplingParams(temperature=0.0, n_predict=n_out + 1, ignore_eos=True, **kw)
                t = time.perf_counter()
                engine.grammars.compile(params)
                compile_s = time.perf_counter() - t
                rids = [engine.add_request(prompt(16), params) for _ in range(b)]
                while any(r in engine.requests and engine.requests[r].num_computed_tokens < 16 for r in rids):
                    engine.step()
                spent.update(fill=0.0, apply=0.0, fill_max=0.0)
                t, steps, n = time.perf_counter(), 0, 0
                while engine.has_unfinished() and steps < n_out:
                    n += sum(len(o.new_token_ids) for o in engine.step())
                    steps += 1
                wall = time.perf_counter() - t
                for r in rids:
                    engine.abort(r)
                while engine.has_unfinished():
                    engine.step()
                out[f"{name}_b{b}"] = {
                    "compile_s": round(compile_s, 3),
                    "step_ms": round(1e3 * wall / steps, 2),
                    "fill_ms": round(1e3 * spent["fill"] / steps, 3),
                    "fill_max_ms": round(1e3 * spent["fill_max"], 3),  # the slowest step's masks
                    "apply_ms": round(1e3 * spent["apply"] / steps, 3),
                    "mask_share": round((spent["fill"] + spent["apply"]) / wall, 4),
                    "tok_s": round(n / wall, 1),
                }
    finally:
        sampler.fill_bitmask, sampler.apply_bitmask = fill, apply  # type: ignore[assignment]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-m", "--model", help="GGUF file (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, help="llama.cpp's partial offload: the last N layers on --device")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--weights", default="quant", choices=WEIGHTS)
    ap.add_argument("--gemm-dtype", default="bfloat16", choices=GEMM_DTYPES)
    ap.add_argument("--head-dtype", default="auto", choices=HEAD_DTYPES)
    ap.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1, help="parallel decode streams")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--clients", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 8, 32],
        help="concurrency levels of the served run (comma-separated; empty to skip)",
    )
    ap.add_argument("--prompt-tokens-served", type=int, default=64)
    ap.add_argument(
        "--constrained", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
        help="only measure constrained decoding at these batch sizes (e.g. 1,8): mask cost per step",
    )
    args = ap.parse_args()
    from runtime.allocator import keep_freed_memory

    keep_freed_memory()  # as the server does

    from runtime.default_model import default_model_path

    path = args.model or str(default_model_path())
    rss0 = rss_mb()
    t0 = time.perf_counter()
    most = max([args.concurrency, *args.clients, *args.constrained])
    n_ctx = max(4096, (max(args.prompt_tokens, args.prompt_tokens_served) + args.decode_tokens + 16) * most)
    cfg = EngineConfig(
        model_path=path, dtype=args.dtype, weights=args.weights, gemm_dtype=args.gemm_dtype,
        head_dtype=args.head_dtype, decode_dtype=args.decode_dtype, n_threads=args.threads, n_ctx=n_ctx,
        device=args.device, n_gpu_layers=args.n_gpu_layers,
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
    if args.constrained:
        res = constrained(engine, prompt, args.constrained, args.decode_tokens)
        print(json.dumps({"model": Path(path).name, "threads": args.threads, "constrained": res}))
        return 0
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
        # A short run first: a running server has served such batches before, and the first
        # one pays one-time costs (first-use setups of its shapes, memory growth): measured
        # here, the 8-client first token took 485-502 ms cold and 397-425 ms after it.
        serve(engine, prompt, c, 4, args.prompt_tokens_served)
        served[f"c{c}"] = serve(engine, prompt, c, args.decode_tokens, args.prompt_tokens_served)
    result = {
        "model": Path(path).name,
        "dtype": args.dtype,
        "weights": args.weights,
        "gemm_dtype": args.gemm_dtype,
        "head_dtype": engine.runner.head_dtype,
        "decode_dtype": engine.runner.decode_dtype,
        "weight_mb": round(engine.loaded.weight_bytes / 1e6, 1),
        "file_tensor_mb": round(engine.loaded.gguf.tensor_bytes / 1e6, 1),
        "threads": args.threads,
        "device": str(engine.loaded.device),
        "load_s": round(load_s, 2),
        f"prompt_tok_s_pp{args.prompt_tokens}": round(max(pp), 1),
        f"decode_tok_s_c{args.concurrency}": round(max(tg), 1),
        "rss_mb": round(rss_mb(), 1),
        "rss_model_mb": round(rss_mb() - rss0, 1),
        "kv_cache_mb": round(engine.runner.cache.nbytes / 2**20, 1),
        "served": served,
    }
    if torch.cuda.is_available() and engine.loaded.device.type == "cuda":
        result["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu_name"] = torch.cuda.get_device_name(engine.loaded.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
