/* A plain LoRA layer's adapter side on CPU, one pass over the rows each way (lora_forward,
 * lora_backward at the end); the frozen layer's GEMM (BLAS) then accumulates into their output.
 *
 *   forward:   z[t, j]      = rescale * sum_i A[j, i] * m[t, i] * x[t, i]        (phi)
 *              out[t, o]    = bias[o] + scale * sum_j z[t, j] * B[o, j]          (then += x W0.T)
 *   backward:  gz[t, j]     = scale_gz * sum_o g[t, o] * B[o, j]  (+ phi's gradient)
 *              grad_B[o, j] = scale_gb * sum_t g[t, o] * z[t, j]
 *              grad_A[j, i] = sum_t gz[t, j] * m[t, i] * x[t, i]
 *              grad_x[t, i] = m[t, i] * sum_j gz[t, j] * A[j, i]                  (then += g W0)
 *
 * m[t, i] is a Bernoulli keep bit computed from (seed, t * D + i) by a counter-based hash. The forward
 * packs it at 1 bit per element (bits_row) for the backward, which reads those bits instead of
 * hashing again; on AVX-512 the bits are the load masks of x, so the masked input x * m never exists
 * (elsewhere one row of it, in L1). Rows are taken two at a time (each A element loaded serves both),
 * pairs of rows are split over OpenMP threads: built with -fopenmp, this library binds to the
 * libgomp.so.1 torch has already loaded, so it shares torch's threads and torch.set_num_threads.
 * Compiled at first use by mtlora/adapters/kernels.py with -O3 -march=native (see there for why
 * and for the numpy twin of the hash, which must stay bit-identical to keep_bit below).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline uint32_t mix32(uint32_t h) { /* "lowbias32" (C. Wellons' hash prospector) */
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

/* One hash per pair of elements: element idx is kept when the 16-bit half (low for even idx, high
 * for odd) of the two-round keyed hash of idx / 2 is >= drop16. */
static inline uint32_t pair_hash(uint64_t c, uint32_t k1, uint32_t k2) {
    return mix32(mix32((uint32_t)c ^ k1) ^ ((uint32_t)(c >> 32) + k2));
}

static inline float keep_bit(uint64_t idx, uint32_t k1, uint32_t k2, uint32_t drop16) {
    uint32_t half = (pair_hash(idx >> 1, k1, k2) >> ((idx & 1) * 16)) & 0xFFFFU;
    return half >= drop16 ? 1.0f : 0.0f;
}

/* bits 0..15 of v spread to the even bits of the result (a Morton-order interleave, no BMI2 needed) */
static inline uint32_t spread16(uint32_t v) {
    v = (v | (v << 8)) & 0x00FF00FFU;
    v = (v | (v << 4)) & 0x0F0F0F0FU;
    v = (v | (v << 2)) & 0x33333333U;
    return (v | (v << 1)) & 0x55555555U;
}

#if defined(__AVX512F__)
static inline __m512i mix32_16(__m512i h) { /* mix32 on 16 lanes */
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846ca68bU));
    return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}
#endif

/* The 32 keep bits of elements first .. first + 31, first even and (first / 2) % 2^32 <= 2^32 - 16:
 * 16 pair hashes, their low halves the even bits, high halves the odd bits. */
static inline uint32_t bits_word(uint64_t first, uint32_t k1, uint32_t k2, uint32_t drop16) {
    const uint64_t c0 = first >> 1;
    const uint32_t lo0 = (uint32_t)c0, hi = (uint32_t)(c0 >> 32) + k2;
#if defined(__AVX512F__)
    const __m512i c = _mm512_add_epi32(_mm512_set1_epi32((int)lo0),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i h = mix32_16(_mm512_xor_si512(mix32_16(_mm512_xor_si512(c, _mm512_set1_epi32((int)k1))),
                                                _mm512_set1_epi32((int)hi)));
    const __m512i drop = _mm512_set1_epi32((int)drop16);
    const uint32_t even = _mm512_cmpge_epu32_mask(_mm512_and_si512(h, _mm512_set1_epi32(0xFFFF)), drop);
    const uint32_t odd = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(h, 16), drop);
#else
    uint32_t even = 0, odd = 0;
#pragma omp simd reduction(| : even, odd)
    for (uint32_t c = 0; c < 16; c++) {
        const uint32_t h = mix32(mix32((lo0 + c) ^ k1) ^ hi);
        even |= (uint32_t)((h & 0xFFFFU) >= drop16) << c;
        odd |= (uint32_t)((h >> 16) >= drop16) << c;
    }
#endif
    return spread16(even) | (spread16(odd) << 1);
}

