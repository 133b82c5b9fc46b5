/* Threads: two sessions adapting on two threads at once predict exactly as one session does
 * alone; a session moves between threads; two threads pushing into one session at once are
 * serialized (every frame gets its own index); messages are per thread. */
#include <pthread.h>

#include "common.h"

#define W 32
#define H 32
#define FRAMES 10

static const char *g_model;
static AcclimatePrediction g_reference[FRAMES];

static AcclimateStatus push_picture(AcclimateSession *s, unsigned seed, AcclimatePrediction *out) {
    unsigned char rgb[W * H * 3], rgba[W * H * 4];
    picture_rgb(rgb, W, H, seed);
    rgb_to_rgba(rgb, rgba, W * H);
    AcclimateFrame f = rgba_frame(rgba, W, H);
    return acclimate_session_push_frame(s, &f, out);
}

struct job {
    AcclimateSession *session; /* NULL: the thread opens its own */
    unsigned first_seed, count;
    AcclimatePrediction out[2 * FRAMES];
    AcclimateStatus status;
    char error[512];
};

static void *run_job(void *arg) {
    struct job *j = arg;
    AcclimateSession *s = j->session;
    j->status = ACCLIMATE_OK;
    if (!s) j->status = acclimate_session_new(g_model, CONFIG_TENT, &s);
    for (unsigned i = 0; j->status == ACCLIMATE_OK && i < j->count; i++) {
        j->status = push_picture(s, j->first_seed + i, &j->out[i]);
    }
    if (j->status != ACCLIMATE_OK) snprintf(j->error, sizeof j->error, "%s", acclimate_last_error());
    if (!j->session) acclimate_session_free(s);
    return NULL;
}

static void *make_error(void *arg) {
    (void)arg;
    acclimate_session_reset(NULL);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.onnx\n", argv[0]);
        return 2;
    }
    g_model = argv[1];

    /* The reference: one session, alone, on the main thread. */
    AcclimateSession *s = NULL;
    MUST(acclimate_session_new(g_model, CONFIG_TENT, &s));
    for (unsigned i = 0; i < FRAMES; i++) MUST(push_picture(s, i, &g_reference[i]));
    acclimate_session_free(s);

    /* Two sessions on two threads at once. */
    static struct job jobs[2];
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        memset(&jobs[i], 0, sizeof jobs[i]);
        jobs[i].count = FRAMES;
        pthread_create(&t[i], NULL, run_job, &jobs[i]);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        EXPECT(jobs[i].status == ACCLIMATE_OK, "concurrent_sessions_succeed", "thread %d: %d: %s", i,
               (int)jobs[i].status, jobs[i].error);
        int same = 0;
        for (unsigned k = 0; k < FRAMES; k++) same += same_prediction(&jobs[i].out[k], &g_reference[k]);
        EXPECT(same == FRAMES, "concurrent_sessions_predict_as_alone", "thread %d: %d of %d identical", i, same,
               FRAMES);
    }

    /* One session, created here, used by another thread, then here again. */
    MUST(acclimate_session_new(g_model, CONFIG_TENT, &s));
    struct job *half = &jobs[0];
    memset(half, 0, sizeof *half);
    half->session = s, half->count = FRAMES / 2;
    pthread_create(&t[0], NULL, run_job, half);
    pthread_join(t[0], NULL);
    EXPECT(half->status == ACCLIMATE_OK, "session_used_from_another_thread", "%d: %s", (int)half->status, half->error);
    int same = 0;
    for (unsigned k = 0; k < FRAMES / 2; k++) same += same_prediction(&half->out[k], &g_reference[k]);
    for (unsigned k = FRAMES / 2; k < FRAMES; k++) {
        AcclimatePrediction p;
        MUST(push_picture(s, k, &p));
        same += same_prediction(&p, &g_reference[k]);
    }
    EXPECT(same == FRAMES, "session_moves_between_threads", "%d of %d identical", same, FRAMES);

    /* Misuse: two threads push into one session at once. The calls are serialized. */
    for (int i = 0; i < 2; i++) {
        memset(&jobs[i], 0, sizeof jobs[i]);
        jobs[i].session = s, jobs[i].first_seed = 50 + 10 * i, jobs[i].count = 6;
        pthread_create(&t[i], NULL, run_job, &jobs[i]);
    }
    int seen[2 * FRAMES + 12] = {0}, ok = 1;
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        ok = ok && jobs[i].status == ACCLIMATE_OK;
        for (unsigned k = 0; k < 6; k++) {
            uint64_t idx = jobs[i].out[k].frame_index;
            if (idx >= FRAMES && idx < FRAMES + 12) seen[idx]++;
            else ok = 0;
        }
    }
    for (int k = FRAMES; k < FRAMES + 12; k++) ok = ok && seen[k] == 1;
    AcclimateStats st;
    MUST(acclimate_session_stats(s, &st));
    EXPECT(ok && st.frames == FRAMES + 12, "one_session_two_threads_serialized",
           "statuses %d/%d, %llu frames; every index 10..21 must appear once", (int)jobs[0].status,
           (int)jobs[1].status, (unsigned long long)st.frames);
    acclimate_session_free(s);

    /* Messages are per thread: another thread's failure leaves this thread's message alone. */
    acclimate_session_num_classes(NULL, NULL);
    char mine[512];
    snprintf(mine, sizeof mine, "%s", acclimate_last_error());
    pthread_create(&t[0], NULL, make_error, NULL);
    pthread_join(t[0], NULL);
    EXPECT(strcmp(mine, acclimate_last_error()) == 0 && strstr(mine, "num_classes"), "last_error_is_per_thread",
           "now '%s', was '%s'", acclimate_last_error(), mine);
    return finish();
}
