// Prompt GEMMs in int8: y = x_hat @ W^T (qmatmul_q8's quantity), W decoded to bytes a panel at a time.
//
// Included once by quant_cpu.cpp inside `#pragma GCC target(... avx512vnni)`, after
// quant_q8.h, whose decoders, quantize_x and off_shift it uses. No include guard on purpose.
//
// The quantity is qmatmul_q8's (reference: runtime/ops/reference.py's qmatmul_q8): x's rows
// quantized to int8 per 32 values (q, scale dx), W's values a * (u - OFF) + b per group of
// G values (G = 32, or 16 for Q6_K, whose scales are per 16). Per output y[i, c] and group:
// the exact integer sum of u * q (vpdpbusd) started from OFF * (-sum(q)), then in float32
//   acc += float(sum) * (a * dx)   and, for types with a b term,   acc += b * (dx * sum(q))
// group after group over k. That chain is the same whatever the call's row count, tile or
// panel, so a row's result depends only on that row of x (batch == alone, bit for bit);
// it is not the row kernels' order (they sum per lane of 4 values), so not their bits.
//
// Layout: a panel of NR = 32 rows of W (output columns), decoded by quant_q8.h's decoders
// to unsigned bytes and packed so that 32-bit word (j, c) holds W[c]'s bytes 4j .. 4j + 3,
// the words of one j and 16 columns side by side: one vector load gives 16 columns of 4
// values, and x's 4 bytes at 4j are one broadcast word. A tile of MR = 4 rows of x holds
// 4 x 2 int32 sums for the group at hand and 4 x 2 float32 accumulators across all of k.
// vpdpbusd multiplies 64 byte pairs per instruction to vdpbf16ps's 32 bfloat16 pairs; with
// the per-group conversions, 512 rows of the default model's shapes ran at 215-300 GMAC/s on
// 2 cores to quant_gemm.h's 177-205 (4 x 2 tiles measured faster than 5 x 2, 6 x 2 and 3 x 3).