/* The keep bits of elements base .. base + d - 1 (one row), packed: bit i % 32 of word i / 32, bits
 * past d zero. The forward writes them for the backward (d / 8 bytes a row: the backward never hashes)
 * and uses them directly as AVX-512 load masks. */
static void bits_row(uint32_t *w, int64_t d, uint64_t base, uint32_t k1, uint32_t k2, uint32_t drop16) {
    const int64_t words = (d + 31) / 32;
    for (int64_t q = 0; q < words && drop16 == 0; q++) w[q] = 0xFFFFFFFFU; /* no dropout: nothing to hash */
    for (int64_t q = 0; q < words && drop16 != 0; q++) {
        const uint64_t first = base + 32 * (uint64_t)q; /* element index of bit 0 */
        if ((first & 1) == 0 && (uint32_t)(first >> 1) <= 0xFFFFFFEFU) { /* pairs line up, no carry */
            w[q] = bits_word(first, k1, k2, drop16);
        } else {
            uint32_t bits = 0;
            for (uint32_t b = 0; b < 32; b++) bits |= (uint32_t)keep_bit(first + b, k1, k2, drop16) << b;
            w[q] = bits;
        }
    }
    if (d % 32) w[words - 1] &= (1U << (d % 32)) - 1U;
}

/* bits_row for callers outside (tests: the packing at any element index, e.g. near pair 2^32) */
void keep_bits_row(uint32_t *w, int64_t d, uint64_t base, uint32_t k1, uint32_t k2, uint32_t drop16) {
    bits_row(w, d, base, k1, k2, drop16);
}

/* m[i] = bit i of w as 0.0 / 1.0 (the portable loops multiply by it) */
static void unpack_row(float *m, const uint32_t *w, int64_t d) {
#pragma omp simd
    for (int64_t i = 0; i < d; i++) m[i] = (float)((w[i >> 5] >> (i & 31)) & 1U);
}

void keep_mask(uint8_t *out, int64_t n, uint32_t k1, uint32_t k2, uint32_t drop16) {
    const int64_t pairs = n / 2;
#pragma omp simd
    for (int64_t c = 0; c < pairs; c++) {
        const uint32_t h = pair_hash((uint64_t)c, k1, k2);
        out[2 * c] = (h & 0xFFFFU) >= drop16;
        out[2 * c + 1] = (h >> 16) >= drop16;
    }
    if (n & 1) out[n - 1] = (uint8_t)keep_bit((uint64_t)(n - 1), k1, k2, drop16);
}

/* z for one row from its masked input xm: R accumulators of 16 lanes (registers), one pass over xm.
 * The portable path (no AVX-512; the odd last row): built with -mno-avx512f, r = 8 took 1.26 ms vs
 * 1.86 ms for forward_row_any at d = 1536 (0.46-0.61 vs 0.64 ms at 576), and BACKWARD_ROWS_R(8)
 * 1.7-2.0 vs 2.3-2.5 ms, 1024 rows, 1 thread (2026-11-28, both sides still hashing the mask in each pass). */
