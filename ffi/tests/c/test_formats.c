/* Every pixel format, with padded strides and planes in separate buffers of exactly the length
 * their strides imply, against a tightly packed RGBA frame of the same picture built here:
 * packed formats, gray, rotations and mirroring must predict exactly as RGBA does (the same
 * pixel values reach the model); YUV formats as the RGBA frame of the picture they encode,
 * decoded here with BT.601 video-range arithmetic and rounded to bytes (so within rounding).
 * The adaptation is off (method "source"), so a prediction depends on its frame alone. */
#include "common.h"

#define W 48
#define H 40
#define CW (W / 2)
#define CH (H / 2)
#define PAD 13

static AcclimateSession *g_session;

static AcclimatePrediction predict(AcclimateFrame *f, const char *what) {
    AcclimatePrediction p;
    AcclimateStatus s = acclimate_session_push_frame(g_session, f, &p);
    if (s != ACCLIMATE_OK) {
        printf("FAIL %s: status %d: %s\n", what, (int)s, acclimate_last_error());
        g_failed++;
        memset(&p, 0, sizeof p);
    }
    return p;
}

static int exact(const AcclimatePrediction *a, const AcclimatePrediction *b) {
    AcclimatePrediction c = *b;
    c.frame_index = a->frame_index;
    return a->k == 5 && same_prediction(a, &c);
}

/* Within colour-conversion rounding: the same top class, its probability within 0.02. */
static int close_to(const AcclimatePrediction *a, const AcclimatePrediction *b) {
    return a->k == 5 && b->k == 5 && a->classes[0] == b->classes[0] && fabsf(a->probs[0] - b->probs[0]) < 0.02f;
}

/* A plane of `rows` rows of `row_bytes` bytes at `stride`, in its own buffer of exactly the
 * length the strides imply (no padding after the last row), filled by `sample`. */
static unsigned char *plane(int rows, size_t stride, size_t row_bytes, size_t *len) {
    *len = (size_t)(rows - 1) * stride + row_bytes;
    unsigned char *b = malloc(*len);
    memset(b, 0xA5, *len); /* padding bytes hold garbage, never read */
    return b;
}

