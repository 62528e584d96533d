// CPU kernels for the small per-token ops of a step (rotary, gated activation, decode attention, grammar masks; RMS norm: norm_cpu.cpp), one pass each.
//
// A decode step runs ~10 of these per layer on a few hundred values; as chains of torch ops
// each costs 5-10 dispatches, which is more time than the arithmetic. Rows are independent
// and each row is summed in one fixed order, so a row's result does not depend on the batch.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_row.h"
#include "cpu_ops.h"
#include "vec_math.h"
#include "work_pool.h"

namespace fused {

// x (T, H, D) rotated on its first 2 * half channels by cos/sin (T, 1, half) float32:
// NEOX pairs channel i with i + half, NORM pairs 2i with 2i + 1; the rest is copied.
torch::Tensor rope(const torch::Tensor& x_in, const torch::Tensor& cos_in, const torch::Tensor& sin_in,
                   bool neox) {
    TORCH_CHECK(x_in.dim() == 3, "rope: x must be (tokens, heads, head_dim)");
    const int64_t t = x_in.size(0), h = x_in.size(1), dd = x_in.size(2);
    TORCH_CHECK(cos_in.dim() == 3 && cos_in.size(0) == t && cos_in.size(1) == 1 && cos_in.sizes() == sin_in.sizes(),
                "rope: cos and sin must be (tokens, 1, rotary_dim / 2)");
    const int64_t half = cos_in.size(2);
    TORCH_CHECK(2 * half <= dd, "rope: rotary dim ", 2 * half, " exceeds head_dim ", dd);
    const auto x = x_in.to(torch::kFloat32).contiguous();
    const auto c = cos_in.to(torch::kFloat32).contiguous();
    const auto s = sin_in.to(torch::kFloat32).contiguous();
    auto y = torch::empty_like(x);
    const float* xp = x.data_ptr<float>();
    const float* cp = c.data_ptr<float>();
    const float* sp = s.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < t; ++i) {
        const float* ci = cp + i * half;
        const float* si = sp + i * half;
        for (int64_t j = 0; j < h; ++j) {
            const float* xr = xp + (i * h + j) * dd;
            float* yr = yp + (i * h + j) * dd;
            if (neox) {
#pragma omp simd
                for (int64_t p = 0; p < half; ++p) {
                    const float x1 = xr[p], x2 = xr[p + half];
                    yr[p] = x1 * ci[p] - x2 * si[p];
                    yr[p + half] = x2 * ci[p] + x1 * si[p];
                }
            } else {
#pragma omp simd
                for (int64_t p = 0; p < half; ++p) {
                    const float x1 = xr[2 * p], x2 = xr[2 * p + 1];
                    yr[2 * p] = x1 * ci[p] - x2 * si[p];
                    yr[2 * p + 1] = x2 * ci[p] + x1 * si[p];
                }
            }
            for (int64_t p = 2 * half; p < dd; ++p) yr[p] = xr[p];
        }
    }
    return y.to(x_in.scalar_type());
}

// ---- gated activations: act(gate) * up, act = tanh-approximated gelu or silu ----

inline float act_scalar(float x, bool gelu) {
    if (!gelu) return x / (1.f + std::exp(-x));
    const float z = 0.7978845608028654f * (x + 0.044715f * x * x * x);  // sqrt(2 / pi) (x + 0.044715 x^3)
    return 0.5f * x * (1.f + std::tanh(z));
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// y[i] = act(g[i]) * u[i] for i < n, 16 at a time.
static void gated_avx512(const float* g, const float* u, float* y, int64_t n, bool gelu) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
        __m512 a;
        if (gelu) {
            const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            const __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                           _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
            // 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)): no cancellation where tanh(z) is near -1
            a = _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_mul_ps(_mm512_set1_ps(-2.f), z))));
        } else {
            a = _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        }
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, u + i)));
    }
}
// decode_head's float32 cache case for d, dv multiples of 16, for G query heads of one KV
// head at once (q: G rows of d, out: G rows of dv): each key and value row is read once for
// the G heads (from L1 after the first), and each head's sums run in the same order as
// alone, so a head's result does not depend on G. Sums in another order than decode_head's;
// exp through exp512 (~1 ulp).
static void decode_heads_avx512(const float* q, int64_t G, const float* kc, const float* vc, const int64_t* blocks,
                                int64_t bs, int64_t kvh, int64_t kv, int64_t d, int64_t dv, int64_t lo, int64_t hi,
                                float scale, float softcap, float* out, std::vector<float>& s) {
    const int64_t n = hi - lo, sn = n + 16;  // s: G rows of sn scores
    s.resize((size_t)(G * sn));
    float m[64];
    for (int64_t g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j < hi; ++j) {
        const float* kr = kc + ((blocks[j / bs] * bs + j % bs) * kvh + kv) * d;
        for (int64_t g = 0; g < G; ++g) {
            const float* qg = q + g * d;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 32 <= d; i += 32) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i), _mm512_loadu_ps(kr + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i + 16), _mm512_loadu_ps(kr + i + 16), a1);
            }
            if (i < d) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i), _mm512_loadu_ps(kr + i), a0);
            float x = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
            if (softcap > 0.f) x = softcap * std::tanh(x / softcap);
            s[(size_t)(g * sn + j - lo)] = x;
            m[g] = std::max(m[g], x);
        }
    }
    float inv[64];
    for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * sn;
        __m512 tot = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {  // exp(s - m), the lanes past n left out of the sum
            const __mmask16 mk = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + j), _mm512_set1_ps(m[g])));
            _mm512_mask_storeu_ps(sg + j, mk, e);
            tot = _mm512_add_ps(tot, _mm512_maskz_mov_ps(mk, e));
        }
        inv[g] = 1.f / _mm512_reduce_add_ps(tot);
        for (int64_t i = 0; i < dv; i += 16) _mm512_storeu_ps(out + g * dv + i, _mm512_setzero_ps());
    }
    for (int64_t j = lo; j < hi; ++j) {
        const float* vr = vc + ((blocks[j / bs] * bs + j % bs) * kvh + kv) * dv;
        for (int64_t g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(s[(size_t)(g * sn + j - lo)]);
            float* og = out + g * dv;
            for (int64_t i = 0; i < dv; i += 16)
                _mm512_storeu_ps(og + i, _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + i), _mm512_loadu_ps(og + i)));
        }
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < dv; i += 16)
            _mm512_storeu_ps(out + g * dv + i, _mm512_mul_ps(_mm512_loadu_ps(out + g * dv + i), _mm512_set1_ps(inv[g])));
}
#pragma GCC pop_options
#endif

