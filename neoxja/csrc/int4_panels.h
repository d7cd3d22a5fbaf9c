/* What neoxja's two int4 kernels (avx512_bf16.c, avx2.c) share: the checks of the shapes, the quantized
   activations' buffers, the loop over units of NV panels (the threads' work), over groups, and over MB
   activation rows at a time; each thread's per-row totals; the totals copied out. The including source
   defines NV, MB, ALIGN (its vectors' alignment in bytes), ACT (the activations' element type) and
     quantize_group(x, G, q, scale, sum): one group of G activations -> G int8, their scale and float sum
     load_scales(s, scale, offset): a panel's group's 16 (scale, zero) bfloat16 pairs (layout in
       int4_layout.h) -> 16 float scales and 16 offsets (zero - 8 * scale)
     pass(xg, xs, xsum, w, scale, offset, tot, K, G, ng, mr, nv): mr (<= MB) activation rows' int8 sums over
       group g of nv (<= NV) panels (w[v]: panel v's bytes of the group), times scale and their activation
       scale, plus offset times their group sum, added to tot (mr rows of NV * P floats)
   after including int4_layout.h. The activations come quantized: xq (M, K) int8, xs and xsum (M, K / G).

   Every output element is computed by the same operations in the same order whatever M, the row's place
   among the M rows and the thread count: the integer sums are exact, and each group adds to a row's total in
   group order. So a row's result does not depend on the other rows in the call (tests/test_native.py). */
#ifndef NEOXJA_INT4_PANELS_H
#define NEOXJA_INT4_PANELS_H

#include <stdlib.h>
#include <string.h>

/* the groups of the nv panels from panel t0, for all M rows: tot (M, NV * P) */
static inline __attribute__((always_inline)) void unit_rows(
        const int8_t *xq, const float *xs, const float *xsum, const uint8_t *qw, const uint16_t *sz,
        float *tot, int M, int K, int G, size_t t0, const int nv) {
    const int ng = K / G;
    const size_t panel_bytes = (size_t)K / 2 * P;
    for (int g = 0; g < ng; g++) {
        const uint8_t *w[NV];
        float scale[NV * P] __attribute__((aligned(ALIGN))), offset[NV * P] __attribute__((aligned(ALIGN)));
        for (int v = 0; v < nv; v++) {
            w[v] = qw + (t0 + v) * panel_bytes + (size_t)g * G * (P / 2);
            load_scales(sz + ((t0 + v) * ng + g) * 2 * P, scale + v * P, offset + v * P);
        }
        for (int m0 = 0; m0 < M; m0 += MB) {
            const int8_t *xg = xq + (size_t)m0 * K + (size_t)g * G;
            const float *sm = xs + (size_t)m0 * ng + g, *um = xsum + (size_t)m0 * ng + g;
            float *tm = tot + (size_t)m0 * NV * P;
            switch (M - m0 < MB ? M - m0 : MB) {  /* constant row counts: the sums stay in registers */
                case 1: pass(xg, sm, um, w, scale, offset, tm, K, G, ng, 1, nv); break;
#if MB > 2
                case 2: pass(xg, sm, um, w, scale, offset, tm, K, G, ng, 2, nv); break;
#endif
#if MB > 3
                case 3: pass(xg, sm, um, w, scale, offset, tm, K, G, ng, 3, nv); break;
#endif
#if MB > 4
#error "unit_rows dispatches at most 4 rows per pass"
#endif
                default: pass(xg, sm, um, w, scale, offset, tm, K, G, ng, MB, nv); break;
            }
        }
    }
}

/* y (M, N) from the quantized activations; 0, or -1 when a thread's totals could not be allocated */
static int panel_product(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *qw, const uint16_t *sz,
                         float *y, int M, int N, int K, int G, int nthreads) {
    const long npanels = N / P, nunits = (npanels + NV - 1) / NV;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *tot = aligned_alloc(ALIGN, (size_t)M * NV * P * sizeof(float));
        if (tot == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long u = 0; u < nunits; u++) {
            if (tot == NULL) continue;
            const size_t t0 = (size_t)u * NV;
            const int nv = npanels - (long)t0 < NV ? (int)(npanels - t0) : NV;
            memset(tot, 0, (size_t)M * NV * P * sizeof(float));
            if (nv == NV)
                unit_rows(xq, xs, xsum, qw, sz, tot, M, K, G, t0, NV);
            else  /* the last unit's few panels, one at a time (the same operations per element) */
                for (int v = 0; v < nv; v++) unit_rows(xq, xs, xsum, qw, sz, tot + v * P, M, K, G, t0 + v, 1);
            for (int m = 0; m < M; m++)
                memcpy(y + (size_t)m * N + t0 * P, tot + (size_t)m * NV * P, (size_t)nv * P * sizeof(float));
        }
        free(tot);
    }
    return failed ? -1 : 0;
}

/* y (M, N) float32 = x (M, K) @ W^T: 0, or -1 when the shapes break the layout's rules or memory for the
   quantized activations or the totals is short */
static int int4_product(const ACT *x, const uint8_t *qw, const uint16_t *sz, float *y, int M, int N, int K, int G,
                        int nthreads) {
    if (M < 1 || N < P || N % P || G < 64 || G % 64 || K < G || K % G || nthreads < 1 ||
        G > (1 << 20)) return -1;  /* a group's int32 sums: at most G * 15 * 128 */
    const int ng = K / G;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc((size_t)M * ng * sizeof(float)), *xsum = malloc((size_t)M * ng * sizeof(float));
    int rc = -1;
    if (xq != NULL && xs != NULL && xsum != NULL) {
        #pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 1)
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

#endif
