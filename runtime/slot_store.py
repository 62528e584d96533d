"""Slot save / restore / erase (llama.cpp's --slot-save-path) over the paged, prefix-cached KV pool.

A slot's cache is the context its request left in the pool (Scheduler.slot_context).
Save writes those token ids and the K/V of the full blocks the prefix cache still
holds for them; restore writes the K/V into free blocks and registers them under
the same prefix hashes, so the next prompt that starts with those tokens reuses
them (cached tokens, identical output); erase forgets the slot's context and the
prefix-cache names of its blocks. File names are confined to the save directory.

save_slot / restore_slot / erase_slot run on the engine thread, between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime.errors import InvalidRequestError, NotSupportedError, SlotBusyError

if TYPE_CHECKING:
    from runtime.engine import Engine

SLOTS_OFF = "This server does not support slots action. Start it with `--slot-save-path`"
_FORMAT = "gguf-serve slot v1"
_BAD_CHARS = set('/\\:*?"<>|')


@dataclass(frozen=True)
class SlotFileResult:
    """What a save or restore did: llama.cpp's n_saved / n_restored, n_written / n_read, ms."""

    id_slot: int
    filename: str
    n_tokens: int
    n_bytes: int
    ms: float


def check_filename(filename: object) -> str:
    """A plain file name (llama.cpp's fs_validate_filename, strictly): never a path, never '..'."""
    ok = (
        isinstance(filename, str)
        and 0 < len(filename.encode("utf-8", "surrogatepass")) <= 255
        and not any(c in _BAD_CHARS or ord(c) < 32 or ord(c) == 127 for c in filename)
        and filename.strip(" ") == filename
        and not filename.startswith(".")
        and not filename.endswith(".")
        and ".." not in filename
    )
    if not ok:
        raise InvalidRequestError("Invalid filename")
    assert isinstance(filename, str)
    return filename


class SlotStore:
    """The save directory and the three slot actions on one engine."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def path(self, filename: object) -> Path:
        name = check_filename(filename)
        root = self.dir.resolve()
        p = (root / name).resolve()
        if p.parent != root:  # belt and braces: nothing outside the directory, ever
            raise InvalidRequestError("Invalid filename")
        return p

    def save(self, engine: Engine, id_slot: int, filename: object) -> SlotFileResult:
        t0 = time.perf_counter()
        _check_slot(engine, id_slot)
        path = self.path(filename)
        tokens = engine.scheduler.slot_context(id_slot)
        bm = engine.blocks
        hashes = bm.hashes(tokens, [])
        blocks = bm.match_prefix(hashes)  # the full blocks the cache still holds, from the start
        k, v = engine.runner.read_blocks(blocks) if blocks else ([], [])
        state = {
            "format": _FORMAT,
            "model": _signature(engine),
            "tokens": list(tokens),
            "n_kv_blocks": len(blocks),
            "k": k,
            "v": v,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a reader never sees half a file
        n = path.stat().st_size
        return SlotFileResult(id_slot, path.name, len(tokens), n, 1e3 * (time.perf_counter() - t0))

    def restore(self, engine: Engine, id_slot: int, filename: object) -> SlotFileResult:
        t0 = time.perf_counter()
        _check_slot(engine, id_slot)
        path = self.path(filename)
        if not path.is_file():
            raise InvalidRequestError(f"Unable to restore slot: no file {path.name!r}")
        state = _load(path)
        if state.get("model") != _signature(engine):
            raise InvalidRequestError(
                "Unable to restore slot: the file was saved for another model"
            )
        tokens: list[int] = state["tokens"]
        n_blocks = _check_blocks(engine, state, path.name)
        bm = engine.blocks
        hashes = bm.hashes(tokens, [])[:n_blocks]
        hit = bm.match_prefix(hashes)  # blocks already cached need no copy
        todo = list(range(len(hit), n_blocks))
        if len(todo) > bm.num_free_after_taking(hit):
            raise InvalidRequestError("Unable to restore slot, no available space in KV cache")
        bm.take(hit)  # held while allocating, so the new blocks cannot evict them
        blocks = bm.allocate(len(todo))
        if todo:
            k = [t[todo] for t in state["k"]]
            v = [t[todo] for t in state["v"]]
            engine.runner.write_blocks(blocks, k, v)
        for b, j in zip(blocks, todo):
            bm.cache(b, hashes[j])
        bm.free(hit + blocks)  # unreferenced but named: the next matching prompt takes them
        engine.scheduler.slot_tokens[id_slot] = tokens
        n = path.stat().st_size
        return SlotFileResult(id_slot, path.name, len(tokens), n, 1e3 * (time.perf_counter() - t0))

    def erase(self, engine: Engine, id_slot: int) -> int:
        """Forget the slot's context; -> tokens erased. A slot running a request cannot be erased."""
        _check_slot(engine, id_slot)
        if any(r.slot_id == id_slot for r in engine.scheduler.running):
            raise SlotBusyError(f"slot {id_slot} is processing a request")
        tokens = engine.scheduler.slot_tokens.pop(id_slot, [])
        bm = engine.blocks
        blocks = bm.match_prefix(bm.hashes(tokens, []))
        bm.uncache([b for b in blocks if bm.ref_count(b) == 0])  # shared blocks in use keep theirs
        return len(tokens)