#define FORWARD_ROW_R(R)                                                                                      \
    static void forward_row_##R(const float *a, const float *xm, int64_t d, float rescale, float *z) {        \
        float acc[R][16];                                                                                    \
        for (int j = 0; j < R; j++)                                                                          \
            for (int l = 0; l < 16; l++) acc[j][l] = 0.0f;                                                   \
        int64_t i0 = 0;                                                                                      \
        for (; i0 + 16 <= d; i0 += 16)                                                                       \
            for (int j = 0; j < R; j++)                                                                      \
                for (int l = 0; l < 16; l++) acc[j][l] += a[j * d + i0 + l] * xm[i0 + l];                    \
        for (int j = 0; j < R; j++) {                                                                        \
            float sum = 0.0f;                                                                                \
            for (int l = 0; l < 16; l++) sum += acc[j][l];                                                   \
            for (int64_t i = i0; i < d; i++) sum += a[j * d + i] * xm[i];                                    \
            z[j] = sum * rescale;                                                                            \
        }                                                                                                    \
    }
FORWARD_ROW_R(4)
FORWARD_ROW_R(8)
FORWARD_ROW_R(16)

static void forward_row_any(const float *a, const float *xm, int64_t d, int64_t r, float rescale, float *z) {
    for (int64_t j = 0; j < r; j++) {
        const float *aj = a + j * d;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < d; i++) acc += aj[i] * xm[i];
        z[j] = acc * rescale;
    }
}

#if defined(__AVX512F__)
/* 16 keep bits of a row from element i (a multiple of 16): an AVX-512 load mask; zero past the row */
static inline __mmask16 keep16(const uint32_t *w, int64_t i) { return (__mmask16)(w[i >> 5] >> (i & 31)); }

/* lanes of the 16 from i that lie inside a row of d */
static inline __mmask16 tail16(int64_t d, int64_t i) {
    return d - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1U << (d - i)) - 1U);
}

/* Fetch the same 16 floats of the next pair of rows (2 d further) while this pair computes: the
 * hardware prefetcher alone left the backward waiting on DRAM for x (saved at forward time, long
 * evicted): 0.28 -> 0.20 ms a call at d = 576, 0.68 -> 0.53 at 1536 (2 threads, x cold, grad_x
 * fresh from its GEMM, as in the model). */
static inline void prefetch_next_pair(const float *p0, const float *p1, int64_t d) {
    _mm_prefetch((const char *)(p0 + 2 * d), _MM_HINT_T0);
    _mm_prefetch((const char *)(p1 + 2 * d), _MM_HINT_T0);
}

/* r = 8 with AVX-512, rows t and t+1 together: 16 accumulators, each A load serves both rows, the
 * keep bits are the load masks of x (dropped elements load as zero: no mask, no masked copy). */
static inline __attribute__((always_inline)) void forward_rows2_8(const float *a, const float *x0, const float *x1,
                                                                  const uint32_t *w0, const uint32_t *w1, int64_t d,
                                                                  float rescale, float *z0, float *z1) {
    __m512 c0[8], c1[8];
    for (int j = 0; j < 8; j++) c0[j] = c1[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 k = tail16(d, i);
        prefetch_next_pair(x0 + i, x1 + i, d);
        const __m512 v0 = _mm512_maskz_loadu_ps(keep16(w0, i), x0 + i);
        const __m512 v1 = _mm512_maskz_loadu_ps(keep16(w1, i), x1 + i);
        for (int j = 0; j < 8; j++) {
            const __m512 aj = _mm512_maskz_loadu_ps(k, a + j * d + i);
            c0[j] = _mm512_fmadd_ps(aj, v0, c0[j]);
            c1[j] = _mm512_fmadd_ps(aj, v1, c1[j]);
        }
    }
    for (int j = 0; j < 8; j++) {
        z0[j] = _mm512_reduce_add_ps(c0[j]) * rescale;
        z1[j] = _mm512_reduce_add_ps(c1[j]) * rescale;
    }
}
#endif

