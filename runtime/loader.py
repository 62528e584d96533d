"""GGUF file -> ModelConfig -> model with its weights on the device."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.config import WEIGHTS, EngineConfig, ModelConfig
from runtime.device_map import DeviceMap, check_device
from runtime.errors import GGUFError, NotSupportedError
from runtime.gguf.quants import dequantize, quant_type
from runtime.gguf.reader import GGUFFile, _short, printable
from runtime.layers.linear import QuantWeight, Weight
from runtime.memory_lock import lock_all_current, lock_region, locked_bytes
from runtime.models import model_config
from runtime.models.transformer import Transformer
from runtime.parallel import Cut, Parallel, Shard, slice_weight
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything the engine needs from one GGUF file."""

    path: Path
    gguf: GGUFFile
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    weights: str = "quant"  # "quant": matrices stay in GGUF blocks; "dense": dequantized to dtype
    weight_bytes: int = 0  # resident bytes of the model's weights
    parallel: Parallel | None = None  # under torchrun: this rank's place; the model holds its shard


# Kept as they are in quant mode: float32 matrices gain nothing from the block kernels.
_DENSE_TYPES = {"F32"}


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    weights: str = "quant",
    use_mmap: bool = True,
    mlock: bool = False,
    parallel: Parallel | None = None,
    n_gpu_layers: int | None = None,
) -> LoadedModel:
    """Read and validate a GGUF model and place its weights; errors are one-line GGUFErrors.

    weights="quant" keeps every quantized (and F16/BF16) matrix in its GGUF blocks,
    zero-copy from the file's memory map on the CPU (use_mmap=False: copied into
    memory, like llama.cpp's --no-mmap), and runs it through runtime/ops;
    weights="dense" dequantizes everything to `dtype` at load. mlock: keep the weights'
    pages in RAM (llama.cpp's --mlock); a failure is logged as a warning, as llama.cpp does.
    parallel: keep only this rank's tensor-parallel shard, on its device (runtime/parallel.py);
    `config` stays the whole model's, `model.cfg` is the shard's.
    n_gpu_layers: llama.cpp's -ngl partial offload, the last N layers on `device` and the
    rest on the CPU (runtime/device_map.py); None: everything on `device`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if parallel is not None and n_gpu_layers is not None:
        raise NotSupportedError("-ngl/--n-gpu-layers partial offload does not combine with tensor parallelism")
    quant = weights == "quant"
    dev = parallel.device if parallel is not None else torch.device(device)
    if n_gpu_layers:
        check_device(device)  # before reading anything: a clear error if it does not exist
    t0 = time.perf_counter()
    f = GGUFFile(path)
    cfg = model_config(f)
    devices = (
        DeviceMap.offload(cfg.n_layers, n_gpu_layers, device)
        if n_gpu_layers is not None
        else DeviceMap.single(cfg.n_layers, dev)
    )
    dev = devices.embed  # where batches are built and the input embedding runs
    if quant and any(d.type == "cpu" for d in devices.devices):
        from runtime import ops

        ops.use_cpu_kernels()  # builds them the first time; a clear error if it cannot
    if n_gpu_layers is not None:
        log.info("-ngl %d: %s", n_gpu_layers, devices.describe())
    try:
        tokenizer = Tokenizer.from_metadata(f.metadata)
    except GGUFError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
        # Missing or ill-typed tokenizer.* keys: a broken file, reported in one line.
        raise GGUFError(f"{path}: unusable tokenizer metadata ({_short(e)})") from e
    if tokenizer.vocab_size != cfg.vocab_size:
        raise GGUFError(
            f"vocabulary has {tokenizer.vocab_size} tokens but token_embd.weight has {cfg.vocab_size} rows"
        )
    used: set[str] = set()
    resident = 0

    def get(name: str, shape: tuple[int, ...], cut: Cut | None = None) -> Weight:
        """The tensor at its full `shape` (checked), or this tensor-parallel rank's `cut` of it."""
        nonlocal resident
        t = f.tensor(name)
        if tuple(t.shape) != shape:
            raise GGUFError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        used.add(name)
        raw: np.ndarray = np.asarray(t.data)
        if cut is not None:
            dense = not quant or t.qtype.name in _DENSE_TYPES
            if len(shape) != 2 or (dense and cut.dim == 1 and not _on_blocks(t.qtype, cut)):
                # a bias, or a dense column cut inside blocks: read whole, then cut
                return slice_weight(name, get(name, shape), cut)
            # Cut from the file's blocks (a view of the map, or whole block columns) before
            # anything reaches a device or is dequantized: only the shard travels.
            part = slice_weight(name, _blocks(name, raw, t.qtype, shape, torch.device("cpu"), copy=False), cut)
            assert isinstance(part, QuantWeight)
            raw, shape = part.data.numpy(), part.shape
        if quant and len(shape) == 2 and t.qtype.name not in _DENSE_TYPES:
            w = _blocks(name, raw, t.qtype, shape, devices.of_tensor(name), copy=not use_mmap)
            resident += w.nbytes
            return w
        # Norm weights stay float32: rms_norm multiplies in float32 anyway.
        out_dtype = torch.float32 if name.endswith("norm.weight") else dtype
        try:
            out = dequantize(raw, t.qtype, shape, dtype=out_dtype, device=devices.of_tensor(name))
        except GGUFError as e:  # name the tensor: the type or size is the file's problem
            raise type(e)(f"tensor {printable(name)}: {e}") from e
        resident += out.numel() * out.element_size()
        return out

    if parallel is None:
        model = Transformer(cfg, get, dev, dtype, devices=devices)
    else:
        shard = Shard.of(cfg, parallel.rank, parallel.world)
        model = Transformer(shard.config(cfg), shard.source(get, cfg), dev, dtype, parallel.all_reduce)
    ignored = {"rope_freqs.weight"}  # read into the config
    unknown = sorted(set(f.tensors) - used - ignored)
    if unknown:
        raise GGUFError(
            f"{cfg.arch}: {len(unknown)} tensors this architecture does not use, e.g. {printable(unknown[0])}"
        )
    if mlock:
        # mapped weights: lock the file's map; copied or dense ones: everything mapped now
        why = lock_region(*f.mapping) if quant and use_mmap else lock_all_current()
        if why:
            log.warning("--mlock: could not lock the model in memory: %s; it may be paged out", why)
        else:
            log.info("--mlock: %.0f MB locked in memory", locked_bytes() / 1e6)
    return LoadedModel(
        Path(path), f, cfg, model, tokenizer, dtype, dev, time.perf_counter() - t0, weights, resident, parallel
    )


