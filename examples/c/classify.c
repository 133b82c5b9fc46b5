/* classify: open a model, push a few frames, print each frame's top-1 class.
 *
 * Build and run (from the repository root):
 *   cargo build --release -p acclimate-ffi
 *   cc examples/c/classify.c -Iffi/include -Ltarget/release -lacclimate_ffi -o classify
 *   LD_LIBRARY_PATH=target/release ./classify assets/svhn.onnx            # a generated picture
 *   LD_LIBRARY_PATH=target/release ./classify assets/svhn.onnx img.rgba 64 48
 * where img.rgba holds WIDTH*HEIGHT*4 bytes of RGBA (for example from
 * `convert photo.png -depth 8 rgba:img.rgba`). The config below is the SVHN digit network's
 * preprocessing; other models need their own `spec` (size, mean and std they were trained with). */
#include <stdio.h>
#include <stdlib.h>

#include "acclimate.h"

static const char *CONFIG =
    "[adapt]\n"
    "method = \"tent\"\n"
    "[stream]\n"
    "window = 8\n"
    "adapt_every = 4\n"
    "[preprocess]\n"
    "spec = \"size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970\"\n";

int main(int argc, char **argv) {
    if (argc != 2 && argc != 5) {
        fprintf(stderr, "usage: %s MODEL.onnx [IMAGE.rgba WIDTH HEIGHT]\n", argv[0]);
        return 2;
    }
    uint32_t w = 64, h = 48;
    if (argc == 5) w = (uint32_t)atoi(argv[3]), h = (uint32_t)atoi(argv[4]);
    size_t len = (size_t)w * h * 4;
    uint8_t *rgba = malloc(len ? len : 1);
    if (!rgba) return 1;
    if (argc == 5) {
        FILE *f = fopen(argv[2], "rb");
        if (!f || fread(rgba, 1, len, f) != len) {
            fprintf(stderr, "cannot read %zu bytes of RGBA from %s\n", len, argv[2]);
            return 1;
        }
        fclose(f);
    } else {
        for (size_t i = 0; i < (size_t)w * h; i++) {
            rgba[4 * i] = (uint8_t)(255 * (i % w) / w);
            rgba[4 * i + 1] = (uint8_t)(255 * (i / w) / h);
            rgba[4 * i + 2] = 128;
            rgba[4 * i + 3] = 255;
        }
    }

    printf("acclimate %s\n", acclimate_version());
    AcclimateSession *session = NULL;
    if (acclimate_session_new(argv[1], CONFIG, &session) != ACCLIMATE_OK) {
        fprintf(stderr, "error: %s\n", acclimate_last_error());
        return 1;
    }
    AcclimateFrame frame = {0};
    frame.width = w;
    frame.height = h;
    frame.format = ACCLIMATE_RGBA8;
    frame.planes[0].data = rgba;
    frame.planes[0].len = len;
    frame.planes[0].row_stride = w * 4;
    frame.planes[0].pixel_stride = 4;
    for (int i = 0; i < 8; i++) {
        AcclimatePrediction p;
        frame.timestamp_ns = (int64_t)i * 33333333;
        if (acclimate_session_push_frame(session, &frame, &p) != ACCLIMATE_OK) {
            fprintf(stderr, "frame %d: %s\n", i, acclimate_last_error());
            continue;
        }
        printf("frame %llu: class %u (p = %.3f)%s, %.1f ms\n", (unsigned long long)p.frame_index, p.classes[0],
               p.probs[0], p.stepped ? ", then a gradient step" : "", p.latency_ms);
    }
    acclimate_session_free(session);
    free(rgba);
    return 0;
}
