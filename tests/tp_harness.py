"""One rank of a tensor-parallel test run: rank 0 generates greedily and prints the ids as JSON, the others follow.

Run as `python -m tests.tp_harness MODEL PROMPTS_JSON N_PREDICT` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (as torchrun sets them); tests spawn one per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    args: list[str], world: int, timeout: float = 300, module: str = "tests.tp_harness"
) -> list[str]:
    """Run `python -m module *args` as `world` ranks on 127.0.0.1; each rank's stdout, in rank order."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode:
            for q in procs:
                q.kill()
            raise RuntimeError(f"rank exited with {p.returncode}:\n{err[-4000:]}")
        outs.append(out)
    return outs


def slots(engine, prompt: list[int], action: str) -> dict:
    """Rank 0's part of the slot test: `save` generates from `prompt` in slot 0 and saves it
    to slot.bin; `restore` restores slot.bin and continues from the restored context."""
    from runtime.sampling_params import SamplingParams
    from runtime.slot_store import restore_slot, save_slot

    greedy = SamplingParams(temperature=0.0, n_predict=8, ignore_eos=True)
    if action == "save":
        ids = engine.generate([prompt], greedy)[0]
        return {"ids": ids, "n_saved": save_slot(engine, 0, "slot.bin").n_tokens}
    n = restore_slot(engine, 0, "slot.bin").n_tokens
    context = engine.scheduler.slot_tokens[0]
    bm = engine.blocks
    cached = len(bm.match_prefix(bm.hashes(context, [])))  # restored blocks, named for reuse
    return {"n_restored": n, "cached_blocks": cached, "ids": engine.generate([context + [7, 8, 9]], greedy)[0]}


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from runtime import parallel
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.loader import load_model
    from runtime.sampling_params import SamplingParams
    from runtime.tp_worker import run_worker

    model, prompts, n_predict = argv[0], json.loads(argv[1]), int(argv[2])
    n_ctx = int(argv[3]) if len(argv) > 3 else 1024
    overrides = json.loads(argv[4]) if len(argv) > 4 else {}  # EngineConfig fields, e.g. decode_dtype
    slot_dir, slot_action = (argv[5], argv[6]) if len(argv) > 6 else (None, None)
    par = parallel.from_env("cpu")
    cfg = EngineConfig(model_path=model, n_ctx=n_ctx, n_threads=1, slot_save_path=slot_dir, **overrides)
    loaded = load_model(model, parallel=par)
    if par is not None and not par.is_driver:
        run_worker(loaded, cfg)
    else:
        engine = Engine(cfg, loaded)
        if slot_action is not None:
            print(json.dumps(slots(engine, prompts[0], slot_action)))
            engine.runner.close()
            dist.destroy_process_group()
            return 0
        t0 = time.perf_counter()
        ids = engine.generate(
            prompts, SamplingParams(temperature=0.0, n_predict=n_predict, ignore_eos=True)
        )
        seconds = time.perf_counter() - t0
        engine.runner.close()
        local = loaded.model.cfg
        shard = {"n_heads": local.n_heads, "n_kv_heads": local.n_kv_heads, "ffn": local.ffn}
        print(json.dumps({"ids": ids, "seconds": seconds, "shard": shard}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
