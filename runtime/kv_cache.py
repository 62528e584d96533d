"""The physical K/V tensors of the paged cache and their sizing; no allocation policy here."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from runtime.config import ModelConfig
from runtime.ops.reference import cached_tokens


class KVCache:
    """Per layer, K and V as (num_blocks, block_size, kv_heads, head_dim) tensors, each on its layer's device."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str | Sequence[torch.device] = "cpu",
    ) -> None:
        """`device`: one for every layer, or one per layer (-ngl partial offload)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape_k = (num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        shape_v = (num_blocks, block_size, cfg.n_kv_heads, cfg.v_head_dim)
        devs = [device] * cfg.n_layers if isinstance(device, (str, torch.device)) else list(device)
        assert len(devs) == cfg.n_layers, "one device per layer"
        self.k = [torch.zeros(shape_k, dtype=dtype, device=d) for d in devs]
        self.v = [torch.zeros(shape_v, dtype=dtype, device=d) for d in devs]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim) * elem

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, kv_heads, head_dim) at flat slots (T,)."""
        kc, vc = self.k[layer], self.v[layer]
        # index_copy_: half the per-call cost of an indexed assignment, in decode steps' 2 x 18 writes
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k if k.dtype == kc.dtype else k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v if v.dtype == vc.dtype else v.to(vc.dtype))

    def gather(
        self, layer: int, blocks: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, end) of a sequence whose block table is `blocks` (M,): (end-start, kvh, d)."""
        return cached_tokens(self.k[layer], blocks, start, end), cached_tokens(self.v[layer], blocks, start, end)

    def move(
        self,
        layer: int,
        src: torch.Tensor,
        dst: torch.Tensor,
        transform_k: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Copy slots src (N,) to dst (N,), keys through transform_k (N, kvh, d); reads before writes."""
        k = self.k[layer].view(-1, *self.k[layer].shape[2:])
        v = self.v[layer].view(-1, *self.v[layer].shape[2:])
        ks, vs = k[src], v[src]  # advanced indexing copies, so src and dst may overlap
        k[dst] = transform_k(ks).to(k.dtype) if transform_k is not None else ks
        v[dst] = vs

    def read_blocks(self, blocks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of whole blocks, per layer (len(blocks), block_size, kv_heads, head_dim), on the CPU."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        k = [t[idx.to(t.device)].cpu() for t in self.k]
        v = [t[idx.to(t.device)].cpu() for t in self.v]
        return k, v

    def write_blocks(self, blocks: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Store read_blocks()'s per-layer tensors into `blocks`."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        for layer, (kl, vl) in enumerate(zip(k, v)):
            dev = self.k[layer].device
            self.k[layer][idx.to(dev)] = kl.to(dev, self.k[layer].dtype)
            self.v[layer][idx.to(dev)] = vl.to(dev, self.v[layer].dtype)
