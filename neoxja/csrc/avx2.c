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

/* Many rows (a prefill, a batch): as in avx512_bf16.c, from `panel_rows` rows up the product runs as a GEMM.
   The nibbles of PN = 16 weight rows and one group are unpacked once into a panel of (column quad, row)
   bytes (the packed bytes of 8 rows transposed, then split into their low and high nibbles); MB activation
   rows at a time run over it: vpmaddubsw multiplies a broadcast quad of int8 activations by 2 vectors of 8
   rows' nibble quads into 16-bit pair sums (exact: at most 2 * 15 * 128), added in 16 bits for 8 quads
   (at most 30,720), then widened to int32 sums (vpmaddwd); each group's sums become float once, times the
   weight's and the activations' scales. The same sums as the tiles above, in another order. */
#define MB 3                /* activation rows per pass over a panel */
#define NV 2                /* 8-row vectors per panel */
#define PN (NV * 8)         /* weight rows per panel */
#define WIDEN 8             /* quads summed in 16 bits before they are widened */
#define PANEL_ALIGN 32      /* bytes: the ymm loads and stores of panels and totals */

/* the panel (G / 4, PN) of 32-bit quads for rows n0.. (rows of them real, the rest zero) and group g */
static void build_panel(const uint8_t *qw, size_t n0, int rows, int K, int G, int g, uint32_t *panel) {
    const size_t tile_bytes = (size_t)R * K / 2;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    prefetch_group(qw, n0, rows, K, G, g + 1);
    for (int v = 0; v < NV; v++)
        for (int b = 0; b < G / 64; b++) {
            __m256i r[8], t[8], u[8];  /* the block's 32 packed bytes of each of 8 rows: 8 quads of bytes */
            for (int j = 0; j < 8; j++) {
                const int n = v * 8 + j;
                r[j] = n < rows ? _mm256_loadu_si256((const __m256i *)(
                                      qw + (n0 + n) / R * tile_bytes + (size_t)(g * (G / 64) + b) * (R * 32)
                                      + (n0 + n) % R * 32))
                                : _mm256_setzero_si256();
            }
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {  /* u[i + e]: quad e (low 128 bits) and e + 4 (high) of 4 rows */
                u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
                u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
                u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
                u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            for (int e = 0; e < 4; e++) {
                const __m256i q[2] = {_mm256_permute2x128_si256(u[e], u[e + 4], 0x20),   /* quad e of the 8 rows */
                                      _mm256_permute2x128_si256(u[e], u[e + 4], 0x31)};  /* quad e + 4 */
                for (int h = 0; h < 2; h++) {
                    const int p = b * 16 + e + 4 * h;
                    _mm256_store_si256((__m256i *)(panel + (size_t)p * PN + v * 8), _mm256_and_si256(q[h], nibble));
                    _mm256_store_si256((__m256i *)(panel + (size_t)(p + 8) * PN + v * 8),
                                       _mm256_and_si256(_mm256_srli_epi16(q[h], 4), nibble));
                }
            }
        }
}

/* mr (<= MB) quantized activation rows against the panel of group g:
   tot (mr, PN) += int sums * weight scale * activation scale + offset * sum(x) */
static inline __attribute__((always_inline)) void panel_rows(
        const int8_t *xq, const float *xs, const float *xsum, const uint32_t *panel, const float *scale,
        const float *offset, float *tot, int K, int G, int g, int ng, const int mr) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[MB][NV];
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < NV; v++) a[m][v] = _mm256_setzero_si256();
    const int8_t *xg = xq + (size_t)g * G;
    for (int p0 = 0; p0 < G / 4; p0 += WIDEN) {
        __m256i h[MB][NV];
        for (int m = 0; m < mr; m++)
            for (int v = 0; v < NV; v++) h[m][v] = _mm256_setzero_si256();
        for (int p = p0; p < p0 + WIDEN; p++) {
            __m256i w[NV];
            for (int v = 0; v < NV; v++) w[v] = _mm256_load_si256((const __m256i *)(panel + (size_t)p * PN + v * 8));
            for (int m = 0; m < mr; m++) {
                int32_t quad;
                memcpy(&quad, xg + (size_t)m * K + 4 * p, 4);
                const __m256i xb = _mm256_set1_epi32(quad);
                for (int v = 0; v < NV; v++) h[m][v] = _mm256_add_epi16(h[m][v], _mm256_maddubs_epi16(w[v], xb));
            }
        }
        for (int m = 0; m < mr; m++)
            for (int v = 0; v < NV; v++) a[m][v] = _mm256_add_epi32(a[m][v], _mm256_madd_epi16(h[m][v], ones));
    }
    for (int m = 0; m < mr; m++) {
        const __m256 sx = _mm256_set1_ps(xs[(size_t)m * ng + g]), sum = _mm256_set1_ps(xsum[(size_t)m * ng + g]);
        for (int v = 0; v < NV; v++) {
            float *t = tot + (size_t)m * PN + v * 8;
            const __m256 products = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][v]),
                                                    _mm256_mul_ps(_mm256_load_ps(scale + v * 8), sx), _mm256_load_ps(t));
            _mm256_store_ps(t, _mm256_fmadd_ps(_mm256_load_ps(offset + v * 8), sum, products));
        }
    }
}

#include "int4_panels.h"  /* panel_product: the loop over panels and groups, shared with avx512_bf16.c */

/* Returns 0, or -1 when the shapes break the layout's rules or memory for the quantized activations or the
   panels is short. M >= panel_rows (>= 2) takes the panel path above. */
int neoxja_int4_linear_avx2(const float *x, const uint8_t *qw, const uint16_t *sz, float *y,
                            int M, int N, int K, int G, int nthreads, int panel_rows) {
    if (M < 1 || N < R || N % R || G < 64 || G % 64 || K < G || K % G || nthreads < 1 || panel_rows < 2 ||
        G > (1 << 20)) return -1;  /* a group's int32 sums: at most G * 15 * 128 */
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
    int rc = 0;
    if (M >= panel_rows) {
        rc = panel_product(xq, xs, xsum, qw, sz, y, M, N, K, G, nthreads);
    } else {
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
    }
    free(xq); free(xs); free(xsum);
    return rc;
}
