// CPU kernels for weights kept in GGUF blocks: matrix-vector (small batch) products and dequantization.
//
// The kernels in quant_kernels.h are compiled three times (AVX-512, AVX2+FMA, baseline)
// and chosen once at run time from the CPU's features. Rows are split over the threads
// set_num_threads() gives (default: torch's intra-op count) by work_pool.h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "quant_types.h"
#include "work_pool.h"

// QK_X86: 3 = AVX-512 intrinsics, 2 = AVX2 + FMA + F16C intrinsics, 0 = portable C++.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#if __GNUC__ >= 10 || defined(__clang__)
#define QK_HAVE_BF16 1  // the compiler knows AVX512-BF16 (vdpbf16ps)
#endif

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define QK_NS k_avx512
#define QK_X86 3
#include "quant_kernels.h"
#undef QK_X86
#undef QK_NS
#pragma GCC pop_options

#ifdef QK_HAVE_BF16  // a compiler that new knows AVX512-VNNI too
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define QK_HAVE_VNNI 1
#include "quant_q8.h"
#include "quant_gemm_q8.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include "quant_gemm.h"
#pragma GCC pop_options
#endif

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define QK_NS k_avx2
#define QK_X86 2
#include "quant_kernels.h"
#undef QK_X86
#undef QK_NS
#pragma GCC pop_options
#endif

#define QK_NS k_base
#define QK_X86 0
#include "quant_kernels.h"
#undef QK_X86
#undef QK_NS
#define k_base_types QK_TYPES

#include "kernel_choice.h"

namespace {

// (values, bytes) per block of a GGUF type; (0, 0) for a type without a kernel here.
std::pair<int64_t, int64_t> block_size(int64_t qtype) {
    switch (qtype) {
#define QK_SIZE(id, bs, ts, fn) \
    case id:                    \
        return {bs, ts};
        k_base_types(QK_SIZE)
#undef QK_SIZE
    }
    return {0, 0};
}

void check_weight(const torch::Tensor& w, int64_t qtype, int64_t k) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kUInt8 && w.dim() == 2,
                "weight must be a 2-D uint8 CPU tensor of GGUF blocks");
    TORCH_CHECK(w.stride(1) == 1, "weight rows must be contiguous");
    const auto [bs, ts] = block_size(qtype);
    TORCH_CHECK(bs > 0, "no CPU kernel for GGUF tensor type ", qtype);
    TORCH_CHECK(k > 0 && k % bs == 0 && w.size(1) == k / bs * ts, "weight rows of ", w.size(1),
                " bytes do not hold ", k, " values of GGUF type ", qtype);
}

// x (t, k) of a product with W, checked and made contiguous in `dtype`.
torch::Tensor checked_input(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, int64_t k,
                            torch::ScalarType dtype) {
    check_weight(w, qtype, k);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be (tokens, ", k, ")");
    return x.to(dtype).contiguous();
}

// With --gemm-dtype bfloat16 the large-batch path lets oneDNN run its float32 GEMM on the
// bfloat16 units (fp32_precision "bf16": operands split into bfloat16 parts, float32 in and
// out, ~1e-6 relative error). Only around that GEMM: torch's CPU flash attention runs ~10x
// slower for single-token queries under the same setting.
std::atomic<bool> g_gemm_bf16{false};
// With --gemm-dtype int8 prompt rows of the types quant_gemm_q8.h has take qgemm_q8.
std::atomic<bool> g_gemm_q8{false};

struct Bf16MatmulScope {
    explicit Bf16MatmulScope(bool on) : on_(on) {
        if (!on_) return;
        auto& ctx = at::globalContext();
        before_ = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
        ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, at::Float32Precision::BF16);
    }
    ~Bf16MatmulScope() {
        if (on_) at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, before_);
    }
    bool on_;
    at::Float32Precision before_ = at::Float32Precision::NONE;
};


// Up to this many rows of x the product runs from the blocks (each weight read once);
// beyond it, tiles of W are dequantized and multiplied by torch's GEMM (compute-bound).
constexpr int64_t kSmallBatch = 8;
// Weight elements per dequantized tile of the large-batch path (16 MB of float32).
constexpr int64_t kTileElements = 1 << 22;

torch::Tensor dequantize_rows(const torch::Tensor& w, int64_t qtype, int64_t k, int64_t r0, int64_t r1) {
    const int64_t row_bytes = w.stride(0);
    auto y = torch::empty({r1 - r0, k}, torch::dtype(torch::kFloat32));
    const uint8_t* wp = w.data_ptr<uint8_t>() + r0 * row_bytes;
    float* yp = y.data_ptr<float>();
    const auto fn = kernels().dequant;
    std::atomic<bool> ok{true};
    parallel_rows(r1 - r0, k, [&](int64_t a, int64_t b) {
        if (!fn((int)qtype, wp, row_bytes, yp, k, a, b)) ok = false;
    });
    TORCH_CHECK(ok, "no CPU kernel for GGUF tensor type ", qtype);
    return y;
}

