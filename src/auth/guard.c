/* Failed-authentication limits per source address.
 *
 * A fixed-size table of addresses, shared by all workers behind one mutex.
 * Entries live in a preallocated array, chained from hash buckets and kept
 * on a least-recently-used list, so a full table forgets the address seen
 * least recently and memory never grows past auth.guard_table_size.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"
#include "core/ids.h"
#include "core/metrics.h"

#define WINDOW_MS 60000 /* failures count within one minute */
#define NO_ENTRY UINT32_MAX

struct guard_entry {
    uint8_t key[16]; /* IPv4 as ::ffff:a.b.c.d, IPv6 as its /64 prefix */
    uint32_t next;   /* next entry in the same bucket */
    uint32_t newer;  /* towards the most recently used entry */
    uint32_t older;  /* towards the least recently used entry */
    int64_t window_start_ms;
    uint64_t failures;
    int64_t blocked_until_ms;
};

struct auth_guard {
    pthread_mutex_t lock;
    uint64_t max_failures;
    uint64_t block_ms;
    uint64_t seed; /* random, so that clients cannot aim at one bucket */
    size_t size;
    size_t used;
    size_t bucket_mask;
    uint32_t *buckets;
    struct guard_entry *entries;
    uint32_t newest;
    uint32_t oldest;
    metrics_counter_t *blocked_total;
    metrics_gauge_t *entries_gauge;
};

/* Monotonic milliseconds, since blocks must not move with the wall
 * clock. */
static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct auth_guard *auth_guard_create(uint64_t max_failures, uint64_t block_ms,
                                     size_t size)
{
    struct auth_guard *g = calloc(1, sizeof(*g));
    size_t bucket_count = 16;

    if (g == NULL)
        return NULL;
    if (size < 16)
        size = 16;
    while (bucket_count < size)
        bucket_count *= 2;
    g->entries = calloc(size, sizeof(*g->entries));
    g->buckets = malloc(bucket_count * sizeof(*g->buckets));
    if (g->entries == NULL || g->buckets == NULL) {
        auth_guard_destroy(g);
        return NULL;
    }
    for (size_t i = 0; i < bucket_count; i++)
        g->buckets[i] = NO_ENTRY;
    if (ids_random_bytes((uint8_t *)&g->seed, sizeof(g->seed)) != 0)
        g->seed = (uint64_t)now_ms() * UINT64_C(0x9e3779b97f4a7c15);
    pthread_mutex_init(&g->lock, NULL);
    g->max_failures = max_failures;
    g->block_ms = block_ms;
    g->size = size;
    g->bucket_mask = bucket_count - 1;
    g->newest = NO_ENTRY;
    g->oldest = NO_ENTRY;
    g->blocked_total = metrics_counter(
        "ingestd_auth_blocked_total",
        "Authentication attempts rejected because their source address "
        "had too many failures",
        NULL);
    g->entries_gauge = metrics_gauge(
        "ingestd_auth_guard_entries",
        "Source addresses in the failed-authentication table", NULL);
    metrics_gauge_set(g->entries_gauge, 0);
    return g;
}

void auth_guard_destroy(struct auth_guard *g)
{
    if (g == NULL)
        return;
    if (g->entries != NULL && g->buckets != NULL)
        pthread_mutex_destroy(&g->lock);
    free(g->entries);
    free(g->buckets);
    free(g);
}

/* Writes the table key of `addr`. Returns 0, or -1 for an address family
 * that is not counted (a Unix socket, for example). */
static int address_key(const struct sockaddr *addr, uint8_t key[16])
{
    static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0, 0xff, 0xff};

    memset(key, 0, 16);
    if (addr == NULL)
        return -1;
    if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;

        memcpy(key, v4_mapped, sizeof(v4_mapped));
        memcpy(key + 12, &in->sin_addr, 4);
        return 0;
    }
    if (addr->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;

        /* An IPv4-mapped address is one IPv4 host, not a /64. */
        if (memcmp(in6->sin6_addr.s6_addr, v4_mapped, 12) == 0) {
            memcpy(key, in6->sin6_addr.s6_addr, 16);
            return 0;
        }
        /* One subscriber usually gets a whole /64, so the prefix is
         * counted as one source. */
        memcpy(key, in6->sin6_addr.s6_addr, 8);
        return 0;
    }
    return -1;
}

static size_t bucket_of(const struct auth_guard *g, const uint8_t key[16])
{
    uint64_t a;
    uint64_t b;
    uint64_t h;

    memcpy(&a, key, 8);
    memcpy(&b, key + 8, 8);
    /* A seeded multiply-xorshift mix. Entries chain, so a crafted
     * collision costs chain length, never correctness. */
    h = (a ^ g->seed) * UINT64_C(0x9e3779b97f4a7c15);
    h ^= h >> 29;
    h = (h ^ b) * UINT64_C(0xbf58476d1ce4e5b9);
    h ^= h >> 32;
    return (size_t)h & g->bucket_mask;
}

static uint32_t find_entry(const struct auth_guard *g, const uint8_t key[16])
{
    uint32_t i = g->buckets[bucket_of(g, key)];

    while (i != NO_ENTRY && memcmp(g->entries[i].key, key, 16) != 0)
        i = g->entries[i].next;
    return i;
}

