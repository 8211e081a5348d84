/* Token buckets, daily quotas and connection counts (see limits.h). */
#include "pipeline/limits.h"

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pthread.h>

#include "core/errors.h"

#define SHARD_COUNT 64
#define SHARD_BUCKETS 256
#define SWEEP_INTERVAL_MS 60000
#define MS_PER_DAY 86400000ull

/* One device or address. Buckets are in tokens; `full_at_ms` is when
 * every bucket is full again if nothing more is taken. */
typedef struct entry {
    struct entry *next;
    uint64_t last_ms;    /* last refill, and last use for eviction */
    uint64_t full_at_ms; /* buckets full again from then on */
    double readings;     /* tokens of the readings (or connection) bucket */
    double bytes;        /* tokens of the bytes bucket */
    uint64_t day;        /* UTC day number of day_count */
    uint64_t day_count;  /* readings taken on `day` */
    uint64_t connections; /* open sessions of a device */
    char key[];
} entry_t;

typedef struct shard {
    pthread_mutex_t lock;
    entry_t *buckets[SHARD_BUCKETS];
    size_t count;
    uint64_t next_sweep_ms;
} shard_t;

typedef struct table {
    shard_t shards[SHARD_COUNT];
    size_t shard_max; /* entries per shard */
} table_t;

struct limits {
    limits_options_t opts;
    table_t devices;
    table_t addresses;
    atomic_uint_fast64_t total;
    atomic_uint_fast64_t per_listener[LIMITS_LISTENER_COUNT];
};

uint64_t limits_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* FNV-1a: the keys are short and not chosen to collide on purpose, and a
 * bad spread only makes one shard slower. */
static uint64_t hash_key(const char *key)
{
    uint64_t h = 14695981039346656037ull;

    for (; *key != '\0'; key++) {
        h ^= (unsigned char)*key;
        h *= 1099511628211ull;
    }
    return h;
}

static void table_init(table_t *t, uint64_t table_size)
{
    t->shard_max = table_size / SHARD_COUNT;
    if (t->shard_max == 0)
        t->shard_max = 1;
    for (size_t i = 0; i < SHARD_COUNT; i++)
        pthread_mutex_init(&t->shards[i].lock, NULL);
}

static void table_free(table_t *t)
{
    for (size_t i = 0; i < SHARD_COUNT; i++) {
        shard_t *s = &t->shards[i];

        for (size_t b = 0; b < SHARD_BUCKETS; b++) {
            entry_t *e = s->buckets[b], *next;

            for (; e != NULL; e = next) {
                next = e->next;
                free(e);
            }
        }
        pthread_mutex_destroy(&s->lock);
    }
}

/* Returns 1 when dropping `e` changes nothing a client can see. */
static bool entry_idle(const entry_t *e, uint64_t now_ms)
{
    return e->connections == 0 && now_ms >= e->full_at_ms &&
           (e->day_count == 0 || e->day != now_ms / MS_PER_DAY);
}

/* Drops idle entries, or the least recently used entry without
 * connections when `evict` is set and nothing was idle. Called with the
 * shard's lock held. */
static void shard_sweep(shard_t *s, uint64_t now_ms, bool evict)
{
    entry_t **oldest = NULL;
    size_t dropped = 0;

    for (size_t b = 0; b < SHARD_BUCKETS; b++) {
        entry_t **link = &s->buckets[b];

        while (*link != NULL) {
            entry_t *e = *link;

            if (entry_idle(e, now_ms)) {
                *link = e->next;
                free(e);
                dropped++;
                continue;
            }
            if (e->connections == 0 &&
                (oldest == NULL || e->last_ms < (*oldest)->last_ms))
                oldest = link;
            link = &e->next;
        }
    }
    s->count -= dropped;
    s->next_sweep_ms = now_ms + SWEEP_INTERVAL_MS;
    if (dropped == 0 && evict && oldest != NULL) {
        entry_t *e = *oldest;

        *oldest = e->next;
        free(e);
        s->count--;
    }
}

/* Finds or creates the entry of `key` and returns it with its shard
 * locked in `*locked`. Returns NULL, with no lock held, when a new entry
 * could not be allocated or the shard is full of connected entries. */
