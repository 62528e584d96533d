// Int8 products for decode rows: x quantized to 8 bits per 32 values, AVX512-VNNI dot products.
//
// Included once by quant_cpu.cpp inside `#pragma GCC target(... avx512vnni)`, after the
// AVX-512 build of quant_kernels.h, whose block helpers (nibbles32, fifth_bit,
// scale_min_k4, h2f) it uses. No include guard on purpose.
//
// The quantity (the reference is runtime/ops/reference.py's qmatmul_q8): x's rows are cut
// into 32-value blocks, each stored as int8 q = round(x * 127 / amax) with the scale
// dx = amax / 127, and y = x_hat @ W_hat^T for x_hat = dx * q. A weight chunk of 64 values
// is decoded to unsigned bytes u with value = a * (u - OFF) + b per lane of 4 values, so
//   sum(value * x_hat) = dx * (a * sum((u - OFF) * q) + b * sum(q))
// where the integer sum is exact in int32 and only the per-lane combination is float32.
// vpdpbusd multiplies unsigned by signed bytes: u is the unsigned side and q the signed one,
// and for a type with an offset the sum starts from OFF * (-sum(q)) per lane (kept beside q,
// one shift per chunk: every OFF is a power of two) instead of subtracting OFF from the
// weights. A type without one (OFF = 0) has its b term instead. Each row of y is computed
// alone, so a row's result does not depend on the other rows of the call.

namespace k_vnni {

using k_avx512::fifth_bit;
using k_avx512::h2f;
using k_avx512::nibbles32;
using k_avx512::scale_min_k4;

// A call's x, quantized by quantize_x: per row kp = k rounded up to 64 bytes of int8 q
// (zero past k); per lane of 4 values dx (its block's scale) and -sum(q) over the lane;
// per 32-value block dx * sum(q) (the b term's).
struct Q8Act {
    const int8_t* q;
    const float* dx;
    const int32_t* nls;
    const float* dsum;
    int64_t kp;
};

// x (t, k) float32 -> the Q8Act buffers, q rounded as runtime/ops/reference.py's quantize_q8.
static void quantize_x(const float* x, int64_t t, int64_t k, int8_t* q, float* dx, int32_t* nls, float* dsum,
                       int64_t kp) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t i = 0; i < t; ++i)
        for (int64_t b0 = 0; b0 < k; b0 += 32) {
            const __m512 v0 = _mm512_loadu_ps(x + i * k + b0), v1 = _mm512_loadu_ps(x + i * k + b0 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, absmask), _mm512_and_ps(v1, absmask)));
            const float id = amax > 0.f ? 127.f / amax : 0.f, d = amax / 127.f;
            const __m512 s = _mm512_set1_ps(id);
            // x * id, clamped, to the nearest integer (ties to even: the default rounding mode)
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_mul_ps(v0, s))));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_mul_ps(v1, s))));
            const __m256i qb = _mm256_set_m128i(_mm512_cvtepi32_epi8(q1), _mm512_cvtepi32_epi8(q0));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kp + b0), qb);
            _mm256_storeu_ps(dx + i * (kp / 4) + b0 / 4, _mm256_set1_ps(d));
            const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, qb);  // per lane of 4
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(nls + i * (kp / 4) + b0 / 4),
                                _mm256_sub_epi32(_mm256_setzero_si256(), sums));
            dsum[i * (kp / 32) + b0 / 32] = d * (float)_mm512_reduce_add_epi32(_mm512_zextsi256_si512(sums));
        }
}

// log2 of a type's weight offset (a power of two), the shift of -sum(q) that starts its sums.
constexpr int off_shift(int off) { return off <= 1 ? 0 : 1 + off_shift(off / 2); }

// The sums' start for chunk c of x's row r: OFF * (-sum(q)) per lane, or zero.
template <int OFF>
static inline __m512i sum_start(const Q8Act& x, int64_t r, int64_t c) {
    static_assert((OFF & (OFF - 1)) == 0, "a weight offset is a power of two");
    if (!OFF) return _mm512_setzero_si512();
    return _mm512_slli_epi32(_mm512_loadu_si512(x.nls + r * (x.kp / 4) + c * 16), off_shift(OFF));
}

// x in lanes 0-7, y in lanes 8-15: one value per 32-value block of a chunk.
static inline __m512 halves(float x, float y) {
    return _mm512_insertf32x8(_mm512_set1_ps(x), _mm256_set1_ps(y), 1);
}

