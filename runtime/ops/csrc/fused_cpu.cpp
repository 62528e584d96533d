// CPU kernels for the small per-token ops of a decode step (RMS norm, rotary embedding), one pass each.
//
// A decode step runs ~10 of these per layer on a few hundred values; as chains of torch ops
// each costs 5-10 dispatches, which is more time than the arithmetic. Rows are independent
// and each row is summed in one fixed order, so a row's result does not depend on the batch.

#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace {

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
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xp + r * d;
        float* yr = yp + r * d;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
        const float scale = 1.f / std::sqrt(ss / (float)d + feps);
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * scale) * wp[i];
    }
    return y.to(x_in.scalar_type());
}

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

}  // namespace

// Schemas in runtime/ops/schema.py, references in runtime/ops/reference.py.
TORCH_LIBRARY_IMPL(gguf_serve, CPU, m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("rope", &rope);
}
