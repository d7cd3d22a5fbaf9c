/* neoxja's int4 weight-only product for x86 CPUs with AVX2 and FMA, but no AVX512-BF16 (Haswell to Ice Lake,
   Zen 1-3): neoxja_int4_linear_avx2, built with -mavx2 -mfma only, so it runs on any CPU that has them.

   y (M, N) float32 = x (M, K) float32 @ W^T, with W as in avx512_bf16.c: W[n, k] = q[n, k] * scale[n, g]
   + offset[n, g], q in [0, 15], g = k / G, offset = zero - 8 * scale; the same packed layout (tiles of R = 4
   rows, 64-column blocks, byte j = column j low nibble, column j + 32 high nibble) and (scale, zero) pairs.

   Why a second kernel: torch's int4 CPU kernel is bound by its unpacking on AVX2 (0.81x FBGEMM int8 on an
   AVX2 machine), and AVX2 has no bfloat16 dot product: turning every nibble into a float costs two
   shuffle-port instructions per 8 weights, which caps it near int8's speed. So this kernel does what
   llama.cpp's Q4_0 x Q8_0 product does: each group of G activations is quantized to int8 with one float
   scale (round(x * 127 / max|x|)), and vpmaddubsw multiplies 32 unsigned nibbles by 32 signed activations
   into 16-bit pairs (exact: at most 2 * 15 * 127), vpmaddwd widens them to int32 sums (exact), and each
   group's sum becomes float once, times the weight scale and the activation scale. The offset enters
   through the group's float sum of the original activations (not the quantized ones). So the only
   rounding beyond float32 sums is the activations' to 8 bits: an error of at most scale_x / 2 per
   activation, where torch's kernel rounds the weights to bfloat16 instead (neoxja.native's tests bound it).
   The activations come in float32: an AVX2 CPU computes the rest of the model in float32 (bfloat16 has no
   hardware there, and neoxja.preferred_dtype picks float32), and the kernel rounds them to 8 bits anyway. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_layout.h"  /* R (4 weight rows per tile), the (scale, zero) pairs */

#define MR 2   /* activation rows per pass over a tile (4 x 2 int32 sums and 2 x 2 inputs stay in the 16 ymm registers) */
#define PREFETCH 1024  /* bytes ahead of the weight stream */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* one group of G activations (G a multiple of 16) -> G int8 (round to nearest even), its scale and sum */
static void quantize_group(const float *x, int G, int8_t *q, float *scale, float *sum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 mx = _mm256_setzero_ps(), s = _mm256_setzero_ps();
    for (int k = 0; k < G; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        s = _mm256_add_ps(s, v);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
    }
    const float amax = hmax(mx);
    *sum = hsum(s);
    float inv = 127.0f / amax;
    *scale = amax / 127.0f;
    if (!(amax > 0.0f) || !(inv <= 3.4028235e38f)) {  /* all zero, nan, or so small that 127 / amax overflows: */
        inv = 0.0f;                                    /* the products' term is dropped (below 1e-36 * sum |w|) */
        if (amax == amax) *scale = 0.0f;               /* (nan stays nan: the result is nan, as the exact one) */
    }
    /* an infinite activation: inv = 0 and scale = inf, and inf * 0 = nan converts to the int8 -128: the products'
       term is nan or an infinity, never finite (the exact one is an infinity, or nan) */
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int k = 0; k < G; k += 16) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
        const __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  /* 16 int16, in order */
        _mm_storeu_si128((__m128i *)(q + k),
                         _mm_packs_epi16(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1)));
    }
}

/* mr (<= MR) quantized activation rows against a tile of R weight rows; xq (mr, K), xs and xsum (mr, K / G) */
static inline __attribute__((always_inline)) void tile_rows(
        const int8_t *xq, const float *xs, const float *xsum, const uint8_t *tile, const uint16_t *sz,
        float *y, int K, int G, int N, const int mr) {
    const int ng = K / G, nb = G / 64;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 tot[R][MR];
    for (int i = 0; i < R; i++)
        for (int m = 0; m < mr; m++) tot[i][m] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m256i a[R][MR];
        for (int i = 0; i < R; i++)
            for (int m = 0; m < mr; m++) a[i][m] = _mm256_setzero_si256();
        for (int b = 0; b < nb; b++) {
            const int k0 = g * G + b * 64;
            const uint8_t *block = tile + (size_t)(k0 / 64) * (R * 32);
            _mm_prefetch((const char *)block + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)block + PREFETCH + 64, _MM_HINT_T0);
            __m256i x0[MR], x1[MR];
            for (int m = 0; m < mr; m++) {
                x0[m] = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * K + k0));
                x1[m] = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * K + k0 + 32));
            }
            for (int i = 0; i < R; i++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(block + i * 32));
                const __m256i lo = _mm256_and_si256(w, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
                for (int m = 0; m < mr; m++) {
                    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0[m]), _mm256_maddubs_epi16(hi, x1[m]));
                    a[i][m] = _mm256_add_epi32(a[i][m], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for (int i = 0; i < R; i++) {
            const float s = scale_of(sz, g * R + i);
            for (int m = 0; m < mr; m++)
                tot[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i][m]), _mm256_set1_ps(s * xs[(size_t)m * ng + g]),
                                            tot[i][m]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int m = 0; m < mr; m++) {
            float r = hsum(tot[i][m]);
            for (int g = 0; g < ng; g++) r += offset_of(sz, g * R + i) * xsum[(size_t)m * ng + g];
            y[(size_t)m * N + i] = r;
        }
}

/* Returns 0, or -1 when the shapes break the layout's rules or memory for the quantized activations is short. */
int neoxja_int4_linear_avx2(const float *x, const uint8_t *qw, const uint16_t *sz, float *y,
                            int M, int N, int K, int G, int nthreads) {
    if (M < 1 || N < R || N % R || G < 64 || G % 64 || K < G || K % G || nthreads < 1) return -1;
    const int ng = K / G;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc((size_t)M * ng * sizeof(float)), *xsum = malloc((size_t)M * ng * sizeof(float));
    if (xq == NULL || xs == NULL || xsum == NULL) {
        free(xq); free(xs); free(xsum);
        return -1;
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 1)
    for (int m = 0; m < M; m++)
        for (int g = 0; g < ng; g++)
            quantize_group(x + (size_t)m * K + (size_t)g * G, G, xq + (size_t)m * K + (size_t)g * G,
                           xs + (size_t)m * ng + g, xsum + (size_t)m * ng + g);
    const size_t tile_bytes = (size_t)R * K / 2, tile_groups = (size_t)R * ng;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < N / R; t++) {
        const uint8_t *tile = qw + t * tile_bytes;
        const uint16_t *tsz = sz + 2 * t * tile_groups;
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int8_t *xm = xq + (size_t)m0 * K;
            const float *sm = xs + (size_t)m0 * ng, *um = xsum + (size_t)m0 * ng;
            float *ym = y + (size_t)m0 * N + (size_t)t * R;
            if (M - m0 == 1)  /* constant row counts: the sums stay in registers */
                tile_rows(xm, sm, um, tile, tsz, ym, K, G, N, 1);
            else
                tile_rows(xm, sm, um, tile, tsz, ym, K, G, N, MR);
        }
    }
    free(xq); free(xs); free(xsum);
    return 0;
}
