/* neoxja's int4 weight-only product for x86 CPUs with AVX2 and FMA, but no AVX512-BF16 (Haswell to Ice Lake,
   Zen 1-3): neoxja_int4_linear_avx2, built with -mavx2 -mfma only, so it runs on any CPU that has them.

   y (M, N) float32 = x (M, K) float32 @ W^T, W in int4_layout.h's packed layout (panels of 16 rows), the
   layout and the arithmetic of avx512_bf16.c's int4 product, in 256-bit vectors.

   Why a second kernel: torch's int4 CPU kernel is bound by its unpacking on AVX2 (0.81x FBGEMM int8 on an
   AVX2 machine), and AVX2 has no bfloat16 dot product: turning every nibble into a float costs two
   shuffle-port instructions per 8 weights, which caps it near int8's speed. So this kernel does what
   llama.cpp's Q4_0 x Q8_0 product does: each group of G activations is quantized to int8 with one float
   scale (round(x * 127 / max|x|)), and vpmaddubsw multiplies 32 unsigned nibbles (a 32-byte half of a
   chunk: 8 rows' column quads) by 32 signed activations (a broadcast quad) into 16-bit pairs (exact: at most
   2 * 15 * 128), added in 16 bits over 4 chunks (at most 30,720), then widened to int32 sums (vpmaddwd),
   and each group's sum becomes float once, times the weight scale and the activation scale. The offset
   enters through the group's float sum of the original activations (not the quantized ones). So the only
   rounding beyond float32 sums is the activations' to 8 bits: an error of at most scale_x / 2 per
   activation, where torch's kernel rounds the weights to bfloat16 instead (neoxja.native's tests bound it).
   The activations come in float32: an AVX2 CPU computes the rest of the model in float32 (bfloat16 has no
   hardware there, and neoxja.preferred_dtype picks float32), and the kernel rounds them to 8 bits anyway.
   One panel (16 rows) and MB activation rows at a time: the sums fill the 16 ymm registers. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_layout.h"  /* P (16 weight rows per panel), the layout, group_inverse */

#define NV 1       /* panels per unit */
#define MB 3       /* activation rows per pass over a group (3: 6 int32 and 6 16-bit sums in registers) */
#define WIDEN 4    /* chunks summed in 16 bits before they are widened */
#define ALIGN 32   /* bytes: the ymm loads and stores of chunks, scales and totals */

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
    const float inv = group_inverse(amax, scale);  /* (nan scale for a non-finite group, 0 for a negligible one) */
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int k = 0; k < G; k += 16) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
        const __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  /* 16 int16, in order */
        _mm_storeu_si128((__m128i *)(q + k),
                         _mm_packs_epi16(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1)));
    }
}

static inline __m256 bf16x8_to_float(const uint16_t *p) {  /* 8 bfloat16 -> float32: the bits shifted up */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline void load_scales(const uint16_t *s, float *scale, float *offset) {
    for (int h = 0; h < P; h += 8) {
        const __m256 sc = bf16x8_to_float(s + h), zero = bf16x8_to_float(s + P + h);
        _mm256_store_ps(scale + h, sc);
        _mm256_store_ps(offset + h, _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), sc, zero));  /* zero - 8 * scale */
    }
}

/* mr (<= MB) quantized activation rows against group g of one panel (nv == NV == 1):
   tot (mr, P) += int sums * weight scale * activation scale + offset * sum(x) */
static inline __attribute__((always_inline)) void pass(
        const int8_t *xg, const float *xs, const float *xsum, const uint8_t *const *w, const float *scale,
        const float *offset, float *tot, int K, int G, int ng, const int mr, const int nv) {
    (void)nv;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i a[MB][2];  /* rows 0-7 and 8-15 of the panel */
    for (int m = 0; m < mr; m++) a[m][0] = a[m][1] = _mm256_setzero_si256();
    for (int c0 = 0; c0 < G / 8; c0 += WIDEN) {
        __m256i h[MB][2];
        for (int m = 0; m < mr; m++) h[m][0] = h[m][1] = _mm256_setzero_si256();
        for (int c = c0; c < c0 + WIDEN; c++)
            for (int half = 0; half < 2; half++) {
                const __m256i chunk = _mm256_load_si256((const __m256i *)(w[0] + (size_t)c * 64 + half * 32));
                const __m256i lo = _mm256_and_si256(chunk, nibble);                        /* columns 4c .. 4c + 3 */
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), nibble);  /* columns G / 2 + 4c .. */
                for (int m = 0; m < mr; m++) {
                    int32_t ql, qh;
                    memcpy(&ql, xg + (size_t)m * K + 4 * c, 4);
                    memcpy(&qh, xg + (size_t)m * K + G / 2 + 4 * c, 4);
                    h[m][half] = _mm256_add_epi16(h[m][half], _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ql)), _mm256_maddubs_epi16(hi, _mm256_set1_epi32(qh))));
                }
            }
        for (int m = 0; m < mr; m++)
            for (int half = 0; half < 2; half++) a[m][half] = _mm256_add_epi32(a[m][half], _mm256_madd_epi16(h[m][half], ones));
    }
    for (int m = 0; m < mr; m++) {
        const __m256 sx = _mm256_set1_ps(xs[(size_t)m * ng]), sum = _mm256_set1_ps(xsum[(size_t)m * ng]);
        for (int half = 0; half < 2; half++) {
            float *t = tot + (size_t)m * (NV * P) + half * 8;
            const __m256 products = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][half]),
                                                    _mm256_mul_ps(_mm256_load_ps(scale + half * 8), sx), _mm256_load_ps(t));
            _mm256_store_ps(t, _mm256_fmadd_ps(_mm256_load_ps(offset + half * 8), sum, products));
        }
    }
}

#define ACT float  /* the activations' element type */
#include "int4_panels.h"  /* int4_product: the checks, the quantizing, the loop over panels, groups and rows */

/* Returns 0, or -1 when the shapes break the layout's rules or memory for the quantized activations or the
   totals is short. */
int neoxja_int4_linear_avx2(const float *x, const uint8_t *qw, const uint16_t *sz, float *y,
                            int M, int N, int K, int G, int nthreads) {
    return int4_product(x, qw, sz, y, M, N, K, G, nthreads);
}
