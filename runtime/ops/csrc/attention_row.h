// One query row's attention over keys where they lie in the paged cache, in plain loops: decode's and every CPU's fallback.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fused {

template <typename T>
inline float to_f(T v) {
    return static_cast<float>(v);
}

// One (sequence, query head): softmax(q . k_j * scale) . v_j over keys j in [lo, hi) of the
// sequence's blocks, read where they lie in the cache (no gathered copy).
template <typename T>
void decode_head(const float* q, const T* kc, const T* vc, const int64_t* blocks, int64_t bs, int64_t kvh,
                 int64_t kv, int64_t d, int64_t dv, int64_t lo, int64_t hi, float scale, float softcap,
                 float* out, std::vector<float>& s) {
    s.resize((size_t)std::max<int64_t>(0, hi - lo));
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j < hi; ++j) {
        const T* kr = kc + ((blocks[j / bs] * bs + j % bs) * kvh + kv) * d;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; ++i) dot += q[i] * to_f(kr[i]);
        float x = dot * scale;
        if (softcap > 0.f) x = softcap * std::tanh(x / softcap);
        s[(size_t)(j - lo)] = x;
        m = std::max(m, x);
    }
    float total = 0.f;
    for (int64_t j = lo; j < hi; ++j) total += (s[(size_t)(j - lo)] = std::exp(s[(size_t)(j - lo)] - m));
    std::fill(out, out + dv, 0.f);
    for (int64_t j = lo; j < hi; ++j) {
        const T* vr = vc + ((blocks[j / bs] * bs + j % bs) * kvh + kv) * dv;
        const float p = s[(size_t)(j - lo)] / total;
#pragma omp simd
        for (int64_t i = 0; i < dv; ++i) out[i] += p * to_f(vr[i]);
    }
}

}  // namespace fused