// Whether the CPU runs the AVX-512 paths above.
bool cpu_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    return yes;
#else
    return false;
#endif
}

// act(gate) * up for gate, up (T, F) -> (T, F) in gate's dtype; float32 math.
torch::Tensor gated(const torch::Tensor& gate_in, const torch::Tensor& up_in, bool gelu) {
    TORCH_CHECK(gate_in.sizes() == up_in.sizes(), "gated: gate and up differ in shape");
    const auto g = gate_in.to(torch::kFloat32).contiguous();
    const auto u = up_in.to(torch::kFloat32).contiguous();
    auto y = torch::empty_like(g);
    const int64_t f = g.dim() ? g.size(-1) : 1, rows = f ? g.numel() / f : 0;
    const float* gp = g.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const bool avx512 = cpu_avx512();
    parallel_rows(rows, 16 * f, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t o = r * f;
#if defined(__x86_64__) && defined(__GNUC__)
            if (avx512) {
                gated_avx512(gp + o, up + o, yp + o, f, gelu);
                continue;
            }
#endif
            for (int64_t i = 0; i < f; ++i) yp[o + i] = act_scalar(gp[o + i], gelu) * up[o + i];
        }
    });
    return y.to(gate_in.scalar_type());
}

// q (B, H, D); caches (num_blocks, block_size, KVH, D|Dv); blocks (B, W) int64; lo/hi (B,):
// sequence b attends to keys [lo_b, hi_b) of the W * block_size its blocks hold -> (B, H, Dv).
torch::Tensor paged_decode(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& blocks_in, const torch::Tensor& lo_in, const torch::Tensor& hi_in,
                           double scale, double softcap) {
    TORCH_CHECK(q_in.dim() == 3, "paged_decode: q must be (batch, heads, head_dim)");
    TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.size(0) == v_cache.size(0) &&
                    k_cache.size(1) == v_cache.size(1) && k_cache.size(2) == v_cache.size(2),
                "paged_decode: caches must be (num_blocks, block_size, kv_heads, dim)");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode: k and v caches differ in dtype");
    const int64_t b_n = q_in.size(0), h_n = q_in.size(1), d = q_in.size(2);
    const int64_t nb = k_cache.size(0), bs = k_cache.size(1), kvh = k_cache.size(2), dv = v_cache.size(3);
    TORCH_CHECK(k_cache.size(3) == d, "paged_decode: key dim ", k_cache.size(3), " != query dim ", d);
    TORCH_CHECK(kvh > 0 && h_n % kvh == 0, "paged_decode: ", h_n, " query heads do not group over ", kvh, " kv heads");
    TORCH_CHECK(blocks_in.dim() == 2 && blocks_in.size(0) == b_n, "paged_decode: blocks must be (batch, width)");
    TORCH_CHECK(lo_in.numel() == b_n && hi_in.numel() == b_n, "paged_decode: lo and hi need one value per sequence");
    const auto q = q_in.to(torch::kFloat32).contiguous();
    const auto kc = k_cache.contiguous();
    const auto vc = v_cache.contiguous();
    const auto blocks = blocks_in.to(torch::kInt64).contiguous();
    const auto lo = lo_in.to(torch::kInt64).contiguous();
    const auto hi = hi_in.to(torch::kInt64).contiguous();
    const int64_t w = blocks.size(1);
    const int64_t* bp = blocks.data_ptr<int64_t>();
    const int64_t* lp = lo.data_ptr<int64_t>();
    const int64_t* hp = hi.data_ptr<int64_t>();
    int64_t keys = 1;  // the most keys a sequence sees: the work estimate per (sequence, head)
    for (int64_t i = 0; i < b_n; ++i) {
        keys = std::max(keys, hp[i] - lp[i]);
        TORCH_CHECK(0 <= lp[i] && lp[i] <= hp[i] && hp[i] <= w * bs, "paged_decode: keys [", lp[i], ", ", hp[i],
                    ") outside the ", w * bs, " the blocks hold");
        for (int64_t c = lp[i] / bs; c < (hp[i] + bs - 1) / bs; ++c)
            TORCH_CHECK(0 <= bp[i * w + c] && bp[i * w + c] < nb, "paged_decode: block id ", bp[i * w + c],
                        " out of range");
    }
    auto out = torch::empty({b_n, h_n, dv}, q.options());
    const float* qp = q.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t group = h_n / kvh;
    const float fs = (float)scale, fc = (float)softcap;
    const bool fast = cpu_avx512() && d % 16 == 0 && dv % 16 == 0;  // decode_heads_avx512 (float32 caches)
    // Units of work: (sequence, KV head, a share of its query heads), the shares as large as
    // leave every thread a unit: on the fast path a unit reads its keys and values once.
    int64_t share = group;
    while (share > 1 && share % 2 == 0 && b_n * kvh * (group / share) < kernel_threads()) share /= 2;
    share = std::min<int64_t>(share, 64);
    while (group % share) --share;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kc.scalar_type(), "paged_decode", [&] {
        const scalar_t* kp = kc.data_ptr<scalar_t>();
        const scalar_t* vp = vc.data_ptr<scalar_t>();
        // units of `share` heads, (hi - lo) * (d + dv) multiply-adds per head
        parallel_rows(b_n * h_n / share, share * keys * (d + dv), [&](int64_t u0, int64_t u1) {
            std::vector<float> s;
            for (int64_t u = u0; u < u1; ++u) {
                const int64_t r = u * share, i = r / h_n, h = r % h_n;  // the unit's first (sequence, head)
#if defined(__x86_64__) && defined(__GNUC__)
                if (std::is_same_v<scalar_t, float> && fast) {  // the casts change nothing then
                    decode_heads_avx512(qp + r * d, share, reinterpret_cast<const float*>(kp),
                                        reinterpret_cast<const float*>(vp), bp + i * w, bs, kvh, h / group, d, dv,
                                        lp[i], hp[i], fs, fc, op + r * dv, s);
                    continue;
                }
#endif
                for (int64_t g = 0; g < share; ++g)
                    decode_head<scalar_t>(qp + (r + g) * d, kp, vp, bp + i * w, bs, kvh, (h + g) / group, d, dv,
                                          lp[i], hp[i], fs, fc, op + (r + g) * dv, s);
            }
        });
    });
    return out.to(q_in.scalar_type());
}

