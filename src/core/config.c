/* Loading of the YAML configuration file into a config_t.
 *
 * The file is read with libyaml's event API into a small tree of nodes that
 * keep their line numbers, so that every error can name its line. Every
 * scalar directive is described once in the `directives` table (name, type,
 * bounds, default). The device_types and sinks sections have their own
 * parsers because their keys are names chosen by the operator, but the
 * values inside them go through the same table-driven code.
 */
#include "core/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <yaml.h>

#include "core/errors.h"
#include "core/log.h"

/* The recursive walks over the tree (freeing, converting inline schemas)
 * stay well inside the stack with this bound, and no sensible config or
 * schema nests deeper. */
#define MAX_DEPTH 64

/* Longest device type or sink name. Names appear in file names, metric
 * labels and log lines. */
#define NAME_MAX_LEN 64

/* Longest part of a bad value quoted in an error message. */
#define SHOWN_VALUE_MAX 60

#define KIB (UINT64_C(1) << 10)
#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)
#define TIB (UINT64_C(1) << 40)

#define MS_PER_S UINT64_C(1000)
#define MS_PER_M (60 * MS_PER_S)
#define MS_PER_H (60 * MS_PER_M)
#define MS_PER_D (24 * MS_PER_H)

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* One YAML node with the line it starts on. */
typedef struct node node_t;
struct node {
    yaml_node_type_t kind;
    char *text;          /* scalar value, NUL-terminated */
    size_t len;          /* scalar length, which may count inner NUL bytes */
    char *tag;           /* explicit tag such as "tag:yaml.org,2002:str" */
    bool plain;          /* plain scalar without a tag, resolved by content */
    unsigned long line;  /* 1-based */
    node_t **items;      /* mapping: key, value, key, value...; sequence */
    size_t count;
    size_t cap;
};

enum directive_type {
    TYPE_STRING,   /* any non-empty string */
    TYPE_NAME,     /* 1 to NAME_MAX_LEN characters from a-z, 0-9, _ and - */
    TYPE_PATH,     /* resolved against the config file's folder */
    TYPE_BOOL,     /* true or false */
    TYPE_INT,      /* decimal integer within min..max */
    TYPE_DURATION, /* milliseconds, written with a unit */
    TYPE_SECONDS,  /* a duration stored in whole seconds, rounded up */
    TYPE_SIZE,     /* bytes, written with an optional unit */
    TYPE_ENUM,     /* one of `choices`, stored as its index */
    TYPE_LISTEN,   /* host:port with a numeric IPv4 or [IPv6] host */
};

/* The directive accepts "" and stores NULL, which disables the feature. */
#define FLAG_EMPTY_DISABLES 1

/* A directive: where its value goes and what values it accepts. */
typedef struct directive {
    const char *name; /* dotted path, such as "http.max_body_bytes" */
    enum directive_type type;
    size_t offset; /* of the field in config_t or config_sink_t */
    size_t size;   /* of that field: an int, a uint64_t or a char * */
    uint64_t min;  /* bounds in bytes, milliseconds or plain numbers */
    uint64_t max;
    const char *default_value;  /* parsed like text from the file */
    const char *const *choices; /* TYPE_ENUM: names, NULL-terminated */
    int flags;
} directive_t;

static const char *const log_levels[] = {"debug", "info", "warn", "error",
                                         NULL};
static const char *const durabilities[] = {"fsync", "none", NULL};
static const char *const sink_kinds[] = {"file", NULL};

/* An enum directive stores the index of the name it matched. */
_Static_assert(LOG_LEVEL_DEBUG == 0 && LOG_LEVEL_INFO == 1 &&
                   LOG_LEVEL_WARN == 2 && LOG_LEVEL_ERROR == 3,
               "log_levels[] must follow enum log_level");
_Static_assert(SPOOL_DURABILITY_FSYNC == 0 && SPOOL_DURABILITY_NONE == 1,
               "durabilities[] must follow enum spool_durability");
_Static_assert(CONFIG_SINK_FILE == 0,
               "sink_kinds[] must follow enum config_sink_kind");

#define CFG(member)                                                            \
    offsetof(config_t, member), sizeof(((config_t *)0)->member)
#define SINK(member)                                                           \
    offsetof(config_sink_t, member), sizeof(((config_sink_t *)0)->member)

/* Every directive outside device_types and sinks. A default of NULL means
 * the value is derived after loading (registry.path from data_dir). */
static const directive_t directives[] = {
    /* name, type, field, min, max, default, choices, flags */
    {"log.level", TYPE_ENUM, CFG(log_level), 0, 0, "info", log_levels, 0},
    {"data_dir", TYPE_PATH, CFG(data_dir), 0, 0, "./data", NULL, 0},
    {"registry.path", TYPE_PATH, CFG(registry.path), 0, 0, NULL, NULL, 0},
    {"registry.key_grace_period", TYPE_DURATION, CFG(registry.key_grace_ms),
     0, 365 * MS_PER_D, "24h", NULL, 0},
    {"registry.reload_interval", TYPE_DURATION,
     CFG(registry.reload_interval_ms), 0, MS_PER_D, "2s", NULL, 0},
    {"http.listen", TYPE_LISTEN, CFG(http.listen), 0, 0, "127.0.0.1:8080",
     NULL, 0},
    {"http.workers", TYPE_INT, CFG(http.workers), 0, 64, "0", NULL, 0},
    {"http.max_header_bytes", TYPE_SIZE, CFG(http.max_header_bytes), KIB, MIB,
     "16KiB", NULL, 0},
    {"http.max_body_bytes", TYPE_SIZE, CFG(http.max_body_bytes), KIB, GIB,
     "1MiB", NULL, 0},
    {"http.max_readings_per_request", TYPE_INT,
     CFG(http.max_readings_per_request), 1, 1000000, "1000", NULL, 0},
    {"http.header_timeout", TYPE_DURATION, CFG(http.header_timeout_ms), 100,
     MS_PER_H, "10s", NULL, 0},
    {"http.body_timeout", TYPE_DURATION, CFG(http.body_timeout_ms), 100,
     MS_PER_H, "30s", NULL, 0},
    {"http.idle_timeout", TYPE_DURATION, CFG(http.idle_timeout_ms), 100,
     MS_PER_D, "60s", NULL, 0},
    {"http.max_connections", TYPE_INT, CFG(http.max_connections), 1, 1000000,
     "10000", NULL, 0},
    {"http.retry_after", TYPE_SECONDS, CFG(http.retry_after_s), 1, MS_PER_H,
     "1s", NULL, 0},
    {"admin.listen", TYPE_LISTEN, CFG(admin.listen), 0, 0, "127.0.0.1:9100",
     NULL, FLAG_EMPTY_DISABLES},
    {"spool.durability", TYPE_ENUM, CFG(spool.durability), 0, 0, "fsync",
     durabilities, 0},
    {"spool.segment_size", TYPE_SIZE, CFG(spool.segment_size), 64 * KIB, TIB,
     "64MiB", NULL, 0},
    {"spool.max_size", TYPE_SIZE, CFG(spool.max_size), 128 * KIB, UINT64_MAX,
     "1GiB", NULL, 0},
    {"shutdown_timeout", TYPE_DURATION, CFG(shutdown_timeout_ms), 0, MS_PER_H,
     "10s", NULL, 0},
    {"default_device_type", TYPE_NAME, CFG(default_device_type), 0, 0,
     "default", NULL, 0},
};

