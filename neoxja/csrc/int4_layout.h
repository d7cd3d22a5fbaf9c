/* What neoxja's int4 kernels (avx512_bf16.c, avx2.c) share: the packed layout, the quantizer's edge rules,
   and (int4_panels.h) the loop over panels, groups and activation rows.

   W[n, k] = q[n, k] * scale[n, g] + offset[n, g], q in [0, 15], g = k / G, with (scale, zero) in bfloat16
   in the tinygemm convention w = (q - 8) * scale + zero, read as offset = zero - 8 * scale in float32.

   Layout (made by neoxja.native.pack_int4): rows in panels of P = 16. A panel's bytes run over the groups of
   K, and a group's over G / 8 chunks of 64 bytes, one 4-byte lane per row: in chunk c, row l's byte b holds
   column 4c + b of the group (low nibble) and column G / 2 + 4c + b (high nibble). So a chunk, loaded as is,
   gives two vectors of 16 rows' column quads (the low nibbles and the high ones), what vpdpbusd (AVX512-VNNI)
   and vpmaddubsw (AVX2) multiply by a broadcast quad of int8 activations, with no shuffle, and a panel's
   weights stream through memory in one sequential pass.
   The (scale, zero) pairs: (N / P, K / G, 2, P) bfloat16 bits, a panel's group's 16 scales, then its 16 zeros.
   N is a multiple of P, K of G, G of 64. */
#ifndef NEOXJA_INT4_LAYOUT_H
#define NEOXJA_INT4_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define P 16  /* weight rows per panel */

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