static int n_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* n floats, zeroed, 64-byte aligned (a cache line: the AVX-512 loops read-modify-write rows of it;
 * calloc's 16-byte alignment split those accesses across lines, 1.6x slower). NULL on failure. */
static float *zeroed_floats(int64_t n) {
    void *p = NULL;
    size_t bytes = (sizeof(float) * (size_t)n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    memset(p, 0, bytes);
    return (float *)p;
}

/* sum of n per-thread r x d partials into out (the threads' shares of grad_A / grad_B.T); out may be
 * the first share itself */
static void reduce_partials(float *out, const float *partials, int n, int64_t size) {
    if (out != partials) memcpy(out, partials, sizeof(float) * (size_t)size);
    for (int p = 1; p < n; p++) {
        const float *src = partials + (int64_t)p * size;
#pragma omp simd
        for (int64_t i = 0; i < size; i++) out[i] += src[i];
    }
}

/* The keep bits of rows t and t + 1 (t + 1 < t_rows or the odd last row alone) into bits, then their
 * z; m: d floats of scratch for the portable loops. */
static inline __attribute__((always_inline)) void forward_pair(const float *x, const float *a, float *z, uint32_t *bits,
                                                               int64_t t, int64_t t_rows, int64_t d, int64_t r,
                                                               float rescale, uint32_t k1, uint32_t k2, uint32_t drop16,
                                                               float *m) {
    const int two = t + 1 < t_rows;
    const int64_t words = (d + 31) / 32;
    for (int64_t u = t; u < t + 1 + two; u++) bits_row(bits + u * words, d, (uint64_t)u * (uint64_t)d, k1, k2, drop16);
#if defined(__AVX512F__)
    if (r == 8 && two) {
        forward_rows2_8(a, x + t * d, x + (t + 1) * d, bits + t * words, bits + (t + 1) * words, d, rescale,
                        z + t * r, z + (t + 1) * r);
        return;
    }
#endif
    for (int64_t u = t; u < t + 1 + two; u++) {
        const float *xu = x + u * d;
        unpack_row(m, bits + u * words, d);
#pragma omp simd
        for (int64_t i = 0; i < d; i++) m[i] *= xu[i];
        switch (r) {
        case 4: forward_row_4(a, m, d, rescale, z + u * r); break;
        case 8: forward_row_8(a, m, d, rescale, z + u * r); break;
        case 16: forward_row_16(a, m, d, rescale, z + u * r); break;
        default: forward_row_any(a, m, d, r, rescale, z + u * r);
        }
    }
}

/* r x d copy of the d x r matrix b (B.T: its rows are what the vector loops load), 64-byte aligned */
static float *transposed(const float *b, int64_t d, int64_t r) {
    float *bt = zeroed_floats(r * d);
    if (bt)
        for (int64_t o = 0; o < d; o++)
            for (int64_t j = 0; j < r; j++) bt[j * d + o] = b[o * r + j];
    return bt;
}

/* out[u] = bias + scale * z[u] B.T for one row (bt = B.T, r x d): the portable loop, any rank */
static void up_row_any(const float *bt, const float *bias, const float *zu, float scale, int64_t d, int64_t r,
                       float *ou) {
    if (bias)
        memcpy(ou, bias, sizeof(float) * (size_t)d);
    else
        memset(ou, 0, sizeof(float) * (size_t)d);
    for (int64_t j = 0; j < r; j++) {
        const float w = scale * zu[j], *btj = bt + j * d;
#pragma omp simd
        for (int64_t o = 0; o < d; o++) ou[o] += w * btj[o];
    }
}

#if defined(__AVX512F__)
/* the same for rows t and t + 1 with r = 8: each B.T load serves both rows */
static inline __attribute__((always_inline)) void up_rows2_8(const float *bt, const float *bias, const float *z0,
                                                             const float *z1, float scale, int64_t d, float *o0,
                                                             float *o1) {
    __m512 w0[8], w1[8];
    for (int j = 0; j < 8; j++) {
        w0[j] = _mm512_set1_ps(scale * z0[j]);
        w1[j] = _mm512_set1_ps(scale * z1[j]);
    }
    for (int64_t o = 0; o < d; o += 16) {
        const __mmask16 k = tail16(d, o);
        __m512 c0 = bias ? _mm512_maskz_loadu_ps(k, bias + o) : _mm512_setzero_ps(), c1 = c0;
        for (int j = 0; j < 8; j++) {
            const __m512 bj = _mm512_maskz_loadu_ps(k, bt + j * d + o);
            c0 = _mm512_fmadd_ps(w0[j], bj, c0);
            c1 = _mm512_fmadd_ps(w1[j], bj, c1);
        }
        _mm512_mask_storeu_ps(o0 + o, k, c0);
        _mm512_mask_storeu_ps(o1 + o, k, c1);
    }
}
#endif

/* The adapter's forward for t_rows rows, two at a time while they are in L1:
 *   z   = rescale * (x * m) A.T          (t_rows x r; m's keep bits to bits, see bits_row)
 *   out = bias + scale * z B.T           (t_rows x d_out; bias may be NULL)
 * The caller then adds the frozen layer's x W0.T into out with a beta = 1 GEMM. */
int lora_forward(const float *x, const float *a, const float *b, const float *bias, float *z, uint32_t *bits,
                 float *out, int64_t t_rows, int64_t d_in, int64_t d_out, int64_t r, float rescale, float scale,
                 uint32_t k1, uint32_t k2, uint32_t drop16) {
    float *bt = transposed(b, d_out, r);
    if (!bt) return -1;
    int failed = 0;
#pragma omp parallel
    {
        float *m = zeroed_floats(d_in);
        if (!m) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < t_rows; t += 2) {
            if (!m) continue;
            const int two = t + 1 < t_rows;
            forward_pair(x, a, z, bits, t, t_rows, d_in, r, rescale, k1, k2, drop16, m);
#if defined(__AVX512F__)
            if (r == 8 && two) {
                up_rows2_8(bt, bias, z + t * 8, z + (t + 1) * 8, scale, d_out, out + t * d_out, out + (t + 1) * d_out);
                continue;
            }
#endif
            for (int64_t u = t; u < t + 1 + two; u++) up_row_any(bt, bias, z + u * r, scale, d_out, r, out + u * d_out);
        }
        free(m);
    }
    free(bt);
    return failed ? -1 : 0;
}

/* Rows t0 and t1 (t1 may equal t0 with its gz zeroed: the odd last row). Each A / grad_A element is
 * loaded once for both rows and the rows' gradient shares stay in registers: the loop over i
 * vectorises with j unrolled inside it, which needs r known at compile time (R = 4, 8, 16, 32, the
 * usual ranks); other ranks run the j-outer loop, which vectorises over i for any r. */
#define BACKWARD_ROWS_R(R)                                                                                     \
    static void backward_rows_##R(const float *a, float *grad_a, int64_t d, const float *m0, const float *m1, \
                                  const float *xm0, const float *xm1, const float *h0, const float *h1,      \
                                  float *gx0, float *gx1, float *s0b, float *s1b) {                          \
        (void)s0b;                                                                                           \
        (void)s1b;                                                                                           \
        _Pragma("omp simd") for (int64_t i = 0; i < d; i++) {                                                \
            float s0 = 0.0f, s1 = 0.0f;                                                                      \
            const float v0 = xm0[i], v1 = xm1[i];                                                            \
            for (int j = 0; j < R; j++) {                                                                    \
                const float aji = a[j * d + i];                                                              \
                grad_a[j * d + i] += h0[j] * v0 + h1[j] * v1;                                                \
                s0 += h0[j] * aji;                                                                           \
                s1 += h1[j] * aji;                                                                           \
            }                                                                                                \
            gx0[i] = m0[i] * s0;                                                                             \
            gx1[i] = m1[i] * s1;                                                                             \
        }                                                                                                    \
    }