// fn(r0, r1, buf) over W's n rows on the kernel threads, buf holding k floats per thread;
// fn returns false for a type without a kernel.
template <typename F>
void over_rows(int64_t n, int64_t k, int64_t t, int64_t qtype, const F& fn) {
    std::atomic<bool> ok{true};
    parallel_rows(n, k * t, [&](int64_t r0, int64_t r1) {
        thread_local std::vector<float> buf;
        buf.resize(k);
        if (!fn(r0, r1, buf.data())) ok = false;
    });
    TORCH_CHECK(ok, "no CPU kernel for GGUF tensor type ", qtype);
}

// x (t, k) float32, contiguous @ W^T through the row kernels, whatever t is: each row of the
// result is computed alone.
torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, int64_t k) {
    const int64_t t = x.size(0), n = w.size(0), row_bytes = w.stride(0);
    auto y = torch::empty({t, n}, x.options());
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const auto fn = kernels().matvec;
    over_rows(n, k, t, qtype, [&](int64_t r0, int64_t r1, float* buf) {
        return fn((int)qtype, wp, row_bytes, xp, yp, t, n, k, r0, r1, buf);
    });
    return y;
}

}  // namespace

// x (t, k) float32 @ W^T, W (n, row_bytes) GGUF blocks of `qtype` -> (t, n) float32.
torch::Tensor qmatmul(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype, int64_t k) {
    const auto x = checked_input(x_in, w, qtype, k, torch::kFloat32);
    const int64_t t = x.size(0), n = w.size(0), row_bytes = w.stride(0);
    if (t > kSmallBatch) {
        const Bf16MatmulScope scope(g_gemm_bf16.load(std::memory_order_relaxed));
        auto tile = [&](int64_t r0, int64_t r1) {
            return at::matmul(x, dequantize_rows(w, qtype, k, r0, r1).t());  // (t, r1 - r0)
        };
        const int64_t rows = std::max<int64_t>(1, kTileElements / k);
        if (rows >= n) return tile(0, n);
        auto y = torch::empty({t, n}, x.options());
        for (int64_t r0 = 0; r0 < n; r0 += rows) {
            const int64_t r1 = std::min(n, r0 + rows);
            y.narrow(1, r0, r1 - r0).copy_(tile(r0, r1));
        }
        return y;
    }
    return matvec(x, w, qtype, k);
}

// x (t, k) @ W^T with x and W's values rounded to bfloat16, float32 sums -> (t, n) float32.
// Every t takes the row kernels (no GEMM path), so each row of y is the same whatever t is.
torch::Tensor qmatmul_bf16(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype, int64_t k) {
    const auto xb = checked_input(x_in, w, qtype, k, torch::kBFloat16);  // the rounded operand (t, k)
    const auto xr = xb.to(torch::kFloat32);  // its values as float32
    const int64_t t = xb.size(0), n = w.size(0), row_bytes = w.stride(0);
    auto y = torch::empty({t, n}, torch::dtype(torch::kFloat32));
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const uint16_t* xbp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    const float* xrp = xr.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const auto fn = kernels().matvec_bf16;
    const bool dot = use_bf16_dot();
    over_rows(n, k, t, qtype, [&](int64_t r0, int64_t r1, float* buf) {
        return fn((int)qtype, wp, row_bytes, xrp, xbp, yp, t, n, k, r0, r1, buf, dot);
    });
    return y;
}

