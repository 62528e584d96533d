// Prompt attention on the CPU: a sequence's new queries against its keys where they lie in the paged cache, causal and within a window, in float32.
//
// Unlike decode, a prompt has many query rows per key, so keys and values are worth tiling.
// A unit of work is (KV head, block of queries): the block's queries x that KV head's g query
// heads make the unit's R rows (row r: query r / g, head r % g), held as the lanes of AVX-512
// registers. Scores are kept key-major (st[key][row]), so the mask and the softmax's max and
// sum run down the lanes. A unit computes the scores of the keys its queries see (from its
// first query's window start to its last query's own key), so a causal prompt costs about
// half the products of a dense one, with scale, mask and softmax in the same pass over L2.
// Keys go by in blocks of kKeyBlock, each block's rows of K and V read once for all the
// unit's rows while they are in L2 (512 queries after 15,872 keys, Gemma 3's heads: 402 ->
// 240 ms, against torch's 290-353; 512 after none: unchanged, 2.9-3.9 ms).
// Each row's sums run in one order (over the head dim, then over the keys), whatever the
// unit around it. CPUs without AVX-512 (and tests) run attention_row.h's decode_head per row.

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_row.h"
#include "cpu_ops.h"
#include "vec_math.h"
#include "work_pool.h"

namespace fused {

namespace {

std::atomic<bool> g_avx512_allowed{true};  // tests turn it off to run the fallback here

constexpr int64_t kUnitRows = 64;  // query rows per unit: 64 x 256 floats of q^T stay in L1/L2
constexpr int64_t kKeyBlock = 128;  // keys whose rows of K (or V) a unit's rows go through at once

// One call's geometry: query i (of n) is key start + i and sees keys [first_key(i), start + i].
struct Geometry {
    int64_t n, h, d, dv, kvh, g, bs, start, window;
    float scale, softcap;
    const int64_t* blocks;