// logits (rows, vocab) float32, in place: -inf wherever the token's bit in mask (rows, words)
// int32 is 0 (bit t % 32 of word t // 32). A word of -1 (all allowed) is skipped, so an
// unconstrained row costs a scan of its words; 0 (all banned) fills 32 logits at once.
void apply_bitmask_(const torch::Tensor& logits, const torch::Tensor& mask_in) {
    TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.is_contiguous(),
                "apply_bitmask_: logits must be a contiguous (rows, vocab) float32 tensor");
    TORCH_CHECK(mask_in.dim() == 2 && mask_in.scalar_type() == torch::kInt32 && mask_in.size(0) == logits.size(0),
                "apply_bitmask_: mask must be (rows, words) int32, a row per logits row");
    const int64_t n = logits.size(0), vocab = logits.size(1), words = mask_in.size(1);
    TORCH_CHECK(words * 32 >= vocab, "apply_bitmask_: ", words, " words do not cover ", vocab, " tokens");
    const auto mask = mask_in.contiguous();
    const int32_t* mp = mask.data_ptr<int32_t>();
    float* lp = logits.data_ptr<float>();
    const float ninf = -std::numeric_limits<float>::infinity();
    parallel_rows(n, vocab / 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            float* row = lp + r * vocab;
            const int32_t* mr = mp + r * words;
            for (int64_t w = 0; w * 32 < vocab; ++w) {
                const uint32_t bits = (uint32_t)mr[w];
                if (bits == 0xFFFFFFFFu) continue;
                float* x = row + w * 32;
                const int64_t lim = std::min<int64_t>(32, vocab - w * 32);
                if (bits == 0) {
                    std::fill(x, x + lim, ninf);
                    continue;
                }
                for (int64_t j = 0; j < lim; ++j)
                    if (!((bits >> j) & 1u)) x[j] = ninf;
            }
        }
    });
}

}  // namespace fused

// Schemas in runtime/ops/schema.py, references in runtime/ops/reference.py.
TORCH_LIBRARY_IMPL(gguf_serve, CPU, m) {
    m.impl("rms_norm", &fused::rms_norm);
    m.impl("rope", &fused::rope);
    m.impl("paged_decode", &fused::paged_decode);
    m.impl("gated", &fused::gated);
    m.impl("apply_bitmask_", &fused::apply_bitmask_);
}
