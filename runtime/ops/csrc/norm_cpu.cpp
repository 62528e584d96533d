// RMS norm on the CPU: rows over the kernel threads, each row's sums in one fixed order.
//
// A prompt normalizes 6 tensors of 512 x 640-1024 values per Gemma 3 layer; on one thread a
// call ran ~120 us there, 5x an add's time. Each row is the loop it always was (4 lanes of
// SSE2: this translation unit is built for any x86-64), so the same bits as before; 16 float
// lanes (AVX-512) or a double sum (llama.cpp's) move the logits by ~1e-7, enough to turn
// near-ties of the default model's greedy runs against llama.cpp's both ways (measured:
// 11/12 and 10/12 of them agreeing on 8 tokens, against 12/12 with this order).

#include <torch/extension.h>

#include <cmath>
#include <cstdint>

#include "cpu_ops.h"
#include "work_pool.h"

namespace fused {

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
    parallel_rows(rows, 2 * d, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = xp + r * d;
            float* yr = yp + r * d;
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
            const float scale = 1.f / std::sqrt(ss / (float)d + feps);
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * scale) * wp[i];
        }
    });
    return y.to(x_in.scalar_type());
}

}  // namespace fused