def load_for(cfg: EngineConfig, parallel: Parallel | None = None) -> LoadedModel:
    """load_model with an engine's settings (its path, dtype, device, weights, mmap, mlock, -ngl)."""
    return load_model(
        cfg.model_path, cfg.torch_dtype, cfg.device, cfg.weights, cfg.use_mmap, cfg.mlock, parallel, cfg.n_gpu_layers
    )


def _on_blocks(qtype: object, cut: Cut) -> bool:
    """Whether a column cut falls on whole blocks of the type."""
    bs = quant_type(qtype).block_size  # type: ignore[arg-type]
    return cut.lo % bs == 0 and cut.hi % bs == 0


def _blocks(
    name: str, raw: object, qtype: object, shape: tuple[int, ...], dev: torch.device, copy: bool
) -> QuantWeight:
    """The tensor's GGUF blocks as (rows, row_bytes) uint8: a view of the memory map on the CPU
    unless `copy`."""
    try:
        qt = quant_type(qtype)  # type: ignore[arg-type]
    except GGUFError as e:
        raise type(e)(f"tensor {printable(name)}: {e}") from e
    n, k = shape
    if k % qt.block_size:
        raise GGUFError(f"tensor {printable(name)}: rows of {k} values are not whole {qt.qtype.name} blocks")
    row_bytes = k // qt.block_size * qt.type_size
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    if flat.nbytes != n * row_bytes:
        raise GGUFError(f"tensor {printable(name)}: {qt.qtype.name} {shape} needs {n * row_bytes} bytes, has {flat.nbytes}")
    with warnings.catch_warnings():
        # The map is read-only and torch warns about that; the ops only ever read weights.
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(flat).view(n, row_bytes)
    data = data.to(dev)
    if copy and data.data_ptr() == flat.ctypes.data:
        data = data.clone()
    return QuantWeight(data, int(qt.qtype), (n, k))
