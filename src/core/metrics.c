#include "core/metrics.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>

enum metric_type { METRIC_COUNTER, METRIC_GAUGE, METRIC_HISTOGRAM };

static const double bucket_bounds[] = {
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05,    0.1,    0.25,    0.5,    1.0,   2.5,    5.0,   10.0,
};
#define BUCKET_COUNT (sizeof(bucket_bounds) / sizeof(bucket_bounds[0]))

struct metrics_counter {
    _Atomic uint64_t value;
};

struct metrics_gauge {
    _Atomic int64_t value;
    int64_t (*fn)(void *);
    void *arg;
};

struct metrics_histogram {
    _Atomic uint64_t buckets[BUCKET_COUNT]; /* not cumulative */
    _Atomic uint64_t count;
    _Atomic uint64_t sum_ns;
};

typedef struct series {
    struct series *next;
    char *labels;
    union {
        struct metrics_counter counter;
        struct metrics_gauge gauge;
        struct metrics_histogram histogram;
    } u;
} series_t;

typedef struct family {
    struct family *next;
    char *name;
    char *help;
    enum metric_type type;
    series_t *series;
    series_t **tail;
} family_t;

static family_t *families;
static family_t **families_tail = &families;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;

static char *xstrdup(const char *s)
{
    char *d = strdup(s ? s : "");
    if (d == NULL)
        abort();
    return d;
}

/* Finds or creates the series; the caller holds registry_lock. Families
 * keep registration order so the output is stable between scrapes. */
static series_t *find_series(const char *name, const char *help,
                             enum metric_type type, const char *labels)
{
    family_t *f;
    series_t *s;

    if (labels == NULL)
        labels = "";
    for (f = families; f; f = f->next) {
        if (strcmp(f->name, name) == 0)
            break;
    }
    if (f == NULL) {
        f = calloc(1, sizeof(*f));
        if (f == NULL)
            abort();
        f->name = xstrdup(name);
        f->help = xstrdup(help);
        f->type = type;
        f->tail = &f->series;
        *families_tail = f;
        families_tail = &f->next;
    }
    for (s = f->series; s; s = s->next) {
        if (strcmp(s->labels, labels) == 0)
            return s;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        abort();
    s->labels = xstrdup(labels);
    *f->tail = s;
    f->tail = &s->next;
    return s;
}

metrics_counter_t *metrics_counter(const char *name, const char *help,
                                   const char *labels)
{
    pthread_mutex_lock(&registry_lock);
    series_t *s = find_series(name, help, METRIC_COUNTER, labels);
    pthread_mutex_unlock(&registry_lock);
    return &s->u.counter;
}

void metrics_counter_add(metrics_counter_t *c, uint64_t n)
{
    atomic_fetch_add_explicit(&c->value, n, memory_order_relaxed);
}

uint64_t metrics_counter_value(const metrics_counter_t *c)
{
    return atomic_load_explicit(&c->value, memory_order_relaxed);
}

metrics_gauge_t *metrics_gauge(const char *name, const char *help,
                               const char *labels)
{
    pthread_mutex_lock(&registry_lock);
    series_t *s = find_series(name, help, METRIC_GAUGE, labels);
    pthread_mutex_unlock(&registry_lock);
    return &s->u.gauge;
}

void metrics_gauge_set(metrics_gauge_t *g, int64_t v)
{
    atomic_store_explicit(&g->value, v, memory_order_relaxed);
}

void metrics_gauge_add(metrics_gauge_t *g, int64_t delta)
{
    atomic_fetch_add_explicit(&g->value, delta, memory_order_relaxed);
}

int64_t metrics_gauge_value(const metrics_gauge_t *g)
{
    if (g->fn)
        return g->fn(g->arg);
    return atomic_load_explicit(&g->value, memory_order_relaxed);
}

void metrics_gauge_func(const char *name, const char *help,
                        const char *labels, int64_t (*fn)(void *), void *arg)
{
    pthread_mutex_lock(&registry_lock);
    series_t *s = find_series(name, help, METRIC_GAUGE, labels);
    s->u.gauge.fn = fn;
    s->u.gauge.arg = arg;
    pthread_mutex_unlock(&registry_lock);
}

metrics_histogram_t *metrics_histogram(const char *name, const char *help,
                                       const char *labels)
{
    pthread_mutex_lock(&registry_lock);
    series_t *s = find_series(name, help, METRIC_HISTOGRAM, labels);
    pthread_mutex_unlock(&registry_lock);
    return &s->u.histogram;
}

void metrics_histogram_observe(metrics_histogram_t *h, double seconds)
{
    size_t i;

    if (seconds < 0)
        seconds = 0;
    for (i = 0; i < BUCKET_COUNT; i++) {
        if (seconds <= bucket_bounds[i]) {
            atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
            break;
        }
    }
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, (uint64_t)(seconds * 1e9),
                              memory_order_relaxed);
}

