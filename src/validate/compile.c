/* Compilation of a schema document into nodes (see validate_internal.h).
 *
 * Every schema value is compiled once. A map from each json_t to its node
 * lets a local $ref reuse a node compiled elsewhere. A node enters the map
 * before its subschemas compile, so a $ref back to an ancestor finds it and
 * the recursion ends.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"
#include "validate/validate_internal.h"

enum { VISIT_NONE, VISIT_ACTIVE, VISIT_DONE };

int validate_compiler_fail(compiler_t *c, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (c->rc != 0)
        return -1; /* keep the first, innermost message */
    n = snprintf(c->err, c->errlen, "%s: ", c->location);
    if (n >= 0 && (size_t)n < c->errlen) {
        va_start(ap, fmt);
        vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    c->rc = ING_EINVAL;
    return -1;
}

static int fail_nomem(compiler_t *c)
{
    if (c->rc == 0)
        snprintf(c->err, c->errlen, "%s: out of memory", c->location);
    c->rc = ING_ENOMEM;
    return -1;
}

static int location_reserve(compiler_t *c, size_t extra)
{
    size_t need = c->location_len + extra + 1;
    char *grown;

    if (need <= c->location_cap)
        return 0;
    if (need < c->location_cap * 2)
        need = c->location_cap * 2;
    grown = realloc(c->location, need);
    if (grown == NULL)
        return fail_nomem(c);
    c->location = grown;
    c->location_cap = need;
    return 0;
}

/* Appends "/" and the segment, escaped as a JSON Pointer token ("~" as "~0"
 * and "/" as "~1"). */
static int location_push(compiler_t *c, const char *segment, size_t len)
{
    char *p;

    if (location_reserve(c, 1 + 2 * len) != 0)
        return -1;
    p = c->location + c->location_len;
    *p++ = '/';
    for (size_t i = 0; i < len; i++) {
        if (segment[i] == '~' || segment[i] == '/') {
            *p++ = '~';
            *p++ = segment[i] == '~' ? '0' : '1';
        } else {
            *p++ = segment[i];
        }
    }
    *p = '\0';
    c->location_len = (size_t)(p - c->location);
    return 0;
}

static void location_truncate(compiler_t *c, size_t len)
{
    c->location_len = len;
    c->location[len] = '\0';
}

static size_t hash_pointer(const json_t *p, size_t cap)
{
    uint64_t h = (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ULL;

    return (size_t)(h >> 32) & (cap - 1);
}

static node_t *map_find(const compiler_t *c, const json_t *key)
{
    if (c->map_cap == 0)
        return NULL;
    for (size_t i = hash_pointer(key, c->map_cap);;
         i = (i + 1) & (c->map_cap - 1)) {
        if (c->map[i].key == NULL)
            return NULL;
        if (c->map[i].key == key)
            return c->map[i].node;
    }
}

static int map_insert(compiler_t *c, const json_t *key, node_t *node)
{
    size_t i;

    if ((c->map_count + 1) * 2 > c->map_cap) {
        size_t cap = c->map_cap ? c->map_cap * 2 : 64;
        struct map_entry *old = c->map;
        size_t old_cap = c->map_cap;

        c->map = calloc(cap, sizeof(*c->map));
        if (c->map == NULL) {
            c->map = old;
            return fail_nomem(c);
        }
        c->map_cap = cap;
        c->map_count = 0;
        for (size_t j = 0; j < old_cap; j++) {
            if (old[j].key != NULL)
                map_insert(c, old[j].key, old[j].node);
        }
        free(old);
    }
    i = hash_pointer(key, c->map_cap);
    while (c->map[i].key != NULL)
        i = (i + 1) & (c->map_cap - 1);
    c->map[i].key = key;
    c->map[i].node = node;
    c->map_count++;
    return 0;
}

/* Allocates a node and records it in the schema for schema_free(). */
static node_t *node_new(compiler_t *c)
{
    schema_t *s = c->schema;
    node_t *n;
    node_t **grown;

    if (s->node_count == s->node_cap) {
        size_t cap = s->node_cap ? s->node_cap * 2 : 16;
        grown = realloc(s->nodes, cap * sizeof(*grown));
        if (grown == NULL) {
            fail_nomem(c);
            return NULL;
        }
        s->nodes = grown;
        s->node_cap = cap;
    }
    n = calloc(1, sizeof(*n));
    if (n == NULL || (n->location = strdup(c->location)) == NULL) {
        free(n);
        fail_nomem(c);
        return NULL;
    }
    s->nodes[s->node_count++] = n;
    return n;
}

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    default:
        return "null";
    }
}

