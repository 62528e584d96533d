"""Tensor parallelism over torch.distributed: the process group, which shard of each weight a rank keeps, the step broadcast.

Megatron-style sharding of every layer across `world` ranks:

- q/k/v are column-parallel by whole heads (rows of W as GGUF stores it). Rank r keeps
  query heads [r*H/W, (r+1)*H/W) and the KV heads those read; when there are more ranks
  than KV heads, KV heads are replicated (vLLM's rule): each rank keeps the one its
  query heads use. q/k/v biases are sliced with their rows.
- gate/up are column-parallel (rows [r*F/W, (r+1)*F/W)).
- attn_output and ffn_down are row-parallel: each rank keeps a slice of W's input
  columns, on whole GGUF blocks for quantized weights (32 values for Q4_0..Q8_0, 256 for
  K-quants); their partial outputs are summed by one all_reduce after attention and one
  after the MLP. (None of the supported architectures has a bias there; one would be
  added once, after the all_reduce.)
- Norms (q_norm/k_norm included), the embedding and the output head are replicated.

Rank 0 runs the APIs, the scheduler and the sampler and broadcasts each step (the
ForwardBatch and the context shift's KV moves) to the other ranks, which run the same
forward in `runtime/tp_worker.py`; a None message stops them. Each message travels as
two int64 tensors (runtime/step_message.py); a slot save or restore announces a KV copy
whose collective follows (runtime/kv_copy.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime import step_message
from runtime.config import ModelConfig
from runtime.errors import GGUFServeError
from runtime.gguf.quants import quant_type
from runtime.layers.linear import QuantWeight, Weight
from runtime.models.transformer import WeightSource
from runtime.step_message import Message


class TensorParallelError(GGUFServeError, ValueError):
    """The model cannot be split across this many ranks (or the launch is inconsistent)."""


@dataclass(frozen=True)
class Cut:
    """Which slice [lo, hi) along dimension `dim` (0: rows / outputs, 1: inputs) of a tensor of `full` there."""

    dim: int
    lo: int
    hi: int
    full: int


# The loader's reader under tensor parallelism: (name, full shape, this rank's cut or None) -> weight.
ShardSource = Callable[[str, tuple[int, ...], Cut | None], Weight]


# GGUF per-layer tensor suffix -> (dimension, what it is cut by)
_CUTS = {
    "attn_q.weight": (0, "q"),
    "attn_q.bias": (0, "q"),
    "attn_k.weight": (0, "k"),
    "attn_k.bias": (0, "k"),
    "attn_v.weight": (0, "v"),
    "attn_v.bias": (0, "v"),
    "attn_output.weight": (1, "o"),
    "ffn_gate.weight": (0, "ffn"),
    "ffn_up.weight": (0, "ffn"),
    "ffn_down.weight": (1, "ffn"),
}
_LAYER_TENSOR = re.compile(r"blk\.\d+\.(.+)")


@dataclass(frozen=True)
class Shard:
    """The part of every layer that one rank keeps: whole query heads, the KV heads they read, a slice of the MLP."""

    rank: int
    world: int
    q_heads: tuple[int, int]  # [start, stop) of the model's query heads
    kv_heads: tuple[int, int]  # [start, stop) of its KV heads
    ffn: tuple[int, int]  # [start, stop) of the MLP's intermediate features

    @staticmethod
    def of(cfg: ModelConfig, rank: int, world: int) -> Shard:
        """Rank `rank`'s shard of `cfg`; TensorParallelError when the model cannot split `world` ways."""
        if not 0 <= rank < world:
            raise TensorParallelError(f"rank {rank} is not in a world of {world}")
        h, kv = cfg.n_heads, cfg.n_kv_heads
        if h % world:
            raise TensorParallelError(
                f"{cfg.arch}: {h} attention heads cannot be split evenly across {world} ranks"
            )
        if kv % world and world % kv:
            raise TensorParallelError(
                f"{cfg.arch}: {kv} KV heads cannot be split across {world} ranks "
                "(one must be a multiple of the other)"
            )
        if cfg.ffn % world:
            raise TensorParallelError(
                f"{cfg.arch}: feed_forward_length {cfg.ffn} cannot be split evenly across {world} ranks"
            )
        hq = h // world
        group = h // kv  # query heads per KV head
        q0 = rank * hq
        kv0, kv1 = q0 // group, (q0 + hq - 1) // group + 1  # the KV heads these queries read
        f = cfg.ffn // world
        return Shard(rank, world, (q0, q0 + hq), (kv0, kv1), (rank * f, rank * f + f))

    def config(self, cfg: ModelConfig) -> ModelConfig:
        """The config this rank's layers are built with: its own head and MLP widths."""
        return dataclasses.replace(
            cfg,
            n_heads=self.q_heads[1] - self.q_heads[0],
            n_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            ffn=self.ffn[1] - self.ffn[0],
        )

    def cut(self, name: str, cfg: ModelConfig) -> Cut | None:
        """The slice of tensor `name` this rank keeps; None when it keeps all of it."""
        m = _LAYER_TENSOR.fullmatch(name)
        if m is None or m.group(1) not in _CUTS:
            return None
        dim, by = _CUTS[m.group(1)]
        if by == "ffn":
            return Cut(dim, *self.ffn, cfg.ffn)
        heads, n, width = {
            "q": (self.q_heads, cfg.n_heads, cfg.head_dim),
            "k": (self.kv_heads, cfg.n_kv_heads, cfg.head_dim),
            "v": (self.kv_heads, cfg.n_kv_heads, cfg.v_head_dim),
            "o": (self.q_heads, cfg.n_heads, cfg.v_head_dim),
        }[by]
        return Cut(dim, heads[0] * width, heads[1] * width, n * width)

    def source(self, get: ShardSource, cfg: ModelConfig) -> WeightSource:
        """Wrap the loader's `get` so that a model built with `self.config(cfg)` receives its shards.

        The model asks for its local shapes; the file's tensor is checked at full shape and
        the loader cuts this rank's part (get(name, full_shape, cut)).
        """

        def get_shard(name: str, shape: tuple[int, ...]) -> Weight:
            c = self.cut(name, cfg)
            if c is None:
                return get(name, shape, None)
            assert shape[c.dim] == c.hi - c.lo, (name, shape, c)
            full = tuple(c.full if d == c.dim else s for d, s in enumerate(shape))
            return get(name, full, c)

        return get_shard