static entry_t *table_get(table_t *t, const char *key, uint64_t now_ms,
                          shard_t **locked)
{
    uint64_t h = hash_key(key);
    shard_t *s = &t->shards[h % SHARD_COUNT];
    size_t b = (size_t)((h / SHARD_COUNT) % SHARD_BUCKETS);
    size_t len = strlen(key);
    entry_t *e;

    pthread_mutex_lock(&s->lock);
    if (now_ms >= s->next_sweep_ms)
        shard_sweep(s, now_ms, false);
    for (e = s->buckets[b]; e != NULL; e = e->next) {
        if (strcmp(e->key, key) == 0) {
            *locked = s;
            return e;
        }
    }
    if (s->count >= t->shard_max)
        shard_sweep(s, now_ms, true);
    if (s->count >= t->shard_max)
        goto fail;
    e = calloc(1, sizeof(*e) + len + 1);
    if (e == NULL)
        goto fail;
    memcpy(e->key, key, len + 1);
    e->last_ms = now_ms;
    e->readings = NAN; /* filled to capacity on first use */
    e->bytes = NAN;
    e->day = now_ms / MS_PER_DAY;
    e->next = s->buckets[b];
    s->buckets[b] = e;
    s->count++;
    *locked = s;
    return e;
fail:
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Looks up an existing entry only. */
static entry_t *table_find(table_t *t, const char *key, shard_t **locked)
{
    uint64_t h = hash_key(key);
    shard_t *s = &t->shards[h % SHARD_COUNT];
    size_t b = (size_t)((h / SHARD_COUNT) % SHARD_BUCKETS);

    pthread_mutex_lock(&s->lock);
    for (entry_t *e = s->buckets[b]; e != NULL; e = e->next) {
        if (strcmp(e->key, key) == 0) {
            *locked = s;
            return e;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static size_t table_entries(table_t *t)
{
    size_t n = 0;

    for (size_t i = 0; i < SHARD_COUNT; i++) {
        pthread_mutex_lock(&t->shards[i].lock);
        n += t->shards[i].count;
        pthread_mutex_unlock(&t->shards[i].lock);
    }
    return n;
}

static void table_sweep(table_t *t, uint64_t now_ms)
{
    for (size_t i = 0; i < SHARD_COUNT; i++) {
        pthread_mutex_lock(&t->shards[i].lock);
        shard_sweep(&t->shards[i], now_ms, false);
        pthread_mutex_unlock(&t->shards[i].lock);
    }
}

int limits_create(const limits_options_t *opts, limits_t **out)
{
    limits_t *l = calloc(1, sizeof(*l));

    if (l == NULL)
        return ING_ENOMEM;
    l->opts = *opts;
    table_init(&l->devices, opts->table_size);
    table_init(&l->addresses, opts->table_size);
    *out = l;
    return 0;
}

void limits_destroy(limits_t *l)
{
    if (l == NULL)
        return;
    table_free(&l->devices);
    table_free(&l->addresses);
    free(l);
}

/* One token bucket: `rate` tokens per second up to `cap`. */
typedef struct bucket {
    double *tokens;
    double rate;
    double cap;
} bucket_t;

/* Adds what accrued since `since_ms`. A clock that went back adds
 * nothing. */
static void refill(bucket_t *k, uint64_t since_ms, uint64_t now_ms)
{
    double elapsed = now_ms > since_ms ? (double)(now_ms - since_ms) : 0;

    if (isnan(*k->tokens)) {
        *k->tokens = k->cap;
        return;
    }
    *k->tokens += elapsed * k->rate / 1000.0;
    if (*k->tokens > k->cap)
        *k->tokens = k->cap;
}

/* Returns 0 when `n` tokens may be taken now, or the milliseconds until
 * they may. A request above the capacity needs a full bucket. */
static uint64_t wait_ms(const bucket_t *k, double n)
{
    double need = n < k->cap ? n : k->cap;
    double wait;

    if (*k->tokens >= need)
        return 0;
    wait = ceil((need - *k->tokens) * 1000.0 / k->rate);
    return wait < 1 ? 1 : (uint64_t)wait;
}

/* Returns the milliseconds until `k` is full again. */
static uint64_t until_full_ms(const bucket_t *k)
{
    if (*k->tokens >= k->cap)
        return 0;
    return (uint64_t)ceil((k->cap - *k->tokens) * 1000.0 / k->rate);
}

int limits_take_readings(limits_t *l, const char *device_id,
                         const config_limits_t *lim, uint64_t readings,
                         uint64_t bytes, uint64_t now_ms,
                         uint64_t *retry_after_ms)
{
    uint64_t today = now_ms / MS_PER_DAY;
    uint64_t wait = 0, full = 0, w;
    bucket_t rk = {0}, bk = {0};
    shard_t *s;
    entry_t *e;

    *retry_after_ms = 0;
    if (lim->readings_per_second == 0 && lim->bytes_per_second == 0 &&
        lim->daily_readings == 0)
        return 0;
    e = table_get(&l->devices, device_id, now_ms, &s);
    if (e == NULL)
        return 0; /* NOTE: an untracked device is not limited. */
    if (e->day != today) {
        e->day = today;
        e->day_count = 0;
    }
    if (lim->daily_readings > 0 &&
        e->day_count + readings > lim->daily_readings) {
        *retry_after_ms = (today + 1) * MS_PER_DAY - now_ms;
        pthread_mutex_unlock(&s->lock);
        return ING_EQUOTA;
    }
    if (lim->readings_per_second > 0) {
        rk.tokens = &e->readings;
        rk.rate = (double)lim->readings_per_second;
        rk.cap = (double)(lim->burst > 0 ? lim->burst
                                         : lim->readings_per_second);
        refill(&rk, e->last_ms, now_ms);
        wait = wait_ms(&rk, (double)readings);
    }
    if (lim->bytes_per_second > 0) {
        /* The bytes bucket holds one second of traffic. */
        bk.tokens = &e->bytes;
        bk.rate = (double)lim->bytes_per_second;
        bk.cap = bk.rate;
        refill(&bk, e->last_ms, now_ms);
        w = wait_ms(&bk, (double)bytes);
        if (w > wait)
            wait = w;
    }
    e->last_ms = now_ms;
    if (wait > 0) {
        *retry_after_ms = wait;
        pthread_mutex_unlock(&s->lock);
        return ING_ERATE;
    }
    if (rk.tokens != NULL) {
        *rk.tokens -= (double)readings;
        full = until_full_ms(&rk);
    }
    if (bk.tokens != NULL) {
        *bk.tokens -= (double)bytes;
        w = until_full_ms(&bk);
        if (w > full)
            full = w;
    }
    e->full_at_ms = now_ms + full;
    /* Counting only under a quota lets an idle entry expire. */
    if (lim->daily_readings > 0)
        e->day_count += readings;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* Charges one connection to `address`. Returns 0 or the wait in ms. */
static uint64_t take_connection_token(limits_t *l, const char *address,
                                      uint64_t now_ms)
{
    bucket_t k;
    uint64_t wait;
    shard_t *s;
    entry_t *e = table_get(&l->addresses, address, now_ms, &s);

    if (e == NULL)
        return 0;
    k.tokens = &e->readings;
    k.rate = (double)l->opts.connection_rate;
    k.cap = (double)(l->opts.connection_burst > 0 ? l->opts.connection_burst
                                                  : l->opts.connection_rate);
    refill(&k, e->last_ms, now_ms);
    e->last_ms = now_ms;
    wait = wait_ms(&k, 1);
    if (wait == 0) {
        *k.tokens -= 1;
        e->full_at_ms = now_ms + until_full_ms(&k);
    }
    pthread_mutex_unlock(&s->lock);
    return wait;
}

/* Adds one to `counter` unless it is at `max` (0 = unlimited). */
static bool counter_acquire(atomic_uint_fast64_t *counter, uint64_t max)
{
    uint_fast64_t v = atomic_load(counter);

    do {
        if (max > 0 && v >= max)
            return false;
    } while (!atomic_compare_exchange_weak(counter, &v, v + 1));
    return true;
}

int limits_connection_open(limits_t *l, enum limits_listener listener,
                           const char *address, uint64_t now_ms,
                           uint64_t *retry_after_ms)
{
    *retry_after_ms = 0;
    if (l->opts.connection_rate > 0 && address != NULL) {
        *retry_after_ms = take_connection_token(l, address, now_ms);
        if (*retry_after_ms > 0)
            return ING_ERATE;
    }
    if (!counter_acquire(&l->total, l->opts.max_connections))
        return ING_EFULL;
    if (!counter_acquire(&l->per_listener[listener],
                         l->opts.listener_max[listener])) {
        atomic_fetch_sub(&l->total, 1);
        return ING_EFULL;
    }
    return 0;
}

void limits_connection_close(limits_t *l, enum limits_listener listener)
{
    atomic_fetch_sub(&l->per_listener[listener], 1);
    atomic_fetch_sub(&l->total, 1);
}

uint64_t limits_connection_count(limits_t *l, enum limits_listener listener)
{
    if (listener == LIMITS_LISTENER_COUNT)
        return atomic_load(&l->total);
    return atomic_load(&l->per_listener[listener]);
}

int limits_device_connect(limits_t *l, const char *device_id, uint64_t max,
                          uint64_t now_ms)
{
    shard_t *s;
    entry_t *e;
    int rc = 0;

    if (max == 0)
        return 0;
    e = table_get(&l->devices, device_id, now_ms, &s);
    if (e == NULL)
        return ING_EQUOTA;
    if (e->connections >= max)
        rc = ING_EQUOTA;
    else
        e->connections++;
    e->last_ms = now_ms;
    pthread_mutex_unlock(&s->lock);
    return rc;
}

void limits_device_disconnect(limits_t *l, const char *device_id)
{
    shard_t *s;
    entry_t *e = table_find(&l->devices, device_id, &s);

    if (e == NULL)
        return;
    if (e->connections > 0)
        e->connections--;
    pthread_mutex_unlock(&s->lock);
}

size_t limits_device_entries(limits_t *l)
{
    return table_entries(&l->devices);
}

size_t limits_address_entries(limits_t *l)
{
    return table_entries(&l->addresses);
}

void limits_sweep(limits_t *l, uint64_t now_ms)
{
    table_sweep(&l->devices, now_ms);
    table_sweep(&l->addresses, now_ms);
}

void limits_peer_address(const char *peer, char *out, size_t size)
{
    const char *colon;
    size_t len;

    if (peer[0] == '[') {
        const char *close = strchr(peer, ']');

        len = close != NULL ? (size_t)(close - peer - 1) : strlen(peer);
        snprintf(out, size, "%.*s", (int)len, close != NULL ? peer + 1 : peer);
        return;
    }
    colon = strrchr(peer, ':');
    /* More than one colon without brackets is a bare IPv6 address. */
    if (colon == NULL || strchr(peer, ':') != colon) {
        snprintf(out, size, "%s", peer);
        return;
    }
    snprintf(out, size, "%.*s", (int)(colon - peer), peer);
}
