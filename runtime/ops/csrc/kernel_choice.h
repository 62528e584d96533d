// Which build of the CPU kernels runs: the best this CPU can, unless a test picks another.
//
// Included once by quant_cpu.cpp after the three builds of quant_kernels.h (k_avx512,
// k_avx2, k_base). No include guard on purpose.

namespace {

using MatvecFn = bool (*)(int, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t, int64_t,
                          int64_t, int64_t, float*);
using DequantFn = bool (*)(int, const uint8_t*, int64_t, float*, int64_t, int64_t, int64_t);
using MatvecBf16Fn = bool (*)(int, const uint8_t*, int64_t, const float*, const uint16_t*, float*, int64_t,
                              int64_t, int64_t, int64_t, int64_t, float*, bool);

struct Kernels {
    const char* isa;
    MatvecFn matvec;
    DequantFn dequant;
    MatvecBf16Fn matvec_bf16;
    bool bf16_dot;  // the CPU has AVX512-BF16: matvec_bf16 may take its vdpbf16ps kernel
    bool int8_dot;  // the CPU has AVX512-VNNI: qmatmul_q8 may take its vpdpbusd kernels
};

// Every build this CPU can run, best first.
std::vector<Kernels> runnable() {
    std::vector<Kernels> out;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        out.push_back({"avx512", k_avx512::matvec, k_avx512::dequant, k_avx512::matvec_bf16,
#ifdef QK_HAVE_BF16
                       (bool)__builtin_cpu_supports("avx512bf16"), (bool)__builtin_cpu_supports("avx512vnni")});
#else
                       false, false});
#endif
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        out.push_back({"avx2", k_avx2::matvec, k_avx2::dequant, k_avx2::matvec_bf16, false, false});
#endif
    out.push_back({"baseline", k_base::matvec, k_base::dequant, k_base::matvec_bf16, false, false});
    return out;
}

std::atomic<int> g_choice{0};  // index into runnable(): the best unless use_isa() said otherwise

const std::vector<Kernels>& all_kernels() {
    static const std::vector<Kernels> all = runnable();
    return all;
}

const Kernels& kernels() { return all_kernels()[(size_t)g_choice.load(std::memory_order_relaxed)]; }

// Tests turn the AVX512-BF16 kernel off to run the AVX-512 build's other path (CPUs without it).
std::atomic<bool> g_bf16_dot_allowed{true};

bool use_bf16_dot() { return kernels().bf16_dot && g_bf16_dot_allowed.load(std::memory_order_relaxed); }

// Tests turn the AVX512-VNNI kernels off to run qmatmul_q8's path for other CPUs.
std::atomic<bool> g_int8_dot_allowed{true};

bool use_int8_dot() { return kernels().int8_dot && g_int8_dot_allowed.load(std::memory_order_relaxed); }

// Tests run every build the machine supports; returns the names of those.
std::vector<std::string> use_isa(const std::string& name) {
    const auto& all = all_kernels();
    std::vector<std::string> names;
    for (size_t i = 0; i < all.size(); ++i) {
        names.push_back(all[i].isa);
        if (name == all[i].isa) g_choice.store((int)i);
    }
    return names;
}

}  // namespace
