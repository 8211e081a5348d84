/* The YAML side of config loading: the node tree and its conversion to
 * JSON. See config_yaml.h.
 */
#include "core/config_yaml.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

int config_fail(config_error_t *error, unsigned long line, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (error->size == 0)
        return ING_ECONFIG;
    if (line > 0)
        n = snprintf(error->buf, error->size, "%s:%lu: ", error->file, line);
    else
        n = snprintf(error->buf, error->size, "%s: ", error->file);
    if (n >= 0 && (size_t)n < error->size) {
        va_start(ap, fmt);
        vsnprintf(error->buf + n, error->size - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return ING_ECONFIG;
}

int config_fail_nomem(config_error_t *error)
{
    if (error->size > 0)
        snprintf(error->buf, error->size, "%s: out of memory", error->file);
    return ING_ENOMEM;
}

const char *config_quote(char *buf, size_t size, const char *text)
{
    size_t used = 0;
    size_t i;

    buf[used++] = '"';
    for (i = 0; text[i] && i < CONFIG_SHOWN_VALUE_MAX; i++) {
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

void config_node_free(config_node_t *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->count; i++)
        config_node_free(n->items[i]);
    free(n->items);
    free(n->text);
    free(n->tag);
    free(n);
}

bool config_node_is_null(const config_node_t *n)
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

const char *config_node_describe(const config_node_t *n)
{
    if (config_node_is_null(n))
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
    config_node_t *root;
    config_node_t *stack[CONFIG_MAX_DEPTH]; /* open mappings and sequences */
    size_t depth;
    int documents;
    bool done;
} builder_t;

static config_node_t *node_new(yaml_node_type_t kind, const yaml_event_t *event)
{
    config_node_t *n = calloc(1, sizeof *n);

    if (n) {
        n->kind = kind;
        n->line = (unsigned long)event->start_mark.line + 1;
    }
    return n;
}

static config_node_t *scalar_new(const yaml_event_t *event)
{
    config_node_t *n = node_new(YAML_SCALAR_NODE, event);
    const char *tag = (const char *)event->data.scalar.tag;

    if (!n)
        return NULL;
    n->len = event->data.scalar.length;
    n->text = malloc(n->len + 1);
    if (tag)
        n->tag = strdup(tag);
    if (!n->text || (tag && !n->tag)) {
        config_node_free(n);
        return NULL;
    }
    memcpy(n->text, event->data.scalar.value, n->len);
    n->text[n->len] = '\0';
    n->plain = event->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && !tag;
    return n;
}

/* Adds `n` to the open container, or makes it the root. Frees `n` when it
 * cannot be added. */
static int attach(config_error_t *error, builder_t *b, config_node_t *n)
{
    config_node_t *parent;

    if (b->depth == 0) {
        b->root = n;
        return 0;
    }
    parent = b->stack[b->depth - 1];
    if (parent->count == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 8;
        config_node_t **items = realloc(parent->items, cap * sizeof *items);

        if (!items) {
            config_node_free(n);
            return config_fail_nomem(error);
        }
        parent->items = items;
        parent->cap = cap;
    }
    parent->items[parent->count++] = n;

    /* Keys sit at even positions. Keys name directives and JSON members,
     * so only strings make sense there. */
    if (parent->kind == YAML_MAPPING_NODE && parent->count % 2 == 1) {
        if (n->kind != YAML_SCALAR_NODE)
            return config_fail(error, n->line,
                               "a mapping key must be a scalar, got %s",
                               config_node_describe(n));
        if (strlen(n->text) != n->len)
            return config_fail(error, n->line,
                               "a mapping key contains a NUL character");
    }
    return 0;
}

static int on_event(config_error_t *error, builder_t *b,
                    const yaml_event_t *event)
{
    unsigned long line = (unsigned long)event->start_mark.line + 1;
    config_node_t *n;
    int rc;

    switch (event->type) {
    case YAML_DOCUMENT_START_EVENT:
        if (++b->documents > 1)
            return config_fail(error, line,
                               "a second YAML document starts here, but "
                               "the config file must contain one");
        return 0;
    case YAML_ALIAS_EVENT:
        /* Aliases would let a small file expand into a huge tree. */
        return config_fail(
            error, line,
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
        return config_fail_nomem(error);
    rc = attach(error, b, n);
    if (rc != 0)
        return rc;
    if (n->kind != YAML_SCALAR_NODE) {
        if (b->depth == CONFIG_MAX_DEPTH)
            return config_fail(error, line,
                               "the config nests deeper than %d levels",
                               CONFIG_MAX_DEPTH);
        b->stack[b->depth++] = n;
    }
    return 0;
}

static int fail_syntax(config_error_t *error, const yaml_parser_t *parser)
{
    const char *problem = parser->problem ? parser->problem : "unknown error";

    if (parser->error == YAML_MEMORY_ERROR)
        return config_fail_nomem(error);
    if (parser->error == YAML_READER_ERROR)
        return config_fail(error, 0, "invalid YAML input at byte %zu: %s",
                           parser->problem_offset, problem);
    if (error->size == 0)
        return ING_ECONFIG;
    if (parser->context)
        snprintf(error->buf, error->size,
                 "%s:%zu:%zu: YAML syntax error: %s (%s at line %zu)",
                 error->file, parser->problem_mark.line + 1,
                 parser->problem_mark.column + 1, problem, parser->context,
                 parser->context_mark.line + 1);
    else
        snprintf(error->buf, error->size, "%s:%zu:%zu: YAML syntax error: %s",
                 error->file, parser->problem_mark.line + 1,
                 parser->problem_mark.column + 1, problem);
    return ING_ECONFIG;
}

int config_yaml_read(config_error_t *error, FILE *f, config_node_t **root)
{
    yaml_parser_t parser;
    yaml_event_t event;
    builder_t b = {0};
    int rc = 0;

    if (!yaml_parser_initialize(&parser))
        return config_fail_nomem(error);
    yaml_parser_set_input_file(&parser, f);
    while (!b.done && rc == 0) {
        if (!yaml_parser_parse(&parser, &event)) {
            rc = fail_syntax(error, &parser);
            break;
        }
        rc = on_event(error, &b, &event);
        yaml_event_delete(&event);
    }
    yaml_parser_delete(&parser);
    if (rc != 0) {
        config_node_free(b.root);
        return rc;
    }
    *root = b.root;
    return 0;
}

int config_node_check_keys(config_error_t *error, const config_node_t *map,
                           const char *path)
{
    for (size_t i = 2; i < map->count; i += 2) {
        const config_node_t *key = map->items[i];

        for (size_t j = 0; j < i; j += 2) {
            const config_node_t *earlier = map->items[j];

            if (earlier->len == key->len &&
                memcmp(earlier->text, key->text, key->len) == 0)
                return config_fail(
                    error, key->line,
                    "duplicate key \"%s%s%s\" (first set at line %lu)", path,
                    *path ? "." : "", key->text, earlier->line);
        }
    }
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
static int scalar_to_json(config_error_t *error, const config_node_t *n,
                          const char *path, json_t **out)
{
    static const char *const trues[] = {"true", "True", "TRUE"};
    static const char *const falses[] = {"false", "False", "FALSE"};
    static const char *const specials[] = {
        ".inf",  ".Inf",  ".INF",  "+.inf", "+.Inf", "+.INF",
        "-.inf", "-.Inf", "-.INF", ".nan",  ".NaN",  ".NAN",
    };
    char shown[CONFIG_QUOTE_SIZE];
    const char *text = n->text;
    int base;

    if (n->tag && strcmp(n->tag, "!") != 0 && strcmp(n->tag, YAML_STR_TAG))
        return config_fail(
            error, n->line,
            "%s: the tag %s is not supported; quote the value to "
            "make it a string",
            path, n->tag);
    if (!n->plain)
        *out = json_stringn(text, n->len);
    else if (config_node_is_null(n))
        *out = json_null();
    else if (is_one_of(text, trues, ARRAY_LEN(trues)))
        *out = json_true();
    else if (is_one_of(text, falses, ARRAY_LEN(falses)))
        *out = json_false();
    else if (is_one_of(text, specials, ARRAY_LEN(specials)))
        return config_fail(error, n->line, "%s: %s has no JSON equivalent",
                           path, config_quote(shown, sizeof shown, text));
    else if (is_yaml_int(text, &base)) {
        long long v;

        errno = 0;
        v = strtoll(base == 8 ? text + 2 : text, NULL, base);
        if (errno == ERANGE)
            return config_fail(error, n->line,
                               "%s: the integer %s is out of range", path,
                               config_quote(shown, sizeof shown, text));
        *out = json_integer((json_int_t)v);
    } else if (is_yaml_float(text)) {
        /* NOTE: strtod follows LC_NUMERIC, which is "C" unless the program
         * calls setlocale. */
        double v = strtod(text, NULL);

        if (!isfinite(v))
            return config_fail(error, n->line,
                               "%s: the number %s is out of range", path,
                               config_quote(shown, sizeof shown, text));
        *out = json_real(v);
    } else {
        *out = json_stringn(text, n->len);
    }
    return *out ? 0 : config_fail_nomem(error);
}

int config_node_to_json(config_error_t *error, const config_node_t *n,
                        const char *path, json_t **out)
{
    char child_path[256];
    json_t *container;
    int rc = 0;

    if (n->kind == YAML_SCALAR_NODE)
        return scalar_to_json(error, n, path, out);
    if (n->kind == YAML_MAPPING_NODE) {
        rc = config_node_check_keys(error, n, path);
        if (rc != 0)
            return rc;
        container = json_object();
    } else {
        container = json_array();
    }
    if (!container)
        return config_fail_nomem(error);
    for (size_t i = 0; rc == 0 && i < n->count; i++) {
        json_t *item = NULL;

        if (n->kind == YAML_MAPPING_NODE) {
            snprintf(child_path, sizeof child_path, "%s.%s", path,
                     n->items[i]->text);
            rc = config_node_to_json(error, n->items[i + 1], child_path, &item);
            if (rc == 0 &&
                json_object_set_new(container, n->items[i]->text, item) != 0)
                rc = config_fail_nomem(error);
            i++;
        } else {
            snprintf(child_path, sizeof child_path, "%s[%zu]", path, i);
            rc = config_node_to_json(error, n->items[i], child_path, &item);
            if (rc == 0 && json_array_append_new(container, item) != 0)
                rc = config_fail_nomem(error);
        }
    }
    if (rc != 0) {
        json_decref(container);
        return rc;
    }
    *out = container;
    return 0;
}