/* The keys of one entry of the sinks sequence. The default path,
 * <data_dir>/out, is set after loading. */
static const directive_t sink_directives[] = {
    {"name", TYPE_NAME, SINK(name), 0, 0, NULL, NULL, 0},
    {"type", TYPE_ENUM, SINK(kind), 0, 0, "file", sink_kinds, 0},
    {"path", TYPE_PATH, SINK(path), 0, 0, NULL, NULL, 0},
    {"rotate_size", TYPE_SIZE, SINK(rotate_size), 64 * KIB, TIB, "64MiB",
     NULL, 0},
    {"fsync", TYPE_BOOL, SINK(fsync), 0, 1, "true", NULL, 0},
    {"batch_records", TYPE_INT, SINK(batch_records), 1, 100000, "512", NULL,
     0},
};

static const directive_t schema_path_directive = {
    "schema",
    TYPE_PATH,
    offsetof(config_device_type_t, schema_path),
    sizeof(char *),
    0,
    0,
    NULL,
    NULL,
    0,
};

/* State of one config_load call. */
typedef struct load {
    config_t *cfg;
    const char *file; /* as given by the caller, for messages */
    char *err;
    size_t errlen;
    unsigned long lines[ARRAY_LEN(directives)]; /* 0 while at default */
    unsigned long device_types_line;
    const node_t *sinks_node;
} load_t;

/* Outcomes of parse_value besides 0 and ING_ENOMEM. */
enum { VALUE_INVALID = 1, VALUE_OUT_OF_RANGE = 2 };

