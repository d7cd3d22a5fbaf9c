/* neoxja's own products for x86 CPUs with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids): the int4
   weight-only product (neoxja_int4_linear) and the one-row bfloat16 product (neoxja_bf16_gemv, at the end).

   neoxja_int4_linear:

   y (M, N) float32 = x (M, K) bfloat16 @ W^T, where W[n, k] = q[n, k] * scale[n, g] + offset[n, g],
   q in [0, 15], g = k / G, offset = zero - 8 * scale in float32 (the tinygemm convention
   w = (q - 8) * scale + zero, with scale and zero in bfloat16).

   Why a kernel of our own: decoding reads every weight once per token, and torch's int4 CPU kernel is bound
   by its own unpacking, not by memory (docs/quantization.md). Here a nibble becomes a bfloat16 with one
   table lookup (vpermw: the 16 values 0..15 are exact in bfloat16), and vdpbf16ps multiplies 32 of them by
   32 activations into float32 sums, so the products and sums are as exact as float32 allows; the scale and
   offset apply once per group (the offset through the group's sum of x).

   Layout (made by neoxja.native.pack_int4): rows in tiles of R = 4; a tile's bytes run over the 64-column
   blocks of K, and within a block over the tile's 4 rows, 32 bytes each: byte j holds column j of the block
   (low nibble) and column j + 32 (high nibble). So the weights stream through memory in one sequential pass.
   sz: (scale, zero) pairs of bfloat16, (N / R, K / G, R, 2). N is a multiple of R, K of G, G of 64. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_layout.h"  /* R (4 weight rows per tile), the (scale, zero) pairs */

#define MR 4           /* activation rows multiplied per pass over a tile */
#define PREFETCH 1024  /* bytes ahead of the weight stream */

static inline __m512i nibble_table(void) {  /* bfloat16 bits of 0.0, 1.0, ..., 15.0 */
    return _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                            0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                            0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
}

/* one block of 64 columns of one row: (low 32 columns, high 32 columns) as bfloat16 */
static inline void unpack_block(const uint8_t *p, __m512i table, __m512bh *lo, __m512bh *hi) {
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));  /* (32,) bytes as 16 bits */
    *lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x000F)), table);
    *hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
}

/* one activation row against a tile of R weight rows: 2 * R independent sums hide vdpbf16ps's latency */
static void tile_one_row(const uint16_t *x, const float *xsum, const uint8_t *tile, const uint16_t *sz,
                         float *y, int K, int G) {
    const int ng = K / G, nb = G / 64;
    const __m512i table = nibble_table();
    __m512 tot[R];
    float off[R];
    for (int i = 0; i < R; i++) { tot[i] = _mm512_setzero_ps(); off[i] = 0.0f; }
    for (int g = 0; g < ng; g++) {
        __m512 a[R][2];
        for (int i = 0; i < R; i++) { a[i][0] = _mm512_setzero_ps(); a[i][1] = _mm512_setzero_ps(); }
        for (int b = 0; b < nb; b++) {
            const int k0 = g * G + b * 64;
            const uint8_t *block = tile + (size_t)(k0 / 64) * (R * 32);
            _mm_prefetch((const char *)block + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)block + PREFETCH + 64, _MM_HINT_T0);
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k0), x1 = (__m512bh)_mm512_loadu_si512(x + k0 + 32);
            for (int i = 0; i < R; i++) {
                __m512bh lo, hi;
                unpack_block(block + i * 32, table, &lo, &hi);
                a[i][0] = _mm512_dpbf16_ps(a[i][0], lo, x0);
                a[i][1] = _mm512_dpbf16_ps(a[i][1], hi, x1);
            }
        }
        for (int i = 0; i < R; i++) {
            tot[i] = _mm512_fmadd_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_set1_ps(scale_of(sz, g * R + i)), tot[i]);
            off[i] += offset_of(sz, g * R + i) * xsum[g];
        }
    }
    for (int i = 0; i < R; i++) y[i] = _mm512_reduce_add_ps(tot[i]) + off[i];
}

/* mr (<= MR) activation rows against a whole tile: each weight block is unpacked once for all mr rows,
   each activation block loaded once for all R weight rows (R * mr sums in registers, their per-group
   totals in memory) */
static inline __attribute__((always_inline)) void tile_rows(
        const uint16_t *x, const float *xsum, const uint8_t *tile, const uint16_t *sz,
        float *y, int K, int G, int N, const int mr) {
    const int ng = K / G, nb = G / 64;
    const __m512i table = nibble_table();
    __m512 tot[R][MR];
    for (int i = 0; i < R; i++)
        for (int m = 0; m < mr; m++) tot[i][m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512 a[R][MR];
        for (int i = 0; i < R; i++)
            for (int m = 0; m < mr; m++) a[i][m] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const int k0 = g * G + b * 64;
            const uint8_t *block = tile + (size_t)(k0 / 64) * (R * 32);
            __m512bh x0[MR], x1[MR];
            for (int m = 0; m < mr; m++) {
                x0[m] = (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k0);
                x1[m] = (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k0 + 32);
            }
            for (int i = 0; i < R; i++) {
                __m512bh lo, hi;
                unpack_block(block + i * 32, table, &lo, &hi);
                for (int m = 0; m < mr; m++) a[i][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a[i][m], lo, x0[m]), hi, x1[m]);
            }
        }
        for (int i = 0; i < R; i++) {
            const __m512 s = _mm512_set1_ps(scale_of(sz, g * R + i));
            for (int m = 0; m < mr; m++) tot[i][m] = _mm512_fmadd_ps(a[i][m], s, tot[i][m]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int m = 0; m < mr; m++) {
            float r = _mm512_reduce_add_ps(tot[i][m]);
            for (int g = 0; g < ng; g++) r += offset_of(sz, g * R + i) * xsum[(size_t)m * ng + g];
            y[(size_t)m * N + i] = r;
        }
}