static inline __m512i join(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// ---- decoders: chunks c0 .. c0 + CH - 1 of 64 values each -> u[h], a[h] and, for MIN
// types, each 32-value block's b in b[0 .. 2 CH). A 32-value type decodes one chunk (its
// blocks 2c0 and 2c0+1; `two` is false for a row's odd last block, whose half is zero), a
// K-quant a whole 256-value super-block (4 chunks, scales unpacked once). ----

using DecodeFn = void (*)(const uint8_t*, int64_t, bool, __m512i*, __m512*, float*);

// The f16 scales at p0 and p1 as one vector: p0's in lanes 0-7, p1's in lanes 8-15.
static inline __m512 pair_scales(const uint8_t* p0, const uint8_t* p1) {
    int16_t h0, h1;
    std::memcpy(&h0, p0, 2);
    std::memcpy(&h1, p1, 2);
    return _mm512_cvtph_ps(_mm256_mask_set1_epi16(_mm256_set1_epi16(h0), 0xFF00, h1));
}

// The 16 packed bytes at p0 and at p1 -> 64 values: p0's low nibbles, its high nibbles, then p1's.
static inline __m512i nibbles64(const uint8_t* p0, const uint8_t* p1) {
    // (p0, p0, p1, p1) in 128-bit lanes, the odd lanes shifted right by 4
    const __m512i raw = _mm512_mask_broadcast_i32x4(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))), 0xFF00,
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)));
    const int64_t h = 0x0004000400040004;
    return _mm512_and_si512(_mm512_srlv_epi16(raw, _mm512_set_epi64(h, h, 0, 0, h, h, 0, 0)), _mm512_set1_epi8(15));
}

// Q4_0 (QS = 2) and Q4_1 (QS = 4: its m is the b term).
template <int TS, int QS>
static inline void c_q4_x(const uint8_t* row, int64_t c, bool two, __m512i* u, __m512* a, float* b) {
    const uint8_t* b0 = row + 2 * c * TS;
    if (two) {
        u[0] = nibbles64(b0 + QS, b0 + TS + QS);
        a[0] = pair_scales(b0, b0 + TS);
    } else {
        u[0] = join(nibbles32(b0 + QS), _mm256_setzero_si256());
        a[0] = halves(h2f(b0), 0.f);
    }
    if (QS == 4) b[0] = h2f(b0 + 2), b[1] = two ? h2f(b0 + TS + 2) : 0.f;
}

// Q5_0 (QH = 2) and Q5_1 (QH = 4: its m is the b term).
template <int TS, int QH>
static inline void c_q5_x(const uint8_t* row, int64_t c, bool two, __m512i* u, __m512* a, float* b) {
    const uint8_t* b0 = row + 2 * c * TS;
    if (two) {
        uint32_t h0, h1;
        std::memcpy(&h0, b0 + QH, 4);
        std::memcpy(&h1, b0 + TS + QH, 4);
        // bit j of a block's qh is its element j's fifth bit: add 16 there (= OR: nibbles are < 16)
        const __mmask64 fifth = _cvtu64_mask64((uint64_t)h0 | ((uint64_t)h1 << 32));
        const __m512i q = nibbles64(b0 + QH + 4, b0 + TS + QH + 4);
        u[0] = _mm512_mask_add_epi8(q, fifth, q, _mm512_set1_epi8(16));
        a[0] = pair_scales(b0, b0 + TS);
    } else {
        u[0] = join(fifth_bit(nibbles32(b0 + QH + 4), b0 + QH), _mm256_setzero_si256());
        a[0] = halves(h2f(b0), 0.f);
    }
    if (QH == 4) b[0] = h2f(b0 + 2), b[1] = two ? h2f(b0 + TS + 2) : 0.f;
}

static inline void c_q8_0(const uint8_t* row, int64_t c, bool two, __m512i* u, __m512* a, float*) {
    const uint8_t* b0 = row + 2 * c * 34;
    const __m256i flip = _mm256_set1_epi8((char)0x80);  // int8 weights w -> unsigned w + 128 (OFF)
    const __m256i lo = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2)), flip);
    const __m256i hi =
        two ? _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 36)), flip)
            : _mm256_setzero_si256();
    u[0] = join(lo, hi);
    a[0] = halves(h2f(b0), two ? h2f(b0 + 34) : 0.f);
}

