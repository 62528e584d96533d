"""The plain-torch reference of every custom op: quantized ones dequantize the blocks, then ordinary torch math.

Runs on any device; the compiled kernels (CPU, CUDA) are tested against it.
"""

from __future__ import annotations

import torch

from runtime.gguf.quants import quant_type


def dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """w (n, row_bytes) uint8 GGUF blocks -> (n, k) float32."""
    qt = quant_type(qtype)
    n = w.shape[0]
    blocks = w.contiguous().view(n * (k // qt.block_size), qt.type_size)
    return qt.dequantize_blocks(blocks).reshape(n, k)


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with W (n, row_bytes) in GGUF blocks -> (t, n) float32."""
    return torch.nn.functional.linear(x.float(), dequantize(w, qtype, k))


def qmatmul_bf16(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with x and W's values rounded to bfloat16, summed in float32 -> (t, n) float32."""
    return torch.nn.functional.linear(x.bfloat16().float(), dequantize(w, qtype, k).bfloat16().float())


def qmatmul_q8_many(x: torch.Tensor, ws: list[torch.Tensor], qtypes: list[int], k: int) -> list[torch.Tensor]:
    """[qmatmul_q8(x, w, qtype, k) for each matrix]."""
    return [qmatmul_q8(x, w, qt, k) for w, qt in zip(ws, qtypes)]


def quantize_q8(x: torch.Tensor) -> torch.Tensor:
    """x (t, k) float32 with each 32-value block of a row as int8 values times their scale:
    q = round(x * 127 / amax) (ties to even), x_hat = q * amax / 127 (a short last block too)."""
    t, k = x.shape
    pad = -k % 32
    xb = torch.nn.functional.pad(x.float(), (0, pad)).reshape(t, -1, 32)  # (t, blocks, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / amax as a true quotient, as the kernels and llama.cpp compute it (torch's
    # scalar / tensor is reciprocal then multiply: an ulp off, which moves exact ties)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * (amax / 127)).reshape(t, -1)[:, :k]


def qmatmul_q8(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """x (t, k) @ W^T with x's rows quantized to int8 per 32 values (quantize_q8) -> (t, n) float32."""
    return qmatmul(quantize_q8(x), w, qtype, k)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,), in float32; returns x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up, in float32: act the tanh-approximated gelu or silu; returns gate's dtype."""
    g = gate.float()
    a = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return (a * up.float()).to(gate.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x (T, H, D) rotated on its first 2 * half channels by cos/sin (T, 1, half), in float32.

    NEOX pairs channel i with i + half, NORM pairs 2i with 2i + 1; the rest is kept.
    """
    d = 2 * cos.shape[-1]
    xf = x.float()
    rot, rest = xf[..., :d], xf[..., d:]
    if neox:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rest.shape[-1]:
        out = torch.cat((out, rest), dim=-1)
    return out.to(x.dtype)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached keys, in place in the paged cache.

    q (B, H, D); caches (num_blocks, block_size, KVH, D | Dv); blocks (B, W) block ids;
    sequence b sees keys [lo_b, hi_b) of the W * block_size its blocks hold -> (B, H, Dv).
    Keys are gathered from whole blocks and the rest masked, so a sequence's result does not
    depend on the others'.
    """
    b, w = blocks.shape
    bs = k_cache.shape[1]
    k = k_cache[blocks].flatten(1, 2).to(q.dtype).transpose(1, 2)  # (B, KVH, S, D), S = W * bs
    v = v_cache[blocks].flatten(1, 2).to(q.dtype).transpose(1, 2)
    pos = torch.arange(w * bs, device=q.device)[None, :]
    mask = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None, None, :]  # (B, 1, 1, S)
    qb = q.unsqueeze(2)  # (B, H, 1, D)
    if not softcap:
        o = torch.nn.functional.scaled_dot_product_attention(
            qb, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != qb.shape[1]
        )
    else:
        group = qb.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.matmul(qb.float(), k.float().transpose(2, 3)) * scale  # (B, H, 1, S)
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
        o = torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)
    return o.squeeze(2)


def cached_tokens(cache: torch.Tensor, blocks: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of one layer's paged cache (num_blocks, block_size, ...) for the
    sequence whose block ids are `blocks` (M,): a copy (end - start, ...)."""
    bs = cache.shape[1]
    first = start // bs
    return cache[blocks[first : -(-end // bs)]].flatten(0, 1)[start - first * bs : end - first * bs]


# Queries per block of prompt_attention: each block computes scores only for the keys its
# queries see (up to its last query; from the window's start), which skips most of the
# masked scores of a causal or sliding-window prompt.
QUERY_BLOCK = 128


def prompt_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    start: int,
    window: int,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """A prompt chunk's attention over its sequence's keys in the paged cache, in float32.

    q (n, H, D); caches (num_blocks, block_size, KVH, D | Dv); blocks (W,) the sequence's
    block ids. Query i is key start + i; it sees the keys up to its own, and only the last
    `window` of them when window > 0 (key j visible when i - window < j <= i, as llama.cpp
    masks) -> (n, H, Dv) in q's dtype. QUERY_BLOCK queries at a time over only the keys they see.
    """
    n, h, d = q.shape
    kvh, dv = k_cache.shape[2], v_cache.shape[3]
    g = h // kvh
    lo = max(0, start - window + 1) if window else 0  # the first query's first key
    kt = cached_tokens(k_cache, blocks, lo, start + n).float().permute(1, 2, 0)  # (KVH, D, S)
    vh = cached_tokens(v_cache, blocks, lo, start + n).float().transpose(0, 1)  # (KVH, S, Dv)
    out = torch.empty(n, h, dv, dtype=q.dtype, device=q.device)
    for b0 in range(0, n, QUERY_BLOCK):
        b1 = min(n, b0 + QUERY_BLOCK)
        m = b1 - b0
        # keys [k0, k1) of the cache: from the first query's window start to the last query's own key
        k0, k1 = (max(0, start + b0 - window + 1) if window else 0), start + b1
        q_idx = torch.arange(start + b0, start + b1, device=q.device)[:, None]
        k_idx = torch.arange(k0, k1, device=q.device)[None, :]
        seen = k_idx <= q_idx  # (m, keys)
        if window:
            seen &= k_idx > q_idx - window
        # the g query heads of each KV head as one (g * m, D) matrix: one product per KV head
        qb = q[b0:b1].float().reshape(m, kvh, g, d).permute(1, 2, 0, 3).reshape(kvh, g * m, d)
        s = torch.bmm(qb, kt[:, :, k0 - lo : k1 - lo]) * scale  # (KVH, g * m, keys)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.view(kvh, g, m, k1 - k0).masked_fill(~seen, float("-inf"))
        o = torch.bmm(s.softmax(-1).view(kvh, g * m, k1 - k0), vh[:, k0 - lo : k1 - lo])  # (KVH, g * m, Dv)
        out[b0:b1] = o.view(kvh, g, m, dv).permute(2, 0, 1, 3).reshape(m, h, dv)
    return out


def apply_bitmask_(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """logits (rows, vocab) float32, in place: -inf where the token's bit in mask (rows, words) int32 is 0.

    Bit t % 32 of word t // 32 (the words' bytes read little-endian, as every supported host stores them).
    """
    n, vocab = logits.shape
    bits = (mask.to(logits.device).view(torch.uint8).reshape(n, -1).int().unsqueeze(-1) >> torch.arange(8, device=logits.device)) & 1
    logits.masked_fill_(bits.reshape(n, -1)[:, :vocab] == 0, float("-inf"))


def decode_layer(
    x: torch.Tensor,
    norms: list[torch.Tensor | None],
    ws: list[torch.Tensor],
    qtypes: list[int],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    heads: list[int],
    params: list[float],
    neox: bool,
    gelu: bool,
) -> torch.Tensor:
    """One transformer layer for decode rows x (B, hidden) -> (B, hidden), int8 products.

    norms: attention, q, k, post-attention, ffn, post-ffn (None where absent); ws/qtypes:
    q, k, v, o, gate, up, down; heads: (n_heads, n_kv_heads, head_dim, v_head_dim); params:
    (eps, attention scale, softcap). This step's keys and values go to `slots` of the caches
    first; then each row attends as paged_decode's blocks/lo/hi say.
    """
    attn_norm, q_norm, k_norm, post_attn, ffn_norm, post_ffn = norms
    assert attn_norm is not None and ffn_norm is not None
    nh, nkv, hd, vd = heads
    eps, scale, softcap = params
    t, hidden = x.shape
    h = rms_norm(x, attn_norm, eps)
    q, k, v = (qmatmul_q8(h, w, qt, hidden) for w, qt in zip(ws[:3], qtypes[:3]))
    q, k, v = q.view(t, nh, hd), k.view(t, nkv, hd), v.view(t, nkv, vd)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rope(q, cos, sin, neox), rope(k, cos, sin, neox)
    k_cache.view(-1, nkv, hd).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, nkv, vd).index_copy_(0, slots, v.to(v_cache.dtype))
    o = paged_decode(q, k_cache, v_cache, blocks, lo, hi, scale, softcap).reshape(t, nh * vd)
    h = qmatmul_q8(o, ws[3], qtypes[3], nh * vd)
    x = x + (h if post_attn is None else rms_norm(h, post_attn, eps))
    h = rms_norm(x, ffn_norm, eps)
    a = gated(qmatmul_q8(h, ws[4], qtypes[4], hidden), qmatmul_q8(h, ws[5], qtypes[5], hidden), gelu)
    h = qmatmul_q8(a, ws[6], qtypes[6], a.shape[1])
    return x + (h if post_ffn is None else rms_norm(h, post_ffn, eps))
