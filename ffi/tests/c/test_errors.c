/* Bad input of every kind: the right status, a message that says what is wrong, and a session
 * that goes on after a bad frame. */
#include <pthread.h>

#include "common.h"

#define W 32
#define H 32

/* The status is `want` and this thread's message is fresh (not the previous one) and holds
 * `needle`. */
static char g_previous[4096];
static void expect_error(AcclimateStatus got, AcclimateStatus want, const char *needle, const char *name) {
    const char *msg = acclimate_last_error();
    EXPECT(got == want, name, "status %d, expected %d (%s)", (int)got, (int)want, msg);
    EXPECT(msg != NULL && msg[0] != '\0', name, "empty message");
    EXPECT(strcmp(msg, g_previous) != 0, name, "the message is the previous call's: %s", msg);
    EXPECT(strstr(msg, needle) != NULL, name, "'%s' not in the message: %s", needle, msg);
    snprintf(g_previous, sizeof g_previous, "%s", msg);
    if (getenv("ACCLIMATE_TEST_VERBOSE")) printf("  %s: %s\n", name, msg);
}

static void write_file(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(bytes, 1, n, f) != n) {
        printf("FAIL cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

static void *other_thread(void *arg) {
    (void)arg;
    /* Messages are per thread: a fresh thread has none, whatever main did. */
    return (void *)(acclimate_last_error()[0] == '\0' ? "ok" : NULL);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.onnx SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    const char *model = argv[1], *dir = argv[2];
    char path[1024];
    AcclimateSession *s = (AcclimateSession *)&path; /* not NULL: session_new must clear it */

    /* Arguments. */
    expect_error(acclimate_session_new(NULL, CONFIG_SOURCE, &s), ACCLIMATE_INVALID_ARGUMENT, "model_path is NULL",
                 "new_null_model_path");
    EXPECT(s == NULL, "new_clears_out_on_error", "*out is not NULL after an error");
    expect_error(acclimate_session_new(model, NULL, &s), ACCLIMATE_INVALID_ARGUMENT, "config_toml is NULL",
                 "new_null_config");
    expect_error(acclimate_session_new(model, CONFIG_SOURCE, NULL), ACCLIMATE_INVALID_ARGUMENT, "out is NULL",
                 "new_null_out");
    expect_error(acclimate_session_new("", CONFIG_SOURCE, &s), ACCLIMATE_INVALID_ARGUMENT, "empty", "new_empty_path");

    /* The model. */
    snprintf(path, sizeof path, "%s/no-such-model.onnx", dir);
    expect_error(acclimate_session_new(path, CONFIG_SOURCE, &s), ACCLIMATE_IO_ERROR, "no-such-model.onnx",
                 "missing_model_file");
    snprintf(path, sizeof path, "%s/not-a-model.onnx", dir);
    write_file(path, "[adapt]\nmethod = 1\n", 19);
    expect_error(acclimate_session_new(path, CONFIG_SOURCE, &s), ACCLIMATE_MODEL_ERROR, "not-a-model.onnx",
                 "file_that_is_not_onnx");

    /* The config. */
    expect_error(acclimate_session_new(model, "[adapt]\nmethod = \"tent\"\n", &s), ACCLIMATE_CONFIG_ERROR,
                 "[preprocess]", "missing_preprocess");
    expect_error(acclimate_session_new(model, "[adapt\nmethod = ", &s), ACCLIMATE_CONFIG_ERROR, "line 1",
                 "bad_toml");
    expect_error(acclimate_session_new(model, "", &s), ACCLIMATE_CONFIG_ERROR, "[preprocess]", "empty_config");
    expect_error(acclimate_session_new(model, "[adapt]\nmethd = \"tent\"\n[preprocess]\nspec = \"size=32\"\n", &s),
                 ACCLIMATE_CONFIG_ERROR, "`adapt.methd`", "unknown_key");
    expect_error(acclimate_session_new(model, "[optimizer]\nlr = -1.0\n[preprocess]\nspec = \"size=32\"\n", &s),
                 ACCLIMATE_CONFIG_ERROR, "`optimizer.lr`", "value_out_of_range");
    expect_error(acclimate_session_new(model, "[preprocess]\nspec = \"size=0\"\n", &s), ACCLIMATE_CONFIG_ERROR,
                 "`preprocess.spec`", "bad_preprocess_spec");
    expect_error(acclimate_session_new(model, "[preprocess]\nspec = \"size=28\"\n", &s), ACCLIMATE_CONFIG_ERROR,
                 "preprocess.spec", "spec_does_not_fit_the_model");
    expect_error(acclimate_session_new(model, "[stream]\nmode = \"batch\"\n[preprocess]\nspec = \"size=32\"\n", &s),
                 ACCLIMATE_CONFIG_ERROR, "`stream.mode`", "batch_mode_refused");
    expect_error(acclimate_session_new(model, "[preprocess]\nspec = \"size=32\xff\"\n", &s), ACCLIMATE_CONFIG_ERROR,
                 "UTF-8", "config_not_utf8");
    EXPECT(s == NULL, "no_session_after_errors", "*out set after a failure");

    MUST(acclimate_session_new(model, CONFIG_SOURCE, &s));
    uint32_t n;
    expect_error(acclimate_session_num_classes(NULL, &n), ACCLIMATE_INVALID_ARGUMENT, "session is NULL",
                 "num_classes_null_session");
    expect_error(acclimate_session_num_classes(s, NULL), ACCLIMATE_INVALID_ARGUMENT, "out is NULL",
                 "num_classes_null_out");

    /* Frames. */
    static unsigned char rgb[W * H * 3], rgba[W * H * 4], y[W * H], uv[W * H / 2];
    picture_rgb(rgb, W, H, 1);
    rgb_to_rgba(rgb, rgba, W * H);
    memset(y, 100, sizeof y);
    memset(uv, 128, sizeof uv);
    const AcclimateFrame good = rgba_frame(rgba, W, H);
    AcclimateFrame f = good;
    AcclimatePrediction p;
    expect_error(acclimate_session_push_frame(NULL, &f, &p), ACCLIMATE_INVALID_ARGUMENT, "session is NULL",
                 "push_null_session");
    expect_error(acclimate_session_push_frame(s, NULL, &p), ACCLIMATE_INVALID_ARGUMENT, "frame is NULL",
                 "push_null_frame");
    expect_error(acclimate_session_push_frame(s, &f, NULL), ACCLIMATE_INVALID_ARGUMENT, "out is NULL",
                 "push_null_out");

    int bad = 0;
    f = good, f.planes[0].data = NULL;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "data is NULL", "null_plane"), bad++;
    f = good, f.planes[0].len -= 1;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "len is 4095", "short_plane"), bad++;
    f = good, f.planes[0].row_stride = W * 4 - 4;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "row_stride 124", "row_stride_small"),
        bad++;
    f = good, f.planes[0].pixel_stride = 3;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "pixel_stride 3", "pixel_stride_small"),
        bad++;
    f = good, f.format = (AcclimatePixelFormat)99;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "format 99", "bad_format_value"), bad++;
    f = good, f.format = (AcclimatePixelFormat)-1;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "is not an AcclimatePixelFormat",
                 "negative_format_value"),
        bad++;
    f = good, f.rotation = 45;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "rotation 45", "rotation_45"), bad++;
    f = good, f.rotation = 360;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "rotation 360", "rotation_360"), bad++;
    f = good, f.width = 0;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "0x32", "zero_width"), bad++;
    f = good, f.width = 0xFFFFFFFFu, f.height = 0xFFFFFFFFu;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "RGBA", "huge_sizes_small_buffer"),
        bad++;
    /* A packed frame claiming to be NV12 has no chroma plane. */
    f = good, f.format = ACCLIMATE_NV12;
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "planes[1] (UV): data is NULL",
                 "nv12_without_chroma"),
        bad++;
    memset(&f, 0, sizeof f);
    f.width = W, f.height = H, f.format = ACCLIMATE_I420;
    f.planes[0] = (AcclimatePlane){y, sizeof y, W, 1};
    f.planes[1] = (AcclimatePlane){uv, W / 2 * H / 2, W / 2, 1};
    f.planes[2] = (AcclimatePlane){uv + W / 2 * H / 2, W / 2 * H / 2 - 1, W / 2, 1};
    expect_error(acclimate_session_push_frame(s, &f, &p), ACCLIMATE_FRAME_ERROR, "planes[2] (V)", "i420_short_v"),
        bad++;
    f.planes[2].len += 1;
    MUST(acclimate_session_push_frame(s, &f, &p));
    EXPECT(p.frame_index == (uint64_t)bad, "bad_frames_take_an_index", "the good frame after %d bad ones has index %llu",
           bad, (unsigned long long)p.frame_index);
    /* mirror is a C bool; any non-zero byte in it is true, never undefined behaviour. */
    f = good;
    memset(&f.mirror, 2, 1);
    AcclimateStatus st = acclimate_session_push_frame(s, &f, &p);
    EXPECT(st == ACCLIMATE_OK, "mirror_byte_2_is_true", "status %d: %s", (int)st, acclimate_last_error());
    f = good, f.mirror = true;
    AcclimatePrediction q;
    MUST(acclimate_session_push_frame(s, &f, &q));
    EXPECT(p.classes[0] == q.classes[0] && p.probs[0] == q.probs[0], "mirror_byte_2_is_true", "differs from true");

    /* State files and the other calls. */
    expect_error(acclimate_session_save_state(NULL, "x"), ACCLIMATE_INVALID_ARGUMENT, "session is NULL",
                 "save_null_session");
    expect_error(acclimate_session_save_state(s, NULL), ACCLIMATE_INVALID_ARGUMENT, "path is NULL", "save_null_path");
    expect_error(acclimate_session_load_state(NULL, "x"), ACCLIMATE_INVALID_ARGUMENT, "session is NULL",
                 "load_null_session");
    expect_error(acclimate_session_load_state(s, NULL), ACCLIMATE_INVALID_ARGUMENT, "path is NULL", "load_null_path");
    expect_error(acclimate_session_reset(NULL), ACCLIMATE_INVALID_ARGUMENT, "session is NULL", "reset_null_session");
    AcclimateStats stats;
    expect_error(acclimate_session_stats(NULL, &stats), ACCLIMATE_INVALID_ARGUMENT, "session is NULL",
                 "stats_null_session");
    expect_error(acclimate_session_stats(s, NULL), ACCLIMATE_INVALID_ARGUMENT, "out is NULL", "stats_null_out");
    snprintf(path, sizeof path, "%s/no-such-dir/state.bin", dir);
    expect_error(acclimate_session_save_state(s, path), ACCLIMATE_IO_ERROR, "no-such-dir", "save_into_missing_dir");
    expect_error(acclimate_session_load_state(s, path), ACCLIMATE_IO_ERROR, "no-such-dir", "load_missing_file");
    snprintf(path, sizeof path, "%s/garbage.state", dir);
    write_file(path, "this is not a state file, not even safetensors", 46);
    expect_error(acclimate_session_load_state(s, path), ACCLIMATE_STATE_ERROR, "garbage.state", "load_garbage");

    /* The session went on through all of it. */
    f = good;
    MUST(acclimate_session_push_frame(s, &f, &p));
    MUST(acclimate_session_stats(s, &stats));
    EXPECT(stats.frames == (uint64_t)bad + 4 && p.frame_index == stats.frames - 1, "session_goes_on",
           "%llu frames, last index %llu", (unsigned long long)stats.frames, (unsigned long long)p.frame_index);
    acclimate_session_free(s);

    pthread_t t;
    void *verdict = NULL;
    pthread_create(&t, NULL, other_thread, NULL);
    pthread_join(t, &verdict);
    EXPECT(verdict != NULL, "last_error_is_per_thread", "a fresh thread sees another thread's message");
    return finish();
}
