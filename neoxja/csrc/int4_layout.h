/* What neoxja's int4 kernels (avx512_bf16.c, avx2.c) share: the packed layout's tile height and the
   (scale, zero) pairs, bfloat16 bits in the tinygemm convention w = (q - 8) * scale + zero, read as
   w = q * scale + offset with offset = zero - 8 * scale in float32. */
#ifndef NEOXJA_INT4_LAYOUT_H
#define NEOXJA_INT4_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define R 4  /* weight rows per tile */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float scale_of(const uint16_t *sz, size_t j) { return bf16_to_float(sz[2 * j]); }
static inline float offset_of(const uint16_t *sz, size_t j) {
    return bf16_to_float(sz[2 * j + 1]) - 8.0f * bf16_to_float(sz[2 * j]);
}

/* Ask for group g's bytes of the tiles holding rows n0 .. n0 + rows - 1 (rows a multiple of R) ahead of their
   loads: a panel reads its rows' tiles as rows / R streams a group at a time, more than the hardware's
   prefetchers follow (one group ahead: 1.25x at 4-8 rows from DRAM; further ahead was slower). */
static inline void prefetch_group(const uint8_t *qw, size_t n0, int rows, int K, int G, int g) {
    const size_t tile_bytes = (size_t)R * K / 2, group_bytes = (size_t)R * 32 * (G / 64);
    if ((size_t)g * G >= (size_t)K) return;
    for (int n = 0; n < rows; n += R)
        for (size_t c = 0; c < group_bytes; c += 64)
            __builtin_prefetch(qw + (n0 + n) / R * tile_bytes + (size_t)g * group_bytes + c, 0, 3);
}

/* The inverse 127 / amax that quantizes a group of activations whose largest magnitude is amax to int8, and
   the group's scale: an infinite or nan activation makes the scale nan, so that the group's products' term is
   nan whatever its integers (inf * 0 = nan converts to the int8 -128); an all-zero group, or one so small
   that 127 / amax overflows, has scale and inverse 0 (its products' term, below 1e-36 * sum |w|, dropped). */
static inline float group_inverse(float amax, float *scale) {
    const float inv = 127.0f / amax;
    if (!(amax <= 3.4028235e38f)) {
        *scale = __builtin_nanf("");
        return 0.0f;
    }
    if (!(amax > 0.0f) || !(inv <= 3.4028235e38f)) {
        *scale = 0.0f;
        return 0.0f;
    }
    *scale = amax / 127.0f;
    return inv;
}

#endif
