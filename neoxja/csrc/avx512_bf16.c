/* neoxja's own products for x86 CPUs with AVX512-BF16 and AVX512-VNNI (Zen 4, Cooper Lake, Sapphire Rapids:
   every CPU with the first has the second): the int4
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
   sz: (scale, zero) pairs of bfloat16, (N / R, K / G, R, 2). N is a multiple of R, K of G, G of 64.

   One activation row, or a few, go through the tiles as they stream, exactly as above; from panel_rows rows
   up (a prefill, a batch) the weights are unpacked into panels and the rows, quantized to int8 per group,
   run over them as in a GEMM (below). */
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

/* Many rows (a prefill, a batch): the tiles above give each activation load R sums and each weight load mr
   (<= 4), as many loads as products, where a GEMM reuses a loaded vector of 16 outputs' weights for several
   rows. From `panel_rows` rows up the product runs as a GEMM, on AVX512-VNNI, as llama.cpp's Q4_0 x Q8_0
   and neoxja's AVX2 kernel do:
   - each group of G activations is quantized to int8 with one float scale (round(x * 127 / max|x|), to
     nearest even, exactly as avx2.c's quantize_group), and keeps its float sum for the offset;
   - the nibbles of PN = 64 weight rows and one group are unpacked once into a panel of (column quad, row)
     bytes (the packed bytes of 16 rows transposed, then split into their low and high nibbles);
   - MB activation rows at a time run over it: vpdpbusd multiplies a broadcast quad of int8 activations by 4
     vectors of 16 rows' quads (unsigned nibbles) and adds the 4 products to int32 sums, exactly (at most
     G * 15 * 127 per group), MB * 4 sums in registers; each group's sums become float once, times the
     weight's and the activations' scales, into per-row totals, and the offset multiplies the group's sum.
   vpdpbusd does 64 multiply-adds where vdpbf16ps does 32: on a Zen 4 core both issue one a cycle. The only
   rounding beyond float32 sums is the activations' to 8 bits, as in the AVX2 kernel (tests bound it). */
#define MB 4                /* activation rows per pass over a panel */
#define NV 4                /* 16-row vectors per panel */
#define PN (NV * 16)        /* weight rows per panel */
#define PANEL_ALIGN 64      /* bytes: the zmm loads and stores of panels and totals */

static inline __m512 bf16x16_to_float(const uint16_t *p) {  /* 16 bfloat16 -> float32: the bits shifted up */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* one group of G bfloat16 activations (G a multiple of 16) -> G int8, their scale and their float sum */
static void quantize_group(const uint16_t *x, int G, int8_t *q, float *scale, float *sum) {
    __m512 mx = _mm512_setzero_ps(), s = _mm512_setzero_ps();
    for (int k = 0; k < G; k += 16) {
        const __m512 v = bf16x16_to_float(x + k);
        s = _mm512_add_ps(s, v);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    *sum = _mm512_reduce_add_ps(s);
    const float inv = group_inverse(amax, scale);  /* (nan scale for a non-finite group, 0 for a negligible one) */
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int k = 0; k < G; k += 16)
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(bf16x16_to_float(x + k), vinv))));
}

/* the panel (G / 4, PN) of 32-bit quads for rows n0.. (rows of them real, the rest zero) and group g:
   element (p, n) = row n's nibbles at columns 4p .. 4p + 3 of the group, one byte each. Per 64-column block
   and 16 rows, the packed bytes are transposed first (16 rows x 8 quads of bytes, two rows per vector: 24
   shuffles), then each transposed vector's low nibbles are columns 4e.. and its high nibbles 32 + 4e.. */
static void build_panel(const uint8_t *qw, size_t n0, int rows, int K, int G, int g, uint32_t *panel) {
    const size_t tile_bytes = (size_t)R * K / 2;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    /* 64-bit lanes of (a, b): the 128-bit lanes 0 and 2 of a and b interleaved, or lanes 1 and 3 */
    const __m512i even = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), odd = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    prefetch_group(qw, n0, rows, K, G, g + 1);
    for (int v = 0; v < NV; v++)
        for (int b = 0; b < G / 64; b++) {
            __m256i row[16];  /* the block's 32 packed bytes of each of 16 rows */
            for (int j = 0; j < 16; j++) {
                const int n = v * 16 + j;
                row[j] = n < rows ? _mm256_loadu_si256((const __m256i *)(
                                        qw + (n0 + n) / R * tile_bytes + (size_t)(g * (G / 64) + b) * (R * 32)
                                        + (n0 + n) % R * 32))
                                  : _mm256_setzero_si256();
            }
            __m512i z[8], t[8], u[8];
            for (int i = 0; i < 8; i++)  /* rows i and i + 8 */
                z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(row[i]), row[i + 8], 1);
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
                t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {  /* u[i + e]: quad e (128-bit lanes 0, 2) and e + 4 (lanes 1, 3) of 4 rows */
                u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
                u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
                u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
                u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            for (int e = 0; e < 4; e++) {
                const __m512i q[2] = {_mm512_permutex2var_epi64(u[e], even, u[e + 4]),   /* quad e of the 16 rows */
                                      _mm512_permutex2var_epi64(u[e], odd, u[e + 4])};   /* quad e + 4 */
                for (int h = 0; h < 2; h++) {
                    const int p = b * 16 + e + 4 * h;
                    _mm512_store_si512(panel + (size_t)p * PN + v * 16, _mm512_and_si512(q[h], nibble));
                    _mm512_store_si512(panel + (size_t)(p + 8) * PN + v * 16,
                                       _mm512_and_si512(_mm512_srli_epi16(q[h], 4), nibble));
                }
            }
        }
}