BACKWARD_ROWS_R(4)
BACKWARD_ROWS_R(8)
BACKWARD_ROWS_R(16)
BACKWARD_ROWS_R(32)

static void backward_rows_any(const float *a, float *grad_a, int64_t d, int64_t r, const float *m0,
                              const float *m1, const float *xm0, const float *xm1, const float *h0,
                              const float *h1, float *gx0, float *gx1, float *s0, float *s1) {
#pragma omp simd
    for (int64_t i = 0; i < d; i++) s0[i] = s1[i] = 0.0f;
    for (int64_t j = 0; j < r; j++) {
        const float *aj = a + j * d;
        float *gaj = grad_a + j * d;
        const float g0 = h0[j], g1 = h1[j];
#pragma omp simd
        for (int64_t i = 0; i < d; i++) {
            gaj[i] += g0 * xm0[i] + g1 * xm1[i];
            s0[i] += g0 * aj[i];
            s1[i] += g1 * aj[i];
        }
    }
#pragma omp simd
    for (int64_t i = 0; i < d; i++) {
        gx0[i] = m0[i] * s0[i];
        gx1[i] = m1[i] * s1[i];
    }
}

#if defined(__AVX512F__)
/* r = 8 with AVX-512: the two rows' gz broadcast once, the keep bits the load masks of x and the zero
 * masks of grad_x's rows (written, not read: see lora_backward). */
