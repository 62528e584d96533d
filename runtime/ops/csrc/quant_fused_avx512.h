// AVX-512 kernels: 32-value blocks decoded straight into registers and multiplied in place.
//
// Part of quant_kernels.h: included inside its namespace when QK_X86 == 3 (the AVX-512
// build), after the block decoders. No include guard on purpose.

// ---- AVX-512: 32-value blocks decoded straight into registers and multiplied in place --------
// Each decoder gives values 0-15 in lo and 16-31 in hi, as d * q (+ m) exactly like the reference.

static inline __m512 i8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

// r[0 .. 16) as a 16 x 16 matrix of 32-bit words, transposed in place: word j of r[i] becomes
// word i of r[j] (the GEMMs' panels: 16 rows of W to 16 columns per word; 64 shuffles
// where 16 gathers, one per word position, took ~5x the time).
static inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {  // words of row pairs interleaved
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // then 64-bit pairs of row pairs
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; ++i) {  // 128-bit lanes of row quads: even lanes, then odd ones
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

// 16 packed bytes -> 32 bytes: low nibbles (elements 0-15), then high nibbles (16-31).
static inline __m256i nibbles32(const uint8_t* qs) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

static inline void split(__m256i q, __m512 d, __m512& lo, __m512& hi) {
    lo = _mm512_mul_ps(d, i8_to_ps(_mm256_castsi256_si128(q)));
    hi = _mm512_mul_ps(d, i8_to_ps(_mm256_extracti128_si256(q, 1)));
}

static inline void split_m(__m256i q, __m512 d, __m512 m, __m512& lo, __m512& hi) {
    // d * q + m as two roundings, like the reference (no fused multiply-add)
    lo = _mm512_add_ps(_mm512_mul_ps(d, i8_to_ps(_mm256_castsi256_si128(q))), m);
    hi = _mm512_add_ps(_mm512_mul_ps(d, i8_to_ps(_mm256_extracti128_si256(q, 1))), m);
}

static inline void v_q4_0(const uint8_t* b, int, __m512& lo, __m512& hi) {
    split(_mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8)), _mm512_set1_ps(h2f(b)), lo, hi);
}

static inline void v_q4_1(const uint8_t* b, int, __m512& lo, __m512& hi) {
    split_m(nibbles32(b + 4), _mm512_set1_ps(h2f(b)), _mm512_set1_ps(h2f(b + 2)), lo, hi);
}

static inline __m256i fifth_bit(__m256i q, const uint8_t* qh_bytes) {
    uint32_t qh;
    std::memcpy(&qh, qh_bytes, 4);
    // bit j of qh is the 5th bit of element j: a byte mask selects where to add 16 (= OR: the nibble is below 16)
    return _mm256_mask_add_epi8(q, _cvtu32_mask32(qh), q, _mm256_set1_epi8(16));
}

static inline void v_q5_0(const uint8_t* b, int, __m512& lo, __m512& hi) {
    const __m256i q = fifth_bit(nibbles32(b + 6), b + 2);
    split(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), _mm512_set1_ps(h2f(b)), lo, hi);
}

static inline void v_q5_1(const uint8_t* b, int, __m512& lo, __m512& hi) {
    split_m(fifth_bit(nibbles32(b + 8), b + 4), _mm512_set1_ps(h2f(b)), _mm512_set1_ps(h2f(b + 2)), lo, hi);
}

static inline void v_q8_0(const uint8_t* b, int, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(h2f(b));
    lo = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))), d);
    hi = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))), d);
}

static inline void v_iq4_nl(const uint8_t* b, int, __m512& lo, __m512& hi) {
    const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4));
    const __m256i idx = nibbles32(b + 2);
    const __m256i q = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), idx);
    split(q, _mm512_set1_ps(h2f(b)), lo, hi);
}


// K-quants: group g (0-7) is 32 consecutive values of the 256-value super-block.
static inline void v_q4_k(const uint8_t* b, int g, __m512& lo, __m512& hi) {
    int sc, mn;
    scale_min_k4(b + 4, g, &sc, &mn);
    const __m512 d = _mm512_set1_ps(h2f(b) * (float)sc), m = _mm512_set1_ps(h2f(b + 2) * (float)mn);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + (g / 2) * 32));
    const __m256i q = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (g % 2)), _mm256_set1_epi8(15));
    lo = _mm512_sub_ps(_mm512_mul_ps(d, i8_to_ps(_mm256_castsi256_si128(q))), m);
    hi = _mm512_sub_ps(_mm512_mul_ps(d, i8_to_ps(_mm256_extracti128_si256(q, 1))), m);
}