/* mr (<= MB) quantized activation rows against the panel of group g:
   tot (mr, PN) += int sums * weight scale * activation scale + offset * sum(x) */
static inline __attribute__((always_inline)) void panel_rows(
        const int8_t *xq, const float *xs, const float *xsum, const uint32_t *panel, const float *scale,
        const float *offset, float *tot, int K, int G, int g, int ng, const int mr) {
    __m512i a[MB][NV];
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < NV; v++) a[m][v] = _mm512_setzero_si512();
    const int8_t *xg = xq + (size_t)g * G;
    for (int p = 0; p < G / 4; p++) {
        __m512i w[NV];
        for (int v = 0; v < NV; v++) w[v] = _mm512_load_si512(panel + (size_t)p * PN + v * 16);
        for (int m = 0; m < mr; m++) {
            int32_t quad;
            memcpy(&quad, xg + (size_t)m * K + 4 * p, 4);
            const __m512i xb = _mm512_set1_epi32(quad);
            for (int v = 0; v < NV; v++) a[m][v] = _mm512_dpbusd_epi32(a[m][v], w[v], xb);
        }
    }
    for (int m = 0; m < mr; m++) {
        const __m512 sx = _mm512_set1_ps(xs[(size_t)m * ng + g]), sum = _mm512_set1_ps(xsum[(size_t)m * ng + g]);
        for (int v = 0; v < NV; v++) {
            float *t = tot + (size_t)m * PN + v * 16;
            const __m512 products = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][v]),
                                                    _mm512_mul_ps(_mm512_load_ps(scale + v * 16), sx), _mm512_load_ps(t));
            _mm512_store_ps(t, _mm512_fmadd_ps(_mm512_load_ps(offset + v * 16), sum, products));
        }
    }
}

#include "int4_panels.h"  /* panel_product: the loop over panels and groups, shared with avx2.c */

/* Returns 0, or -1 when the shapes break the layout's rules or memory for the group sums or the panels is
   short. M >= panel_rows (>= 2) takes the panel path above. */
int neoxja_int4_linear(const uint16_t *x, const uint8_t *qw, const uint16_t *sz, float *y,
                       int M, int N, int K, int G, int nthreads, int panel_rows) {
    if (M < 1 || N < R || N % R || G < 64 || G % 64 || K < G || K % G || nthreads < 1 || panel_rows < 2 ||
        G > (1 << 20)) return -1;  /* a group's int32 sums: at most G * 15 * 128 */
    if (M >= panel_rows) {
        const int ng = K / G;
        int8_t *xq = malloc((size_t)M * K);
        float *xs = malloc((size_t)M * ng * sizeof(float)), *xsum = malloc((size_t)M * ng * sizeof(float));
        int rc = -1;
        if (xq != NULL && xs != NULL && xsum != NULL) {
            #pragma omp parallel for num_threads(nthreads) schedule(static)
            for (int m = 0; m < M; m++)
                for (int g = 0; g < ng; g++)
                    quantize_group(x + (size_t)m * K + (size_t)g * G, G, xq + (size_t)m * K + (size_t)g * G,
                                   xs + (size_t)m * ng + g, xsum + (size_t)m * ng + g);
            rc = panel_product(xq, xs, xsum, qw, sz, y, M, N, K, G, nthreads);
        }
        free(xq);
        free(xs);
        free(xsum);
        return rc;
    }
    const int ng = K / G;
    float *xsum = malloc((size_t)M * ng * sizeof(float));  /* the sum of each group of each activation row */
    if (xsum == NULL) return -1;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < ng; g++) {
            const uint16_t *xg = x + (size_t)m * K + (size_t)g * G;
            __m512 s = _mm512_setzero_ps();
            for (int k = 0; k < G; k += 16) s = _mm512_add_ps(s, bf16x16_to_float(xg + k));
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
