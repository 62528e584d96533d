// The int8 products' host side: x quantized once, then AVX512-VNNI kernels over W's rows.
//
// Included once by quant_cpu.cpp after its helpers (checked_input, matvec, over_rows,
// parallel_rows, use_int8_dot) and the kernels of quant_q8.h. No include guard on purpose.

namespace {

// n (<= 32) values of x as int8 q (rounded to nearest, ties to even) and their scale
// amax / 127, as runtime/ops/reference.py's quantize_q8 computes them.
float quantize_block(const float* x, int n, int8_t* q) {
    float amax = 0.f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < n; ++i) q[i] = (int8_t)std::nearbyint(std::min(127.f, std::max(-127.f, x[i] * id)));
    return amax / 127.f;
}

// x_hat (t, k): x with each 32-value block replaced by its int8 values times their scale.
torch::Tensor quantized_q8(const torch::Tensor& x) {
    const int64_t t = x.size(0), k = x.size(1);
    auto y = torch::empty({t, k}, torch::dtype(torch::kFloat32));
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    int8_t q[32];
    for (int64_t i = 0; i < t; ++i)
        for (int64_t b0 = 0; b0 < k; b0 += 32) {  // a row's last block may be short (F16 rows)
            const int nb = (int)std::min<int64_t>(32, k - b0);
            const float d = quantize_block(xp + i * k + b0, nb, q);
            for (int j = 0; j < nb; ++j) yp[i * k + b0 + j] = (float)q[j] * d;
        }
    return y;
}

#ifdef QK_HAVE_VNNI
// x (t, k) float32, contiguous, quantized once for every type, and the buffers behind its Q8Act.
struct Q8Input {
    std::vector<int8_t> q;
    std::vector<float> dx, dsum;
    std::vector<int32_t> nls;
    k_vnni::Q8Act act;

    Q8Input(const torch::Tensor& x, int64_t k) {
        // Every type with a kernel has k % 32 == 0: whole blocks of 8 lanes (4 values each).
        const int64_t t = x.size(0), kp = (k + 63) / 64 * 64;
        // past k: q 0, dx 0, so padding adds nothing
        q.assign((size_t)(t * kp), 0);
        dx.assign((size_t)(t * kp / 4), 0.f);
        nls.assign((size_t)(t * kp / 4), 0);
        dsum.assign((size_t)(t * kp / 32), 0.f);
        const float* xp = x.data_ptr<float>();
        parallel_rows(t, k, [&](int64_t a, int64_t b) {  // one chunk below ~100 rows of 640
            k_vnni::quantize_x(xp + a * k, b - a, k, q.data() + a * kp, dx.data() + a * (kp / 4), nls.data() + a * (kp / 4),
                               dsum.data() + a * (kp / 32), kp);
        });
        act = k_vnni::Q8Act{q.data(), dx.data(), nls.data(), dsum.data(), kp};
    }
};
#endif

}  // namespace

// Whether the AVX512-VNNI kernels (the rows' and the GEMM's) run for a type here: this
// build, this CPU (and allow_int8_dot) and the type. Elsewhere the float32 kernels take x_hat.
bool int8_kernel(int64_t qtype) {
#ifdef QK_HAVE_VNNI
    return use_int8_dot() && k_vnni::has_q8_kernel((int)qtype);
#else
    (void)qtype;
    return false;
#endif
}

// x (t, k) @ W^T with x's rows quantized to int8 per 32 values (scale amax / 127) -> (t, n)
// float32: llama.cpp's CPU numerics for decode rows. Each row of y is the same whatever t is.
torch::Tensor qmatmul_q8(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype, int64_t k) {
    const auto x = checked_input(x_in, w, qtype, k, torch::kFloat32);
#ifdef QK_HAVE_VNNI
    if (int8_kernel(qtype)) {
        const int64_t t = x.size(0), n = w.size(0), row_bytes = w.stride(0);
        const Q8Input in(x, k);
        auto y = torch::empty({t, n}, torch::dtype(torch::kFloat32));
        const uint8_t* wp = w.data_ptr<uint8_t>();
        float* yp = y.data_ptr<float>();
        over_rows(n, k, t, qtype, [&](int64_t r0, int64_t r1, float* buf) {
            return k_vnni::matvec_q8((int)qtype, wp, row_bytes, in.act, yp, t, n, k, r0, r1, buf);
        });
        return y;
    }
#endif
    // Other CPUs and types: the same x_hat through the float32 row kernels.
    return matvec(quantized_q8(x), w, qtype, k);
}

