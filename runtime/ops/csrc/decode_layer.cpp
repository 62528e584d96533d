// One transformer layer for a step of decode rows, as one op: the layer loop's ops called from C++.
//
// In a decode step each layer runs ~17 small ops (norms, rotary, the cache write, attention,
// seven int8 products, the activation, two residual adds); dispatched one by one from Python
// they cost ~100 us a layer beside the products' own time. This op makes the same calls of
// the same functions in the same order as runtime/models/transformer.py's layer loop (the
// reference, runtime/ops/reference.py's decode_layer, composes the same ops), so its result
// is that loop's bit for bit.

#include <torch/extension.h>

#include <cstring>

#include "cpu_ops.h"

namespace {

// Store rows (T, KVH, D) at flat slots (T,) of a cache (blocks, block_size, KVH, D).
void write_rows(const torch::Tensor& cache, const torch::Tensor& slots, const torch::Tensor& rows) {
    const int64_t per = cache.numel() / std::max<int64_t>(1, cache.size(0) * cache.size(1));
    TORCH_CHECK(rows.numel() == slots.numel() * per, "decode_layer: a cache row holds ", per, " values");
    if (cache.scalar_type() != torch::kFloat32 || !cache.is_contiguous()) {
        cache.view({-1, rows.size(1), rows.size(2)}).index_copy_(0, slots, rows.to(cache.scalar_type()));
        return;
    }
    // index_copy_'s copy, without its dispatch: float32 rows to float32 slots
    const auto src = rows.to(torch::kFloat32).contiguous();
    const auto idx = slots.to(torch::kInt64).contiguous();
    const int64_t n = cache.size(0) * cache.size(1);
    const int64_t* ip = idx.data_ptr<int64_t>();
    float* dst = cache.data_ptr<float>();
    const float* sp = src.data_ptr<float>();
    for (int64_t i = 0; i < idx.numel(); ++i) {
        TORCH_CHECK(0 <= ip[i] && ip[i] < n, "decode_layer: slot ", ip[i], " outside the cache's ", n);
        std::memcpy(dst + ip[i] * per, sp + i * per, (size_t)per * sizeof(float));
    }
}

torch::Tensor norm_or_same(const torch::Tensor& x, const std::optional<torch::Tensor>& w, double eps) {
    return w ? fused::rms_norm(x, *w, eps) : x;
}

// x (B, hidden) float32 -> (B, hidden). norms: attn, q, k, post-attention, ffn, post-ffn
// (None where the architecture has none; q and k together); ws/qtypes: q, k, v, o, gate, up,
// down in GGUF blocks; heads: (n_heads, n_kv_heads, head_dim, v_head_dim); params: (eps,
// attention scale, softcap); cos/sin (B, 1, rotary_dim / 2); slots (B,): where this step's
// keys and values go; blocks/lo/hi: the keys each row attends to, as paged_decode takes them.
torch::Tensor decode_layer(const torch::Tensor& x, const c10::List<std::optional<torch::Tensor>>& norms,
                           at::TensorList ws, at::IntArrayRef qtypes, const torch::Tensor& cos, const torch::Tensor& sin,
                           const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& slots,
                           const torch::Tensor& blocks, const torch::Tensor& lo, const torch::Tensor& hi,
                           at::IntArrayRef heads, at::ArrayRef<double> params, bool neox, bool gelu) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "decode_layer: x must be (rows, hidden) float32");
    TORCH_CHECK(norms.size() == 6 && ws.size() == 7 && qtypes.size() == 7 && heads.size() == 4 && params.size() == 3,
                "decode_layer: 6 norms, 7 weights and types, 4 head sizes, 3 parameters");
    const std::optional<torch::Tensor> attn_norm = norms[0], q_norm = norms[1], k_norm = norms[2],
                                       post_attn = norms[3], ffn_norm = norms[4], post_ffn = norms[5];
    TORCH_CHECK(attn_norm && ffn_norm, "decode_layer: the attention and ffn norms are required");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "decode_layer: q and k norms come together");
    const int64_t t = x.size(0), hidden = x.size(1), nh = heads[0], nkv = heads[1], hd = heads[2], vd = heads[3];
    const double eps = params[0], scale = params[1], softcap = params[2];

    auto h = fused::rms_norm(x, *attn_norm, eps);
    const auto qkv = qmatmul_q8_many(h, {ws[0], ws[1], ws[2]}, {qtypes[0], qtypes[1], qtypes[2]}, hidden);
    auto q = qkv[0].view({t, nh, hd}), k = qkv[1].view({t, nkv, hd});
    const auto v = qkv[2].view({t, nkv, vd});
    if (q_norm) {
        q = fused::rms_norm(q, *q_norm, eps);
        k = fused::rms_norm(k, *k_norm, eps);
    }
    q = fused::rope(q, cos, sin, neox);
    k = fused::rope(k, cos, sin, neox);
    write_rows(k_cache, slots, k);
    write_rows(v_cache, slots, v);
    const auto o = fused::paged_decode(q, k_cache, v_cache, blocks, lo, hi, scale, softcap);
    h = norm_or_same(qmatmul_q8(o.reshape({t, nh * vd}), ws[3], qtypes[3], nh * vd), post_attn, eps);
    const auto x1 = x + h;

    h = fused::rms_norm(x1, *ffn_norm, eps);
    const auto gu = qmatmul_q8_many(h, {ws[4], ws[5]}, {qtypes[4], qtypes[5]}, hidden);
    const auto a = fused::gated(gu[0], gu[1], gelu);
    h = norm_or_same(qmatmul_q8(a, ws[6], qtypes[6], a.size(1)), post_ffn, eps);
    return x1 + h;
}

}  // namespace

// Schema in runtime/ops/schema.py, reference in runtime/ops/reference.py.
TORCH_LIBRARY_IMPL(gguf_serve, CPU, m) { m.impl("decode_layer", &decode_layer); }
