"""Streams /completion requests from concurrent clients to a llama.cpp-compatible server (this one or llama.cpp's) and reports tokens/s and time to first token.

The same client for both servers makes their figures comparable: each client sends
random token ids as the prompt (no prompt cache reuse) and streams `n_predict`
tokens with ignore_eos; the aggregate rate counts the tokens the server reports
(tokens_predicted) over the wall time of the whole round. Standard library only.

    python scripts/bench_http.py --url http://127.0.0.1:8080 --clients 1,8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from http.client import HTTPConnection
from urllib.parse import urlparse


def stream_one(url: str, prompt: list[int], n_predict: int, out: dict) -> None:
    """One streaming /completion; fills out with ttft_s, tokens, end_s (perf_counter times)."""
    u = urlparse(url)
    conn = HTTPConnection(u.hostname, u.port or 80, timeout=600)
    body = {
        "prompt": prompt, "n_predict": n_predict, "stream": True, "ignore_eos": True,
        "temperature": 0.0, "cache_prompt": False,
    }  # fmt: skip
    t0 = time.perf_counter()
    conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"/completion answered {resp.status}: {resp.read()[:300]!r}")
    out["start_s"] = t0
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if "ttft_s" not in out and event.get("content"):
            out["ttft_s"] = time.perf_counter() - t0
        if event.get("stop"):
            out["tokens"] = int(event.get("tokens_predicted") or event.get("timings", {}).get("predicted_n", 0))
            break
    out["end_s"] = time.perf_counter()
    conn.close()


def round_of(url: str, clients: int, n_predict: int, n_prompt: int, rng: random.Random) -> dict:
    """`clients` concurrent streams -> aggregate tok/s, mean and max first-token time."""
    outs: list[dict] = [{} for _ in range(clients)]
    prompts = [[rng.randrange(100, 20000) for _ in range(n_prompt)] for _ in range(clients)]
    threads = [
        threading.Thread(target=stream_one, args=(url, p, n_predict, o)) for p, o in zip(prompts, outs)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(o["end_s"] for o in outs) - t0
    ttft = [o["ttft_s"] * 1e3 for o in outs]
    return {
        "tok_s": round(sum(o["tokens"] for o in outs) / wall, 1),
        "ttft_ms": round(statistics.mean(ttft), 1),
        "ttft_max_ms": round(max(ttft), 1),
        "per_client_tok_s": round(statistics.mean(o["tokens"] / (o["end_s"] - o["start_s"]) for o in outs), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 8])
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    result = {}
    for c in args.clients:
        round_of(args.url, c, 4, args.prompt_tokens, rng)  # warm-up: the batch's first use
        result[f"c{c}"] = round_of(args.url, c, args.n_predict, args.prompt_tokens, rng)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