def slice_weight(name: str, w: Weight, c: Cut) -> Weight:
    """w[lo:hi] along c.dim, quantized weights on whole GGUF blocks; the shard owns its memory."""
    if isinstance(w, torch.Tensor):  # a copy, so that the whole tensor is freed
        return w.narrow(c.dim, c.lo, c.hi - c.lo).clone(memory_format=torch.contiguous_format)
    n, k = w.shape
    if c.dim == 0:
        rows = w.data[c.lo : c.hi]
        # On the CPU a view of the file's map stays zero-copy (the other rows' pages are
        # never read); elsewhere a copy, so that the whole tensor is freed.
        data = rows if rows.device.type == "cpu" else rows.clone()
        return QuantWeight(data, w.qtype, (c.hi - c.lo, k))
    qt = quant_type(w.qtype)
    bs, ts = qt.block_size, qt.type_size
    if c.lo % bs or c.hi % bs:
        raise TensorParallelError(
            f"tensor {name}: its {qt.qtype.name} rows of {k} values cannot be split on whole "
            f"{bs}-value blocks across {k // (c.hi - c.lo)} ranks"
        )
    data = w.data[:, c.lo // bs * ts : c.hi // bs * ts].contiguous()  # (n, local row bytes)
    return QuantWeight(data, w.qtype, (n, c.hi - c.lo))


class Parallel:
    """This process's place in the tensor-parallel group: its rank and device, the all-reduce, the step broadcast."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.device = device
        # Step messages are CPU tensors: they travel over a gloo group of their own on every
        # backend, so that the stop message (sent from another thread) never interleaves with
        # a step's all-reduces.
        self._cpu_group: Any = dist.new_group(backend="gloo")
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and serves; the others follow its broadcasts."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial outputs (T, hidden) in place."""
        dist.all_reduce(x)
        return x

    def send(self, msg: Message, then: Callable[[Any], object] | None = None) -> None:
        """Rank 0: broadcast one message to every rank (None stops them); then, under the
        same lock (a stop from another thread cannot come between), `then(group)`: a
        collective on the CPU group that the message announced (runtime/kv_copy.py)."""
        assert self.is_driver
        header, payload = step_message.pack(msg)
        with self._lock:
            if self._stopped:
                raise TensorParallelError("the tensor-parallel workers have been stopped")
            self._stopped = msg is None
            dist.broadcast(header, src=0, group=self._cpu_group)
            if payload.numel():
                dist.broadcast(payload, src=0, group=self._cpu_group)
            if then is not None:
                then(self._cpu_group)

    @property
    def cpu_group(self) -> Any:
        """The gloo group messages travel on (CPU tensors, on every backend)."""
        return self._cpu_group

    def receive(self) -> Message:
        """Ranks > 0: the next message rank 0 sent."""
        header = torch.empty(step_message.HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self._cpu_group)
        payload = torch.empty(step_message.payload_size(header), dtype=torch.int64)
        if payload.numel():
            dist.broadcast(payload, src=0, group=self._cpu_group)
        return step_message.unpack(header, payload)

    def stop(self) -> None:
        """Rank 0: tell the workers to leave their loop (once; later calls do nothing)."""
        if self.is_driver and not self._stopped:
            self.send(None)


_joined: Parallel | None = None


def joined() -> Parallel | None:
    """The group this process joined with from_env() (None: one process)."""
    return _joined


def from_env(
    device: str = "cpu", main_gpu: int | None = None, split: str | None = None
) -> Parallel | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); None for one process.

    NCCL on CUDA (rank r uses GPU main_gpu + LOCAL_RANK), gloo on the CPU. `split`
    (-ts/--tensor-split) must be an even split over the launched processes.
    """
    global _joined
    if _joined is not None:
        return _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if split is not None:
        tensor_split(split, world)
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TensorParallelError(f"--device {device}: CUDA is not available")
        dev = torch.device("cuda", ((main_gpu or 0) + local) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise TensorParallelError(f"tensor parallelism runs on cuda or cpu, not {device}")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    _joined = Parallel(rank, world, dev)
    return _joined


def tensor_split(spec: str, world: int) -> None:
    """Check llama.cpp's -ts/--tensor-split against the launch: only an even split over `world` ranks."""
    try:
        parts = [float(x) for x in spec.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise TensorParallelError(
            f"-ts/--tensor-split {spec!r}: expected numbers such as 1,1"
        ) from None
    if len(parts) != world:
        raise TensorParallelError(
            f"-ts/--tensor-split {spec!r} names {len(parts)} devices but {world} "
            f"process{'es' if world != 1 else ''} run: launch with torchrun --nproc-per-node {len(parts)}"
        )
    if not parts or min(parts) <= 0 or max(parts) != min(parts):
        raise TensorParallelError(
            f"-ts/--tensor-split {spec!r}: only an even split is supported (tensor parallelism shards "
            "every layer equally)"
        )
