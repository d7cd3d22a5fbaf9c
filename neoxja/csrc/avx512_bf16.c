/* neoxja's own products for x86 CPUs with AVX512-BF16 and AVX512-VNNI (Zen 4, Cooper Lake, Sapphire Rapids:
   every CPU with the first has the second): the int4 weight-only product (neoxja_int4_linear) and the
   one-row bfloat16 product (neoxja_bf16_gemv, at the end).

   neoxja_int4_linear:

   y (M, N) float32 = x (M, K) bfloat16 @ W^T, W in int4_layout.h's packed layout (panels of 16 rows).

   Why a kernel of our own: decoding reads every weight once per token, and torch's int4 CPU kernel is bound
   by its own unpacking, not by memory (docs/quantization.md). Here, as in llama.cpp's Q4_0 x Q8_0 product
   and neoxja's AVX2 kernel, each group of G activations is quantized to int8 with one float scale
   (round(x * 127 / max|x|), to nearest even) and keeps its float sum for the offset. A 64-byte chunk of the
   layout is 16 rows x 4 columns twice over (low and high nibbles): two ANDs and a shift make it two vectors
   of unsigned column quads, and vpdpbusd multiplies each by a broadcast quad of int8 activations and adds
   the 4 products to 16 int32 sums, exactly (at most G * 15 * 128 per group). Each group's sums become float
   once, times the weight's and the activations' scales, and the offset multiplies the group's sum.
   vpdpbusd does 64 multiply-adds where vdpbf16ps does 32, and the layout needs no table lookup or shuffle:
   on a Zen 4 core both issue one a cycle. The only rounding beyond float32 sums is the activations' to 8
   bits (tests/test_native.py bounds it).

   NV = 4 panels (64 rows) at a time, MB = 4 activation rows at a time over the chunks of a group, which stay
   in L1 for the next rows: one row (decoding) streams the weights at memory speed, many rows (a prefill, a
   batch) reuse each loaded chunk for 4 rows and each broadcast quad for 4 x 16 rows. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_layout.h"  /* P (16 weight rows per panel), the layout, group_inverse */

#define NV 4       /* panels per unit */
#define MB 4       /* activation rows per pass over a group */
#define ALIGN 64   /* bytes: the zmm loads and stores of chunks, scales and totals */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

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

static inline void load_scales(const uint16_t *s, float *scale, float *offset) {
    const __m512 sc = bf16x16_to_float(s), zero = bf16x16_to_float(s + P);
    _mm512_store_ps(scale, sc);
    _mm512_store_ps(offset, _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc, zero));  /* zero - 8 * scale */
}

/* mr (<= MB) quantized activation rows against group g of nv (<= NV) panels:
   tot (mr, NV * P) += int sums * weight scale * activation scale + offset * sum(x) */
static inline __attribute__((always_inline)) void pass(
        const int8_t *xg, const float *xs, const float *xsum, const uint8_t *const *w, const float *scale,
        const float *offset, float *tot, int K, int G, int ng, const int mr, const int nv) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const int split = mr <= 2;  /* the low and high quads into sums of their own: enough chains in flight */
    __m512i a[MB][NV], b[MB][NV];
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) { a[m][v] = _mm512_setzero_si512(); b[m][v] = _mm512_setzero_si512(); }
    for (int c = 0; c < G / 8; c++) {
        __m512i lo[NV], hi[NV];
        for (int v = 0; v < nv; v++) {
            const __m512i chunk = _mm512_load_si512(w[v] + (size_t)c * 64);
            lo[v] = _mm512_and_si512(chunk, nibble);                        /* columns 4c .. 4c + 3 */
            hi[v] = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), nibble);  /* columns G / 2 + 4c .. */
        }
        for (int m = 0; m < mr; m++) {
            int32_t ql, qh;
            memcpy(&ql, xg + (size_t)m * K + 4 * c, 4);
            memcpy(&qh, xg + (size_t)m * K + G / 2 + 4 * c, 4);
            const __m512i xl = _mm512_set1_epi32(ql), xh = _mm512_set1_epi32(qh);
            for (int v = 0; v < nv; v++) {
                a[m][v] = _mm512_dpbusd_epi32(a[m][v], lo[v], xl);
                if (split) b[m][v] = _mm512_dpbusd_epi32(b[m][v], hi[v], xh);
                else a[m][v] = _mm512_dpbusd_epi32(a[m][v], hi[v], xh);
            }
        }
    }
    for (int m = 0; m < mr; m++) {
        const __m512 sx = _mm512_set1_ps(xs[(size_t)m * ng]), sum = _mm512_set1_ps(xsum[(size_t)m * ng]);
        for (int v = 0; v < nv; v++) {
            const __m512i s = split ? _mm512_add_epi32(a[m][v], b[m][v]) : a[m][v];  /* exact either way */
            float *t = tot + (size_t)m * (NV * P) + v * P;
            const __m512 products = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_load_ps(scale + v * P), sx),
                                                    _mm512_load_ps(t));
            _mm512_store_ps(t, _mm512_fmadd_ps(_mm512_load_ps(offset + v * P), sum, products));
        }
    }
}

#define ACT uint16_t  /* the activations' element type */
#include "int4_panels.h"  /* int4_product: the checks, the quantizing, the loop over panels, groups and rows */

/* Returns 0, or -1 when the shapes break the layout's rules or memory for the quantized activations or the
   totals is short. */
int neoxja_int4_linear(const uint16_t *x, const uint8_t *qw, const uint16_t *sz, float *y,
                       int M, int N, int K, int G, int nthreads) {
    return int4_product(x, qw, sz, y, M, N, K, G, nthreads);
}

/* neoxja_bf16_gemv: y (N,) bfloat16 = W (N, K) bfloat16 @ x (K,) bfloat16 (+ bias (N,) bfloat16 or NULL), sums
   in float32 rounded once to bfloat16 (to nearest even), as oneDNN's and torch.mv's one-row products do.
   W row-major and contiguous (an nn.Linear weight, read in place). Why: a one-row product streams its weight
   once, and the libraries' calls cost 15-50 us on top of that (oneDNN's reorder or setup, ATen's dispatch);
   this costs ~5 us for a 256 x 256 weight and streams large ones at least as fast (neoxja.kernels times it
   against them, per shape, and uses it only where it wins). Rows in tiles of 4 (8 sums in flight), the last
   partial 32 columns through a masked load. Returns 0, or -1 for shapes it does not take. */
#define GEMV_ROWS 4

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
    for (int n0 = 0; n0 < N; n0 += GEMV_ROWS) {
        const int rows = N - n0 < GEMV_ROWS ? N - n0 : GEMV_ROWS;
        const uint16_t *wt = w + (size_t)n0 * K;
        __m512 a[GEMV_ROWS][2];
        for (int i = 0; i < GEMV_ROWS; i++) { a[i][0] = _mm512_setzero_ps(); a[i][1] = _mm512_setzero_ps(); }
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