namespace k_gemm8 {

// Values per scale group of a type's GEMM: Q6_K's scales are per 16, every other type's per 32.
constexpr int group_size(int qtype) { return qtype == QT_Q6_K ? 16 : 32; }

using namespace k_vnni;  // the decoders Q8_TYPES names, DecodeFn, off_shift

constexpr int NR = 32;  // W rows per panel: 2 vectors of 16 columns
constexpr int NV = NR / 16;
constexpr int MR = 4;   // x rows per register tile

// A call's x as the tiles read it: per row kp int8 q (quantize_x's), and compact per 32-value
// block dx and dx * sum(q), per scale group of G values -sum(q) (a tile streams these for
// every panel: quantize_x's per-lane arrays would be 8x the bytes).
struct GemmX {
    const int8_t* q;
    const float* dx;    // (t, kp / 32)
    const float* dsum;  // (t, kp / 32)
    const int32_t* ns;  // (t, kp / G)
    int64_t kp;
};

// A thread's decoded and packed panel. kp: k rounded up to 64 (a decoder's chunk). Nothing
// needs zeroing: decode_panel writes every byte and scale the tiles read.
struct Panel {
    std::vector<uint8_t> u;  // NR rows of kp + 64 bytes (the extra line: 16 rows read together, 16 L1 sets)
    std::vector<uint32_t> p;  // kp / 4 words of NR columns
    std::vector<float> a;     // per group of G values: NR scales
    std::vector<float> b;     // per 32-value block: NR b terms (types with one)
    std::vector<float> row_b;  // a decoder's room for one row's b terms
    void resize(int64_t kp) {
        u.resize((size_t)(NR * (kp + 64)));
        p.resize((size_t)(kp / 4 * NR));
        a.resize((size_t)(kp / 16 * NR));
        b.resize((size_t)(kp / 32 * NR));
        row_b.resize((size_t)(kp / 32 + 8));
    }
};

// Rows [0, nr) of W (nr <= NR, row stride row_bytes) -> the panel: bytes, then per group of
// G values each row's scale a (a decoder gives one per lane of 4 values: lane 0 of a group)
// and per block its b. Columns past nr are zero (their rows' bytes and scales).
template <int G, bool MIN, int CH, DecodeFn F>
static void decode_panel(const uint8_t* w, int64_t row_bytes, int nr, int64_t k, int64_t kp, Panel& pn) {
    const int64_t nb = k / 32, nc = kp / 64, us = kp + 64;
    std::fill(pn.a.begin(), pn.a.end(), 0.f);
    std::fill(pn.b.begin(), pn.b.end(), 0.f);
    for (int r = 0; r < NR; ++r) {
        uint8_t* ur = pn.u.data() + r * us;
        if (r >= nr) {
            std::memset(ur, 0, (size_t)kp);
            continue;
        }
        const uint8_t* row = w + r * row_bytes;
        for (int64_t c0 = 0; c0 < nc; c0 += CH) {
            __m512i u[CH];
            __m512 a[CH];
            F(row, c0, 2 * c0 + 1 < nb, u, a, pn.row_b.data() + 2 * c0);
            for (int h = 0; h < CH; ++h) {
                const int64_t c = c0 + h;
                _mm512_storeu_si512(ur + c * 64, u[h]);
                alignas(64) float lanes[16];
                _mm512_store_ps(lanes, a[h]);
                for (int j = 0; j < 64 / G; ++j) pn.a[(c * (64 / G) + j) * NR + r] = lanes[j * G / 4];
            }
        }
        if (MIN)
            for (int64_t blk = 0; blk < nb; ++blk) pn.b[blk * NR + r] = pn.row_b[blk];
    }
    // words (j, 16 columns): 16 rows by 16 words at a time, transposed in registers
    for (int g = 0; g < NV; ++g) {
        const uint8_t* base = pn.u.data() + 16 * g * us;
        for (int64_t j0 = 0; j0 < kp / 4; j0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(base + i * us + 4 * j0);
            k_avx512::transpose16(r);
            for (int j = 0; j < 16; ++j) _mm512_storeu_si512(pn.p.data() + (j0 + j) * NR + 16 * g, r[j]);
        }
    }
}

// R (<= MR) rows of x (from row i) against a panel -> y's columns [0, nr) of those rows (row stride n).
template <int R, int G, int OFF, bool MIN>
static inline void tile(const GemmX& x, int64_t i, int64_t k, const Panel& pn, float* y, int64_t n, int nr) {
    constexpr int S = G / 4;  // words per group
    const int64_t ng = k / G, gp = x.kp / G, bp = x.kp / 32;
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t grp = 0; grp < ng; ++grp) {
        __m512i sum[R][NV];
        for (int r = 0; r < R; ++r) {
            // OFF * (-sum(q)): the offset's share, so the weights stay unsigned
            const __m512i s0 = OFF ? _mm512_set1_epi32(x.ns[(i + r) * gp + grp] << off_shift(OFF))
                                   : _mm512_setzero_si512();
            for (int v = 0; v < NV; ++v) sum[r][v] = s0;
        }
        const uint32_t* pg = pn.p.data() + grp * S * NR;
        for (int s = 0; s < S; ++s) {
            __m512i wv[NV];
            for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(pg + s * NR + 16 * v);
            for (int r = 0; r < R; ++r) {
                int32_t word;
                std::memcpy(&word, x.q + (i + r) * x.kp + grp * G + 4 * s, 4);
                const __m512i xv = _mm512_set1_epi32(word);
                for (int v = 0; v < NV; ++v) sum[r][v] = _mm512_dpbusd_epi32(sum[r][v], wv[v], xv);
            }
        }
        const int64_t blk = grp * G / 32;
        __m512 av[NV];
        for (int v = 0; v < NV; ++v) av[v] = _mm512_loadu_ps(pn.a.data() + grp * NR + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512 dx = _mm512_set1_ps(x.dx[(i + r) * bp + blk]);
            for (int v = 0; v < NV; ++v)
                acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][v]), _mm512_mul_ps(av[v], dx), acc[r][v]);
        }
        if (MIN) {  // G == 32: a group is a block
            __m512 bv[NV];
            for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(pn.b.data() + blk * NR + 16 * v);
            for (int r = 0; r < R; ++r) {
                const __m512 ds = _mm512_set1_ps(x.dsum[(i + r) * bp + blk]);
                for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(bv[v], ds, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) {
            const int live = std::min(16, nr - 16 * v);
            if (live >= 16)
                _mm512_storeu_ps(y + r * n + 16 * v, acc[r][v]);
            else if (live > 0)
                _mm512_mask_storeu_ps(y + r * n + 16 * v, (__mmask16)((1u << live) - 1), acc[r][v]);
        }
}

// All t rows of x against one panel, MR rows at a time.
template <int G, int OFF, bool MIN>
static void panel_rows(const GemmX& x, int64_t t, int64_t k, const Panel& pn, float* y, int64_t n, int nr) {
    int64_t i = 0;
    for (; i + MR <= t; i += MR) tile<MR, G, OFF, MIN>(x, i, k, pn, y + i * n, n, nr);
    float* yi = y + i * n;
    switch (t - i) {
        case 4: tile<4, G, OFF, MIN>(x, i, k, pn, yi, n, nr); break;
        case 3: tile<3, G, OFF, MIN>(x, i, k, pn, yi, n, nr); break;
        case 2: tile<2, G, OFF, MIN>(x, i, k, pn, yi, n, nr); break;
        case 1: tile<1, G, OFF, MIN>(x, i, k, pn, yi, n, nr); break;
        default: break;
    }
}


// Panels [c_begin, c_end) of W (n rows) against all t rows of x (its ns per group of
// group_size(qtype)). False for a type without a kernel.
static bool gemm_panels(int qtype, const uint8_t* w, int64_t row_bytes, const GemmX& x, int64_t t, int64_t n,
                        int64_t k, int64_t c_begin, int64_t c_end, float* y, Panel& pn) {
    switch (qtype) {
#define Q8_GEMM(id, off, has_b, ch, fn, pair)                                                              \
    case id:                                                                                               \
        for (int64_t c = c_begin; c < c_end; ++c) {                                                        \
            const int64_t c0 = c * NR;                                                                     \
            const int live = (int)std::min<int64_t>(NR, n - c0);                                           \
            decode_panel<group_size(id), has_b, ch, fn>(w + c0 * row_bytes, row_bytes, live, k, x.kp, pn); \
            panel_rows<group_size(id), off, has_b>(x, t, k, pn, y + c0, n, live);                          \
        }                                                                                                  \
        return true;
        Q8_TYPES(Q8_GEMM)
#undef Q8_GEMM
    }
    return false;
}

}  // namespace k_gemm8
