/* What neoxja's two int4 kernels (avx512_bf16.c, avx2.c) share for many activation rows: the loop over panels
   of PN weight rows and over groups, each thread's panel and per-row totals, the (scale, offset) of each
   panel row, MB activation rows at a time, and the totals copied out. The including source defines PN, MB,
   PANEL_ALIGN (its vectors' alignment in bytes), and
     build_panel(qw, n0, rows, K, G, g, panel): the panel (G / 4, PN) of nibble quads of rows n0.. (rows real)
     panel_rows(xq, xs, xsum, panel, scale, offset, tot, K, G, g, ng, mr): mr (<= MB) activation rows'
       int8 sums over the panel of group g, times scale (PN floats) and their activation scale, plus offset
       (PN floats) times their group sum, added to tot (mr, PN)
   after including int4_layout.h. The activations come quantized: xq (M, K) int8, xs and xsum (M, K / G). */
#ifndef NEOXJA_INT4_PANELS_H
#define NEOXJA_INT4_PANELS_H

#include <stdlib.h>
#include <string.h>

static int panel_product(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *qw, const uint16_t *sz,
                         float *y, int M, int N, int K, int G, int nthreads) {
    const int ng = K / G;
    const long npanels = ((long)N + PN - 1) / PN;  /* (in int, N near INT_MAX would wrap) */
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        uint32_t *panel = aligned_alloc(PANEL_ALIGN, (size_t)G / 4 * PN * sizeof(uint32_t));
        float *tot = aligned_alloc(PANEL_ALIGN, (size_t)M * PN * sizeof(float));
        if (panel == NULL || tot == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long t = 0; t < npanels; t++) {
            if (panel == NULL || tot == NULL) continue;
            const size_t n0 = (size_t)t * PN;
            const int rows = N - n0 < PN ? (int)(N - n0) : PN;
            memset(tot, 0, (size_t)M * PN * sizeof(float));
            for (int g = 0; g < ng; g++) {
                build_panel(qw, n0, rows, K, G, g, panel);
                float scale[PN] __attribute__((aligned(PANEL_ALIGN))), offset[PN] __attribute__((aligned(PANEL_ALIGN)));
                for (int n = 0; n < PN; n += R) {  /* a tile's R rows (all real or none: rows % R == 0) */
                    const uint16_t *pairs = sz + 2 * (((n0 + n) / R * ng + g) * R);  /* their (scale, zero) pairs */
                    for (int i = 0; i < R; i++) {
                        scale[n + i] = n < rows ? scale_of(pairs, i) : 0.0f;
                        offset[n + i] = n < rows ? offset_of(pairs, i) : 0.0f;
                    }
                }
                for (int m0 = 0; m0 < M; m0 += MB) {
                    const int8_t *xm = xq + (size_t)m0 * K;
                    const float *sm = xs + (size_t)m0 * ng, *um = xsum + (size_t)m0 * ng;
                    float *tm = tot + (size_t)m0 * PN;
                    switch (M - m0 < MB ? M - m0 : MB) {  /* constant row counts: the sums stay in registers */
                        case 1: panel_rows(xm, sm, um, panel, scale, offset, tm, K, G, g, ng, 1); break;
#if MB > 2
                        case 2: panel_rows(xm, sm, um, panel, scale, offset, tm, K, G, g, ng, 2); break;
#endif
#if MB > 3
                        case 3: panel_rows(xm, sm, um, panel, scale, offset, tm, K, G, g, ng, 3); break;
#endif
#if MB > 4
#error "panel_product dispatches at most 4 rows per pass"
#endif
                        default: panel_rows(xm, sm, um, panel, scale, offset, tm, K, G, g, ng, MB); break;
                    }
                }
            }
            for (int m = 0; m < M; m++)
                memcpy(y + (size_t)m * N + n0, tot + (size_t)m * PN, (size_t)rows * sizeof(float));
        }
        free(panel);
        free(tot);
    }
    return failed ? -1 : 0;
}

#endif
