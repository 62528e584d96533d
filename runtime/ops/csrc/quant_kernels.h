// GGUF block dequantization and the quantized matrix-vector product, compiled once per ISA.
//
// Included several times by quant_cpu.cpp, each time inside `#pragma GCC target(...)`
// with QK_NS naming the namespace, so one portable source gives an AVX-512, an AVX2
// and a baseline build of every kernel; the dispatcher picks one at run time.
// No include guard on purpose. Formulas follow runtime/gguf/quants/*.py (the
// reference): the same products in the same order, so with -ffp-contract=off a
// dequantized block is bit-identical to the torch reference.

namespace QK_NS {

static inline float h2f(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
#if QK_X86 >= 2
    return _cvtsh_ss(h);  // F16C: one instruction instead of the bit-by-bit conversion
#else
    return half_to_float(h);
#endif
}

// ---- one block -> block_size floats ------------------------------------------------

static inline void deq_q4_0(const uint8_t* b, float* y) {
    const float d = h2f(b);
    const uint8_t* qs = b + 2;
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
        y[j] = d * (float)((int)(qs[j] & 15) - 8);
        y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static inline void deq_q4_1(const uint8_t* b, float* y) {
    const float d = h2f(b), m = h2f(b + 2);
    const uint8_t* qs = b + 4;
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
        y[j] = d * (float)(qs[j] & 15) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static inline void deq_q5_0(const uint8_t* b, float* y) {
    const float d = h2f(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
        const int lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
        const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static inline void deq_q5_1(const uint8_t* b, float* y) {
    const float d = h2f(b), m = h2f(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const uint8_t* qs = b + 8;
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
        const int lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
        const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

static inline void deq_q8_0(const uint8_t* b, float* y) {
    const float d = h2f(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
#pragma omp simd
    for (int j = 0; j < 32; ++j) y[j] = (float)qs[j] * d;
}

static inline void deq_q2_k(const uint8_t* b, float* y) {
    const uint8_t* sc = b;
    const uint8_t* qs = b + 16;
    const float d = h2f(b + 80), dmin = h2f(b + 82);
    for (int h = 0; h < 2; ++h)
        for (int s = 0; s < 4; ++s) {
            for (int half = 0; half < 2; ++half) {  // two 16-value sub-blocks per (h, s)
                const int sb = h * 8 + s * 2 + half;
                const float dl = d * (float)(sc[sb] & 15), ml = dmin * (float)(sc[sb] >> 4);
                float* o = y + sb * 16;
                const uint8_t* q = qs + h * 32 + half * 16;
#pragma omp simd
                for (int k = 0; k < 16; ++k) o[k] = dl * (float)((q[k] >> (2 * s)) & 3) - ml;
            }
        }
}

static inline void deq_q3_k(const uint8_t* b, float* y) {
    const uint8_t* hm = b;
    const uint8_t* qs = b + 32;
    const uint8_t* sc = b + 96;
    const float d = h2f(b + 108);
    float dl[16];
    for (int i = 0; i < 16; ++i) {
        const int low = i < 8 ? (sc[i] & 15) : (sc[i - 8] >> 4);
        const int high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        dl[i] = d * (float)((int)(int8_t)(uint8_t)(low | (high << 4)) - 32);
    }
    for (int h = 0; h < 2; ++h)
        for (int s = 0; s < 4; ++s)
            for (int half = 0; half < 2; ++half) {
                const int e0 = h * 128 + s * 32 + half * 16;  // first element of this sub-block
                const float f = dl[e0 / 16];
                const uint8_t* q = qs + h * 32 + half * 16;
                const uint8_t* m = hm + half * 16;
                const int hs = e0 / 32;  // hmask bit = element index / 32
#pragma omp simd
                for (int k = 0; k < 16; ++k) {
                    const int ql = (q[k] >> (2 * s)) & 3;
                    const int qh = (m[k] >> hs) & 1;
                    y[e0 + k] = f * (float)(ql - ((qh ^ 1) << 2));
                }
            }
}

static inline void scale_min_k4(const uint8_t* s, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[4 + j] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

static inline void deq_q4_k(const uint8_t* b, float* y) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* qs = b + 16;
    for (int c = 0; c < 4; ++c) {
        int sc0, mn0, sc1, mn1;
        scale_min_k4(b + 4, 2 * c, &sc0, &mn0);
        scale_min_k4(b + 4, 2 * c + 1, &sc1, &mn1);
        const float d0 = d * (float)sc0, m0 = dmin * (float)mn0;
        const float d1 = d * (float)sc1, m1 = dmin * (float)mn1;
        const uint8_t* q = qs + c * 32;
        float* o = y + c * 64;
#pragma omp simd
        for (int k = 0; k < 32; ++k) {
            o[k] = d0 * (float)(q[k] & 15) - m0;
            o[k + 32] = d1 * (float)(q[k] >> 4) - m1;
        }
    }
}

static inline void deq_q5_k(const uint8_t* b, float* y) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48;
    for (int c = 0; c < 4; ++c) {
        int sc0, mn0, sc1, mn1;
        scale_min_k4(b + 4, 2 * c, &sc0, &mn0);
        scale_min_k4(b + 4, 2 * c + 1, &sc1, &mn1);
        const float d0 = d * (float)sc0, m0 = dmin * (float)mn0;
        const float d1 = d * (float)sc1, m1 = dmin * (float)mn1;
        const uint8_t* q = qs + c * 32;
        float* o = y + c * 64;
#pragma omp simd
        for (int k = 0; k < 32; ++k) {
            const int lo = (q[k] & 15) | (((qh[k] >> (2 * c)) & 1) << 4);
            const int hi = (q[k] >> 4) | (((qh[k] >> (2 * c + 1)) & 1) << 4);
            o[k] = d0 * (float)lo - m0;
            o[k + 32] = d1 * (float)hi - m1;
        }
    }
}

static inline void deq_q6_k(const uint8_t* b, float* y) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = h2f(b + 208);
    for (int h = 0; h < 2; ++h)
        for (int s = 0; s < 4; ++s) {  // 32 elements e = h*128 + s*32 + k
            const int e0 = h * 128 + s * 32;
            const float f0 = d * (float)sc[e0 / 16], f1 = d * (float)sc[e0 / 16 + 1];
            const int nib = s / 2;  // low nibble for r < 64, high for r >= 64
            const uint8_t* l = ql + h * 64 + (s % 2) * 32;
            const uint8_t* q = qh + h * 32;
#pragma omp simd
            for (int k = 0; k < 32; ++k) {
                const int v = (((l[k] >> (4 * nib)) & 15) | (((q[k] >> (2 * s)) & 3) << 4)) - 32;
                y[e0 + k] = (k < 16 ? f0 : f1) * (float)v;
            }
        }
}

static inline void deq_iq4_nl(const uint8_t* b, float* y) {
    const float d = h2f(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = d * (float)kIQ4[qs[j] & 15];
        y[j + 16] = d * (float)kIQ4[qs[j] >> 4];
    }
}

static inline void deq_iq4_xs(const uint8_t* b, float* y) {
    const float d = h2f(b);
    uint16_t sh;
    std::memcpy(&sh, b + 2, 2);
    const uint8_t* sl = b + 4;
    const uint8_t* qs = b + 8;
    for (int s = 0; s < 8; ++s) {
        const int low = (sl[s / 2] >> (4 * (s % 2))) & 15;
        const int high = (sh >> (2 * s)) & 3;
        const float dl = d * (float)((int)(int8_t)(uint8_t)(low | (high << 4)) - 32);
        const uint8_t* q = qs + s * 16;
        for (int k = 0; k < 16; ++k) {
            y[s * 32 + k] = dl * (float)kIQ4[q[k] & 15];
            y[s * 32 + k + 16] = dl * (float)kIQ4[q[k] >> 4];
        }
    }
}

static inline void deq_f16(const uint8_t* b, float* y) {
    for (int j = 0; j < 1; ++j) y[j] = h2f(b + 2 * j);
}

static inline void deq_bf16(const uint8_t* b, float* y) {
    uint16_t h;
    std::memcpy(&h, b, 2);
    const uint32_t u = (uint32_t)h << 16;
    std::memcpy(y, &u, 4);
}

// ---- rows -------------------------------------------------------------------------

template <int BS, int TS, void (*DEQ)(const uint8_t*, float*)>
static void deq_row(const uint8_t* row, float* y, int64_t k) {
    for (int64_t b = 0; b < k / BS; ++b) DEQ(row + b * TS, y + b * BS);
}

#if QK_X86 == 3
// Four independent accumulators hide the FMA latency; k is a multiple of 32 for every
// block type but F16/BF16 rows, whose tail the scalar loop takes.
static inline float dot(const float* a, const float* b, int64_t k) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
           s3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= k; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    for (; i < k; ++i) s += a[i] * b[i];
    return s;
}
#elif QK_X86 == 2
static inline float dot(const float* a, const float* b, int64_t k) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
           s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    const __m256 v = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < k; ++i) s += a[i] * b[i];
    return s;
}
#else
static inline float dot(const float* a, const float* b, int64_t k) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < k; ++i) s += a[i] * b[i];
    return s;
}
#endif

// Four dot products of a with consecutive rows of x (4, k): a's vector loads are shared.
[[maybe_unused]] static inline void dot4(const float* a, const float* x, int64_t k, float* out, int64_t stride) {
    const float* x1 = x + k;
    const float* x2 = x + 2 * k;
    const float* x3 = x + 3 * k;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < k; ++i) {
        const float v = a[i];
        s0 += v * x[i];
        s1 += v * x1[i];
        s2 += v * x2[i];
        s3 += v * x3[i];
    }
    out[0] = s0;
    out[stride] = s1;
    out[2 * stride] = s2;
    out[3 * stride] = s3;
}