__attribute__((format(printf, 3, 4))) static int
fail(load_t *ld, unsigned long line, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (ld->errlen == 0)
        return ING_ECONFIG;
    if (line > 0)
        n = snprintf(ld->err, ld->errlen, "%s:%lu: ", ld->file, line);
    else
        n = snprintf(ld->err, ld->errlen, "%s: ", ld->file);
    if (n >= 0 && (size_t)n < ld->errlen) {
        va_start(ap, fmt);
        vsnprintf(ld->err + n, ld->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return ING_ECONFIG;
}

static int fail_nomem(load_t *ld)
{
    if (ld->errlen > 0)
        snprintf(ld->err, ld->errlen, "%s: out of memory", ld->file);
    return ING_ENOMEM;
}

/* Formats `text` for an error message: in double quotes, with quotes,
 * backslashes and control characters escaped, and cut after
 * SHOWN_VALUE_MAX bytes. Returns `buf`, which needs 4 * SHOWN_VALUE_MAX + 8
 * bytes to show the longest value whole. */
static const char *quote(char *buf, size_t size, const char *text)
{
    size_t used = 0;
    size_t i;

    buf[used++] = '"';
    for (i = 0; text[i] && i < SHOWN_VALUE_MAX; i++) {
        unsigned char c = (unsigned char)text[i];

        if (used + 8 >= size)
            break;
        if (c == '"' || c == '\\') {
            buf[used++] = '\\';
            buf[used++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            used += (size_t)snprintf(buf + used, size - used, "\\x%02x", c);
        } else {
            buf[used++] = (char)c;
        }
    }
    if (text[i]) {
        memcpy(buf + used, "...", 3);
        used += 3;
    }
    buf[used++] = '"';
    buf[used] = '\0';
    return buf;
}

/* ---- The node tree ---- */

static void node_free(node_t *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->count; i++)
        node_free(n->items[i]);
    free(n->items);
    free(n->text);
    free(n->tag);
    free(n);
}

static bool is_null(const node_t *n)
{
    static const char *const nulls[] = {"~", "null", "Null", "NULL"};

    if (n->kind != YAML_SCALAR_NODE)
        return false;
    if (n->tag)
        return strcmp(n->tag, YAML_NULL_TAG) == 0;
    if (!n->plain)
        return false;
    if (n->len == 0)
        return true;
    for (size_t i = 0; i < ARRAY_LEN(nulls); i++) {
        if (strcmp(n->text, nulls[i]) == 0)
            return true;
    }
    return false;
}

static const char *describe_node(const node_t *n)
{
    if (is_null(n))
        return "no value";
    switch (n->kind) {
    case YAML_MAPPING_NODE:
        return "a mapping";
    case YAML_SEQUENCE_NODE:
        return "a sequence";
    default:
        return "a scalar";
    }
}

/* State of the event-to-tree conversion. */
typedef struct builder {
    node_t *root;
    node_t *stack[MAX_DEPTH]; /* open mappings and sequences */
    size_t depth;
    int documents;
    bool done;
} builder_t;

static node_t *node_new(yaml_node_type_t kind, const yaml_event_t *event)
{
    node_t *n = calloc(1, sizeof *n);

    if (n) {
        n->kind = kind;
        n->line = (unsigned long)event->start_mark.line + 1;
    }
    return n;
}

static node_t *scalar_new(const yaml_event_t *event)
{
    node_t *n = node_new(YAML_SCALAR_NODE, event);
    const char *tag = (const char *)event->data.scalar.tag;

    if (!n)
        return NULL;
    n->len = event->data.scalar.length;
    n->text = malloc(n->len + 1);
    if (tag)
        n->tag = strdup(tag);
    if (!n->text || (tag && !n->tag)) {
        node_free(n);
        return NULL;
    }
    memcpy(n->text, event->data.scalar.value, n->len);
    n->text[n->len] = '\0';
    n->plain = event->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && !tag;
    return n;
}

/* Adds `n` to the open container, or makes it the root. Frees `n` when it
 * cannot be added. */
static int attach(load_t *ld, builder_t *b, node_t *n)
{
    node_t *parent;

    if (b->depth == 0) {
        b->root = n;
        return 0;
    }
    parent = b->stack[b->depth - 1];
    if (parent->count == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 8;
        node_t **items = realloc(parent->items, cap * sizeof *items);

        if (!items) {
            node_free(n);
            return fail_nomem(ld);
        }
        parent->items = items;
        parent->cap = cap;
    }
    parent->items[parent->count++] = n;

    /* Keys sit at even positions. Keys name directives and JSON members,
     * so only strings make sense there. */
    if (parent->kind == YAML_MAPPING_NODE && parent->count % 2 == 1) {
        if (n->kind != YAML_SCALAR_NODE)
            return fail(ld, n->line, "a mapping key must be a scalar, got %s",
                        describe_node(n));
        if (strlen(n->text) != n->len)
            return fail(ld, n->line, "a mapping key contains a NUL character");
    }
    return 0;
}

static int on_event(load_t *ld, builder_t *b, const yaml_event_t *event)
{
    unsigned long line = (unsigned long)event->start_mark.line + 1;
    node_t *n;
    int rc;

    switch (event->type) {
    case YAML_DOCUMENT_START_EVENT:
        if (++b->documents > 1)
            return fail(ld, line, "a second YAML document starts here, but "
                                  "the config file must contain one");
        return 0;
    case YAML_ALIAS_EVENT:
        /* Aliases would let a small file expand into a huge tree. */
        return fail(ld, line,
                    "aliases such as *%s are not supported; repeat the value "
                    "instead",
                    (const char *)event->data.alias.anchor);
    case YAML_SCALAR_EVENT:
        n = scalar_new(event);
        break;
    case YAML_SEQUENCE_START_EVENT:
        n = node_new(YAML_SEQUENCE_NODE, event);
        break;
    case YAML_MAPPING_START_EVENT:
        n = node_new(YAML_MAPPING_NODE, event);
        break;
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT:
        b->depth--;
        return 0;
    case YAML_STREAM_END_EVENT:
        b->done = true;
        return 0;
    default:
        return 0;
    }
    if (!n)
        return fail_nomem(ld);
    rc = attach(ld, b, n);
    if (rc != 0)
        return rc;
    if (n->kind != YAML_SCALAR_NODE) {
        if (b->depth == MAX_DEPTH)
            return fail(ld, line, "the config nests deeper than %d levels",
                        MAX_DEPTH);
        b->stack[b->depth++] = n;
    }
    return 0;
}

static int fail_syntax(load_t *ld, const yaml_parser_t *parser)
{
    const char *problem = parser->problem ? parser->problem : "unknown error";

    if (parser->error == YAML_MEMORY_ERROR)
        return fail_nomem(ld);
    if (parser->error == YAML_READER_ERROR)
        return fail(ld, 0, "invalid YAML input at byte %zu: %s",
                    parser->problem_offset, problem);
    if (ld->errlen == 0)
        return ING_ECONFIG;
    if (parser->context)
        snprintf(ld->err, ld->errlen,
                 "%s:%zu:%zu: YAML syntax error: %s (%s at line %zu)",
                 ld->file, parser->problem_mark.line + 1,
                 parser->problem_mark.column + 1, problem, parser->context,
                 parser->context_mark.line + 1);
    else
        snprintf(ld->err, ld->errlen, "%s:%zu:%zu: YAML syntax error: %s",
                 ld->file, parser->problem_mark.line + 1,
                 parser->problem_mark.column + 1, problem);
    return ING_ECONFIG;
}

/* Reads the file's single YAML document into a tree. Stores NULL in
 * `*root` for a file with no document. */
static int read_tree(load_t *ld, FILE *f, node_t **root)
{
    yaml_parser_t parser;
    yaml_event_t event;
    builder_t b = {0};
    int rc = 0;

    if (!yaml_parser_initialize(&parser))
        return fail_nomem(ld);
    yaml_parser_set_input_file(&parser, f);
    while (!b.done && rc == 0) {
        if (!yaml_parser_parse(&parser, &event)) {
            rc = fail_syntax(ld, &parser);
            break;
        }
        rc = on_event(ld, &b, &event);
        yaml_event_delete(&event);
    }
    yaml_parser_delete(&parser);
    if (rc != 0) {
        node_free(b.root);
        return rc;
    }
    *root = b.root;
    return 0;
}

/* Rejects a key that appears twice in `map`. `path` is the mapping's
 * dotted name, "" at the top level. */
static int check_keys(load_t *ld, const node_t *map, const char *path)
{
    for (size_t i = 2; i < map->count; i += 2) {
        const node_t *key = map->items[i];

        for (size_t j = 0; j < i; j += 2) {
            const node_t *earlier = map->items[j];

            if (earlier->len == key->len &&
                memcmp(earlier->text, key->text, key->len) == 0)
                return fail(ld, key->line,
                            "duplicate key \"%s%s%s\" (first set at line %lu)",
                            path, *path ? "." : "", key->text, earlier->line);
        }
    }
    return 0;
}

/* ---- Value parsers ---- */

/* Parses leading decimal digits of `s`. Returns 0 and stores the number
 * and the first byte after it, or -1 when there is no digit or the number
 * does not fit. */
static int parse_digits(const char *s, uint64_t *out, const char **rest)
{
    uint64_t v = 0;
    const char *p = s;

    if (*p < '0' || *p > '9')
        return -1;
    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned digit = (unsigned)(*p - '0');

        if (v > (UINT64_MAX - digit) / 10)
            return -1;
        v = v * 10 + digit;
    }
    *out = v;
    *rest = p;
    return 0;
}

/* Applies the unit `suffix` from `units`, rejecting overflow. */
static int apply_unit(uint64_t number, const char *suffix,
                      const char *const *names, const uint64_t *multipliers,
                      size_t count, uint64_t *out)
{
    for (size_t i = 0; i < count; i++) {
        if (strcmp(suffix, names[i]) != 0)
            continue;
        if (number > UINT64_MAX / multipliers[i])
            return ING_EINVAL;
        *out = number * multipliers[i];
        return 0;
    }
    return ING_EINVAL;
}

int config_parse_duration_ms(const char *s, uint64_t *out)
{
    static const char *const names[] = {"ms", "s", "m", "h", "d"};
    static const uint64_t multipliers[] = {1, MS_PER_S, MS_PER_M, MS_PER_H,
                                           MS_PER_D};
    uint64_t number;
    const char *rest;

    if (!s || parse_digits(s, &number, &rest) != 0)
        return ING_EINVAL;
    /* A bare number is ambiguous (seconds or milliseconds?) unless it is
     * zero, so only "0" may leave out the unit. */
    if (*rest == '\0') {
        if (number != 0)
            return ING_EINVAL;
        *out = 0;
        return 0;
    }
    return apply_unit(number, rest, names, multipliers, ARRAY_LEN(names), out);
}

int config_parse_size(const char *s, uint64_t *out)
{
    static const char *const names[] = {"",   "B",  "KiB", "MiB", "GiB",
                                        "TiB", "KB", "MB",  "GB",  "TB"};
    static const uint64_t multipliers[] = {
        1,    1,     KIB,        MIB,           GIB,
        TIB,  1000,  1000000,    1000000000,    UINT64_C(1000000000000),
    };
    uint64_t number;
    const char *rest;

    if (!s || parse_digits(s, &number, &rest) != 0)
        return ING_EINVAL;
    return apply_unit(number, rest, names, multipliers, ARRAY_LEN(names), out);
}

static void format_with_units(char *buf, size_t size, uint64_t value,
                              const char *const *names,
                              const uint64_t *multipliers, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (value != 0 && value % multipliers[i] == 0) {
            snprintf(buf, size, "%" PRIu64 "%s", value / multipliers[i],
                     names[i]);
            return;
        }
    }
    snprintf(buf, size, "%" PRIu64, value);
}

