"""The decoder-only transformer every supported architecture is an instance of, and its GGUF tensor map."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from runtime import ops
from runtime.config import ModelConfig
from runtime.device_map import DeviceMap
from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache
from runtime.layers.activation import KINDS, gated
from runtime.layers.attention import DecodePlan, decode_plan, paged_attention
from runtime.layers.linear import (
    Embedding,
    Linear,
    QuantLinear,
    QuantWeight,
    Weight,
    int8_on_cpu,
    linear,
    project,
)
from runtime.layers.norm import rms_norm
from runtime.layers.rotary import Rotary

# GGUF tensor names (llama.cpp's) per layer; {i} is the layer index.
LAYER_TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
    "post_ffn_norm": "blk.{i}.post_ffw_norm.weight",
}
MODEL_TENSORS = {"embed": "token_embd.weight", "norm": "output_norm.weight", "output": "output.weight"}

# (name, shape) -> weight; the loader checks the shape, and gives 1-D tensors dense and
# matrices dense (--weights dense) or in their GGUF blocks (QuantWeight).
WeightSource = Callable[[str, tuple[int, ...]], Weight]
Proj = Linear | QuantLinear


@dataclass
class Layer:
    attn_norm: torch.Tensor
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    ffn_norm: torch.Tensor
    gate: Proj
    up: Proj
    down: Proj
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None

    @property
    def projections(self) -> tuple[Proj, ...]:
        """q, k, v, o, gate, up, down: decode_layer's order of its weights."""
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


