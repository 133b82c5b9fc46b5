/* The whole ABI on good input: version, sessions, the frame protocol's indices, top-k and step
 * schedule, counters, reset, free. */
#include "common.h"

#define W 40
#define H 36

static AcclimateStatus push_picture(AcclimateSession *s, unsigned seed, AcclimatePrediction *out) {
    static unsigned char rgb[W * H * 3], rgba[W * H * 4];
    picture_rgb(rgb, W, H, seed);
    rgb_to_rgba(rgb, rgba, W * H);
    AcclimateFrame f = rgba_frame(rgba, W, H);
    f.timestamp_ns = (int64_t)seed * 33333333;
    return acclimate_session_push_frame(s, &f, out);
}

static void check_top_k(const AcclimatePrediction *p, const char *name) {
    int ok = p->k == 5;
    float sum = 0;
    for (uint32_t i = 0; ok && i < p->k; i++) {
        ok = p->classes[i] < 10 && p->probs[i] >= 0.0f && p->probs[i] <= 1.0f;
        if (i > 0) ok = ok && p->probs[i] <= p->probs[i - 1];
        for (uint32_t j = 0; ok && j < i; j++) ok = p->classes[i] != p->classes[j];
        sum += p->probs[i];
    }
    EXPECT(ok && sum <= 1.0001f && sum > 0.0f, name, "k %u, classes %u %u %u, probs %g %g %g, sum %g", p->k,
           p->classes[0], p->classes[1], p->classes[2], p->probs[0], p->probs[1], p->probs[2], sum);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.onnx\n", argv[0]);
        return 2;
    }
    const char *model = argv[1];

    const char *v = acclimate_version();
    EXPECT(v != NULL && v[0] >= '0' && v[0] <= '9', "version", "version '%s'", v ? v : "(null)");
    EXPECT(acclimate_last_error() != NULL, "last_error_never_null", "NULL before any call");

    AcclimateSession *s = NULL;
    MUST(acclimate_session_new(model, CONFIG_TENT, &s));
    EXPECT(s != NULL, "session_new_sets_out", "out is NULL after OK");
    uint32_t classes = 0;
    MUST(acclimate_session_num_classes(s, &classes));
    EXPECT(classes == 10, "num_classes", "%u classes, the SVHN network has 10", classes);

    /* window 8, adapt_every 4: steps start after frames 3 and 7 and run in the background; each
     * lands (and is reported) adapt_every frames later: the first at frame 7. */
    AcclimatePrediction p;
    for (unsigned i = 0; i < 10; i++) {
        MUST(push_picture(s, i, &p));
        EXPECT(p.frame_index == i, "frame_index_counts_from_0", "frame %u has index %llu", i,
               (unsigned long long)p.frame_index);
        int due = i == 7;
        EXPECT(p.stepped == due, "stepped_every_adapt_every", "frame %u: stepped %d, expected %d", i, p.stepped, due);
        EXPECT(p.latency_ms > 0.0f && p.latency_ms < 600000.0f, "latency_ms", "frame %u: %g ms", i, p.latency_ms);
        check_top_k(&p, "top_k_sorted_distinct");
    }
    AcclimateStats st;
    MUST(acclimate_session_stats(s, &st));
    EXPECT(st.frames == 10 && st.steps == 1 && st.steps_skipped == 0, "stats", "frames %llu steps %llu skipped %llu",
           (unsigned long long)st.frames, (unsigned long long)st.steps, (unsigned long long)st.steps_skipped);

    /* Reset: the unadapted model and an empty window, indices going on; it predicts as a fresh
     * session does. */
    MUST(acclimate_session_reset(s));
    AcclimateSession *fresh = NULL;
    MUST(acclimate_session_new(model, CONFIG_TENT, &fresh));
    int same = 1, moved = 0;
    for (unsigned i = 0; i < 6; i++) {
        AcclimatePrediction a, b;
        MUST(push_picture(s, 100 + i, &a));
        MUST(push_picture(fresh, 100 + i, &b));
        EXPECT(a.frame_index == 10 + i && b.frame_index == i, "reset_keeps_indices", "indices %llu and %llu",
               (unsigned long long)a.frame_index, (unsigned long long)b.frame_index);
        b.frame_index = a.frame_index;
        same = same && same_prediction(&a, &b);
        if (i > 0 && a.probs[0] != p.probs[0]) moved = 1;
        p = a;
    }
    EXPECT(same, "reset_predicts_as_a_fresh_session", "the reset session's predictions differ from a fresh one's");
    EXPECT(moved, "predictions_vary_between_frames", "every frame got the same top probability");
    acclimate_session_free(fresh);
    acclimate_session_free(s);

    /* No [adapt]: the default preset (a method with gradient steps), [stream] defaults
     * (adapt_every 16): the step started after frame 15 lands at frame 31. */
    const char *preset_only = "[preprocess]\nspec = \"" SVHN_SPEC "\"\n";
    MUST(acclimate_session_new(model, preset_only, &s));
    int steps_ok = 1;
    for (unsigned i = 0; i < 32; i++) {
        MUST(push_picture(s, i, &p));
        steps_ok = steps_ok && p.stepped == (i == 31);
    }
    EXPECT(steps_ok, "default_preset_steps_every_16_frames", "the step started at frame 15 did not land at frame 31 alone");
    acclimate_session_free(s);

    /* No adaptation: no steps, and the same frame predicts the same. */
    MUST(acclimate_session_new(model, CONFIG_SOURCE, &s));
    AcclimatePrediction first;
    MUST(push_picture(s, 7, &first));
    MUST(push_picture(s, 7, &p));
    first.frame_index = p.frame_index;
    EXPECT(same_prediction(&first, &p) && !p.stepped, "source_is_stateless", "the same frame predicted differently");
    MUST(acclimate_session_stats(s, &st));
    EXPECT(st.steps == 0 && st.frames == 2, "source_takes_no_steps", "%llu steps", (unsigned long long)st.steps);
    acclimate_session_free(s);

    acclimate_session_free(NULL);
    EXPECT(1, "free_null_is_a_no_op", "unreachable");
    return finish();
}