static inline void c_iq4_nl(const uint8_t* row, int64_t c, bool two, __m512i* u, __m512* a, float*) {
    // kIQ4 + 128: the levels as unsigned bytes
    alignas(16) static const uint8_t kU[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
    const __m128i t = _mm_load_si128(reinterpret_cast<const __m128i*>(kU));
    const __m256i table = _mm256_set_m128i(t, t);
    const uint8_t* b0 = row + 2 * c * 18;
    const __m256i lo = _mm256_shuffle_epi8(table, nibbles32(b0 + 2));
    u[0] = join(lo, two ? _mm256_shuffle_epi8(table, nibbles32(b0 + 20)) : _mm256_setzero_si256());
    a[0] = halves(h2f(b0), two ? h2f(b0 + 18) : 0.f);
}

// Q4_K / Q5_K: the 8 6-bit scales and mins of a super-block (12 bytes at s) as floats
// d * scale (a8) and -dmin * min (stored in b).
static inline __m256 k4_scales(const uint8_t* s, float d, float dmin, float* b) {
    uint32_t w[3];
    std::memcpy(w, s, 12);
    // bytes 0-3: scales 0-3 (low 6 bits), 4-7: mins 0-3; bytes 8-11: low nibbles scales 4-7,
    // high nibbles mins 4-7, whose top 2 bits are the top bits of bytes 0-3 and 4-7
    const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    const uint64_t sc = (uint64_t)(w[0] & m6) | (uint64_t)((w[2] & m4) | (((w[0] >> 6) & m2) << 4)) << 32;
    const uint64_t mn = (uint64_t)(w[1] & m6) | (uint64_t)(((w[2] >> 4) & m4) | (((w[1] >> 6) & m2) << 4)) << 32;
    const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)));
    const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn)));
    _mm256_storeu_ps(b, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps(dmin), mnf)));
    return _mm256_mul_ps(_mm256_set1_ps(d), scf);
}

// Chunk j's per-lane scale from the super-block's 8 (groups 2j, 2j+1: 8 lanes each).
static inline __m512 pair_lanes(__m256 a8, int j) {
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * j)),
                                           _mm256_set1_epi32(2 * j + 1), 1);
    return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(a8));
}

static inline void c_q4_k(const uint8_t* row, int64_t c0, bool, __m512i* u, __m512* a, float* b) {
    const uint8_t* blk = row + (c0 / 4) * 144;
    const __m256 a8 = k4_scales(blk + 4, h2f(blk), h2f(blk + 2), b);
    const __m256i m = _mm256_set1_epi8(15);
    for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + j * 32));
        u[j] = join(_mm256_and_si256(raw, m), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m));
        a[j] = pair_lanes(a8, j);
    }
}

static inline void c_q5_k(const uint8_t* row, int64_t c0, bool, __m512i* u, __m512* a, float* b) {
    const uint8_t* blk = row + (c0 / 4) * 176;
    const __m256 a8 = k4_scales(blk + 4, h2f(blk), h2f(blk + 2), b);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    const __m256i m = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 48 + j * 32));
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4);
        u[j] = join(_mm256_or_si256(_mm256_and_si256(raw, m), h0),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m), h1));
        a[j] = pair_lanes(a8, j);
    }
}

// Q6_K: chunk j holds groups (h, s) = (j / 2, 2 (j % 2)) and (j / 2, 2 (j % 2) + 1) of the
// reference's layout; its scales are per 16 values, four per chunk.
static inline void c_q6_k(const uint8_t* row, int64_t c0, bool, __m512i* u, __m512* a, float*) {
    const uint8_t* blk = row + (c0 / 4) * 210;
    const __m512 s16 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)))),
        _mm512_set1_ps(h2f(blk + 208)));
    const __m256i m = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3);
    for (int j = 0; j < 4; ++j) {
        const int h = j / 2, s0 = 2 * (j % 2), shift = 4 * (j % 2);
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + h * 64));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + h * 64 + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + h * 32));
        const __m256i q0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, shift), m),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * s0), three), 4));
        const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, shift), m),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * s0 + 2), three), 4));
        u[j] = join(q0, q1);
        const __m512i idx = _mm512_set_epi32(4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 2, 4 * j + 2, 4 * j + 2,
                                             4 * j + 2, 4 * j + 1, 4 * j + 1, 4 * j + 1, 4 * j + 1, 4 * j, 4 * j, 4 * j, 4 * j);
        a[j] = _mm512_permutexvar_ps(idx, s16);
    }
}

