// The bfloat16-products matrix-vector kernels: x (t, k) @ W^T with x and the decoded
// weights both rounded to bfloat16, products summed in float32.
//
// Part of quant_kernels.h: included inside its namespace after the float32 kernels. No
// include guard on purpose. Every build computes the same quantity (the reference is
// `x.bfloat16().float() @ dequantize(W).bfloat16().float().T`); they differ only in the
// order of the float32 sums. Each output row is computed alone, whatever t is, so a row's
// logits do not depend on which other rows share the call (batch == alone, bit for bit).

// float -> the nearest bfloat16 (ties to even), kept as a float; NaN stays NaN.
static inline float round_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    std::memcpy(&f, &u, 4);
    return f;
}

// Portable path: decode a row, round it, float32 dot products with the pre-rounded x (xr).
template <int BS, int TS, void (*DEQ)(const uint8_t*, float*)>
static void bf16_rows_portable(const uint8_t* w, int64_t row_bytes, const float* xr, float* y, int64_t t,
                               int64_t n, int64_t k, int64_t r0, int64_t r1, float* buf) {
    for (int64_t r = r0; r < r1; ++r) {
        deq_row<BS, TS, DEQ>(w + r * row_bytes, buf, k);
        for (int64_t i = 0; i < k; ++i) buf[i] = round_bf16(buf[i]);
        for (int64_t i = 0; i < t; ++i) y[i * n + r] = dot(buf, xr + i * k, k);
    }
}

#if QK_X86 == 3 && defined(QK_HAVE_BF16)
#pragma GCC push_options
#pragma GCC target("avx512bf16")
// AVX512-BF16: 32 decoded values become one vector of bfloat16 pairs; vdpbf16ps multiplies
// it with 32 values of each of NT rows of x (xb, bfloat16 in natural order: the same pair
// layout) and adds pairs into 16 float32 lanes. Each block is decoded once per NT rows.
template <int BS, int TS, Decoder V, int NT>
static inline void bf16_row(const uint8_t* row, const uint16_t* xb, float* y, int64_t n, int64_t k) {
    __m512 acc[NT];
    for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / BS; ++b) {
        for (int g = 0; g < BS / 32; ++g) {
            __m512 lo, hi;
            V(row + b * TS, g, lo, hi);
            const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);  // values 0-15 from lo, 16-31 from hi
            const uint16_t* xg = xb + b * BS + g * 32;
            for (int j = 0; j < NT; ++j)
                acc[j] = _mm512_dpbf16_ps(acc[j], wv, (__m512bh)_mm512_loadu_si512(xg + j * k));
        }
    }
    for (int j = 0; j < NT; ++j) y[j * n] = _mm512_reduce_add_ps(acc[j]);
}

// Rows [r0, r1) of W against all t rows of x, 8 at a time; 16 rows of W per pass keep
// their blocks in L1 while the groups of x go by.
template <int BS, int TS, Decoder V>
static void bf16_rows_native(const uint8_t* w, int64_t row_bytes, const uint16_t* xb, float* y, int64_t t,
                             int64_t n, int64_t k, int64_t r0, int64_t r1) {
    for (int64_t c0 = r0; c0 < r1; c0 += 16) {
        const int64_t c1 = std::min(r1, c0 + 16);
        for (int64_t i = 0; i < t; i += 8) {
            const uint16_t* xi = xb + i * k;
            float* yi = y + i * n;
            for (int64_t r = c0; r < c1; ++r) {
                const uint8_t* row = w + r * row_bytes;
                switch (std::min<int64_t>(8, t - i)) {
                    case 8: bf16_row<BS, TS, V, 8>(row, xi, yi + r, n, k); break;
                    case 7: bf16_row<BS, TS, V, 7>(row, xi, yi + r, n, k); break;
                    case 6: bf16_row<BS, TS, V, 6>(row, xi, yi + r, n, k); break;
                    case 5: bf16_row<BS, TS, V, 5>(row, xi, yi + r, n, k); break;
                    case 4: bf16_row<BS, TS, V, 4>(row, xi, yi + r, n, k); break;
                    case 3: bf16_row<BS, TS, V, 3>(row, xi, yi + r, n, k); break;
                    case 2: bf16_row<BS, TS, V, 2>(row, xi, yi + r, n, k); break;
                    default: bf16_row<BS, TS, V, 1>(row, xi, yi + r, n, k); break;
                }
            }
        }
    }
}

// The AVX512-BF16 kernel where one exists for the type; false sends the caller to the portable one.
static bool matvec_bf16_native(int qtype, const uint8_t* w, int64_t row_bytes, const uint16_t* xb, float* y,
                               int64_t t, int64_t n, int64_t k, int64_t r0, int64_t r1) {
    switch (qtype) {
#define QK_CASE(id, bs, ts, fn)                                          \
    case id:                                                             \
        bf16_rows_native<bs, ts, fn>(w, row_bytes, xb, y, t, n, k, r0, r1); \
        return true;
        QK_FUSED(QK_CASE)
#undef QK_CASE
        default: return false;
    }
}
#pragma GCC pop_options
#endif

// y (t, n) = bf16(x) @ bf16(W)^T for rows [r0, r1); xb: x as bfloat16 (t, k), xr: the same
// values as float32. native: use the AVX512-BF16 kernel (the caller checked the CPU).
// Returns false for a type this file does not know.
static bool matvec_bf16(int qtype, const uint8_t* w, int64_t row_bytes, const float* xr, const uint16_t* xb,
                        float* y, int64_t t, int64_t n, int64_t k, int64_t r0, int64_t r1, float* buf,
                        bool native) {
#if QK_X86 == 3 && defined(QK_HAVE_BF16)
    if (native && matvec_bf16_native(qtype, w, row_bytes, xb, y, t, n, k, r0, r1)) return true;
#else
    (void)xb;
    (void)native;
#endif
    switch (qtype) {
#define QK_CASE(id, bs, ts, fn)                                                    \
    case id:                                                                       \
        bf16_rows_portable<bs, ts, fn>(w, row_bytes, xr, y, t, n, k, r0, r1, buf); \
        return true;
        QK_TYPES(QK_CASE)
#undef QK_CASE
    }
    return false;
}
