/* Memory read bandwidth, measured the way a decode step reads its weights: every core streams its
 * share of a buffer far larger than the last-level cache. Four independent vector accumulators per
 * thread so that the adds never limit the rate. Built and loaded by bench/membw.py. */
#include <pthread.h>
#include <stddef.h>
#include <time.h>
#include <immintrin.h>

struct part { const float *a; size_t n; float sum; };

static void *read_part(void *arg) {
    struct part *p = arg;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i + 32 <= p->n; i += 32) {
        s0 = _mm256_add_ps(s0, _mm256_load_ps(p->a + i));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(p->a + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(p->a + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(p->a + i + 24));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    p->sum = 0;
    for (int i = 0; i < 8; i++) p->sum += lanes[i];
    return NULL;
}

/* Seconds to read n floats of a (32-byte aligned, n a multiple of 32 * threads) with `threads`
 * threads, 1 <= threads <= 64; *sum keeps the reads from being optimised away. */
double read_seconds(const float *a, size_t n, int threads, float *sum) {
    pthread_t tid[64];
    struct part parts[64];
    struct timespec t0, t1;
    size_t share = n / threads;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int t = 0; t < threads; t++) {
        parts[t] = (struct part){a + t * share, share, 0};
        if (t) pthread_create(&tid[t], NULL, read_part, &parts[t]);
    }
    read_part(&parts[0]);
    *sum = parts[0].sum;
    for (int t = 1; t < threads; t++) {
        pthread_join(tid[t], NULL);
        *sum += parts[t].sum;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
}