static void tile_many_rows(const uint16_t *x, const float *xsum, const uint8_t *tile, const uint16_t *sz,
                           float *y, int M, int N, int K, int G) {
    const int ng = K / G;
    for (int m0 = 0; m0 < M; m0 += MR) {
        const uint16_t *xm = x + (size_t)m0 * K;
        const float *sm = xsum + (size_t)m0 * ng;
        float *ym = y + (size_t)m0 * N;
        switch (M - m0 < MR ? M - m0 : MR) {  /* constant row counts: the sums stay in registers */
            case 1: tile_rows(xm, sm, tile, sz, ym, K, G, N, 1); break;
            case 2: tile_rows(xm, sm, tile, sz, ym, K, G, N, 2); break;
            case 3: tile_rows(xm, sm, tile, sz, ym, K, G, N, 3); break;
            default: tile_rows(xm, sm, tile, sz, ym, K, G, N, MR); break;
        }
    }
}

/* Returns 0, or -1 when the shapes break the layout's rules or memory for the group sums is short. */
int neoxja_int4_linear(const uint16_t *x, const uint8_t *qw, const uint16_t *sz, float *y,
                       int M, int N, int K, int G, int nthreads) {
    if (M < 1 || N < R || N % R || G < 64 || G % 64 || K < G || K % G || nthreads < 1) return -1;
    const int ng = K / G;
    float *xsum = malloc((size_t)M * ng * sizeof(float));  /* the sum of each group of each activation row */
    if (xsum == NULL) return -1;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < ng; g++) {
            const uint16_t *xg = x + (size_t)m * K + (size_t)g * G;
            __m512 s = _mm512_setzero_ps();
            for (int k = 0; k < G; k += 16)  /* 16 bfloat16 -> float32: the bits shifted up by 16 */
                s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xg + k))), 16)));
            xsum[(size_t)m * ng + g] = _mm512_reduce_add_ps(s);
        }
    const size_t tile_bytes = (size_t)R * K / 2, tile_groups = (size_t)R * ng;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < N / R; t++) {
        const uint8_t *tile = qw + t * tile_bytes;
        const uint16_t *tsz = sz + 2 * t * tile_groups;
        if (M == 1)
            tile_one_row(x, xsum, tile, tsz, y + (size_t)t * R, K, G);
        else
            tile_many_rows(x, xsum, tile, tsz, y + (size_t)t * R, M, N, K, G);
    }
    free(xsum);
    return 0;
}

/* neoxja_bf16_gemv: y (N,) bfloat16 = W (N, K) bfloat16 @ x (K,) bfloat16 (+ bias (N,) bfloat16 or NULL), sums
   in float32 rounded once to bfloat16 (to nearest even), as oneDNN's and torch.mv's one-row products do.
   W row-major and contiguous (an nn.Linear weight, read in place). Why: a one-row product streams its weight
   once, and the libraries' calls cost 15-50 us on top of that (oneDNN's reorder or setup, ATen's dispatch);
   this costs ~5 us for a 256 x 256 weight and streams large ones at least as fast (neoxja.kernels times it
   against them, per shape, and uses it only where it wins). Rows in tiles of 4 (8 sums in flight), the last
   partial 32 columns through a masked load. Returns 0, or -1 for shapes it does not take. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u) return (uint16_t)((u >> 16) | ((u & 0xFFFFu) ? 0x40u : 0u));  /* inf, nan */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int neoxja_bf16_gemv(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int N, int K,
                     int nthreads) {
    if (N < 1 || K < 1 || nthreads < 1) return -1;
    const int kfull = K & ~31;
    const __mmask32 tail = (__mmask32)((1ull << (K - kfull)) - 1);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n0 = 0; n0 < N; n0 += R) {
        const int rows = N - n0 < R ? N - n0 : R;
        const uint16_t *wt = w + (size_t)n0 * K;
        __m512 a[R][2];
        for (int i = 0; i < R; i++) { a[i][0] = _mm512_setzero_ps(); a[i][1] = _mm512_setzero_ps(); }
        int k = 0;
        for (; k <= kfull - 64; k += 64) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
            for (int i = 0; i < rows; i++) {
                const uint16_t *wr = wt + (size_t)i * K + k;
                a[i][0] = _mm512_dpbf16_ps(a[i][0], (__m512bh)_mm512_loadu_si512(wr), x0);
                a[i][1] = _mm512_dpbf16_ps(a[i][1], (__m512bh)_mm512_loadu_si512(wr + 32), x1);
            }
        }
        for (; k < kfull; k += 32) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k);
            for (int i = 0; i < rows; i++)
                a[i][0] = _mm512_dpbf16_ps(a[i][0], (__m512bh)_mm512_loadu_si512(wt + (size_t)i * K + k), x0);
        }
        if (tail) {
            const __m512bh x0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + kfull);
            for (int i = 0; i < rows; i++)
                a[i][0] = _mm512_dpbf16_ps(a[i][0], (__m512bh)_mm512_maskz_loadu_epi16(tail, wt + (size_t)i * K + kfull), x0);
        }
        for (int i = 0; i < rows; i++) {
            float r = _mm512_reduce_add_ps(_mm512_add_ps(a[i][0], a[i][1]));
            if (bias) r += bf16_to_float(bias[n0 + i]);
            y[n0 + i] = float_to_bf16(r);
        }
    }
    return 0;
}