/* Writes a byte count in the largest binary unit that divides it. */
static void format_size(char *buf, size_t size, uint64_t bytes)
{
    static const char *const names[] = {"TiB", "GiB", "MiB", "KiB"};
    static const uint64_t multipliers[] = {TIB, GIB, MIB, KIB};

    format_with_units(buf, size, bytes, names, multipliers, ARRAY_LEN(names));
}

/* Writes milliseconds in the largest unit that divides them. */
static void format_duration(char *buf, size_t size, uint64_t ms)
{
    static const char *const names[] = {"d", "h", "m", "s", "ms"};
    static const uint64_t multipliers[] = {MS_PER_D, MS_PER_H, MS_PER_M,
                                           MS_PER_S, 1};

    format_with_units(buf, size, ms, names, multipliers, ARRAY_LEN(names));
}

static bool is_valid_name(const char *s)
{
    size_t n;

    for (n = 0; s[n]; n++) {
        char c = s[n];

        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-'))
            return false;
    }
    return n >= 1 && n <= NAME_MAX_LEN;
}

/* Checks "host:port" where host is a dotted IPv4 address or a bracketed
 * IPv6 address, and port is 1 to 65535. Host names are rejected so that
 * loading never waits on DNS. */
static bool is_valid_listen(const char *s)
{
    char host[INET6_ADDRSTRLEN];
    unsigned char addr[sizeof(struct in6_addr)];
    const char *port;
    size_t host_len;
    int family;
    uint64_t number;
    const char *rest;

    if (s[0] == '[') {
        const char *close = strchr(s, ']');

        if (!close || close[1] != ':')
            return false;
        host_len = (size_t)(close - s - 1);
        s++;
        port = close + 2;
        family = AF_INET6;
    } else {
        const char *colon = strrchr(s, ':');

        if (!colon)
            return false;
        host_len = (size_t)(colon - s);
        port = colon + 1;
        family = AF_INET;
    }
    if (host_len == 0 || host_len >= sizeof host)
        return false;
    memcpy(host, s, host_len);
    host[host_len] = '\0';
    if (inet_pton(family, host, addr) != 1)
        return false;
    if (parse_digits(port, &number, &rest) != 0 || *rest != '\0')
        return false;
    return number >= 1 && number <= 65535;
}

/* Joins `dir` and `name` with one slash. */
static char *join_path(const char *dir, size_t dir_len, const char *name)
{
    bool slash = dir_len > 0 && dir[dir_len - 1] != '/';
    size_t name_len = strlen(name);
    char *out = malloc(dir_len + slash + name_len + 1);

    if (!out)
        return NULL;
    memcpy(out, dir, dir_len);
    if (slash)
        out[dir_len] = '/';
    memcpy(out + dir_len + slash, name, name_len + 1);
    return out;
}

/* Resolves `path` against `dir`, the canonical folder of the config file.
 * Leading "./" and "../" parts are folded into `dir`: because `dir` comes
 * from realpath(3) it has no symlinks, so its lexical parent is its real
 * parent. Later parts are kept as written. */
static char *resolve_path(const char *dir, const char *path)
{
    size_t dir_len = strlen(dir);

    if (path[0] == '/')
        return strdup(path);
    for (;;) {
        if (path[0] == '.' && (path[1] == '/' || path[1] == '\0')) {
            path += 1;
        } else if (path[0] == '.' && path[1] == '.' &&
                   (path[2] == '/' || path[2] == '\0')) {
            const char *last = memrchr(dir, '/', dir_len);

            if (last)
                dir_len = last == dir ? 1 : (size_t)(last - dir);
            path += 2;
        } else {
            break;
        }
        while (*path == '/')
            path++;
    }
    if (*path == '\0')
        return strndup(dir, dir_len);
    return join_path(dir, dir_len, path);
}

static bool is_numeric(enum directive_type type)
{
    return type == TYPE_BOOL || type == TYPE_INT || type == TYPE_DURATION ||
           type == TYPE_SECONDS || type == TYPE_SIZE || type == TYPE_ENUM;
}

/* Parses `text` for directive `d`. Stores a number in `*number` or a new
 * string in `*string` (NULL for a disabled feature). Returns 0,
 * VALUE_INVALID, VALUE_OUT_OF_RANGE or ING_ENOMEM. */
static int parse_value(const directive_t *d, const char *dir, const char *text,
                       uint64_t *number, char **string)
{
    uint64_t v = 0;
    const char *rest;

    *number = 0;
    *string = NULL;
    switch (d->type) {
    case TYPE_STRING:
    case TYPE_NAME:
    case TYPE_PATH:
    case TYPE_LISTEN:
        if (text[0] == '\0' && (d->flags & FLAG_EMPTY_DISABLES))
            return 0;
        if (text[0] == '\0')
            return VALUE_INVALID;
        if (d->type == TYPE_NAME && !is_valid_name(text))
            return VALUE_INVALID;
        if (d->type == TYPE_LISTEN && !is_valid_listen(text))
            return VALUE_INVALID;
        if (d->type == TYPE_PATH)
            *string = resolve_path(dir, text);
        else
            *string = strdup(text);
        return *string ? 0 : ING_ENOMEM;
    case TYPE_BOOL:
        if (!strcmp(text, "true") || !strcmp(text, "True") ||
            !strcmp(text, "TRUE"))
            v = 1;
        else if (strcmp(text, "false") && strcmp(text, "False") &&
                 strcmp(text, "FALSE"))
            return VALUE_INVALID;
        break;
    case TYPE_ENUM:
        for (v = 0; d->choices[v]; v++) {
            if (strcmp(text, d->choices[v]) == 0)
                break;
        }
        if (!d->choices[v])
            return VALUE_INVALID;
        *number = v;
        return 0;
    case TYPE_INT:
        if (parse_digits(text, &v, &rest) != 0 || *rest != '\0')
            return VALUE_INVALID;
        break;
    case TYPE_SIZE:
        if (config_parse_size(text, &v) != 0)
            return VALUE_INVALID;
        break;
    case TYPE_DURATION:
    case TYPE_SECONDS:
        if (config_parse_duration_ms(text, &v) != 0)
            return VALUE_INVALID;
        break;
    }
    if (v < d->min || v > d->max)
        return VALUE_OUT_OF_RANGE;
    if (d->type == TYPE_SECONDS)
        v = (v + MS_PER_S - 1) / MS_PER_S;
    *number = v;
    return 0;
}

static void store_value(const directive_t *d, void *base, uint64_t number,
                        char *string)
{
    char *field = (char *)base + d->offset;

    if (!is_numeric(d->type)) {
        char *old;

        memcpy(&old, field, sizeof old);
        free(old);
        memcpy(field, &string, sizeof string);
    } else if (d->size == sizeof(uint64_t)) {
        memcpy(field, &number, sizeof number);
    } else {
        /* The bounds keep every int and enum field's value small. */
        int small = (int)number;

        memcpy(field, &small, sizeof small);
    }
}

