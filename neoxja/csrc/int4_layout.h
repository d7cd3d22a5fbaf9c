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