static void lru_unlink(struct auth_guard *g, uint32_t i)
{
    struct guard_entry *e = &g->entries[i];

    if (e->newer != NO_ENTRY)
        g->entries[e->newer].older = e->older;
    else
        g->newest = e->older;
    if (e->older != NO_ENTRY)
        g->entries[e->older].newer = e->newer;
    else
        g->oldest = e->newer;
}

static void lru_push_newest(struct auth_guard *g, uint32_t i)
{
    struct guard_entry *e = &g->entries[i];

    e->newer = NO_ENTRY;
    e->older = g->newest;
    if (g->newest != NO_ENTRY)
        g->entries[g->newest].newer = i;
    g->newest = i;
    if (g->oldest == NO_ENTRY)
        g->oldest = i;
}

static void bucket_remove(struct auth_guard *g, uint32_t i)
{
    uint32_t *link = &g->buckets[bucket_of(g, g->entries[i].key)];

    while (*link != i)
        link = &g->entries[*link].next;
    *link = g->entries[i].next;
}

/* Returns a fresh entry for `key`, reusing the least recently used entry
 * when the table is full. */
static uint32_t insert_entry(struct auth_guard *g, const uint8_t key[16])
{
    uint32_t i;
    size_t b;

    if (g->used < g->size) {
        i = (uint32_t)g->used++;
        metrics_gauge_set(g->entries_gauge, (int64_t)g->used);
    } else {
        i = g->oldest;
        lru_unlink(g, i);
        bucket_remove(g, i);
    }
    memset(&g->entries[i], 0, sizeof(g->entries[i]));
    memcpy(g->entries[i].key, key, 16);
    b = bucket_of(g, key);
    g->entries[i].next = g->buckets[b];
    g->buckets[b] = i;
    lru_push_newest(g, i);
    return i;
}

uint64_t auth_guard_check(auth_t *a, const struct sockaddr *addr)
{
    struct auth_guard *g = a->guard;
    uint64_t wait_s = 0;
    uint8_t key[16];
    int64_t now;
    uint32_t i;

    if (g->max_failures == 0 || address_key(addr, key) != 0)
        return 0;
    now = now_ms();
    pthread_mutex_lock(&g->lock);
    i = find_entry(g, key);
    if (i != NO_ENTRY && g->entries[i].blocked_until_ms > now) {
        int64_t left_ms = g->entries[i].blocked_until_ms - now;

        wait_s = (uint64_t)(left_ms + 999) / 1000;
    }
    pthread_mutex_unlock(&g->lock);
    if (wait_s > 0)
        metrics_counter_add(g->blocked_total, 1);
    return wait_s;
}

void auth_guard_failed(auth_t *a, const struct sockaddr *addr)
{
    struct auth_guard *g = a->guard;
    struct guard_entry *e;
    uint8_t key[16];
    int64_t now;
    uint32_t i;

    if (g->max_failures == 0 || address_key(addr, key) != 0)
        return;
    now = now_ms();
    pthread_mutex_lock(&g->lock);
    i = find_entry(g, key);
    if (i == NO_ENTRY) {
        i = insert_entry(g, key);
    } else {
        lru_unlink(g, i);
        lru_push_newest(g, i);
    }
    e = &g->entries[i];
    if (e->failures == 0 || now - e->window_start_ms >= WINDOW_MS) {
        e->window_start_ms = now;
        e->failures = 0;
    }
    e->failures++;
    if (e->failures >= g->max_failures) {
        e->blocked_until_ms = now + (int64_t)g->block_ms;
        /* The block replaces the count, so an address starts over when
         * it ends. */
        e->failures = 0;
    }
    pthread_mutex_unlock(&g->lock);
}

size_t auth_guard_entries(auth_t *a)
{
    size_t used;

    pthread_mutex_lock(&a->guard->lock);
    used = a->guard->used;
    pthread_mutex_unlock(&a->guard->lock);
    return used;
}

/* Parses "a.b.c.d:port" or "[v6]:port" into `ss`. Returns 0 or -1. */
static int parse_peer(const char *peer, struct sockaddr_storage *ss)
{
    char host[64];
    const char *end;
    size_t len;

    memset(ss, 0, sizeof(*ss));
    if (peer == NULL)
        return -1;
    if (peer[0] == '[') {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;

        end = strchr(peer, ']');
        if (end == NULL || (size_t)(end - peer - 1) >= sizeof(host))
            return -1;
        len = (size_t)(end - peer - 1);
        memcpy(host, peer + 1, len);
        host[len] = '\0';
        in6->sin6_family = AF_INET6;
        return inet_pton(AF_INET6, host, &in6->sin6_addr) == 1 ? 0 : -1;
    }
    end = strrchr(peer, ':');
    len = end != NULL ? (size_t)(end - peer) : strlen(peer);
    if (len >= sizeof(host))
        return -1;
    memcpy(host, peer, len);
    host[len] = '\0';
    ((struct sockaddr_in *)ss)->sin_family = AF_INET;
    return inet_pton(AF_INET, host, &((struct sockaddr_in *)ss)->sin_addr) ==
                   1
               ? 0
               : -1;
}

uint64_t auth_guard_check_peer(auth_t *a, const char *peer)
{
    struct sockaddr_storage ss;

    if (parse_peer(peer, &ss) != 0)
        return 0;
    return auth_guard_check(a, (const struct sockaddr *)&ss);
}

void auth_guard_failed_peer(auth_t *a, const char *peer)
{
    struct sockaddr_storage ss;

    if (parse_peer(peer, &ss) == 0)
        auth_guard_failed(a, (const struct sockaddr *)&ss);
}