class Transformer:
    """Embedding -> N x (attention, gated MLP) -> norm -> logits, over a paged KV cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        get: WeightSource,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        devices: DeviceMap | None = None,
    ) -> None:
        """`cfg` gives this process's widths (a tensor-parallel shard's, runtime/parallel.py);
        `reduce` sums the row-parallel outputs of attention and MLP across ranks (T, hidden);
        `devices` says where each part is (runtime/device_map.py; `get` places the weights
        there), else everything is on `device`."""
        self.cfg = cfg
        self.reduce = reduce or _identity
        self.devices = devices or DeviceMap.single(cfg.n_layers, device)
        c = cfg
        self.embed = Embedding(get(MODEL_TENSORS["embed"], (c.vocab_size, c.hidden)), dtype)
        self.norm = dense(get(MODEL_TENSORS["norm"], (c.hidden,)))
        self.output = (
            linear(_to(self.embed.weight, self.devices.output))  # tied: a copy when the head is offloaded
            if c.tied_embeddings
            else linear(get(MODEL_TENSORS["output"], (c.vocab_size, c.hidden)))
        )
        self.layers = [self._layer(i, get) for i in range(c.n_layers)]
        self.fused = [False] * c.n_layers  # set_decode_dtype: layers a decode step runs as one op
        # cos/sin are computed where the batch is (the input's device), then copied to the others
        self.rotary = Rotary(c.rope, self.devices.embed)
        self.rotary_local = Rotary(c.rope_local, self.devices.embed) if c.rope_local else self.rotary

    def _layer(self, i: int, get: WeightSource) -> Layer:
        c = self.cfg
        q_out, kv_out, v_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.v_head_dim

        def w(key: str, shape: tuple[int, ...]) -> Weight:
            return get(LAYER_TENSORS[key].format(i=i), shape)

        def vec(key: str, n: int) -> torch.Tensor:
            return dense(w(key, (n,)))

        def bias(key: str, n: int) -> torch.Tensor | None:
            return vec(key, n) if c.qkv_bias else None

        layer = Layer(
            attn_norm=vec("attn_norm", c.hidden),
            q=linear(w("q", (q_out, c.hidden)), bias("q_bias", q_out)),
            k=linear(w("k", (kv_out, c.hidden)), bias("k_bias", kv_out)),
            v=linear(w("v", (v_out, c.hidden)), bias("v_bias", v_out)),
            o=linear(w("o", (c.hidden, c.n_heads * c.v_head_dim))),
            ffn_norm=vec("ffn_norm", c.hidden),
            gate=linear(w("gate", (c.ffn, c.hidden))),
            up=linear(w("up", (c.ffn, c.hidden))),
            down=linear(w("down", (c.hidden, c.ffn))),
        )
        if c.qk_norm:
            layer.q_norm = vec("q_norm", c.head_dim)
            layer.k_norm = vec("k_norm", c.head_dim)
        if c.sandwich_norm:
            layer.post_attn_norm = vec("post_attn_norm", c.hidden)
            layer.post_ffn_norm = vec("post_ffn_norm", c.hidden)
        return layer

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """-> float32 logits (len(batch.logits_indices), vocab)."""
        return self.logits(self.hidden_states(batch, cache)[batch.logits_indices])

    @torch.inference_mode()
    def hidden_states(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """-> final-norm hidden states of every batch row (T, hidden), in the activation dtype."""
        c = self.cfg
        x = self.embed(batch.token_ids)  # (T, hidden)
        if c.embed_scale != 1.0:
            # llama.cpp and HF both scale in the activation dtype
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        cos_sin = self.rotary.cos_sin(batch.positions)
        cos_sin_local = (
            self.rotary_local.cos_sin(batch.positions) if self.rotary_local is not self.rotary else cos_sin
        )
        # The step's inputs on each device the layers use (one copy per device and step).
        inputs = {x.device: (batch, cos_sin, cos_sin_local)}
        for i, layer in enumerate(self.layers):
            dev = self.devices.layers[i]
            if dev not in inputs:
                inputs[dev] = (batch.to(dev), _pair_to(cos_sin, dev), _pair_to(cos_sin_local, dev))
            b, cs_global, cs_local = inputs[dev]
            x = x.to(dev)  # (T, hidden), across a -ngl boundary
            sliding = c.is_sliding(i)
            rot, cs = (self.rotary_local, cs_local) if sliding else (self.rotary, cs_global)
            window = c.sliding_window if sliding else 0
            if self.fused[i] and b.decode_rows == b.num_tokens and x.dtype == torch.float32:
                plan = decode_plan(b, cache.block_size, window)
                if plan is not None and plan.every_row:
                    x = self._decode_layer(i, layer, x, b, cache, rot, cs, plan)
                    continue
            h = rms_norm(x, layer.attn_norm, c.norm_eps)
            h = self.reduce(self._attention(i, layer, h, b, cache, rot, cs, window))
            if layer.post_attn_norm is not None:
                h = rms_norm(h, layer.post_attn_norm, c.norm_eps)
            x = x + h
            h = rms_norm(x, layer.ffn_norm, c.norm_eps)
            n8 = b.decode_rows
            gate, up = project(h, (layer.gate, layer.up), n8)
            h = self.reduce(layer.down(gated(gate, up, c.activation), n8))
            if layer.post_ffn_norm is not None:
                h = rms_norm(h, layer.post_ffn_norm, c.norm_eps)
            x = x + h
        return rms_norm(x.to(self.devices.output), self.norm, c.norm_eps)

    def set_head_dtype(self, head_dtype: str) -> str:
        """The output head's products (EngineConfig.head_dtype); returns "float32", "bfloat16" or "int8"."""
        if head_dtype == "auto":
            quant_cpu = isinstance(self.output, QuantLinear) and self.output.weight.data.device.type == "cpu"
            head_dtype = "bfloat16" if quant_cpu else "float32"
        self.output.set_products(head_dtype)
        return head_dtype

    def set_decode_dtype(self, decode_dtype: str) -> str:
        """The layers' products for decode rows (EngineConfig.decode_dtype); returns "float32" or "int8"."""
        projs = [p for layer in self.layers for p in layer.projections]
        if decode_dtype == "auto":
            quant_cpu = all(isinstance(p, QuantLinear) and p.weight.data.device.type == "cpu" for p in projs)
            decode_dtype = "int8" if quant_cpu and projs and ops.int8_dot() else "float32"
        for p in projs:
            p.decode_int8 = decode_dtype == "int8"
        # Layers a decode-only step runs as one op (ops.decode_layer): int8 products of
        # weights in blocks on the CPU, no biases, not sharded (nothing to reduce).
        self.fused = [
            self.reduce is _identity and all(int8_on_cpu(p) and p.bias is None for p in layer.projections)
            for layer in self.layers
        ]
        return decode_dtype

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (N, hidden) -> float32 logits (N, vocab)."""
        c = self.cfg
        logits = self.output(x).float()
        if c.final_softcap:
            logits = c.final_softcap * torch.tanh(logits / c.final_softcap)
        return logits

    @torch.inference_mode()
    def move_kv(self, cache: KVCache, src: torch.Tensor, dst: torch.Tensor, delta: int) -> None:
        """Move cached tokens to new slots, re-rotating their keys by `delta` positions (context shift).

        A key stored at position p is R(p) k; R(p + delta) k = R(delta) R(p) k, so
        rotating the stored key by delta gives the key the token would have had there.
        """
        for i in range(self.cfg.n_layers):
            rot = self.rotary_local if self.cfg.is_sliding(i) else self.rotary
            dev = self.devices.layers[i]
            s, d = src.to(dev), dst.to(dev)
            if delta:
                cos, sin = _pair_to(rot.cos_sin(torch.full((src.numel(),), delta, device=src.device)), dev)
                cache.move(i, s, d, partial(_rotate, rot, cos, sin))
            else:
                cache.move(i, s, d)

    def _attention(
        self,
        i: int,
        layer: Layer,
        h: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        rot: Rotary,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        window: int,
    ) -> torch.Tensor:
        c = self.cfg
        t = h.shape[0]
        n8 = batch.decode_rows
        q, k, v = project(h, (layer.q, layer.k, layer.v), n8)
        q = q.view(t, c.n_heads, c.head_dim)
        k = k.view(t, c.n_kv_heads, c.head_dim)
        v = v.view(t, c.n_kv_heads, c.v_head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, c.norm_eps)
            k = rms_norm(k, layer.k_norm, c.norm_eps)
        q = rot.apply(q, *cos_sin)
        k = rot.apply(k, *cos_sin)
        o = paged_attention(q, k, v, cache, i, batch, c.scale, window, c.attn_softcap)
        return layer.o(o.reshape(t, c.n_heads * c.v_head_dim), n8)

    def _decode_layer(
        self,
        i: int,
        layer: Layer,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        rot: Rotary,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        plan: DecodePlan,
    ) -> torch.Tensor:
        """The layer loop's body for a step of decode rows only, as one op: the same numbers."""
        c = self.cfg
        ws = [p.weight for p in layer.projections if isinstance(p, QuantLinear)]  # all seven: see self.fused
        norms = [layer.attn_norm, layer.q_norm, layer.k_norm, layer.post_attn_norm, layer.ffn_norm, layer.post_ffn_norm]
        return ops.decode_layer(
            x, norms, [w.data for w in ws], [w.qtype for w in ws], *cos_sin, cache.k[i], cache.v[i],
            batch.slot_mapping, plan.blocks, plan.lo, plan.hi,
            [c.n_heads, c.n_kv_heads, c.head_dim, c.v_head_dim], [c.norm_eps, c.scale, c.attn_softcap],
            rot.cfg.neox, KINDS[c.activation],
        )  # fmt: skip


def dense(w: Weight) -> torch.Tensor:
    """Vectors (norms, biases) always come dense from the loader."""
    assert isinstance(w, torch.Tensor), "1-D weights are loaded dense"
    return w


def _to(w: Weight, device: torch.device) -> Weight:
    """w on `device`: w itself when it is there already (a tied head shares the table's bytes)."""
    if isinstance(w, QuantWeight):
        return w if w.data.device == device else QuantWeight(w.data.to(device), w.qtype, w.shape)
    return w.to(device)


def _pair_to(cs: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return cs[0].to(device), cs[1].to(device)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _rotate(rot: Rotary, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return rot.apply(k, cos, sin)


def default_attn_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