static inline void v_q5_k(const uint8_t* b, int g, __m512& lo, __m512& hi) {
    int sc, mn;
    scale_min_k4(b + 4, g, &sc, &mn);
    const __m512 d = _mm512_set1_ps(h2f(b) * (float)sc), m = _mm512_set1_ps(h2f(b + 2) * (float)mn);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + (g / 2) * 32));
    const __m256i ql = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (g % 2)), _mm256_set1_epi8(15));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, g), _mm256_set1_epi8(1));
    const __m256i q = _mm256_or_si256(ql, _mm256_slli_epi16(hb, 4));
    lo = _mm512_sub_ps(_mm512_mul_ps(d, i8_to_ps(_mm256_castsi256_si128(q))), m);
    hi = _mm512_sub_ps(_mm512_mul_ps(d, i8_to_ps(_mm256_extracti128_si256(q, 1))), m);
}

static inline void v_q6_k(const uint8_t* b, int g, __m512& lo, __m512& hi) {
    const int h = g / 4, s = g % 4;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = h2f(b + 208);
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + h * 64 + (s % 2) * 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + h * 32));
    const __m256i low = _mm256_and_si256(_mm256_srli_epi16(l, 4 * (s / 2)), _mm256_set1_epi8(15));
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), _mm256_set1_epi8(3));
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
    lo = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * g]), i8_to_ps(_mm256_castsi256_si128(q)));
    hi = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * g + 1]), i8_to_ps(_mm256_extracti128_si256(q, 1)));
}

static inline float hsum(__m512 a, __m512 b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }

// NT (1-4) rows of x at once against one row of W: each block is decoded once per group.
using Decoder = void (*)(const uint8_t*, int, __m512&, __m512&);

template <int BS, int TS, Decoder V, int NT>
static inline void fused_row(const uint8_t* row, const float* x, float* y, int64_t n, int64_t k) {
    __m512 a0[NT], a1[NT];
    for (int j = 0; j < NT; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / BS; ++b) {
        for (int g = 0; g < BS / 32; ++g) {
            __m512 lo, hi;
            V(row + b * TS, g, lo, hi);
            const float* xb = x + b * BS + g * 32;
            for (int j = 0; j < NT; ++j) {
                a0[j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + j * k), a0[j]);
                a1[j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + j * k + 16), a1[j]);
            }
        }
    }
    for (int j = 0; j < NT; ++j) y[j * n] = hsum(a0[j], a1[j]);
}

template <int BS, int TS, Decoder V>
static void fused_rows(const uint8_t* w, int64_t row_bytes, const float* x, float* y, int64_t t, int64_t n,
                       int64_t k, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = w + r * row_bytes;
        int64_t i = 0;
        for (; i + 4 <= t; i += 4) fused_row<BS, TS, V, 4>(row, x + i * k, y + i * n + r, n, k);
        switch (t - i) {
            case 3: fused_row<BS, TS, V, 3>(row, x + i * k, y + i * n + r, n, k); break;
            case 2: fused_row<BS, TS, V, 2>(row, x + i * k, y + i * n + r, n, k); break;
            case 1: fused_row<BS, TS, V, 1>(row, x + i * k, y + i * n + r, n, k); break;
            default: break;
        }
    }
}
// Rows [r0, r1) of W decoded into y (n, k) through the register decoders.
template <int BS, int TS, Decoder V>
static void fused_dequant(const uint8_t* w, int64_t row_bytes, float* y, int64_t k, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = w + r * row_bytes;
        float* out = y + r * k;
        for (int64_t b = 0; b < k / BS; ++b)
            for (int g = 0; g < BS / 32; ++g) {
                __m512 lo, hi;
                V(row + b * TS, g, lo, hi);
                _mm512_storeu_ps(out + b * BS + g * 32, lo);
                _mm512_storeu_ps(out + b * BS + g * 32 + 16, hi);
            }
    }
}

#define QK_FUSED(X)                 \
    X(QT_Q4_0, 32, 18, v_q4_0)      \
    X(QT_Q4_1, 32, 20, v_q4_1)      \
    X(QT_Q5_0, 32, 22, v_q5_0)      \
    X(QT_Q5_1, 32, 24, v_q5_1)      \
    X(QT_Q8_0, 32, 34, v_q8_0)      \
    X(QT_IQ4_NL, 32, 18, v_iq4_nl)  \
    X(QT_Q4_K, 256, 144, v_q4_k)    \
    X(QT_Q5_K, 256, 176, v_q5_k)    \
    X(QT_Q6_K, 256, 210, v_q6_k)