/* Writes what `d` accepts, such as "a size such as 1MiB", into `buf`. */
static void describe_expected(const directive_t *d, int outcome, char *buf,
                              size_t size)
{
    char low[32], high[32];
    const char *noun = d->type == TYPE_SIZE ? "a size" : "a duration";
    size_t used;

    switch (d->type) {
    case TYPE_STRING:
        snprintf(buf, size, "a non-empty string");
        return;
    case TYPE_NAME:
        snprintf(buf, size,
                 "a name of 1 to %d characters from a-z, 0-9, '_' and '-'",
                 NAME_MAX_LEN);
        return;
    case TYPE_PATH:
        snprintf(buf, size, "a non-empty path");
        return;
    case TYPE_LISTEN:
        snprintf(buf, size, "an address such as %s or [::1]:%s%s",
                 d->default_value, strrchr(d->default_value, ':') + 1,
                 (d->flags & FLAG_EMPTY_DISABLES) ? ", or \"\" to disable"
                                                  : "");
        return;
    case TYPE_BOOL:
        snprintf(buf, size, "true or false");
        return;
    case TYPE_ENUM:
        used = (size_t)snprintf(buf, size, "one of");
        for (size_t i = 0; d->choices[i] && used < size; i++)
            used += (size_t)snprintf(buf + used, size - used, "%s %s",
                                     i ? "," : "", d->choices[i]);
        return;
    case TYPE_INT:
        snprintf(buf, size, "an integer from %" PRIu64 " to %" PRIu64, d->min,
                 d->max);
        return;
    case TYPE_SIZE:
    case TYPE_DURATION:
    case TYPE_SECONDS:
        break;
    }
    if (d->type == TYPE_SIZE) {
        format_size(low, sizeof low, d->min);
        format_size(high, sizeof high, d->max);
    } else {
        format_duration(low, sizeof low, d->min);
        format_duration(high, sizeof high, d->max);
    }
    if (outcome == VALUE_OUT_OF_RANGE && d->max == UINT64_MAX)
        snprintf(buf, size, "%s of at least %s", noun, low);
    else if (outcome == VALUE_OUT_OF_RANGE)
        snprintf(buf, size, "%s from %s to %s", noun, low, high);
    else if (d->type == TYPE_SIZE)
        snprintf(buf, size, "a size such as %s", d->default_value);
    else
        snprintf(buf, size,
                 "a duration with a unit (ms, s, m, h or d) such as %s",
                 d->default_value);
}

/* Sets directive `d` of the struct at `base` from `value`. `name` is the
 * directive's full dotted name for messages. */
static int apply_directive(load_t *ld, const directive_t *d, void *base,
                           const char *name, const node_t *value)
{
    char expected[160];
    char shown[4 * SHOWN_VALUE_MAX + 8];
    uint64_t number;
    char *string;
    int rc;

    if (value->kind != YAML_SCALAR_NODE || is_null(value)) {
        describe_expected(d, VALUE_INVALID, expected, sizeof expected);
        return fail(ld, value->line, "%s: expected %s, got %s", name, expected,
                    describe_node(value));
    }
    if (strlen(value->text) != value->len)
        return fail(ld, value->line, "%s: the value contains a NUL character",
                    name);
    rc = parse_value(d, ld->cfg->dir, value->text, &number, &string);
    if (rc == ING_ENOMEM)
        return fail_nomem(ld);
    if (rc != 0) {
        describe_expected(d, rc, expected, sizeof expected);
        return fail(ld, value->line, "%s: expected %s, got %s", name, expected,
                    quote(shown, sizeof shown, value->text));
    }
    store_value(d, base, number, string);
    return 0;
}

static int apply_defaults(load_t *ld, const directive_t *table, size_t count,
                          void *base)
{
    for (size_t i = 0; i < count; i++) {
        const directive_t *d = &table[i];
        uint64_t number;
        char *string;
        int rc;

        if (!d->default_value)
            continue;
        rc = parse_value(d, ld->cfg->dir, d->default_value, &number, &string);
        if (rc == ING_ENOMEM)
            return fail_nomem(ld);
        if (rc != 0)
            return fail(ld, 0, "%s: the built-in default \"%s\" is invalid",
                        d->name, d->default_value);
        store_value(d, base, number, string);
    }
    return 0;
}

static const directive_t *find_directive(const directive_t *table,
                                         size_t count, const char *name)
{
    for (size_t i = 0; i < count; i++) {
        if (strcmp(table[i].name, name) == 0)
            return &table[i];
    }
    return NULL;
}

/* Returns the length of the key that `name` has directly under `prefix`
 * ("" for the top level), or 0 when `name` is not under `prefix`. */
static size_t key_under(const char *name, const char *prefix, const char **key)
{
    size_t prefix_len = strlen(prefix);

    if (prefix_len > 0) {
        if (strncmp(name, prefix, prefix_len) != 0 || name[prefix_len] != '.')
            return 0;
        name += prefix_len + 1;
    }
    *key = name;
    return strcspn(name, ".");
}

/* Writes the keys directly under `prefix` as a comma-separated list, each
 * once, in table order. */
static void join_keys(const directive_t *table, size_t count,
                      const char *prefix, char *buf, size_t size)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < count && used < size; i++) {
        const char *key, *other;
        size_t len = key_under(table[i].name, prefix, &key);
        bool seen = false;

        if (len == 0)
            continue;
        for (size_t j = 0; j < i && !seen; j++) {
            size_t other_len = key_under(table[j].name, prefix, &other);

            seen = other_len == len && memcmp(other, key, len) == 0;
        }
        if (!seen)
            used += (size_t)snprintf(buf + used, size - used, "%s%.*s",
                                     used ? ", " : "", (int)len, key);
    }
}

static bool is_section(const char *key)
{
    size_t len = strlen(key);

    for (size_t i = 0; i < ARRAY_LEN(directives) && len > 0; i++) {
        if (strncmp(directives[i].name, key, len) == 0 &&
            directives[i].name[len] == '.')
            return true;
    }
    return false;
}

static int fail_unknown_key(load_t *ld, const node_t *key,
                            const char *section, const char *known)
{
    if (!section)
        return fail(ld, key->line, "unknown key \"%s\" (known keys: %s)",
                    key->text, known);
    return fail(ld, key->line, "unknown key \"%s.%s\" (known keys in %s: %s)",
                section, key->text, section, known);
}

/* ---- Sections ---- */

static int parse_section(load_t *ld, const node_t *key, const node_t *map)
{
    const char *section = key->text;
    char name[128], known[256];
    int rc;

    if (is_null(map))
        return 0;
    if (map->kind != YAML_MAPPING_NODE)
        return fail(ld, map->line, "%s: expected a mapping of keys, got %s",
                    section, describe_node(map));
    rc = check_keys(ld, map, section);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        const node_t *subkey = map->items[i];
        const directive_t *d;

        snprintf(name, sizeof name, "%s.%s", section, subkey->text);
        d = find_directive(directives, ARRAY_LEN(directives), name);
        if (!d) {
            join_keys(directives, ARRAY_LEN(directives), section, known,
                      sizeof known);
            return fail_unknown_key(ld, subkey, section, known);
        }
        rc = apply_directive(ld, d, ld->cfg, d->name, map->items[i + 1]);
        ld->lines[d - directives] = map->items[i + 1]->line;
    }
    return rc;
}