// sum(a[i] * b[i]) for i < n.
static inline float dot_n(const float* a, const float* b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// NT rows of x (from row i0 of `x`) against one row of W; each chunk is decoded once.
// bb: room for the row's b per 32-value block (MIN types).
template <int OFF, bool MIN, int CH, DecodeFn F, int NT>
static inline void q8_row(const uint8_t* row, const Q8Act& x, int64_t i0, float* y, int64_t n, int64_t k,
                          float* bb) {
    const int64_t nb = (k + 31) / 32, nc = (nb + 1) / 2, lanes = x.kp / 4;
    __m512 acc[NT];
    for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < nc; c0 += CH) {
        __m512i u[CH];
        __m512 a[CH];
        F(row, c0, 2 * c0 + 1 < nb, u, a, bb + 2 * c0);
        for (int h = 0; h < CH; ++h) {
            const int64_t c = c0 + h;
            for (int j = 0; j < NT; ++j) {
                const int64_t r = i0 + j;
                const __m512i q = _mm512_loadu_si512(x.q + r * x.kp + c * 64);
                // sum((u - OFF) * q) per lane, exact
                const __m512i dot = _mm512_dpbusd_epi32(sum_start<OFF>(x, r, c), u[h], q);
                const __m512 dx = _mm512_loadu_ps(x.dx + r * lanes + c * 16);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(a[h], dx), acc[j]);
            }
        }
    }
    for (int j = 0; j < NT; ++j) {
        float v = _mm512_reduce_add_ps(acc[j]);
        if (MIN) v += dot_n(bb, x.dsum + (i0 + j) * (x.kp / 32), nb);  // sum over blocks of b * dx * sum(q)
        y[j * n] = v;
    }
}

// One row of x (row i of `x`) against two rows of W, w0 and w1 -> y0, y1: q8_row<..., 1>'s
// operations for each, interleaved (two independent chains for the out-of-order core: a
// single decode row is otherwise bound by one chunk's latency after another). bb0, bb1:
// each W row's room for its b per block.
template <int OFF, bool MIN, int CH, DecodeFn F>
static inline void q8_row2(const uint8_t* w0, const uint8_t* w1, const Q8Act& x, int64_t i, float* y0, float* y1,
                           int64_t k, float* bb0, float* bb1) {
    const int64_t nb = (k + 31) / 32, nc = (nb + 1) / 2, lanes = x.kp / 4;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < nc; c0 += CH) {
        __m512i u0[CH], u1[CH];
        __m512 a0[CH], a1[CH];
        F(w0, c0, 2 * c0 + 1 < nb, u0, a0, bb0 + 2 * c0);
        F(w1, c0, 2 * c0 + 1 < nb, u1, a1, bb1 + 2 * c0);
        for (int h = 0; h < CH; ++h) {
            const int64_t c = c0 + h;
            const __m512i q = _mm512_loadu_si512(x.q + i * x.kp + c * 64), init = sum_start<OFF>(x, i, c);
            const __m512 dx = _mm512_loadu_ps(x.dx + i * lanes + c * 16);
            const __m512i d0 = _mm512_dpbusd_epi32(init, u0[h], q);
            const __m512i d1 = _mm512_dpbusd_epi32(init, u1[h], q);
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(a0[h], dx), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(a1[h], dx), acc1);
        }
    }
    float v0 = _mm512_reduce_add_ps(acc0), v1 = _mm512_reduce_add_ps(acc1);
    if (MIN) {
        v0 += dot_n(bb0, x.dsum + i * (x.kp / 32), nb);
        v1 += dot_n(bb1, x.dsum + i * (x.kp / 32), nb);
    }
    *y0 = v0;
    *y1 = v1;
}