static inline __attribute__((always_inline)) void backward_rows2_8(const float *a, float *grad_a, int64_t d,
                                                                   const uint32_t *w0, const uint32_t *w1,
                                                                   const float *x0, const float *x1, const float *h0,
                                                                   const float *h1, float *gx0, float *gx1) {
    __m512 b0[8], b1[8];
    for (int j = 0; j < 8; j++) {
        b0[j] = _mm512_set1_ps(h0[j]);
        b1[j] = _mm512_set1_ps(h1[j]);
    }
    for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 k = tail16(d, i), q0 = keep16(w0, i), q1 = keep16(w1, i);
        prefetch_next_pair(x0 + i, x1 + i, d);
        const __m512 v0 = _mm512_maskz_loadu_ps(q0, x0 + i), v1 = _mm512_maskz_loadu_ps(q1, x1 + i);
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (int j = 0; j < 8; j++) {
            const __m512 aj = _mm512_maskz_loadu_ps(k, a + j * d + i);
            __m512 ga = _mm512_maskz_loadu_ps(k, grad_a + j * d + i);
            ga = _mm512_fmadd_ps(b1[j], v1, _mm512_fmadd_ps(b0[j], v0, ga));
            _mm512_mask_storeu_ps(grad_a + j * d + i, k, ga);
            s0 = _mm512_fmadd_ps(b0[j], aj, s0);
            s1 = _mm512_fmadd_ps(b1[j], aj, s1);
        }
        _mm512_mask_storeu_ps(gx0 + i, k, _mm512_maskz_mov_ps(q0, s0));
        _mm512_mask_storeu_ps(gx1 + i, k, _mm512_maskz_mov_ps(q1, s1));
    }
}
#endif

/* grad_a (this thread's partial) and grad_x for rows t and t + 1 (gz rows h0, h1; h1 zero for the odd
 * last row); buf: 7 d floats of scratch. */