static int parse_sink(load_t *ld, size_t index, const node_t *map)
{
    config_t *cfg = ld->cfg;
    config_sink_t *sink = &cfg->sinks[index];
    const node_t *name_node = NULL;
    char prefix[32], name[96], known[128];
    int rc;

    cfg->sink_count = index + 1;
    snprintf(prefix, sizeof prefix, "sinks[%zu]", index);
    rc = apply_defaults(ld, sink_directives, ARRAY_LEN(sink_directives), sink);
    if (rc != 0)
        return rc;
    join_keys(sink_directives, ARRAY_LEN(sink_directives), "", known,
              sizeof known);
    if (map->kind != YAML_MAPPING_NODE)
        return fail(ld, map->line, "%s: expected a mapping with keys %s, got %s",
                    prefix, known, describe_node(map));
    rc = check_keys(ld, map, prefix);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        const node_t *key = map->items[i];
        const directive_t *d = find_directive(
            sink_directives, ARRAY_LEN(sink_directives), key->text);

        if (!d)
            return fail_unknown_key(ld, key, prefix, known);
        snprintf(name, sizeof name, "%s.%s", prefix, d->name);
        rc = apply_directive(ld, d, sink, name, map->items[i + 1]);
        if (d == &sink_directives[0])
            name_node = map->items[i + 1];
    }
    if (rc != 0)
        return rc;
    if (!sink->name)
        return fail(ld, map->line, "%s: missing required key \"name\"",
                    prefix);
    for (size_t j = 0; j < index; j++) {
        if (strcmp(cfg->sinks[j].name, sink->name) == 0)
            return fail(ld, name_node->line,
                        "%s.name: \"%s\" is already the name of sinks[%zu]; "
                        "sink names must be unique",
                        prefix, sink->name, j);
    }
    return 0;
}

static int parse_sinks(load_t *ld, const node_t *seq)
{
    int rc = 0;

    if (is_null(seq))
        return 0;
    if (seq->kind != YAML_SEQUENCE_NODE)
        return fail(ld, seq->line,
                    "sinks: expected a sequence of sink mappings, got %s",
                    describe_node(seq));
    if (seq->count == 0)
        return fail(ld, seq->line,
                    "sinks: at least one sink is required; remove the key to "
                    "get the default file sink");
    ld->cfg->sinks = calloc(seq->count, sizeof *ld->cfg->sinks);
    if (!ld->cfg->sinks)
        return fail_nomem(ld);
    ld->sinks_node = seq;
    for (size_t i = 0; rc == 0 && i < seq->count; i++)
        rc = parse_sink(ld, i, seq->items[i]);
    return rc;
}

/* ---- Device types and their schemas ---- */

static int open_regular_file(const char *path, FILE **out, char *reason,
                             size_t size)
{
    struct stat st;
    FILE *f = fopen(path, "re");

    if (!f) {
        snprintf(reason, size, "%s", strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(reason, size, "not a regular file");
        fclose(f);
        return -1;
    }
    *out = f;
    return 0;
}

static const char *json_type_name(const json_t *json)
{
    switch (json_typeof(json)) {
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    default:
        return "an object";
    }
}

static int load_schema_file(load_t *ld, const char *name, unsigned long line,
                            config_device_type_t *type)
{
    char reason[128];
    json_error_t error;
    json_t *doc;
    FILE *f;

    if (open_regular_file(type->schema_path, &f, reason, sizeof reason) != 0)
        return fail(ld, line, "%s: cannot read the schema file %s: %s", name,
                    type->schema_path, reason);
    doc = json_loadf(f, JSON_REJECT_DUPLICATES, &error);
    fclose(f);
    if (!doc)
        return fail(ld, line, "%s: invalid JSON in %s:%d:%d: %s", name,
                    type->schema_path, error.line, error.column, error.text);
    if (!json_is_object(doc)) {
        const char *got = json_type_name(doc);

        json_decref(doc);
        return fail(ld, line, "%s: expected a JSON object in %s, got %s", name,
                    type->schema_path, got);
    }
    type->schema = doc;
    return 0;
}

static bool is_one_of(const char *text, const char *const *set, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (strcmp(text, set[i]) == 0)
            return true;
    }
    return false;
}

static bool is_yaml_int(const char *text, int *base)
{
    const char *p = text;
    const char *digits;

    if (p[0] == '0' && p[1] == 'o') {
        *base = 8;
        p += 2;
        digits = "01234567";
    } else if (p[0] == '0' && p[1] == 'x') {
        *base = 16;
        p += 2;
        digits = "0123456789abcdefABCDEF";
    } else {
        *base = 10;
        if (*p == '-' || *p == '+')
            p++;
        digits = "0123456789";
    }
    return *p != '\0' && strspn(p, digits) == strlen(p);
}

static const char *skip_digits(const char *p)
{
    while (*p >= '0' && *p <= '9')
        p++;
    return p;
}

/* Matches the YAML 1.2 core schema float pattern, without .inf and .nan. */
static bool is_yaml_float(const char *text)
{
    const char *p = text;
    const char *start;

    if (*p == '-' || *p == '+')
        p++;
    start = p;
    p = skip_digits(p);
    if (*p == '.')
        p = skip_digits(p + 1);
    if (p == start || (p == start + 1 && *start == '.'))
        return false;
    if (*p == 'e' || *p == 'E') {
        const char *exponent;

        p++;
        if (*p == '-' || *p == '+')
            p++;
        exponent = p;
        p = skip_digits(p);
        if (p == exponent)
            return false;
    }
    return *p == '\0';
}

/* Converts a scalar the way the YAML 1.2 core schema resolves it: plain
 * null, booleans, integers and floats become JSON literals, and quoted or
 * !!str scalars stay strings. */
static int scalar_to_json(load_t *ld, const node_t *n, const char *path,
                          json_t **out)
{
    static const char *const trues[] = {"true", "True", "TRUE"};
    static const char *const falses[] = {"false", "False", "FALSE"};
    static const char *const specials[] = {
        ".inf",  ".Inf",  ".INF",  "+.inf", "+.Inf", "+.INF", "-.inf",
        "-.Inf", "-.INF", ".nan",  ".NaN",  ".NAN",
    };
    char shown[4 * SHOWN_VALUE_MAX + 8];
    const char *text = n->text;
    int base;

    if (n->tag && strcmp(n->tag, "!") != 0 && strcmp(n->tag, YAML_STR_TAG))
        return fail(ld, n->line,
                    "%s: the tag %s is not supported; quote the value to "
                    "make it a string",
                    path, n->tag);
    if (!n->plain)
        *out = json_stringn(text, n->len);
    else if (is_null(n))
        *out = json_null();
    else if (is_one_of(text, trues, ARRAY_LEN(trues)))
        *out = json_true();
    else if (is_one_of(text, falses, ARRAY_LEN(falses)))
        *out = json_false();
    else if (is_one_of(text, specials, ARRAY_LEN(specials)))
        return fail(ld, n->line, "%s: %s has no JSON equivalent", path,
                    quote(shown, sizeof shown, text));
    else if (is_yaml_int(text, &base)) {
        long long v;

        errno = 0;
        v = strtoll(base == 8 ? text + 2 : text, NULL, base);
        if (errno == ERANGE)
            return fail(ld, n->line, "%s: the integer %s is out of range",
                        path, quote(shown, sizeof shown, text));
        *out = json_integer((json_int_t)v);
    } else if (is_yaml_float(text)) {
        /* NOTE: strtod follows LC_NUMERIC, which is "C" unless the program
         * calls setlocale. */
        double v = strtod(text, NULL);

        if (!isfinite(v))
            return fail(ld, n->line, "%s: the number %s is out of range", path,
                        quote(shown, sizeof shown, text));
        *out = json_real(v);
    } else {
        *out = json_stringn(text, n->len);
    }
    return *out ? 0 : fail_nomem(ld);
}

