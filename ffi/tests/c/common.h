/* Shared helpers of the C test suite (ffi/tests/c_suite.rs compiles and runs each test file).
 *
 * Every test program takes the model path (svhn.onnx: 32x32 RGB, 10 classes) and a scratch
 * directory, runs its checks, prints "ok NAME" or "FAIL NAME: why" per check and a last line
 * "N passed, M failed", and exits 1 when anything failed. */
#ifndef ACCLIMATE_TEST_COMMON_H
#define ACCLIMATE_TEST_COMMON_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acclimate.h"

static int g_passed, g_failed;

#define EXPECT(cond, name, ...)                                        \
    do {                                                               \
        if (cond) {                                                    \
            g_passed++;                                                \
        } else {                                                       \
            g_failed++;                                                \
            printf("FAIL %s (%s:%d): ", name, __FILE__, __LINE__);     \
            printf(__VA_ARGS__);                                       \
            printf("\n");                                              \
        }                                                              \
    } while (0)

/* A call that must succeed; on failure the message is printed and the program stops. */
#define MUST(call)                                                                            \
    do {                                                                                      \
        AcclimateStatus s_ = (call);                                                          \
        if (s_ != ACCLIMATE_OK) {                                                             \
            printf("FAIL %s:%d: %s -> %d: %s\n", __FILE__, __LINE__, #call, (int)s_,          \
                   acclimate_last_error());                                                   \
            printf("%d passed, %d failed\n", g_passed, g_failed + 1);                        \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static inline int finish(void) {
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}

/* The SVHN network's preprocessing (the digits demo's). */
#define SVHN_SPEC "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970"

/* No adaptation: predictions depend on the frame alone. */
#define CONFIG_SOURCE "[adapt]\nmethod = \"source\"\n[preprocess]\nspec = \"" SVHN_SPEC "\"\n"

/* TENT with a step every 4 frames on a window of 8: the state changes with every frame. */
#define CONFIG_TENT                                                                          \
    "[adapt]\nmethod = \"tent\"\n[optimizer]\nlr = 0.01\n[stream]\nwindow = 8\nadapt_every = 4\n" \
    "[preprocess]\nspec = \"" SVHN_SPEC "\"\n"

/* An RGB picture with structure in every channel and both axes (so rotations, mirrors and
 * channel swaps change it), varied by `seed`. */
static inline void picture_rgb(unsigned char *rgb, int w, int h, unsigned seed) {
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            unsigned char *p = rgb + 3 * (y * w + x);
            double fx = (double)x / w, fy = (double)y / h;
            double ring = sin(9.0 * sqrt((fx - 0.3) * (fx - 0.3) + (fy - 0.6) * (fy - 0.6)) + seed);
            p[0] = (unsigned char)(255.0 * fx * (0.5 + 0.5 * ring));
            p[1] = (unsigned char)(255.0 * (1.0 - fy) * (seed % 3 == 0 ? 0.9 : 0.6));
            p[2] = (unsigned char)(127.5 + 127.0 * sin(6.0 * fx * fy + seed * 0.7));
        }
    }
}

/* A tightly packed RGBA frame over `rgba` (w*h*4 bytes). */
static inline AcclimateFrame rgba_frame(const unsigned char *rgba, int w, int h) {
    AcclimateFrame f;
    memset(&f, 0, sizeof f);
    f.width = (uint32_t)w;
    f.height = (uint32_t)h;
    f.format = ACCLIMATE_RGBA8;
    f.planes[0].data = rgba;
    f.planes[0].len = (size_t)w * h * 4;
    f.planes[0].row_stride = (uint32_t)w * 4;
    f.planes[0].pixel_stride = 4;
    return f;
}

static inline void rgb_to_rgba(const unsigned char *rgb, unsigned char *rgba, int n) {
    for (int i = 0; i < n; i++) {
        rgba[4 * i] = rgb[3 * i];
        rgba[4 * i + 1] = rgb[3 * i + 1];
        rgba[4 * i + 2] = rgb[3 * i + 2];
        rgba[4 * i + 3] = 255;
    }
}

static inline int same_prediction(const AcclimatePrediction *a, const AcclimatePrediction *b) {
    if (a->k != b->k || a->stepped != b->stepped || a->frame_index != b->frame_index) return 0;
    for (uint32_t i = 0; i < a->k; i++) {
        if (a->classes[i] != b->classes[i] || a->probs[i] != b->probs[i]) return 0;
    }
    return 1;
}

#endif