def save_slot(engine: Engine, id_slot: int, filename: object) -> SlotFileResult:
    return _store(engine).save(engine, id_slot, filename)


def restore_slot(engine: Engine, id_slot: int, filename: object) -> SlotFileResult:
    return _store(engine).restore(engine, id_slot, filename)


def erase_slot(engine: Engine, id_slot: int) -> int:
    return _store(engine).erase(engine, id_slot)


def _store(engine: Engine) -> SlotStore:
    if engine.slot_store is None:
        raise NotSupportedError(SLOTS_OFF)
    return engine.slot_store


def _check_slot(engine: Engine, id_slot: int) -> None:
    n = engine.cfg.n_parallel
    if isinstance(id_slot, bool) or not isinstance(id_slot, int) or not 0 <= id_slot < n:
        raise InvalidRequestError(f"Invalid slot ID: must be in [0, {n}), got {id_slot!r}")


def _signature(engine: Engine) -> dict[str, Any]:
    """What a file's K/V must match to be reused: the model, the cache layout and dtype."""
    c = engine.loaded.config
    return {
        "arch": c.arch,
        "n_layers": c.n_layers,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "v_head_dim": c.v_head_dim,
        "vocab_size": c.vocab_size,
        "block_size": engine.cfg.block_size,
        "dtype": engine.cfg.dtype,
        "model_file": Path(engine.cfg.model_path).name,
    }


def _check_blocks(engine: Engine, state: dict[str, Any], name: str) -> int:
    """The file's block count, once its tokens and K/V are what this model's cache holds: a
    file that passes the signature but not this (edited, or damaged) is refused here, before
    anything is written or, under tensor parallelism, sent to the other ranks."""
    c, bs = engine.loaded.config, engine.cfg.block_size
    n, tokens, k, v = state.get("n_kv_blocks"), state.get("tokens"), state.get("k"), state.get("v")
    ok = (
        isinstance(n, int) and n >= 0
        and isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) and n * bs <= len(tokens)
        and isinstance(k, list) and isinstance(v, list) and len(k) == len(v) == (c.n_layers if n else 0)
        and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in k + v)
        and all(tuple(t.shape) == (n, bs, c.n_kv_heads, c.head_dim) for t in k)
        and all(tuple(t.shape) == (n, bs, c.n_kv_heads, c.v_head_dim) for t in v)
    )  # fmt: skip
    if not ok:
        raise InvalidRequestError(f"Unable to restore slot: {name!r} does not hold this model's KV blocks")
    assert isinstance(n, int)
    return n


def _load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not ours, truncated, or not a torch file at all
        raise InvalidRequestError(
            f"Unable to restore slot: {path.name!r} is not a slot file ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise InvalidRequestError(f"Unable to restore slot: {path.name!r} is not a slot file")
    return state