static inline __attribute__((always_inline)) void backward_pair(const float *x, const float *a, const float *h0,
                                                                const float *h1, float *grad_x, float *grad_a,
                                                                const uint32_t *bits, int64_t t, int64_t t_rows,
                                                                int64_t d, int64_t r, float *buf) {
    float *m0 = buf, *m1 = buf + d, *xm0 = buf + 2 * d, *xm1 = buf + 3 * d, *spare = buf + 4 * d;
    float *s0 = buf + 5 * d, *s1 = buf + 6 * d;
    const int two = t + 1 < t_rows;
    const int64_t t1 = two ? t + 1 : t, words = (d + 31) / 32;
    const float *x0 = x + t * d, *x1 = x + t1 * d;
#if defined(__AVX512F__)
    if (r == 8 && two) {
        backward_rows2_8(a, grad_a, d, bits + t * words, bits + t1 * words, x0, x1, h0, h1, grad_x + t * d,
                         grad_x + t1 * d);
        return;
    }
#endif
    unpack_row(m0, bits + t * words, d);
    unpack_row(m1, bits + t1 * words, d);
#pragma omp simd
    for (int64_t i = 0; i < d; i++) {
        xm0[i] = m0[i] * x0[i];
        xm1[i] = m1[i] * x1[i];
    }
    float *gx0 = grad_x + t * d, *gx1 = two ? grad_x + t1 * d : spare;
    switch (r) {
    case 4: backward_rows_4(a, grad_a, d, m0, m1, xm0, xm1, h0, h1, gx0, gx1, s0, s1); break;
    case 8: backward_rows_8(a, grad_a, d, m0, m1, xm0, xm1, h0, h1, gx0, gx1, s0, s1); break;
    case 16: backward_rows_16(a, grad_a, d, m0, m1, xm0, xm1, h0, h1, gx0, gx1, s0, s1); break;
    case 32: backward_rows_32(a, grad_a, d, m0, m1, xm0, xm1, h0, h1, gx0, gx1, s0, s1); break;
    default: backward_rows_any(a, grad_a, d, r, m0, m1, xm0, xm1, h0, h1, gx0, gx1, s0, s1);
    }
}

/* The up-projection's backward for rows t and t + 1 (g1 == g0 and z1 zero for the odd last row):
 *   h[j]          = scale_gz * sum_o g[o] bt[j, o]      (the rows of gz = s g B)
 *   grad_bt[j, o] += scale_gb * (z0[j] g0[o] + z1[j] g1[o])   (this thread's share of (s g.T z).T) */
static void up_backward_rows_any(const float *g0, const float *g1, const float *bt, const float *z0, const float *z1,
                                 float *grad_bt, int64_t d, int64_t r, float scale_gz, float scale_gb, float *h0,
                                 float *h1) {
    for (int64_t j = 0; j < r; j++) {
        const float *btj = bt + j * d, w0 = scale_gb * z0[j], w1 = scale_gb * z1[j];
        float *gbj = grad_bt + j * d, s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
        for (int64_t o = 0; o < d; o++) {
            s0 += g0[o] * btj[o];
            s1 += g1[o] * btj[o];
            gbj[o] += w0 * g0[o] + w1 * g1[o];
        }
        h0[j] = s0 * scale_gz;
        h1[j] = s1 * scale_gz;
    }
}

#if defined(__AVX512F__)
/* the same with r = 8: 16 accumulators, each B.T / grad_B.T load serves both rows */
static inline __attribute__((always_inline)) void up_backward_rows2_8(const float *g0, const float *g1,
                                                                      const float *bt, const float *z0,
                                                                      const float *z1, float *grad_bt, int64_t d,
                                                                      float scale_gz, float scale_gb, float *h0,
                                                                      float *h1) {
    __m512 c0[8], c1[8], w0[8], w1[8];
    for (int j = 0; j < 8; j++) {
        c0[j] = c1[j] = _mm512_setzero_ps();
        w0[j] = _mm512_set1_ps(z0[j] * scale_gb);
        w1[j] = _mm512_set1_ps(z1[j] * scale_gb);
    }
    for (int64_t o = 0; o < d; o += 16) {
        const __mmask16 k = tail16(d, o);
        prefetch_next_pair(g0 + o, g1 + o, d);
        const __m512 v0 = _mm512_maskz_loadu_ps(k, g0 + o), v1 = _mm512_maskz_loadu_ps(k, g1 + o);
        for (int j = 0; j < 8; j++) {
            const __m512 bj = _mm512_maskz_loadu_ps(k, bt + j * d + o);
            c0[j] = _mm512_fmadd_ps(bj, v0, c0[j]);
            c1[j] = _mm512_fmadd_ps(bj, v1, c1[j]);
            __m512 gb = _mm512_maskz_loadu_ps(k, grad_bt + j * d + o);
            gb = _mm512_fmadd_ps(w1[j], v1, _mm512_fmadd_ps(w0[j], v0, gb));
            _mm512_mask_storeu_ps(grad_bt + j * d + o, k, gb);
        }
    }
    for (int j = 0; j < 8; j++) {
        h0[j] = _mm512_reduce_add_ps(c0[j]) * scale_gz;
        h1[j] = _mm512_reduce_add_ps(c1[j]) * scale_gz;
    }
}
#endif