// bb: room for 2 * ceil(k / 32) + 2 floats. PAIR: a single row of x takes W's rows in pairs
// (q8_row2), one from each half of the range: Q5_0 2048 x 640 83 -> 70 us on one thread;
// Q4_0 14336 x 4096 2.6-3.1 -> 1.9-2.8 ms. Pairs of adjacent rows ran Q4_0 and Q8_0 2-2.5x
// slower than single rows (each stream then skips a row after every row: no prefetch).
// Q4_K and Q6_K in pairs ran 1.3-1.5x faster on one thread but no faster on two: not taken.
template <int OFF, bool MIN, int CH, DecodeFn F, bool PAIR>
static void q8_rows(const uint8_t* w, int64_t row_bytes, const Q8Act& x, float* y, int64_t t, int64_t n,
                    int64_t k, int64_t r0, int64_t r1, float* bb) {
    if (PAIR && t == 1) {
        const int64_t room = ((k + 31) / 32 + 1) / 2 * 2;  // a decoder writes 2 b's per chunk, a half one too
        // row i of the first half with row i of the second: two sequential streams of W for the
        // prefetchers (adjacent rows in pairs make each stream jump a row after every row)
        const int64_t half = (r1 - r0) / 2, m = r0 + half;
        for (int64_t i = 0; i < half; ++i)
            q8_row2<OFF, MIN, CH, F>(w + (r0 + i) * row_bytes, w + (m + i) * row_bytes, x, 0, y + r0 + i, y + m + i,
                                     k, bb, bb + room);
        if ((r1 - r0) % 2) q8_row<OFF, MIN, CH, F, 1>(w + (r1 - 1) * row_bytes, x, 0, y + r1 - 1, n, k, bb);
        return;
    }
    // Panels of W rows (~64 KB, so they stay in L2), each against every group of 4 rows of x
    // in turn: a group's x stays in L1 or L2 across the panel, and W is read from memory once.
    // Per row the same q8_row calls as row by row, so the same bits.
    const int64_t panel = std::max<int64_t>(1, std::min<int64_t>(64, 65536 / row_bytes));
    for (int64_t p0 = r0; p0 < r1; p0 += panel) {
        const int64_t p1 = std::min(r1, p0 + panel);
        int64_t i = 0;
        for (; i + 4 <= t; i += 4)
            for (int64_t r = p0; r < p1; ++r) q8_row<OFF, MIN, CH, F, 4>(w + r * row_bytes, x, i, y + i * n + r, n, k, bb);
        for (int64_t r = p0; r < p1; ++r) {
            const uint8_t* row = w + r * row_bytes;
            switch (t - i) {
                case 3: q8_row<OFF, MIN, CH, F, 3>(row, x, i, y + i * n + r, n, k, bb); break;
                case 2: q8_row<OFF, MIN, CH, F, 2>(row, x, i, y + i * n + r, n, k, bb); break;
                case 1: q8_row<OFF, MIN, CH, F, 1>(row, x, i, y + i * n + r, n, k, bb); break;
                default: break;
            }
        }
    }
}

// (GGML type id, weight offset OFF, has a b term, chunks per decode, decoder, W rows in pairs
// for one row of x) of every type with an int8 kernel.
#define Q8_TYPES(X)                                  \
    X(QT_Q4_0, 8, false, 1, (c_q4_x<18, 2>), true)   \
    X(QT_Q4_1, 0, true, 1, (c_q4_x<20, 4>), false)   \
    X(QT_Q5_0, 16, false, 1, (c_q5_x<22, 2>), true)  \
    X(QT_Q5_1, 0, true, 1, (c_q5_x<24, 4>), true)    \
    X(QT_Q8_0, 128, false, 1, c_q8_0, true)          \
    X(QT_IQ4_NL, 128, false, 1, c_iq4_nl, false)     \
    X(QT_Q4_K, 0, true, 4, c_q4_k, false)            \
    X(QT_Q5_K, 0, true, 4, c_q5_k, false)            \
    X(QT_Q6_K, 32, false, 4, c_q6_k, false)

// Whether the type has a kernel here (else the caller takes another path).
static bool has_q8_kernel(int qtype) {
    switch (qtype) {
#define Q8_HAS(id, off, min, ch, fn, pair) \
    case id:                               \
        return true;
        Q8_TYPES(Q8_HAS)
#undef Q8_HAS
    }
    return false;
}

// bb: 2 * ceil(k / 32) + 2 floats of room (the thread's own).
static bool matvec_q8(int qtype, const uint8_t* w, int64_t row_bytes, const Q8Act& x, float* y, int64_t t,
                      int64_t n, int64_t k, int64_t r0, int64_t r1, float* bb) {
    switch (qtype) {
#define Q8_CASE(id, off, min, ch, fn, pair)                                     \
    case id:                                                                    \
        q8_rows<off, min, ch, fn, pair>(w, row_bytes, x, y, t, n, k, r0, r1, bb); \
        return true;
        Q8_TYPES(Q8_CASE)
#undef Q8_CASE
    }
    return false;
}

}  // namespace k_vnni
