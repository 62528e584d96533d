// RMS norm on the CPU: each row's sum of squares in 16 float32 lanes (AVX-512) or the portable loop's order.
//
// A prompt normalizes 6 tensors of 512 x 640-1024 values per Gemma 3 layer; the portable
// loop (4 lanes of SSE2: this translation unit is built for any x86-64) ran one thread at
// ~180 us a call there, 8x an add's time. Rows are split over the kernel threads, and each
// row's sums run in one fixed order, so a row's result does not depend on the batch.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_ops.h"
#include "work_pool.h"

namespace fused {

namespace {

// y = (x * rsqrt(mean(x^2) + eps)) * w over one row of d values, portably.
void norm_row(const float* x, const float* w, float* y, int64_t d, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
    const float scale = 1.f / std::sqrt(ss / (float)d + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) y[i] = (x[i] * scale) * w[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// norm_row with the squares summed in 16 lanes (then reduced): 16 values a step, the last masked.
void norm_row_avx512(const float* x, const float* w, float* y, int64_t d, float eps) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 m = d - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)d + eps));
    for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 m = d - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - i)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
    }
}
#pragma GCC pop_options
#endif

}  // namespace

// x (..., d) * rsqrt(mean(x^2) + eps) * w (d,), in float32; returns x's dtype.
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w_in, double eps) {
    TORCH_CHECK(x_in.dim() >= 1, "rms_norm: x must have at least one dimension");
    TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == x_in.size(-1),
                "rms_norm: weight must be (", x_in.size(-1), ",)");
    const auto x = x_in.to(torch::kFloat32).contiguous();
    const auto w = w_in.to(torch::kFloat32).contiguous();
    auto y = torch::empty_like(x);
    const int64_t d = w.size(0), rows = d ? x.numel() / d : 0;
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const float feps = (float)eps;
    const bool avx512 = cpu_avx512();
    parallel_rows(rows, 2 * d, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
#if defined(__x86_64__) && defined(__GNUC__)
            if (avx512) {
                norm_row_avx512(xp + r * d, wp, yp + r * d, d, feps);
                continue;
            }
#endif
            norm_row(xp + r * d, wp, yp + r * d, d, feps);
        }
    });
    return y.to(x_in.scalar_type());
}

}  // namespace fused
