"""Whole-model copies of KV blocks across tensor-parallel ranks, each of which caches only its shard's KV heads.

Slot save and restore (runtime/slot_store.py) read and write blocks with every KV head,
so a file saved by N ranks restores on one process or on M ranks. Rank 0 announces the
copy (a KVCopy message, runtime/step_message.py) and, under the same lock, runs the
collective on the CPU group: to read, a gather of each rank's copies, whose heads it puts
together (Shard.kv_heads: replicated heads come from the first rank holding them); to
write, a broadcast of the whole blocks, of which each rank keeps its heads. The other
ranks run `serve` on the message in their loop (runtime/tp_worker.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from runtime.config import ModelConfig
from runtime.kv_cache import KVCache
from runtime.parallel import Parallel, Shard
from runtime.step_message import KVCopy

# Per layer (blocks, block_size, kv_heads, head_dim): the K tensors, then the V tensors.
Blocks = list[torch.Tensor]


def read(cache: KVCache, par: Parallel, cfg: ModelConfig, blocks: list[int]) -> tuple[Blocks, Blocks]:
    """Rank 0: CPU copies of `blocks` with all `cfg.n_kv_heads` heads, as KVCache.read_blocks gives them."""
    k, v = cache.read_blocks(blocks)
    mine = k + v
    flat = _flatten(mine)
    parts = [torch.empty_like(flat) for _ in range(par.world)]
    par.send(KVCopy(False, tuple(blocks)), then=lambda group: dist.gather(flat, parts, dst=0, group=group))
    ranks = [_unflatten(p, mine) for p in parts]  # ranks[r][i]: rank r's tensor i
    whole = []
    for i, t in enumerate(mine):
        out = t.new_empty((*t.shape[:2], cfg.n_kv_heads, t.shape[3]))
        for r in reversed(range(par.world)):  # the lowest rank holding a replicated head wins
            a, b = Shard.of(cfg, r, par.world).kv_heads
            out[:, :, a:b] = ranks[r][i]
        whole.append(out)
    return whole[: len(k)], whole[len(k) :]


def write(
    cache: KVCache, par: Parallel, cfg: ModelConfig, blocks: list[int], k: Blocks, v: Blocks
) -> None:
    """Rank 0: store whole-head blocks (read()'s layout) into `blocks` of every rank's cache."""
    whole = [t.to(c.dtype) for t, c in zip(k + v, cache.k + cache.v)]
    flat = _flatten(whole)
    par.send(KVCopy(True, tuple(blocks)), then=lambda group: dist.broadcast(flat, src=0, group=group))
    _keep(cache, par, cfg, blocks, whole)


def serve(cache: KVCache, par: Parallel, cfg: ModelConfig, msg: KVCopy) -> None:
    """Ranks > 0: their part of rank 0's read or write of `msg.blocks`."""
    blocks = list(msg.blocks)
    if not msg.write:
        k, v = cache.read_blocks(blocks)
        dist.gather(_flatten(k + v), None, dst=0, group=par.cpu_group)
        return
    like = [
        torch.empty((len(blocks), c.shape[1], cfg.n_kv_heads, c.shape[3]), dtype=c.dtype)
        for c in cache.k + cache.v
    ]
    flat = torch.empty(sum(t.nbytes for t in like), dtype=torch.uint8)
    dist.broadcast(flat, src=0, group=par.cpu_group)
    _keep(cache, par, cfg, blocks, _unflatten(flat, like))


def _keep(cache: KVCache, par: Parallel, cfg: ModelConfig, blocks: list[int], whole: Blocks) -> None:
    """Write this rank's heads of the whole blocks."""
    a, b = Shard.of(cfg, par.rank, par.world).kv_heads
    n = len(cache.k)
    cache.write_blocks(blocks, [t[:, :, a:b] for t in whole[:n]], [t[:, :, a:b] for t in whole[n:]])


def _flatten(ts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes end to end (uint8): one collective whatever their dtypes."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in ts])


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """_flatten's inverse for tensors shaped and typed as `like`."""
    out, at = [], 0
    for t in like:
        out.append(flat[at : at + t.nbytes].view(t.dtype).view(t.shape))
        at += t.nbytes
    return out
