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

#endif