/* Converts a YAML subtree into JSON. `path` names the node in messages. */
static int node_to_json(load_t *ld, const node_t *n, const char *path,
                        json_t **out)
{
    char child_path[256];
    json_t *container;
    int rc = 0;

    if (n->kind == YAML_SCALAR_NODE)
        return scalar_to_json(ld, n, path, out);
    if (n->kind == YAML_MAPPING_NODE) {
        rc = check_keys(ld, n, path);
        if (rc != 0)
            return rc;
        container = json_object();
    } else {
        container = json_array();
    }
    if (!container)
        return fail_nomem(ld);
    for (size_t i = 0; rc == 0 && i < n->count; i++) {
        json_t *item = NULL;

        if (n->kind == YAML_MAPPING_NODE) {
            snprintf(child_path, sizeof child_path, "%s.%s", path,
                     n->items[i]->text);
            rc = node_to_json(ld, n->items[i + 1], child_path, &item);
            if (rc == 0 &&
                json_object_set_new(container, n->items[i]->text, item) != 0)
                rc = fail_nomem(ld);
            i++;
        } else {
            snprintf(child_path, sizeof child_path, "%s[%zu]", path, i);
            rc = node_to_json(ld, n->items[i], child_path, &item);
            if (rc == 0 && json_array_append_new(container, item) != 0)
                rc = fail_nomem(ld);
        }
    }
    if (rc != 0) {
        json_decref(container);
        return rc;
    }
    *out = container;
    return 0;
}

static int parse_device_type(load_t *ld, const node_t *key,
                             const node_t *value, config_device_type_t *type)
{
    const node_t *file = NULL, *inline_schema = NULL;
    char shown[4 * SHOWN_VALUE_MAX + 8];
    char path[128], name[160];
    int rc;

    if (!is_valid_name(key->text))
        return fail(ld, key->line,
                    "device_types: the name %s is invalid; use 1 to %d "
                    "characters from a-z, 0-9, '_' and '-'",
                    quote(shown, sizeof shown, key->text), NAME_MAX_LEN);
    type->name = strdup(key->text);
    if (!type->name)
        return fail_nomem(ld);
    snprintf(path, sizeof path, "device_types.%s", key->text);
    if (value->kind != YAML_MAPPING_NODE)
        return fail(ld, value->line,
                    "%s: expected a mapping with schema or schema_inline, "
                    "got %s",
                    path, describe_node(value));
    rc = check_keys(ld, value, path);
    for (size_t i = 0; rc == 0 && i < value->count; i += 2) {
        const node_t *subkey = value->items[i];

        if (strcmp(subkey->text, "schema") == 0)
            file = value->items[i + 1];
        else if (strcmp(subkey->text, "schema_inline") == 0)
            inline_schema = value->items[i + 1];
        else
            return fail_unknown_key(ld, subkey, path, "schema, schema_inline");
    }
    if (rc != 0)
        return rc;
    if (file && inline_schema)
        return fail(ld, value->line,
                    "%s: set either schema or schema_inline, not both", path);
    if (!file && !inline_schema)
        return fail(ld, value->line,
                    "%s: missing schema; set schema to a JSON Schema file or "
                    "schema_inline to a mapping",
                    path);
    if (file) {
        snprintf(name, sizeof name, "%s.schema", path);
        rc = apply_directive(ld, &schema_path_directive, type, name, file);
        if (rc == 0)
            rc = load_schema_file(ld, name, file->line, type);
        return rc;
    }
    snprintf(name, sizeof name, "%s.schema_inline", path);
    if (inline_schema->kind != YAML_MAPPING_NODE)
        return fail(ld, inline_schema->line,
                    "%s: expected a mapping (a JSON Schema object), got %s",
                    name, describe_node(inline_schema));
    return node_to_json(ld, inline_schema, name, &type->schema);
}

static int parse_device_types(load_t *ld, const node_t *key,
                              const node_t *map)
{
    config_t *cfg = ld->cfg;
    int rc;

    ld->device_types_line = key->line;
    if (is_null(map))
        return 0;
    if (map->kind != YAML_MAPPING_NODE)
        return fail(ld, map->line,
                    "device_types: expected a mapping of device type names, "
                    "got %s",
                    describe_node(map));
    if (map->count == 0)
        return fail(ld, map->line,
                    "device_types: at least one device type is required");
    rc = check_keys(ld, map, "device_types");
    if (rc != 0)
        return rc;
    cfg->device_types = calloc(map->count / 2, sizeof *cfg->device_types);
    if (!cfg->device_types)
        return fail_nomem(ld);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        cfg->device_type_count = i / 2 + 1;
        rc = parse_device_type(ld, map->items[i], map->items[i + 1],
                               &cfg->device_types[i / 2]);
    }
    return rc;
}

/* ---- The whole file ---- */

static int parse_root(load_t *ld, const node_t *root)
{
    char known[256];
    int rc = 0;

    if (!root || is_null(root))
        return 0;
    if (root->kind != YAML_MAPPING_NODE)
        return fail(ld, root->line,
                    "expected a mapping of keys at the top level, got %s",
                    describe_node(root));
    rc = check_keys(ld, root, "");
    for (size_t i = 0; rc == 0 && i < root->count; i += 2) {
        const node_t *key = root->items[i];
        const node_t *value = root->items[i + 1];
        const directive_t *d =
            find_directive(directives, ARRAY_LEN(directives), key->text);

        if (strcmp(key->text, "device_types") == 0) {
            rc = parse_device_types(ld, key, value);
        } else if (strcmp(key->text, "sinks") == 0) {
            rc = parse_sinks(ld, value);
        } else if (is_section(key->text)) {
            rc = parse_section(ld, key, value);
        } else if (d && !strchr(d->name, '.')) {
            rc = apply_directive(ld, d, ld->cfg, d->name, value);
            ld->lines[d - directives] = value->line;
        } else {
            join_keys(directives, ARRAY_LEN(directives), "", known,
                      sizeof known);
            strncat(known, ", device_types, sinks",
                    sizeof known - strlen(known) - 1);
            rc = fail_unknown_key(ld, key, NULL, known);
        }
    }
    return rc;
}

