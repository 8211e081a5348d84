/* Measures the memory of the idempotency index. The program fills an
 * index with N committed keys like msg_id keys: device ids of 12 bytes,
 * keys of 36-byte UUID text and one message id each. It prints the index's
 * own byte count, the growth of the resident set size, and the time of one
 * insert and one lookup.
 *
 * Usage: idempotency_memory [N]   (default 1000000, at most 50000000)
 * Built and run by bench/idempotency.sh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pipeline/idempotency.h"

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    }
    fclose(f);
    return kib;
}

static double seconds_since(const struct timespec *start)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) +
           (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000000;
    idempotency_options_t opts = {
        .window_ms = 24 * 3600 * 1000,
        .max_keys = (uint64_t)n,
    };
    int64_t now = idempotency_now_ms();
    uint8_t id[IDEMPOTENCY_ID_BYTES] = {0};
    char err[256], device[32], key[40];
    idempotency_t *ix;
    struct timespec start;
    uint8_t *ids;
    size_t nids;
    long before;

    if (n < 1 || n > 50000000) {
        fprintf(stderr, "idempotency_memory: N must be 1 to 50000000\n");
        return 2;
    }
    before = rss_kib();
    if (idempotency_open(&opts, &ix, err, sizeof(err)) != 0) {
        fprintf(stderr, "idempotency_memory: %s\n", err);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < n; i++) {
        snprintf(device, sizeof(device), "device-%05ld", i % 10000);
        snprintf(key, sizeof(key), "%08lx-0000-4000-8000-%012lx", i, i * 7);
        memcpy(id, &i, sizeof(i));
        if (idempotency_claim(ix, device, key, strlen(key), &opts, now, &ids,
                              &nids) != IDEMPOTENCY_NEW ||
            idempotency_commit(ix, device, key, strlen(key), &opts, now, id,
                               1) != 0) {
            fprintf(stderr, "idempotency_memory: insert %ld failed\n", i);
            return 1;
        }
    }
    double fill_s = seconds_since(&start);
    long after = rss_kib();

    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < n; i++) {
        snprintf(device, sizeof(device), "device-%05ld", i % 10000);
        snprintf(key, sizeof(key), "%08lx-0000-4000-8000-%012lx", i, i * 7);
        if (idempotency_claim(ix, device, key, strlen(key), &start, now, &ids,
                              &nids) != IDEMPOTENCY_REPLAY) {
            fprintf(stderr, "idempotency_memory: lookup %ld missed\n", i);
            return 1;
        }
        free(ids);
    }
    double lookup_s = seconds_since(&start);

    printf("keys=%ld index_bytes=%zu rss_growth_kib=%ld "
           "bytes_per_key_rss=%.0f insert_ns=%.0f lookup_ns=%.0f\n",
           n, idempotency_bytes(ix), after - before,
           (double)(after - before) * 1024 / (double)n, fill_s * 1e9 / n,
           lookup_s * 1e9 / n);
    idempotency_close(ix);
    return 0;
}
