"""The loop a tensor-parallel rank > 0 runs: receive each step from rank 0, run its shard of the forward, until told to stop."""

from __future__ import annotations

import logging
import signal
import threading

import torch

from runtime import kv_copy
from runtime.config import EngineConfig
from runtime.loader import LoadedModel
from runtime.model_runner import ModelRunner
from runtime.step_message import KVCopy

log = logging.getLogger(__name__)


def run_worker(loaded: LoadedModel, cfg: EngineConfig) -> int:
    """Follow rank 0's steps over this rank's shard and KV heads; returns the steps run.

    `cfg` must size the KV pool as rank 0's does (the same block ids address both).
    Rank 0 samples and serves; here only the forward runs, so that the all-reduces
    inside it meet their partners.
    """
    par = loaded.parallel
    assert par is not None and not par.is_driver, "rank 0 drives; the others follow"
    if cfg.n_threads:
        torch.set_num_threads(cfg.n_threads)
    runner = ModelRunner(loaded, cfg)
    _leave_signals_to_rank_0(par.rank)
    log.info("tensor-parallel rank %d/%d ready on %s", par.rank, par.world, loaded.device)
    steps = 0
    while True:
        msg = par.receive()
        if msg is None:  # rank 0 is shutting down
            break
        if isinstance(msg, KVCopy):  # a slot save or restore
            kv_copy.serve(runner.cache, par, loaded.config, msg)
            continue
        moves, batch = msg
        runner.forward(moves, batch)
        steps += 1
    log.info("tensor-parallel rank %d stopped after %d steps", par.rank, steps)
    return steps


def _leave_signals_to_rank_0(rank: int) -> None:
    """SIGTERM and SIGINT reach every rank at once (torchrun forwards them; Ctrl-C signals the
    whole process group). Rank 0 drains its requests and then stops this loop; a rank that
    died on the signal would fail the steps still running, so here they are only noted."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (tests run ranks in threads)

    def note(signum: int, frame: object) -> None:
        log.info("tensor-parallel rank %d: %s; following rank 0's shutdown", rank, signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)