// qmatmul_q8's quantity through a GEMM for prompt rows: on AVX512-VNNI, panels of W decoded
// to bytes and packed per thread (quant_gemm_q8.h); each row of y is the same whatever t is
// (not the row kernels' bits: another order of sums). Elsewhere qmatmul_q8's row kernels, also
// each row alone (qmatmul_prompt takes this op only where the GEMM runs: int8_kernel).
torch::Tensor qgemm_q8(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype, int64_t k) {
    const auto x = checked_input(x_in, w, qtype, k, torch::kFloat32);
#ifdef QK_HAVE_VNNI
    if (int8_kernel(qtype)) {
        const int64_t t = x.size(0), n = w.size(0), row_bytes = w.stride(0), nr = k_gemm8::NR;
        const Q8Input in(x, k);
        const int64_t kp = in.act.kp, per = k_gemm8::group_size((int)qtype) / 4, gp = kp / 4 / per;
        std::vector<int32_t> ns((size_t)(t * gp), 0);  // -sum(q) per row and scale group
        std::vector<float> dx((size_t)(t * kp / 32));   // dx per row and block
        for (int64_t i = 0; i < t * gp; ++i)
            for (int64_t j = 0; j < per; ++j) ns[i] += in.nls[i * per + j];
        for (int64_t i = 0; i < t * kp / 32; ++i) dx[i] = in.dx[i * 8];
        const k_gemm8::GemmX gx{in.q.data(), dx.data(), in.dsum.data(), ns.data(), kp};
        auto y = torch::empty({t, n}, torch::dtype(torch::kFloat32));
        const uint8_t* wp = w.data_ptr<uint8_t>();
        float* yp = y.data_ptr<float>();
        std::atomic<bool> ok{true};
        parallel_items((n + nr - 1) / nr, [&](int64_t a, int64_t b) {
            thread_local k_gemm8::Panel pn;
            pn.resize(kp);
            if (!k_gemm8::gemm_panels((int)qtype, wp, row_bytes, gx, t, n, k, a, b, yp, pn)) ok = false;
        });
        TORCH_CHECK(ok, "no CPU kernel for GGUF tensor type ", qtype);
        return y;
    }
#endif
    return qmatmul_q8(x, w, qtype, k);
}

// qmatmul_q8 of one x with several matrices (a layer's q, k, v or gate, up): x quantized
// once, every matrix's rows in one job of the kernel threads (a decode
// step's small products otherwise pay a job each). The same numbers as separate calls.
std::vector<torch::Tensor> qmatmul_q8_many(const torch::Tensor& x_in, at::TensorList ws, at::IntArrayRef qtypes,
                                           int64_t k) {
    TORCH_CHECK(ws.size() == qtypes.size() && !ws.empty(), "qmatmul_q8_many: one type per weight");
    std::vector<torch::Tensor> ys;
    const auto x = checked_input(x_in, ws[0], qtypes[0], k, torch::kFloat32);
    bool fast = true;
    for (size_t i = 0; i < ws.size(); ++i) {
        checked_input(x, ws[i], qtypes[i], k, torch::kFloat32);
        fast = fast && int8_kernel(qtypes[i]);
    }
#ifdef QK_HAVE_VNNI
    if (fast) {
        const int64_t t = x.size(0);
        const Q8Input in(x, k);
        std::vector<int64_t> first{0};  // matrix i's rows are [first[i], first[i + 1]) of the job
        for (size_t i = 0; i < ws.size(); ++i) {
            ys.push_back(torch::empty({t, ws[i].size(0)}, torch::dtype(torch::kFloat32)));
            first.push_back(first.back() + ws[i].size(0));
        }
        over_rows(first.back(), k, t, qtypes[0], [&](int64_t r0, int64_t r1, float* buf) {
            for (size_t i = 0; i < ws.size(); ++i) {
                const int64_t a = std::max(r0, first[i]) - first[i], b = std::min(r1, first[i + 1]) - first[i];
                if (a >= b) continue;
                const int qt = (int)qtypes[i];
                if (!k_vnni::matvec_q8(qt, ws[i].data_ptr<uint8_t>(), ws[i].stride(0), in.act, ys[i].data_ptr<float>(), t,
                                       ws[i].size(0), k, a, b, buf))
                    return false;
            }
            return true;
        });
        return ys;
    }
#endif
    for (size_t i = 0; i < ws.size(); ++i) ys.push_back(qmatmul_q8(x, ws[i], qtypes[i], k));
    return ys;
}