// qmatmul_bf16's quantity (x and W rounded to bfloat16, float32 sums) through a GEMM for
// prompt rows: on AVX512-BF16, panels of W decoded and packed per thread (quant_gemm.h);
// elsewhere qmatmul_bf16's row kernels. Each row of y is the same whatever t is (not the
// same bits as qmatmul_bf16's row kernels: another order of sums).
torch::Tensor qgemm_bf16(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype, int64_t k) {
    const auto x = checked_input(x_in, w, qtype, k, torch::kFloat32);
    const int64_t t = x.size(0), n = w.size(0), row_bytes = w.stride(0);
#ifdef QK_HAVE_BF16
    if (use_bf16_dot() && k % 2 == 0) {
        const int64_t nr = k_gemm::NR;
        auto xb = torch::empty({t, k}, torch::dtype(torch::kBFloat16));
        auto y = torch::empty({t, n}, torch::dtype(torch::kFloat32));
        uint16_t* xp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
        const float* xf = x.data_ptr<float>();
        parallel_rows(t, k, [&](int64_t a, int64_t b) { k_gemm::to_bf16(xf + a * k, xp + a * k, (b - a) * k); });
        const uint8_t* wp = w.data_ptr<uint8_t>();
        float* yp = y.data_ptr<float>();
        const auto deq = kernels().dequant;
        std::atomic<bool> ok{true};
        parallel_items((n + nr - 1) / nr, [&](int64_t a, int64_t b) {
            const int64_t hs = k_gemm::panel_stride(k);
            thread_local std::vector<float> f;  // a row, float32
            thread_local std::vector<uint16_t> h;  // the panel's rows as bfloat16 (nr, hs)
            thread_local std::vector<uint32_t> p;  // the same as pairs, packed
            f.resize((size_t)k);
            h.resize((size_t)(nr * hs));
            p.resize((size_t)(k / 2 * nr));
            for (int64_t c = a; c < b; ++c) {
                const int64_t c0 = c * nr;
                const int live = (int)std::min(nr, n - c0);
                for (int r = 0; r < live; ++r) {
                    if (!deq((int)qtype, wp + (c0 + r) * row_bytes, row_bytes, f.data(), k, 0, 1))
                        return (void)(ok = false);
                    k_gemm::to_bf16(f.data(), h.data() + r * hs, k);
                }
                k_gemm::pack(h.data(), hs, live, k, p.data());
                k_gemm::panel(xp, t, k, p.data(), yp + c0, n, live);
            }
        });
        TORCH_CHECK(ok, "no CPU kernel for GGUF tensor type ", qtype);
        return y;
    }
#endif
    return qmatmul_bf16(x, w, qtype, k);  // the row kernels: also each row alone
}

#include "q8_ops.h"

// W (n, row_bytes) GGUF blocks -> (n, k) float32.
torch::Tensor dequantize(const torch::Tensor& w, int64_t qtype, int64_t k) {
    check_weight(w, qtype, k);
    return dequantize_rows(w, qtype, k, 0, w.size(0));
}

std::string isa() { return kernels().isa; }

bool bf16_dot() { return use_bf16_dot(); }

void allow_bf16_dot(bool on) { g_bf16_dot_allowed.store(on); }

bool int8_dot() { return use_int8_dot(); }

void allow_int8_dot(bool on) { g_int8_dot_allowed.store(on); }

void set_gemm_bf16(bool on) { g_gemm_bf16.store(on); }

bool gemm_bf16() { return g_gemm_bf16.load(); }

void set_gemm_q8(bool on) { g_gemm_q8.store(on); }

bool gemm_q8() { return g_gemm_q8.load(); }

void set_num_threads(int64_t n) { kernel_threads_setting().store((int)std::max<int64_t>(0, n)); }

// The schemas are defined in Python (runtime/ops/schema.py), with the plain-torch
// reference as the fallback for every device; these are the CPU kernels.
TORCH_LIBRARY_IMPL(gguf_serve, CPU, m) {
    m.impl("qmatmul", &qmatmul);
    m.impl("qmatmul_bf16", &qmatmul_bf16);
    m.impl("qgemm_bf16", &qgemm_bf16);
    m.impl("qmatmul_q8", &qmatmul_q8);
    m.impl("qgemm_q8", &qgemm_q8);
    m.impl("qmatmul_q8_many", &qmatmul_q8_many);
    m.impl("dequantize", &dequantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("isa", &isa, "the instruction set the kernels were picked for");
    m.def("bf16_dot", &bf16_dot, "whether qmatmul_bf16 runs on the CPU's bfloat16 dot-product instructions");
    m.def("allow_bf16_dot", &allow_bf16_dot, "let qmatmul_bf16 use them where the CPU has them (for tests)");
    m.def("int8_dot", &int8_dot, "whether qmatmul_q8 runs on the CPU's int8 dot-product instructions");
    m.def("allow_int8_dot", &allow_int8_dot, "let qmatmul_q8 use them where the CPU has them (for tests)");
    m.def("use_isa", &use_isa, "pick a build by name (for tests); returns the runnable ones");
    m.def("set_gemm_bf16", &set_gemm_bf16, "large-batch GEMMs on the bfloat16 units, float32 accuracy");
    m.def("gemm_bf16", &gemm_bf16, "whether set_gemm_bf16 is on");
    m.def("set_gemm_q8", &set_gemm_q8, "prompt rows through qgemm_q8 where it has a kernel");
    m.def("gemm_q8", &gemm_q8, "whether set_gemm_q8 is on");
    m.def("int8_kernel", &int8_kernel, "whether qmatmul_q8 and qgemm_q8 run the AVX512-VNNI kernels for a type here");
    m.def("allow_avx512_attention", &fused::allow_avx512_attention,
          "let prompt_attention take its AVX-512 kernel where the CPU has it (for tests)");
    m.def("set_num_threads", &set_num_threads, "threads for the kernels (0: torch's intra-op count)");
}