typedef struct out {
    char *buf;
    size_t len;
    size_t cap;
    int failed;
} out_t;

static void out_printf(out_t *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void out_printf(out_t *o, const char *fmt, ...)
{
    va_list ap;

    if (o->failed)
        return;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = 1;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap * 2 + (size_t)n;
        char *b = realloc(o->buf, cap);
        if (b == NULL) {
            o->failed = 1;
            return;
        }
        o->buf = b;
        o->cap = cap;
    }
}

/* Writes `name{labels,extra}` with the braces left out when both are
 * empty. */
static void out_series_name(out_t *o, const char *name, const char *suffix,
                            const char *labels, const char *extra)
{
    int has_labels = labels[0] != '\0';
    int has_extra = extra != NULL && extra[0] != '\0';

    out_printf(o, "%s%s", name, suffix);
    if (has_labels || has_extra) {
        out_printf(o, "{%s%s%s}", labels, has_labels && has_extra ? "," : "",
                   has_extra ? extra : "");
    }
}

static void render_histogram(out_t *o, const family_t *f, const series_t *s)
{
    const struct metrics_histogram *h = &s->u.histogram;
    uint64_t cumulative = 0;
    char le[48];

    for (size_t i = 0; i < BUCKET_COUNT; i++) {
        cumulative += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
        snprintf(le, sizeof(le), "le=\"%g\"", bucket_bounds[i]);
        out_series_name(o, f->name, "_bucket", s->labels, le);
        out_printf(o, " %llu\n", (unsigned long long)cumulative);
    }
    uint64_t count = atomic_load_explicit(&h->count, memory_order_relaxed);
    out_series_name(o, f->name, "_bucket", s->labels, "le=\"+Inf\"");
    out_printf(o, " %llu\n", (unsigned long long)count);
    out_series_name(o, f->name, "_sum", s->labels, NULL);
    out_printf(o, " %.9f\n",
               (double)atomic_load_explicit(&h->sum_ns, memory_order_relaxed) /
                   1e9);
    out_series_name(o, f->name, "_count", s->labels, NULL);
    out_printf(o, " %llu\n", (unsigned long long)count);
}

char *metrics_render(size_t *len)
{
    static const char *type_names[] = {"counter", "gauge", "histogram"};
    out_t o = {.cap = 16384};

    o.buf = malloc(o.cap);
    if (o.buf == NULL)
        return NULL;
    pthread_mutex_lock(&registry_lock);
    for (const family_t *f = families; f; f = f->next) {
        out_printf(&o, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help,
                   f->name, type_names[f->type]);
        for (const series_t *s = f->series; s; s = s->next) {
            if (f->type == METRIC_HISTOGRAM) {
                render_histogram(&o, f, s);
                continue;
            }
            out_series_name(&o, f->name, "", s->labels, NULL);
            if (f->type == METRIC_COUNTER) {
                out_printf(&o, " %llu\n",
                           (unsigned long long)metrics_counter_value(
                               &s->u.counter));
            } else {
                out_printf(&o, " %lld\n",
                           (long long)metrics_gauge_value(&s->u.gauge));
            }
        }
    }
    pthread_mutex_unlock(&registry_lock);
    if (o.failed) {
        free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}