// y (t, n) = x (t, k) @ W^T for rows [r0, r1) of W (n, row_bytes); buf holds k floats.
template <int BS, int TS, void (*DEQ)(const uint8_t*, float*)>
static void matvec_rows(const uint8_t* w, int64_t row_bytes, const float* x, float* y, int64_t t,
                        int64_t n, int64_t k, int64_t r0, int64_t r1, float* buf) {
    for (int64_t r = r0; r < r1; ++r) {
        deq_row<BS, TS, DEQ>(w + r * row_bytes, buf, k);
        int64_t i = 0;
#if QK_X86 == 0
        for (; i + 4 <= t; i += 4) dot4(buf, x + i * k, k, y + i * n + r, n);
#endif
        for (; i < t; ++i) y[i * n + r] = dot(buf, x + i * k, k);
    }
}

template <int BS, int TS, void (*DEQ)(const uint8_t*, float*)>
static void deq_rows(const uint8_t* w, int64_t row_bytes, float* y, int64_t k, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) deq_row<BS, TS, DEQ>(w + r * row_bytes, y + r * k, k);
}

#if QK_X86 == 3
#include "quant_fused_avx512.h"
#endif

#define QK_TYPES(X)                        \
    X(QT_Q4_0, 32, 18, deq_q4_0)           \
    X(QT_Q4_1, 32, 20, deq_q4_1)           \
    X(QT_Q5_0, 32, 22, deq_q5_0)           \
    X(QT_Q5_1, 32, 24, deq_q5_1)           \
    X(QT_Q8_0, 32, 34, deq_q8_0)           \
    X(QT_Q2_K, 256, 84, deq_q2_k)          \
    X(QT_Q3_K, 256, 110, deq_q3_k)         \
    X(QT_Q4_K, 256, 144, deq_q4_k)         \
    X(QT_Q5_K, 256, 176, deq_q5_k)         \
    X(QT_Q6_K, 256, 210, deq_q6_k)         \
    X(QT_IQ4_NL, 32, 18, deq_iq4_nl)       \
    X(QT_IQ4_XS, 256, 136, deq_iq4_xs)     \
    X(QT_F16, 1, 2, deq_f16)               \
    X(QT_BF16, 1, 2, deq_bf16)