/* The adapter's whole backward, two rows at a time: for each pair, first the up-projection's share
 * (gz rows from g, grad_B), then, with gz still in registers, the down-projection's (grad_A and the
 * masked share of grad_x from x and the forward's keep bits):
 *   gz     = scale_gz * g B + phi_scale * g_phi     (g_phi: the gradient of phi = z, may be NULL)
 *   grad_B = scale_gb * g.T z                        (d_out x r, B's layout)
 *   grad_A = gz.T (x * m)
 *   grad_x = (gz A) * m      written, not accumulated: the caller adds g W0 into it with a beta = 1
 *                            GEMM. (Adding into the GEMM's freshly written output instead re-read it
 *                            from memory: 0.37 vs 0.22 ms over the GEMM alone at d = 576, 2 threads.)
 * One pass over g, x and grad_x's rows together: gz never goes to memory, and the three streams'
 * cache misses overlap. */
int lora_backward(const float *g, const float *b, const float *z, const float *g_phi, const float *x, const float *a,
                  const uint32_t *bits, float *grad_x, float *grad_a, float *grad_b, int64_t t_rows, int64_t d_in,
                  int64_t d_out, int64_t r, float scale_gz, float scale_gb, float phi_scale) {
    const int n = n_threads();
    float *bt = transposed(b, d_out, r);
    float *partials_a = zeroed_floats((int64_t)n * r * d_in), *partials_bt = zeroed_floats((int64_t)n * r * d_out);
    int failed = 0;
    if (!bt || !partials_a || !partials_bt) {
        free(bt);
        free(partials_a);
        free(partials_bt);
        return -1;
    }
#pragma omp parallel num_threads(n)
    {
        float *buf = zeroed_floats(d_in * 7 + r * 3);
        float *mine_a = partials_a + (int64_t)thread_id() * r * d_in;
        float *mine_bt = partials_bt + (int64_t)thread_id() * r * d_out;
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        float *h0 = buf + d_in * 7, *h1 = h0 + r, *zero = h1 + r; /* zero: r zeros (z of the odd row's partner) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < t_rows; t += 2) {
            if (!buf) continue;
            const int two = t + 1 < t_rows;
            const float *g0 = g + t * d_out, *g1 = two ? g0 + d_out : g0;
            const float *z0 = z + t * r, *z1 = two ? z0 + r : zero;
#if defined(__AVX512F__)
            if (r == 8)
                up_backward_rows2_8(g0, g1, bt, z0, z1, mine_bt, d_out, scale_gz, scale_gb, h0, h1);
            else
#endif
                up_backward_rows_any(g0, g1, bt, z0, z1, mine_bt, d_out, r, scale_gz, scale_gb, h0, h1);
            if (g_phi)
                for (int64_t j = 0; j < r; j++) {
                    h0[j] += phi_scale * g_phi[t * r + j];
                    h1[j] = two ? h1[j] + phi_scale * g_phi[(t + 1) * r + j] : 0.0f;
                }
            else if (!two)
                memset(h1, 0, sizeof(float) * (size_t)r);
            backward_pair(x, a, h0, h1, grad_x, mine_a, bits, t, t_rows, d_in, r, buf);
        }
        free(buf);
    }
    if (!failed) {
        reduce_partials(grad_a, partials_a, n, r * d_in);
        reduce_partials(partials_bt, partials_bt, n, r * d_out); /* summed in place into the first share */
        for (int64_t o = 0; o < d_out; o++)
            for (int64_t j = 0; j < r; j++) grad_b[o * r + j] = partials_bt[j * d_out + o];
    }
    free(bt);
    free(partials_a);
    free(partials_bt);
    return failed ? -1 : 0;
}