    int64_t first_key(int64_t i) const { return window > 0 ? std::max<int64_t>(0, start + i - window + 1) : 0; }
    int64_t slot(int64_t j) const { return blocks[j / bs] * bs + j % bs; }
    int64_t queries_per_unit() const { return std::max<int64_t>(1, kUnitRows / g); }
};

// The fallback: each (query, head) of a unit as one decode row over the keys it sees.
template <typename T>
void unit_rows(const Geometry& G, const float* q, const T* kc, const T* vc, int64_t kv, int64_t q0, int64_t q1,
               float* out) {
    thread_local std::vector<float> s;
    for (int64_t i = q0; i < q1; ++i)
        for (int64_t h = kv * G.g; h < (kv + 1) * G.g; ++h)
            decode_head<T>(q + (i * G.h + h) * G.d, kc, vc, G.blocks, G.bs, G.kvh, kv, G.d, G.dv, G.first_key(i),
                           G.start + i + 1, G.scale, G.softcap, out + (i * G.h + h) * G.dv, s);
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")

// A thread's buffers, kept between units and calls.
struct Scratch {
    std::vector<float> qt, st, kf, vf, zero;  // q^T (d, RP); scores (keys + 8, RP); float rows; a zero key row
    std::vector<const float*> kp, vp;        // the unit's key and value rows, in key order
    std::vector<int32_t> lo, hi;             // per row: first and last key it sees, from the unit's first key
    std::vector<float*> rows;                // per row: its output row (null past the unit's rows)
};

// acc[t][v] = sum_i k_t[i] * qt[i][lanes of vector v0 + v], for 8 keys and NV vectors of 16 rows.
template <int NV>
inline void score_tile(const float* qt, int64_t rp, int64_t v0, const float* const* k, int64_t d,
                       __m512 (&acc)[8][2]) {
    for (int t = 0; t < 8; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
    const float* qv = qt + v0 * 16;
    for (int64_t i = 0; i < d; ++i) {
        __m512 a[NV];
        for (int v = 0; v < NV; ++v) a[v] = _mm512_loadu_ps(qv + i * rp + v * 16);
        for (int t = 0; t < 8; ++t) {
            const __m512 b = _mm512_set1_ps(k[t][i]);
            for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_fmadd_ps(b, a[v], acc[t][v]);
        }
    }
}

// out rows r0 .. r0 + 7 (dv wide) += p[j][row] * v_j over keys [j0, j1), 32 values at a time;
// a row's sums continue where the last key block left them (the same order as in one go).
inline void value_tile(const float* st, int64_t rp, int64_t r0, const float* const* v, int64_t j0, int64_t j1,
                       int64_t dv, float* const* out) {
    for (int64_t c = 0; c < dv; c += 32) {
        const int64_t w0 = std::min<int64_t>(16, dv - c), w1 = std::max<int64_t>(0, std::min<int64_t>(16, dv - c - 16));
        const __mmask16 m0 = (__mmask16)((1u << w0) - 1), m1 = (__mmask16)((1u << w1) - 1);
        __m512 acc[8][2];
        for (int t = 0; t < 8; ++t) {
            acc[t][0] = out[t] ? _mm512_maskz_loadu_ps(m0, out[t] + c) : _mm512_setzero_ps();
            acc[t][1] = out[t] ? _mm512_maskz_loadu_ps(m1, out[t] + c + 16) : _mm512_setzero_ps();
        }
        for (int64_t j = j0; j < j1; ++j) {
            const __m512 a0 = _mm512_maskz_loadu_ps(m0, v[j] + c), a1 = _mm512_maskz_loadu_ps(m1, v[j] + c + 16);
            const float* pj = st + j * rp + r0;
            for (int t = 0; t < 8; ++t) {
                const __m512 p = _mm512_set1_ps(pj[t]);
                acc[t][0] = _mm512_fmadd_ps(p, a0, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(p, a1, acc[t][1]);
            }
        }
        for (int t = 0; t < 8; ++t) {
            if (!out[t]) continue;  // a lane past the unit's rows
            _mm512_mask_storeu_ps(out[t] + c, m0, acc[t][0]);
            _mm512_mask_storeu_ps(out[t] + c + 16, m1, acc[t][1]);
        }
    }
}

// One unit: KV head kv, queries [q0, q1).
template <typename T>
void unit_avx512(const Geometry& G, const float* q, const T* kc, const T* vc, int64_t kv, int64_t q0, int64_t q1,
                 float* out, Scratch& s) {
    const int64_t g = G.g, d = G.d, dv = G.dv;
    const int64_t R = (q1 - q0) * g, rp = (R + 15) / 16 * 16, nv = rp / 16;
    const int64_t klo = G.first_key(q0), nk = G.start + q1 - klo;
    // Each row's keys, relative to klo; lanes past R repeat the last row's (q^T is 0 there).
    s.lo.resize((size_t)rp);
    s.hi.resize((size_t)rp);
    for (int64_t r = 0; r < rp; ++r) {
        const int64_t i = q0 + std::min(r, R - 1) / g;
        s.lo[(size_t)r] = (int32_t)(G.first_key(i) - klo);
        s.hi[(size_t)r] = (int32_t)(G.start + i - klo);
    }
    s.qt.assign((size_t)(d * rp), 0.f);
    for (int64_t r = 0; r < R; ++r) {
        const float* qr = q + ((q0 + r / g) * G.h + kv * g + r % g) * d;
        for (int64_t i = 0; i < d; ++i) s.qt[(size_t)(i * rp + r)] = qr[i];
    }
    s.kp.resize((size_t)(nk + 8));
    s.vp.resize((size_t)nk);
    s.zero.assign((size_t)d, 0.f);
    if constexpr (std::is_same_v<T, float>) {
        for (int64_t j = 0; j < nk; ++j) {
            const int64_t at = G.slot(klo + j) * G.kvh + kv;
            s.kp[(size_t)j] = kc + at * d;
            s.vp[(size_t)j] = vc + at * dv;
        }
    } else {  // float copies of the rows: (d + dv) conversions per key against R * (d + dv) products
        s.kf.resize((size_t)(nk * d));
        s.vf.resize((size_t)(nk * dv));
        for (int64_t j = 0; j < nk; ++j) {
            const int64_t at = G.slot(klo + j) * G.kvh + kv;
            for (int64_t i = 0; i < d; ++i) s.kf[(size_t)(j * d + i)] = static_cast<float>(kc[at * d + i]);
            for (int64_t i = 0; i < dv; ++i) s.vf[(size_t)(j * dv + i)] = static_cast<float>(vc[at * dv + i]);
            s.kp[(size_t)j] = s.kf.data() + j * d;
            s.vp[(size_t)j] = s.vf.data() + j * dv;
        }
    }
    for (int64_t j = nk; j < nk + 8; ++j) s.kp[(size_t)j] = s.zero.data();  // a tile's keys past the last
    s.st.resize((size_t)((nk + 8) * rp));
    float* st = s.st.data();
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), scale = _mm512_set1_ps(G.scale);
    // Scores for the keys each pair of vectors (32 rows) sees, masked to -inf outside a row's;
    // key blocks outside, so a block's rows of K stay in L2 for every pair.
    for (int64_t kb = 0; kb <= s.hi[(size_t)(rp - 1)]; kb += kKeyBlock) {
        for (int64_t v0 = 0; v0 < nv; v0 += 2) {
            const int64_t n2 = std::min<int64_t>(2, nv - v0), last = (v0 + n2) * 16 - 1;
            const int64_t j1 = std::min<int64_t>(kb + kKeyBlock, s.hi[(size_t)last] + 1);
            const __m512i lo0 = _mm512_loadu_si512(s.lo.data() + v0 * 16), hi0 = _mm512_loadu_si512(s.hi.data() + v0 * 16);
            const __m512i lo1 = _mm512_loadu_si512(s.lo.data() + (v0 + n2 - 1) * 16);
            const __m512i hi1 = _mm512_loadu_si512(s.hi.data() + (v0 + n2 - 1) * 16);
            for (int64_t j0 = std::max<int64_t>(kb, s.lo[(size_t)(v0 * 16)] / 8 * 8); j0 < j1; j0 += 8) {
                __m512 acc[8][2];
                if (n2 == 2)
                    score_tile<2>(s.qt.data(), rp, v0, s.kp.data() + j0, d, acc);
                else
                    score_tile<1>(s.qt.data(), rp, v0, s.kp.data() + j0, d, acc);
                for (int t = 0; t < 8; ++t) {
                    const __m512i j = _mm512_set1_epi32((int32_t)(j0 + t));
                    for (int v = 0; v < n2; ++v) {
                        const __m512i lo = v ? lo1 : lo0, hi = v ? hi1 : hi0;
                        const __mmask16 seen = _mm512_cmple_epi32_mask(lo, j) & _mm512_cmple_epi32_mask(j, hi);
                        __m512 x = _mm512_mul_ps(acc[t][v], scale);
                        if (G.softcap > 0.f) {  // Gemma 2's cap, rare: lane by lane
                            alignas(64) float l[16];
                            _mm512_store_ps(l, x);
                            for (float& e : l) e = G.softcap * std::tanh(e / G.softcap);
                            x = _mm512_load_ps(l);
                        }
                        _mm512_storeu_ps(st + (j0 + t) * rp + (v0 + v) * 16, _mm512_mask_blend_ps(seen, ninf, x));
                    }
                }
            }
        }
    }
    // Softmax down each vector's lanes over the keys any of its rows sees; p = e / sum, 0 where masked.
    for (int64_t v = 0; v < nv; ++v) {
        const int64_t j0 = s.lo[(size_t)(v * 16)], j1 = s.hi[(size_t)(v * 16 + 15)] + 1;
        float* col = st + v * 16;
        __m512 m = ninf, sum = _mm512_setzero_ps();
        for (int64_t j = j0; j < j1; ++j) m = _mm512_max_ps(m, _mm512_loadu_ps(col + j * rp));
        for (int64_t j = j0; j < j1; ++j) {
            const __m512 x = _mm512_loadu_ps(col + j * rp);
            const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, m)));
            _mm512_storeu_ps(col + j * rp, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
        for (int64_t j = j0; j < j1; ++j) _mm512_storeu_ps(col + j * rp, _mm512_mul_ps(_mm512_loadu_ps(col + j * rp), inv));
    }
    // Outputs, 8 rows at a time over the keys any of them sees (p is 0 past a row's own), key
    // blocks outside so that a block's rows of V stay in L2 for every row.
    s.rows.resize((size_t)rp);
    for (int64_t r = 0; r < rp; ++r) {
        float* o = r < R ? out + ((q0 + r / g) * G.h + kv * g + r % g) * dv : nullptr;
        s.rows[(size_t)r] = o;
        if (o) std::fill(o, o + dv, 0.f);
    }
    for (int64_t kb = 0; kb < nk; kb += kKeyBlock)
        for (int64_t r0 = 0; r0 < R; r0 += 8) {
            const int64_t rl = std::min(R, r0 + 8) - 1;
            const int64_t j0 = std::max<int64_t>(kb, s.lo[(size_t)r0]);
            const int64_t j1 = std::min<int64_t>(kb + kKeyBlock, s.hi[(size_t)rl] + 1);
            if (j0 < j1) value_tile(st, rp, r0, s.vp.data(), j0, j1, dv, s.rows.data() + r0);
        }
}
#pragma GCC pop_options
#endif

}  // namespace

void allow_avx512_attention(bool on) { g_avx512_allowed.store(on); }

// q (n, H, D); caches (num_blocks, block_size, KVH, D | Dv); blocks (W,) the sequence's block ids;
// query i is key start + i and sees the keys up to its own, the last `window` of them when
// window > 0 (as llama.cpp masks) -> (n, H, Dv) in q's dtype.
torch::Tensor prompt_attention(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& blocks_in, int64_t start, int64_t window, double scale,
                               double softcap) {
    TORCH_CHECK(q_in.dim() == 3, "prompt_attention: q must be (tokens, heads, head_dim)");
    TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes().slice(0, 3).equals(v_cache.sizes().slice(0, 3)),
                "prompt_attention: caches must be (num_blocks, block_size, kv_heads, dim)");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "prompt_attention: k and v caches differ in dtype");
    TORCH_CHECK(blocks_in.dim() == 1, "prompt_attention: blocks must be (width,) block ids");
    TORCH_CHECK(start >= 0 && window >= 0, "prompt_attention: start and window must be >= 0");
    const int64_t n = q_in.size(0), h = q_in.size(1), d = q_in.size(2);
    const int64_t nb = k_cache.size(0), bs = k_cache.size(1), kvh = k_cache.size(2), dv = v_cache.size(3);
    TORCH_CHECK(k_cache.size(3) == d, "prompt_attention: key dim ", k_cache.size(3), " != query dim ", d);
    TORCH_CHECK(kvh > 0 && h % kvh == 0, "prompt_attention: ", h, " query heads do not group over ", kvh, " kv heads");
    const auto blocks = blocks_in.to(torch::kInt64).contiguous();
    const int64_t* bp = blocks.data_ptr<int64_t>();
    TORCH_CHECK(start + n <= blocks.size(0) * bs, "prompt_attention: keys up to ", start + n, " outside the ",
                blocks.size(0) * bs, " the blocks hold");
    const Geometry G{n, h, d, dv, kvh, h / kvh, bs, start, window, (float)scale, (float)softcap, bp};
    for (int64_t c = G.first_key(0) / bs; c < (start + n + bs - 1) / bs; ++c)
        TORCH_CHECK(0 <= bp[c] && bp[c] < nb, "prompt_attention: block id ", bp[c], " out of range");
    const auto q = q_in.to(torch::kFloat32).contiguous();
    const auto kc = k_cache.contiguous();
    const auto vc = v_cache.contiguous();
    auto out = torch::empty({n, h, dv}, q.options());
    if (n == 0) return out.to(q_in.scalar_type());
    const float* qp = q.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t per = G.queries_per_unit(), blocks_n = (n + per - 1) / per;
    const bool fast = cpu_avx512() && g_avx512_allowed.load();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kc.scalar_type(), "prompt_attention", [&] {
        const scalar_t* kp = kc.data_ptr<scalar_t>();
        const scalar_t* vp = vc.data_ptr<scalar_t>();
        // The last query blocks see the most keys: handed out first, so the threads end together.
        parallel_items(blocks_n * kvh, [&](int64_t c, int64_t) {
            const int64_t b = blocks_n - 1 - c / kvh, kv = c % kvh;
            const int64_t q0 = b * per, q1 = std::min(n, q0 + per);
#if defined(__x86_64__) && defined(__GNUC__)
            if (fast) {
                thread_local Scratch s;
                unit_avx512<scalar_t>(G, qp, kp, vp, kv, q0, q1, op, s);
                return;
            }
#endif
            unit_rows<scalar_t>(G, qp, kp, vp, kv, q0, q1, op);
        });
    });
    return out.to(q_in.scalar_type());
}

}  // namespace fused

TORCH_LIBRARY_IMPL(gguf_serve, CPU, m) { m.impl("prompt_attention", &fused::prompt_attention); }