// Returns false for a type this file does not know.
static bool matvec(int qtype, const uint8_t* w, int64_t row_bytes, const float* x, float* y, int64_t t,
                   int64_t n, int64_t k, int64_t r0, int64_t r1, float* buf) {
#if QK_X86 == 3
    switch (qtype) {
#define QK_CASE(id, bs, ts, fn)                                      \
    case id:                                                         \
        fused_rows<bs, ts, fn>(w, row_bytes, x, y, t, n, k, r0, r1); \
        return true;
        QK_FUSED(QK_CASE)
#undef QK_CASE
        default: break;
    }
#endif
    switch (qtype) {
#define QK_CASE(id, bs, ts, fn)                                                  \
    case id:                                                                     \
        matvec_rows<bs, ts, fn>(w, row_bytes, x, y, t, n, k, r0, r1, buf);      \
        return true;
        QK_TYPES(QK_CASE)
#undef QK_CASE
    }
    return false;
}

static bool dequant(int qtype, const uint8_t* w, int64_t row_bytes, float* y, int64_t k, int64_t r0,
                    int64_t r1) {
#if QK_X86 == 3
    switch (qtype) {
#define QK_CASE(id, bs, ts, fn)                                 \
    case id:                                                    \
        fused_dequant<bs, ts, fn>(w, row_bytes, y, k, r0, r1); \
        return true;
        QK_FUSED(QK_CASE)
#undef QK_CASE
        default: break;
    }
#endif
    switch (qtype) {
#define QK_CASE(id, bs, ts, fn)                                  \
    case id:                                                     \
        deq_rows<bs, ts, fn>(w, row_bytes, y, k, r0, r1);        \
        return true;
        QK_TYPES(QK_CASE)
#undef QK_CASE
    }
    return false;
}

#include "quant_bf16.h"

}  // namespace QK_NS