static unsigned long line_of(const load_t *ld, const char *name)
{
    const directive_t *d =
        find_directive(directives, ARRAY_LEN(directives), name);

    return ld->lines[d - directives];
}

static int add_default_sink(load_t *ld)
{
    config_t *cfg = ld->cfg;
    int rc;

    cfg->sinks = calloc(1, sizeof *cfg->sinks);
    if (!cfg->sinks)
        return fail_nomem(ld);
    cfg->sink_count = 1;
    rc = apply_defaults(ld, sink_directives, ARRAY_LEN(sink_directives),
                        cfg->sinks);
    if (rc != 0)
        return rc;
    cfg->sinks[0].name = strdup("file");
    return cfg->sinks[0].name ? 0 : fail_nomem(ld);
}

static int finish_sinks(load_t *ld)
{
    config_t *cfg = ld->cfg;
    int rc;

    if (cfg->sink_count == 0) {
        rc = add_default_sink(ld);
        if (rc != 0)
            return rc;
    }
    for (size_t i = 0; i < cfg->sink_count; i++) {
        config_sink_t *sink = &cfg->sinks[i];

        if (!sink->path) {
            sink->path = join_path(cfg->data_dir, strlen(cfg->data_dir), "out");
            if (!sink->path)
                return fail_nomem(ld);
        }
        /* Two file sinks in one folder would write over each other. */
        for (size_t j = 0; j < i; j++) {
            if (strcmp(cfg->sinks[j].path, sink->path) == 0)
                return fail(ld, ld->sinks_node->items[i]->line,
                            "sinks[%zu].path: %s is already the path of "
                            "sinks[%zu]; give each sink its own folder",
                            i, sink->path, j);
        }
    }
    return 0;
}

/* Fills the values derived from others and checks rules that span
 * several directives. */
static int finish_config(load_t *ld)
{
    config_t *cfg = ld->cfg;
    char names[256];
    char segment[32], max[32];
    size_t used = 0;

    if (!cfg->registry.path) {
        cfg->registry.path =
            join_path(cfg->data_dir, strlen(cfg->data_dir), "registry.db");
        if (!cfg->registry.path)
            return fail_nomem(ld);
    }
    if (cfg->device_type_count == 0)
        return fail(ld, ld->device_types_line,
                    "device_types: at least one device type is required");
    if (!config_device_type(cfg, cfg->default_device_type)) {
        unsigned long line = line_of(ld, "default_device_type");

        names[0] = '\0';
        for (size_t i = 0; i < cfg->device_type_count && used < sizeof names;
             i++)
            used += (size_t)snprintf(names + used, sizeof names - used,
                                     "%s%s", i ? ", " : "",
                                     cfg->device_types[i].name);
        return fail(ld, line ? line : ld->device_types_line,
                    "default_device_type: \"%s\" is not a configured device "
                    "type (configured: %s)",
                    cfg->default_device_type, names);
    }
    /* The spool frees space only by deleting a whole segment that every
     * sink has passed, so it needs room for that segment and the one being
     * written. */
    if (cfg->spool.max_size / 2 < cfg->spool.segment_size) {
        unsigned long line = line_of(ld, "spool.max_size");

        format_size(max, sizeof max, cfg->spool.max_size);
        format_size(segment, sizeof segment, cfg->spool.segment_size);
        return fail(ld, line ? line : line_of(ld, "spool.segment_size"),
                    "spool.max_size: expected at least twice "
                    "spool.segment_size (%s), got %s",
                    segment, max);
    }
    if (cfg->admin.listen && strcmp(cfg->admin.listen, cfg->http.listen) == 0)
        return fail(ld, line_of(ld, "admin.listen"),
                    "admin.listen: %s is also http.listen; use another port",
                    cfg->admin.listen);
    return finish_sinks(ld);
}

/* Stores the canonical folder of `path` in `*out`. */
static int find_config_dir(load_t *ld, const char *path, char **out)
{
    const char *slash = strrchr(path, '/');
    char *folder;

    if (!slash)
        folder = strdup(".");
    else if (slash == path)
        folder = strdup("/");
    else
        folder = strndup(path, (size_t)(slash - path));
    if (!folder)
        return fail_nomem(ld);
    *out = realpath(folder, NULL);
    if (!*out) {
        int rc = errno == ENOMEM
                     ? fail_nomem(ld)
                     : fail(ld, 0, "cannot resolve the folder %s: %s", folder,
                            strerror(errno));

        free(folder);
        return rc;
    }
    free(folder);
    return 0;
}

int config_load(const char *path, config_t **out, char *err, size_t errlen)
{
    load_t ld = {.file = path, .err = err, .errlen = errlen};
    node_t *root = NULL;
    char reason[128];
    FILE *f;
    int rc;

    *out = NULL;
    if (errlen > 0)
        err[0] = '\0';
    if (open_regular_file(path, &f, reason, sizeof reason) != 0)
        return fail(&ld, 0, "cannot read the config file: %s", reason);
    ld.cfg = calloc(1, sizeof *ld.cfg);
    if (!ld.cfg) {
        fclose(f);
        return fail_nomem(&ld);
    }
    ld.cfg->path = strdup(path);
    if (!ld.cfg->path) {
        rc = fail_nomem(&ld);
        goto error;
    }
    rc = find_config_dir(&ld, path, &ld.cfg->dir);
    if (rc == 0)
        rc = read_tree(&ld, f, &root);
    if (rc == 0)
        rc = apply_defaults(&ld, directives, ARRAY_LEN(directives), ld.cfg);
    if (rc == 0)
        rc = parse_root(&ld, root);
    if (rc == 0)
        rc = finish_config(&ld);
    if (rc != 0)
        goto error;
    fclose(f);
    node_free(root);
    *out = ld.cfg;
    return 0;

error:
    fclose(f);
    node_free(root);
    config_free(ld.cfg);
    return rc;
}

const config_device_type_t *config_device_type(const config_t *cfg,
                                               const char *name)
{
    for (size_t i = 0; i < cfg->device_type_count; i++) {
        if (strcmp(cfg->device_types[i].name, name) == 0)
            return &cfg->device_types[i];
    }
    return NULL;
}

void config_free(config_t *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < cfg->device_type_count; i++) {
        free(cfg->device_types[i].name);
        free(cfg->device_types[i].schema_path);
        json_decref(cfg->device_types[i].schema);
    }
    free(cfg->device_types);
    for (size_t i = 0; i < cfg->sink_count; i++) {
        free(cfg->sinks[i].name);
        free(cfg->sinks[i].path);
    }
    free(cfg->sinks);
    free(cfg->path);
    free(cfg->dir);
    free(cfg->data_dir);
    free(cfg->registry.path);
    free(cfg->http.listen);
    free(cfg->admin.listen);
    free(cfg->default_device_type);
    free(cfg);
}