static unsigned char clamp_u8(double v) {
    v = floor(v + 0.5);
    return (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* BT.601 video range (what phone cameras deliver, and the library's default for YUV frames). */
static void rgb_to_yuv(const unsigned char *rgb, unsigned char *y, unsigned char *u, unsigned char *v) {
    for (int j = 0; j < H; j++) {
        for (int i = 0; i < W; i++) {
            const unsigned char *p = rgb + 3 * (j * W + i);
            y[j * W + i] = clamp_u8(16 + (65.481 * p[0] + 128.553 * p[1] + 24.966 * p[2]) / 255.0);
        }
    }
    for (int j = 0; j < CH; j++) {
        for (int i = 0; i < CW; i++) {
            double r = 0, g = 0, b = 0;
            for (int d = 0; d < 4; d++) {
                const unsigned char *p = rgb + 3 * ((2 * j + d / 2) * W + 2 * i + d % 2);
                r += p[0] / 4.0, g += p[1] / 4.0, b += p[2] / 4.0;
            }
            u[j * CW + i] = clamp_u8(128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0);
            v[j * CW + i] = clamp_u8(128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0);
        }
    }
}

/* The RGBA picture the YUV planes encode (ITU-R BT.601 video range inverse), rounded. */
static void yuv_to_rgba(const unsigned char *y, const unsigned char *u, const unsigned char *v, unsigned char *rgba) {
    for (int j = 0; j < H; j++) {
        for (int i = 0; i < W; i++) {
            double yy = (y[j * W + i] - 16) * 255.0 / 219.0;
            double cb = (u[(j / 2) * CW + i / 2] - 128) * 255.0 / 224.0;
            double cr = (v[(j / 2) * CW + i / 2] - 128) * 255.0 / 224.0;
            unsigned char *o = rgba + 4 * (j * W + i);
            o[0] = clamp_u8(yy + 1.402 * cr);
            o[1] = clamp_u8(yy - 0.114 * 1.772 / 0.587 * cb - 0.299 * 1.402 / 0.587 * cr);
            o[2] = clamp_u8(yy + 1.772 * cb);
            o[3] = 255;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.onnx\n", argv[0]);
        return 2;
    }
    MUST(acclimate_session_new(argv[1], CONFIG_SOURCE, &g_session));

    static unsigned char rgb[W * H * 3], rgba[W * H * 4];
    picture_rgb(rgb, W, H, 4);
    rgb_to_rgba(rgb, rgba, W * H);
    AcclimateFrame ref_frame = rgba_frame(rgba, W, H);
    AcclimatePrediction ref = predict(&ref_frame, "rgba_reference");

    /* Packed formats with padded rows. */
    struct {
        AcclimatePixelFormat format;
        int bytes, pixel_stride;
        const char *name;
    } packed[] = {
        {ACCLIMATE_RGBA8, 4, 4, "rgba8_padded"},
        {ACCLIMATE_BGRA8, 4, 4, "bgra8_padded"},
        {ACCLIMATE_RGB8, 3, 3, "rgb8_padded"},
        {ACCLIMATE_RGB8, 3, 4, "rgb8_in_rgbx_pixel_stride_4"},
    };
    for (size_t t = 0; t < sizeof packed / sizeof packed[0]; t++) {
        size_t ps = (size_t)packed[t].pixel_stride, stride = W * ps + PAD, len;
        unsigned char *b = plane(H, stride, (W - 1) * ps + (size_t)packed[t].bytes, &len);
        for (int j = 0; j < H; j++) {
            for (int i = 0; i < W; i++) {
                unsigned char *o = b + j * stride + i * ps;
                const unsigned char *p = rgb + 3 * (j * W + i);
                int bgr = packed[t].format == ACCLIMATE_BGRA8;
                o[0] = p[bgr ? 2 : 0], o[1] = p[1], o[2] = p[bgr ? 0 : 2];
                if (packed[t].bytes == 4) o[3] = 255;
            }
        }
        AcclimateFrame f;
        memset(&f, 0, sizeof f);
        f.width = W, f.height = H, f.format = packed[t].format;
        f.planes[0] = (AcclimatePlane){b, len, (uint32_t)stride, (uint32_t)ps};
        AcclimatePrediction p = predict(&f, packed[t].name);
        EXPECT(exact(&p, &ref), packed[t].name, "top %u %.6f vs RGBA's %u %.6f", p.classes[0], p.probs[0],
               ref.classes[0], ref.probs[0]);
        free(b);
    }

    /* Strides of 0: tightly packed. */
    AcclimateFrame tight = ref_frame;
    tight.planes[0].row_stride = 0, tight.planes[0].pixel_stride = 0;
    AcclimatePrediction p = predict(&tight, "zero_strides_mean_tight");
    EXPECT(exact(&p, &ref), "zero_strides_mean_tight", "differs from RGBA");

    /* Gray: the gray frame as RGBA (g, g, g) predicts the same (channels=3 replicates gray). */
    {
        static unsigned char gray_rgba[W * H * 4];
        size_t stride = W + PAD, len;
        unsigned char *g = plane(H, stride, W, &len);
        for (int j = 0; j < H; j++) {
            for (int i = 0; i < W; i++) {
                const unsigned char *q = rgb + 3 * (j * W + i);
                unsigned char l = (unsigned char)((q[0] * 77 + q[1] * 150 + q[2] * 29) >> 8);
                g[j * stride + i] = l;
                unsigned char *o = gray_rgba + 4 * (j * W + i);
                o[0] = o[1] = o[2] = l, o[3] = 255;
            }
        }
        AcclimateFrame gf = rgba_frame(gray_rgba, W, H);
        AcclimatePrediction want = predict(&gf, "gray_reference");
        AcclimateFrame f;
        memset(&f, 0, sizeof f);
        f.width = W, f.height = H, f.format = ACCLIMATE_GRAY8;
        f.planes[0] = (AcclimatePlane){g, len, (uint32_t)stride, 1};
        p = predict(&f, "gray8_padded");
        EXPECT(exact(&p, &want), "gray8_padded", "top %u %.6f vs %u %.6f", p.classes[0], p.probs[0], want.classes[0],
               want.probs[0]);
        free(g);
    }

    /* Rotations and mirror: the stored picture is the upright one turned the other way. */
    for (int rot = 0; rot < 360; rot += 90) {
        for (int mirror = 0; mirror < 2; mirror++) {
            int sw = rot % 180 ? H : W, sh = rot % 180 ? W : H;
            size_t stride = (size_t)sw * 4 + PAD, len;
            unsigned char *b = plane(sh, stride, (size_t)sw * 4, &len);
            /* Upright (u, v) = stored pixel rotated clockwise by rot, then mirrored. */
            for (int v = 0; v < H; v++) {
                for (int u0 = 0; u0 < W; u0++) {
                    int u = mirror ? W - 1 - u0 : u0, x, y;
                    if (rot == 0) x = u, y = v;
                    else if (rot == 90) x = v, y = sh - 1 - u;
                    else if (rot == 180) x = sw - 1 - u, y = sh - 1 - v;
                    else x = sw - 1 - v, y = u;
                    memcpy(b + y * stride + x * 4, rgba + 4 * (v * W + u0), 4);
                }
            }
            AcclimateFrame f;
            memset(&f, 0, sizeof f);
            f.width = (uint32_t)sw, f.height = (uint32_t)sh, f.format = ACCLIMATE_RGBA8;
            f.planes[0] = (AcclimatePlane){b, len, (uint32_t)stride, 4};
            f.rotation = (uint32_t)rot, f.mirror = mirror;
            char name[64];
            snprintf(name, sizeof name, "rotation_%d_mirror_%d", rot, mirror);
            p = predict(&f, name);
            EXPECT(exact(&p, &ref), name, "top %u %.6f vs RGBA's %u %.6f", p.classes[0], p.probs[0], ref.classes[0],
                   ref.probs[0]);
            if (rot == 0 && mirror == 1) {
                /* The same bytes without the flag are another picture: the comparison can fail. */
                f.mirror = false;
                p = predict(&f, "unmirrored");
                EXPECT(!exact(&p, &ref), "mirror_changes_the_prediction", "the mirrored picture predicts as upright");
            }
            free(b);
        }
    }

    /* YUV. */
    static unsigned char y[W * H], u[CW * CH], v[CW * CH], yuv_rgba[W * H * 4];
    rgb_to_yuv(rgb, y, u, v);
    yuv_to_rgba(y, u, v, yuv_rgba);
    AcclimateFrame yf = rgba_frame(yuv_rgba, W, H);
    AcclimatePrediction want = predict(&yf, "yuv_reference");

    size_t ys = W + PAD, ylen;
    unsigned char *yp = plane(H, ys, W, &ylen);
    for (int j = 0; j < H; j++) memcpy(yp + j * ys, y + j * W, W);

    for (int nv21 = 0; nv21 < 2; nv21++) {
        size_t cs = 2 * CW + PAD, clen;
        unsigned char *c = plane(CH, cs, 2 * CW, &clen);
        for (int j = 0; j < CH; j++) {
            for (int i = 0; i < CW; i++) {
                c[j * cs + 2 * i + nv21] = u[j * CW + i];
                c[j * cs + 2 * i + 1 - nv21] = v[j * CW + i];
            }
        }
        AcclimateFrame f;
        memset(&f, 0, sizeof f);
        f.width = W, f.height = H, f.format = nv21 ? ACCLIMATE_NV21 : ACCLIMATE_NV12;
        f.planes[0] = (AcclimatePlane){yp, ylen, (uint32_t)ys, 1};
        f.planes[1] = (AcclimatePlane){c, clen, (uint32_t)cs, 2};
        const char *name = nv21 ? "nv21_padded" : "nv12_padded";
        p = predict(&f, name);
        EXPECT(close_to(&p, &want), name, "top %u %.5f vs the decoded picture's %u %.5f", p.classes[0], p.probs[0],
               want.classes[0], want.probs[0]);
        if (nv21) {
            /* NV21 bytes read as NV12 swap the chroma: another picture. */
            f.format = ACCLIMATE_NV12;
            p = predict(&f, "nv21_as_nv12");
            EXPECT(!close_to(&p, &want), "chroma_order_changes_the_prediction", "swapped chroma predicts the same");
        }
        free(c);
    }

    /* I420: three planes, padded. */
    {
        size_t cs = CW + PAD, ulen, vlen;
        unsigned char *up = plane(CH, cs, CW, &ulen), *vp = plane(CH, cs, CW, &vlen);
        for (int j = 0; j < CH; j++) memcpy(up + j * cs, u + j * CW, CW), memcpy(vp + j * cs, v + j * CW, CW);
        AcclimateFrame f;
        memset(&f, 0, sizeof f);
        f.width = W, f.height = H, f.format = ACCLIMATE_I420;
        f.planes[0] = (AcclimatePlane){yp, ylen, (uint32_t)ys, 1};
        f.planes[1] = (AcclimatePlane){up, ulen, (uint32_t)cs, 1};
        f.planes[2] = (AcclimatePlane){vp, vlen, (uint32_t)cs, 1};
        p = predict(&f, "i420_padded");
        EXPECT(close_to(&p, &want), "i420_padded", "top %u %.5f vs %u %.5f", p.classes[0], p.probs[0], want.classes[0],
               want.probs[0]);
        free(up), free(vp);
    }

    /* Android's YUV_420_888 from a semi-planar camera buffer: U and V planes interleave with
     * pixel stride 2, V one byte after U, and each plane's buffer ends at its last sample (the
     * length Image.Plane.getBuffer() reports: row_stride * (rows - 1) + 2 * (cols - 1) + 1). */
    {
        size_t cs = 2 * CW + PAD, ilen;
        unsigned char *uv = plane(CH, cs, 2 * CW, &ilen);
        for (int j = 0; j < CH; j++) {
            for (int i = 0; i < CW; i++) uv[j * cs + 2 * i] = u[j * CW + i], uv[j * cs + 2 * i + 1] = v[j * CW + i];
        }
        size_t plane_len = cs * (CH - 1) + 2 * (CW - 1) + 1;
        AcclimateFrame f;
        memset(&f, 0, sizeof f);
        f.width = W, f.height = H, f.format = ACCLIMATE_I420;
        f.planes[0] = (AcclimatePlane){yp, ylen, (uint32_t)ys, 1};
        f.planes[1] = (AcclimatePlane){uv, plane_len, (uint32_t)cs, 2};
        f.planes[2] = (AcclimatePlane){uv + 1, plane_len, (uint32_t)cs, 2};
        p = predict(&f, "i420_android_pixel_stride_2");
        EXPECT(close_to(&p, &want), "i420_android_pixel_stride_2", "top %u %.5f vs %u %.5f", p.classes[0], p.probs[0],
               want.classes[0], want.probs[0]);
        /* One byte short of that: refused, not read past. */
        f.planes[2].len = plane_len - 1;
        AcclimateStatus s = acclimate_session_push_frame(g_session, &f, &p);
        EXPECT(s == ACCLIMATE_FRAME_ERROR, "i420_android_one_byte_short", "status %d", (int)s);
        free(uv);
    }
    free(yp);

    acclimate_session_free(g_session);
    return finish();
}