static node_t *compile_node(compiler_t *c, const json_t *value)
{
    node_t *n = map_find(c, value);
    const char *key;
    size_t key_len;
    json_t *member;

    if (n != NULL)
        return n;
    if (!json_is_object(value) && !json_is_boolean(value)) {
        validate_compiler_fail(c,
                               "invalid schema: expected an object or a "
                               "boolean, got %s",
                               json_type_name(value));
        return NULL;
    }
    n = node_new(c);
    if (n == NULL || map_insert(c, value, n) != 0)
        return NULL;
    if (json_is_boolean(value)) {
        n->is_bool = true;
        n->bool_value = json_is_true(value);
        return n;
    }
    /* The jansson iteration macros take a non-const object, but only read
     * it. */
    json_object_keylen_foreach ((json_t *)value, key, key_len, member) {
        const keyword_t *kw = validate_keyword_find(key, key_len);

        if (kw == NULL) {
            validate_compiler_fail(c, "unsupported keyword \"%.*s\"",
                                   (int)key_len, key);
            return NULL;
        }
        if (kw->compile(c, n, kw, member) != 0)
            return NULL;
    }
    return n;
}

node_t *validate_compile_subschema(compiler_t *c, const json_t *value,
                                   const char *segment, size_t segment_len,
                                   const char *segment2, size_t segment2_len)
{
    size_t saved = c->location_len;
    node_t *n = NULL;

    if (location_push(c, segment, segment_len) != 0)
        return NULL;
    if (segment2 == NULL || location_push(c, segment2, segment2_len) == 0)
        n = compile_node(c, value);
    location_truncate(c, saved);
    return n;
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Decodes the %XX escapes of a URI fragment in place and returns the new
 * length, or -1 on a malformed escape. */
static long percent_decode(char *s, size_t len)
{
    size_t out = 0;

    for (size_t i = 0; i < len; i++) {
        if (s[i] == '%') {
            int hi, lo;
            if (i + 2 >= len)
                return -1;
            hi = hex_value(s[i + 1]);
            lo = hex_value(s[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            s[out++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            s[out++] = s[i];
        }
    }
    return (long)out;
}

/* Copies the JSON Pointer token that ends at '/' or at `end` into `out`,
 * unescaping "~0" and "~1". Returns its length, or -1 for a bad escape. */
static long pointer_token(const char *token, const char *end, char *out)
{
    long len = 0;

    for (const char *p = token; p < end && *p != '/'; p++) {
        if (*p == '~') {
            if (p + 1 >= end || (p[1] != '0' && p[1] != '1'))
                return -1;
            out[len++] = p[1] == '0' ? '~' : '/';
            p++;
        } else {
            out[len++] = *p;
        }
    }
    return len;
}

/* Parses an array index token: decimal digits without a leading zero. */
static bool parse_index(const char *token, size_t len, size_t *index)
{
    *index = 0;
    if (len == 0 || (len > 1 && token[0] == '0'))
        return false;
    for (size_t i = 0; i < len; i++) {
        if (token[i] < '0' || token[i] > '9' || *index > (SIZE_MAX - 9) / 10)
            return false;
        *index = *index * 10 + (size_t)(token[i] - '0');
    }
    return true;
}

/* Finds the value that a JSON Pointer (RFC 6901) names in `doc`. Returns
 * NULL when a token names no member or element, or on a bad escape. */
static const json_t *pointer_resolve(const json_t *doc, const char *pointer,
                                     size_t len)
{
    const char *end = pointer + len;
    const json_t *cur = doc;
    char *token = malloc(len + 1);
    const char *p = pointer;

    if (token == NULL)
        return NULL;
    while (cur != NULL && p < end) {
        /* p points at the '/' before the next token. */
        long token_len = pointer_token(++p, end, token);
        size_t index;

        if (token_len < 0) {
            cur = NULL;
        } else if (json_is_object(cur)) {
            cur = json_object_getn(cur, token, (size_t)token_len);
        } else if (json_is_array(cur) &&
                   parse_index(token, (size_t)token_len, &index)) {
            cur = json_array_get(cur, index);
        } else {
            cur = NULL;
        }
        while (p < end && *p != '/')
            p++;
    }
    free(token);
    return cur;
}

/* Compiles `value` with the location set to "#" and `pointer`, so that its
 * errors name the place the pointer leads to. */
static node_t *compile_at(compiler_t *c, const json_t *value,
                          const char *pointer, size_t len)
{
    size_t saved_len = c->location_len;
    char *saved = strdup(c->location);
    node_t *node = NULL;

    if (saved == NULL || location_reserve(c, len + 1) != 0) {
        free(saved);
        fail_nomem(c);
        return NULL;
    }
    c->location[0] = '#';
    memcpy(c->location + 1, pointer, len);
    location_truncate(c, len + 1);
    node = compile_node(c, value);
    /* The buffer may have grown, but never below its size on entry. */
    memcpy(c->location, saved, saved_len + 1);
    c->location_len = saved_len;
    free(saved);
    return node;
}

/* Compiles "$ref": a fragment of this document, "#" or "#/json/pointer".
 * References to other documents and to $anchor names are rejected because
 * no resolver for them exists here. */
int validate_compile_ref(compiler_t *c, node_t *n, const json_t *value)
{
    const char *ref = json_string_value(value);
    size_t len = json_string_length(value);
    const json_t *target;
    char *fragment;
    long fragment_len;
    int rc = -1;

    if (ref == NULL)
        return validate_compiler_fail(c, "invalid \"$ref\": expected a "
                                         "string");
    if (len == 0 || ref[0] != '#')
        return validate_compiler_fail(
            c,
            "unsupported keyword \"$ref\" to another document \"%s\": only "
            "references that start with \"#\" are supported",
            ref);
    fragment = malloc(len);
    if (fragment == NULL)
        return fail_nomem(c);
    memcpy(fragment, ref + 1, len - 1);
    fragment_len = percent_decode(fragment, len - 1);
    if (fragment_len < 0) {
        validate_compiler_fail(c, "invalid \"$ref\" \"%s\": bad %% escape",
                               ref);
        goto done;
    }
    if (fragment_len > 0 && fragment[0] != '/') {
        validate_compiler_fail(c,
                               "unsupported keyword \"$ref\" to an anchor "
                               "\"%s\" ($anchor): only JSON Pointer "
                               "fragments are supported",
                               ref);
        goto done;
    }
    target = pointer_resolve(c->root_doc, fragment, (size_t)fragment_len);
    if (target == NULL) {
        validate_compiler_fail(c,
                               "invalid \"$ref\" \"%s\": no such location "
                               "in this document",
                               ref);
        goto done;
    }
    n->ref = compile_at(c, target, fragment, (size_t)fragment_len);
    if (n->ref != NULL)
        rc = 0;

done:
    free(fragment);
    return rc;
}

static int check_cycles(compiler_t *c, node_t *n);

static int check_list(compiler_t *c, const node_list_t *list)
{
    for (size_t i = 0; i < list->count; i++) {
        if (check_cycles(c, list->items[i]) != 0)
            return -1;
    }
    return 0;
}

/* Rejects a loop of $ref and in-place applicators (allOf, anyOf, oneOf,
 * not, if, then, else) that returns to a schema without moving into a
 * property or item, because validating it would never end. */
static int check_cycles(compiler_t *c, node_t *n)
{
    node_t *single[5];

    if (n->visit_state == VISIT_DONE)
        return 0;
    if (n->visit_state == VISIT_ACTIVE) {
        snprintf(c->err, c->errlen,
                 "%s: invalid \"$ref\": it leads back to this schema "
                 "without descending into the instance, so validation "
                 "would never end",
                 n->location);
        c->rc = ING_EINVAL;
        return -1;
    }
    n->visit_state = VISIT_ACTIVE;
    single[0] = n->ref;
    single[1] = n->not_schema;
    single[2] = n->if_schema;
    single[3] = n->then_schema;
    single[4] = n->else_schema;
    for (size_t i = 0; i < sizeof(single) / sizeof(single[0]); i++) {
        if (single[i] != NULL && check_cycles(c, single[i]) != 0)
            return -1;
    }
    if (check_list(c, &n->all_of) != 0 || check_list(c, &n->any_of) != 0 ||
        check_list(c, &n->one_of) != 0)
        return -1;
    n->visit_state = VISIT_DONE;
    return 0;
}

static void node_list_free(node_list_t *list)
{
    free(list->items);
}

static void node_free(node_t *n)
{
    validate_regex_free(&n->pattern);
    node_list_free(&n->prefix_items);
    free(n->properties);
    for (size_t i = 0; i < n->pattern_property_count; i++)
        validate_regex_free(&n->pattern_properties[i].regex);
    free(n->pattern_properties);
    free(n->required.names);
    free(n->required.lens);
    for (size_t i = 0; i < n->dependent_required_count; i++) {
        free(n->dependent_required[i].required.names);
        free(n->dependent_required[i].required.lens);
    }
    free(n->dependent_required);
    node_list_free(&n->all_of);
    node_list_free(&n->any_of);
    node_list_free(&n->one_of);
    free((char *)n->location);
    free(n);
}

void schema_free(schema_t *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->node_count; i++)
        node_free(s->nodes[i]);
    free(s->nodes);
    pcre2_match_context_free(s->match_context);
    json_decref(s->doc);
    free(s);
}

int schema_compile(json_t *doc, schema_t **out, char *err, size_t errlen)
{
    compiler_t c = {0};
    char dummy[1];

    *out = NULL;
    c.err = errlen > 0 ? err : dummy;
    c.errlen = errlen > 0 ? errlen : sizeof(dummy);
    c.err[0] = '\0';
    c.root_doc = doc;
    c.schema = calloc(1, sizeof(*c.schema));
    c.location = malloc(64);
    if (c.schema == NULL || c.location == NULL) {
        snprintf(c.err, c.errlen, "#: out of memory");
        c.rc = ING_ENOMEM;
        goto done;
    }
    c.location_cap = 64;
    strcpy(c.location, "#");
    c.location_len = 1;
    c.schema->doc = json_incref(doc);
    c.schema->match_context = validate_regex_match_context();
    if (c.schema->match_context == NULL) {
        fail_nomem(&c);
        goto done;
    }
    c.schema->root = compile_node(&c, doc);
    if (c.schema->root == NULL)
        goto done;
    for (size_t i = 0; i < c.schema->node_count; i++) {
        if (check_cycles(&c, c.schema->nodes[i]) != 0)
            goto done;
    }
    *out = c.schema;
    c.schema = NULL;

done:
    if (c.rc == 0 && *out == NULL)
        c.rc = ING_EINVAL;
    schema_free(c.schema);
    free(c.location);
    free(c.map);
    return c.rc;
}
