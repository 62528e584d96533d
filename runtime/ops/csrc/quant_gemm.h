// Prompt GEMMs on AVX512-BF16: y = bf16(x) @ bf16(W)^T with float32 sums, W decoded a panel at a time.
//
// Included once by quant_cpu.cpp inside `#pragma GCC target(... avx512bf16)`. No include
// guard on purpose. The quantity is qmatmul_bf16's (reference: runtime/ops/reference.py's
// qmatmul_bf16); only the order of the float32 sums differs from its row kernels. Each
// output y[i, c] is the same chain of vdpbf16ps over k whatever the call's row count,
// panel or tile, so a row's result depends only on that row of x (batch == alone, bit
// for bit) and W may be cut into row shards (tensor parallelism) without changing it.
//
// Layout: a panel of NR = 64 rows of W (output columns), decoded to float32 by the
// dequantize kernels and packed as bfloat16 pairs: 32-bit word (q, c) holds W[c, 2q] in
// its low half and W[c, 2q + 1] in its high half, words of one q and 16 columns side by
// side, so one vector load gives 16 columns of a pair of k. x's rows, bfloat16 in their
// natural order, give a pair as one broadcast 32-bit word. A tile of MR = 6 rows of x
// against the panel holds 6 x 4 accumulators across all of k (measured 6-10% faster than
// 8 x 3 on the default model's shapes: fewer broadcasts per product).

namespace k_gemm {

constexpr int NR = 64;  // W rows per panel: 4 vectors of 16 columns
constexpr int NV = NR / 16;
constexpr int MR = 6;   // x rows per register tile

// x[0 .. n) float32 -> bfloat16 (to nearest, ties to even), 32 at a time.
static void to_bf16(const float* x, uint16_t* y, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512(y + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(y + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

// The row stride of a decoded panel (bfloat16 values): k plus one cache line, so that the 16
// rows pack() reads together fall in 16 different L1 sets (at k a power of two they would
// share one set, and 16 lines of one set miss an 8-way L1: 4096 x 4096 at 64 rows ran at 66
// GMAC/s).
static inline int64_t panel_stride(int64_t k) { return k + 32; }

// Panel rows h (nr <= NR rows of k bfloat16 values, k even, row stride hs) -> p: k / 2 groups
// of NR words, each word one row's pair of values; columns past nr are zero. 16 rows by 16
// words at a time, transposed in registers.
static void pack(const uint16_t* h, int64_t hs, int nr, int64_t k, uint32_t* p) {
    const int64_t kk = k / 2;
    for (int g = 0; g < NR / 16; ++g) {
        const int live = std::min(16, nr - 16 * g);
        uint32_t* out = p + 16 * g;
        const uint16_t* base = h + 16 * g * hs;
        for (int64_t q0 = 0; q0 < kk; q0 += 16) {
            const int nw = (int)std::min<int64_t>(16, kk - q0);
            const __mmask16 m = (__mmask16)(nw >= 16 ? 0xFFFF : (1u << nw) - 1);
            __m512i r[16];
            for (int i = 0; i < 16; ++i)
                r[i] = i < live ? _mm512_maskz_loadu_epi32(m, base + i * hs + 2 * q0) : _mm512_setzero_si512();
            k_avx512::transpose16(r);
            for (int j = 0; j < nw; ++j) _mm512_storeu_si512(out + (q0 + j) * NR, r[j]);
        }
    }
}

// R (<= MR) rows of x (bfloat16, row stride k) against a packed panel -> y's columns
// [0, nr) of those rows (row stride n).
template <int R>
static inline void tile(const uint16_t* x, int64_t k, const uint32_t* p, float* y, int64_t n, int nr) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < NV; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t q = 0; q < k / 2; ++q) {
        const uint32_t* pq = p + q * NR;
        __m512bh wv[NV];
        for (int g = 0; g < NV; ++g) wv[g] = (__m512bh)_mm512_loadu_si512(pq + 16 * g);
        for (int r = 0; r < R; ++r) {
            int32_t pair;
            std::memcpy(&pair, x + r * k + 2 * q, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int g = 0; g < NV; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], wv[g], xv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < NV; ++g) {
            const int live = std::min(16, nr - 16 * g);
            if (live >= 16)
                _mm512_storeu_ps(y + r * n + 16 * g, acc[r][g]);
            else if (live > 0)
                _mm512_mask_storeu_ps(y + r * n + 16 * g, (__mmask16)((1u << live) - 1), acc[r][g]);
        }
}

// All t rows of x against one packed panel, MR rows at a time.
static void panel(const uint16_t* x, int64_t t, int64_t k, const uint32_t* p, float* y, int64_t n, int nr) {
    int64_t i = 0;
    for (; i + MR <= t; i += MR) tile<MR>(x + i * k, k, p, y + i * n, n, nr);
    const uint16_t* xi = x + i * k;
    float* yi = y + i * n;
    switch (t - i) {
        case 5: tile<5>(xi, k, p, yi, n, nr); break;
        case 4: tile<4>(xi, k, p, yi, n, nr); break;
        case 3: tile<3>(xi, k, p, yi, n, nr); break;
        case 2: tile<2>(xi, k, p, yi, n, nr); break;
        case 1: tile<1>(xi, k, p, yi, n, nr); break;
        default: break;
    }
}

}  // namespace k_gemm
