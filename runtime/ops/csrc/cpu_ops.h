// The CPU ops that one translation unit calls in another's: decode_layer.cpp runs a layer's
// ops as direct C++ calls (no dispatch per op) of the same functions the dispatcher reaches.
#pragma once

#include <torch/extension.h>

#include <vector>

// quant_cpu.cpp (q8_ops.h)
torch::Tensor qmatmul_q8(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype, int64_t k);
std::vector<torch::Tensor> qmatmul_q8_many(const torch::Tensor& x_in, at::TensorList ws, at::IntArrayRef qtypes,
                                           int64_t k);

// fused_cpu.cpp, norm_cpu.cpp (rms_norm)
namespace fused {
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w_in, double eps);
torch::Tensor rope(const torch::Tensor& x_in, const torch::Tensor& cos_in, const torch::Tensor& sin_in, bool neox);
torch::Tensor gated(const torch::Tensor& gate_in, const torch::Tensor& up_in, bool gelu);
torch::Tensor paged_decode(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& blocks_in, const torch::Tensor& lo_in, const torch::Tensor& hi_in,
                           double scale, double softcap);
bool cpu_avx512();

// prompt_attention.cpp
torch::Tensor prompt_attention(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& blocks_in, int64_t start, int64_t window, double scale,
                               double softcap);
void allow_avx512_attention(bool on);
}  // namespace fused
