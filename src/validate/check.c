/* Validation of an instance against compiled nodes.
 *
 * A valid instance allocates nothing: the instance location is a chain of
 * path_t frames on the stack, and it becomes a JSON Pointer string only when
 * an error is recorded. Branches whose failure is summarised (anyOf, oneOf,
 * not, if) run without an error list and stop at their first failure.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "validate/validate_internal.h"

#define DEFAULT_ERROR_LIMIT 16

/* Deeper nesting of schemas applied to one instance fails validation
 * instead of risking the stack. Compilation already rejects $ref loops that
 * do not descend into the instance, so only a deeply nested instance gets
 * here. */
#define MAX_DEPTH 2048

/* One step of the instance location: a member name or an array index. */
typedef struct path {
    const struct path *parent;
    const char *key; /* NULL for an array index */
    size_t key_len;
    size_t index;
} path_t;

/* The instance being validated: a JSON value, or a member name that
 * propertyNames validates as a string without building a json_t for it. */
typedef struct instance {
    const json_t *json; /* NULL for a member name */
    const char *name;
    size_t name_len;
} instance_t;

typedef struct context {
    const schema_t *schema;
    validate_errors_t *errs; /* NULL when only the verdict matters */
    size_t limit;
    size_t failures;
    bool stop;          /* the error list is full */
    bool property_name; /* validating a member name for propertyNames */
    int depth;
} context_t;

static bool check_node(const node_t *n, const instance_t *inst,
                       const path_t *path, context_t *ctx, const char *keyword);

static bool check_json(const node_t *n, const json_t *json, const path_t *path,
                       context_t *ctx, const char *keyword)
{
    instance_t inst = {json, NULL, 0};

    return check_node(n, &inst, path, ctx, keyword);
}

static json_type instance_typeof(const instance_t *inst)
{
    return inst->json != NULL ? json_typeof(inst->json) : JSON_STRING;
}

/* Returns the length of the JSON Pointer for `path`, escapes included. */
static size_t pointer_length(const path_t *path)
{
    size_t len = 0;
    char digits[24];

    for (; path != NULL; path = path->parent) {
        len++;
        if (path->key == NULL) {
            len += (size_t)snprintf(digits, sizeof(digits), "%zu", path->index);
            continue;
        }
        for (size_t i = 0; i < path->key_len; i++)
            len += path->key[i] == '~' || path->key[i] == '/' ? 2 : 1;
    }
    return len;
}

/* Builds the JSON Pointer string for `path` from the end backwards, because
 * the frames link from the leaf to the root. */
static char *pointer_build(const path_t *path)
{
    size_t len = pointer_length(path);
    char *buf = malloc(len + 1);
    char *p;
    char digits[24];

    if (buf == NULL)
        return NULL;
    p = buf + len;
    *p = '\0';
    for (; path != NULL; path = path->parent) {
        if (path->key == NULL) {
            int n = snprintf(digits, sizeof(digits), "%zu", path->index);
            p -= n;
            memcpy(p, digits, (size_t)n);
        } else {
            for (size_t i = path->key_len; i-- > 0;) {
                char ch = path->key[i];
                if (ch == '~' || ch == '/') {
                    *--p = ch == '~' ? '0' : '1';
                    *--p = '~';
                } else {
                    *--p = ch;
                }
            }
        }
        *--p = '/';
    }
    return buf;
}

/* Counts a failure and, when errors are being collected, appends one. */
__attribute__((format(printf, 3, 4))) static void
report(context_t *ctx, const path_t *path, const char *fmt, ...)
{
    validate_errors_t *errs = ctx->errs;
    validate_error_t *item;
    char *reason = NULL, *message = NULL;
    va_list ap;

    ctx->failures++;
    if (errs == NULL)
        return;
    if (errs->count >= ctx->limit) {
        ctx->stop = true;
        return;
    }
    if (errs->count == errs->cap) {
        size_t cap = errs->cap ? errs->cap * 2 : 4;
        validate_error_t *grown = realloc(errs->items, cap * sizeof(*grown));
        if (grown == NULL)
            return;
        errs->items = grown;
        errs->cap = cap;
    }
    va_start(ap, fmt);
    if (vasprintf(&message, fmt, ap) < 0)
        message = NULL;
    va_end(ap);
    if (message != NULL && ctx->property_name) {
        if (asprintf(&reason, "property name %s", message) < 0)
            reason = NULL;
        free(message);
    } else {
        reason = message;
    }
    item = &errs->items[errs->count];
    item->pointer = pointer_build(path);
    item->reason = reason;
    if (item->pointer == NULL || item->reason == NULL) {
        free(item->pointer);
        free(item->reason);
        return;
    }
    errs->count++;
    if (errs->count >= ctx->limit)
        ctx->stop = true;
}

static const char *instance_type(const instance_t *inst)
{
    switch (instance_typeof(inst)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "integer";
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    default:
        return "null";
    }
}

static bool type_matches(uint8_t types, const instance_t *inst)
{
    num_t n;

    switch (instance_typeof(inst)) {
    case JSON_OBJECT:
        return types & TYPE_OBJECT;
    case JSON_ARRAY:
        return types & TYPE_ARRAY;
    case JSON_STRING:
        return types & TYPE_STRING;
    case JSON_INTEGER:
        return types & (TYPE_NUMBER | TYPE_INTEGER);
    case JSON_REAL:
        if (types & TYPE_NUMBER)
            return true;
        validate_num_from_json(inst->json, &n);
        return (types & TYPE_INTEGER) && validate_num_is_integral(&n);
    case JSON_TRUE:
    case JSON_FALSE:
        return types & TYPE_BOOLEAN;
    default:
        return types & TYPE_NULL;
    }
}

static void report_type(context_t *ctx, const path_t *path, uint8_t types,
                        const instance_t *inst)
{
    static const char *names[] = {"null",   "boolean", "object", "array",
                                  "number", "string",  "integer"};
    char list[96];
    size_t len = 0;

    list[0] = '\0';
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (!(types & (1u << i)))
            continue;
        len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%s",
                                len ? " or " : "", names[i]);
    }
    report(ctx, path, "must be of type %s, got %s", list, instance_type(inst));
}

/* Writes a compact JSON text of `v` for a message, or "" when it is too
 * long to be useful there. */
static void describe_value(const json_t *v, char *buf, size_t size)
{
    char *text =
        json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER);

    buf[0] = '\0';
    if (text != NULL && strlen(text) < size)
        memcpy(buf, text, strlen(text) + 1);
    free(text);
}

static bool check_number(const node_t *n, const json_t *inst,
                         const path_t *path, context_t *ctx)
{
    static const struct {
        uint32_t bit;
        size_t offset;
        const char *op;
        int fail_when; /* the comparison result that fails */
        int fail_also;
    } bounds[] = {
        {HAS_MINIMUM, offsetof(node_t, minimum), ">=", -1, -1},
        {HAS_MAXIMUM, offsetof(node_t, maximum), "<=", 1, 1},
        {HAS_EXCLUSIVE_MINIMUM, offsetof(node_t, exclusive_minimum), ">", -1,
         0},
        {HAS_EXCLUSIVE_MAXIMUM, offsetof(node_t, exclusive_maximum), "<", 1, 0},
    };
    char limit_text[40], value_text[40];
    bool ok = true;
    num_t value;

    validate_num_from_json(inst, &value);
    for (size_t i = 0; i < sizeof(bounds) / sizeof(bounds[0]); i++) {
        const num_t *limit;
        int cmp;

        if (!(n->has & bounds[i].bit))
            continue;
        limit = (const num_t *)((const char *)n + bounds[i].offset);
        cmp = validate_num_compare(&value, limit);
        if (cmp != bounds[i].fail_when && cmp != bounds[i].fail_also)
            continue;
        ok = false;
        if (ctx->errs == NULL)
            return false;
        validate_num_format(limit, limit_text, sizeof(limit_text));
        validate_num_format(&value, value_text, sizeof(value_text));
        report(ctx, path, "must be %s %s, got %s", bounds[i].op, limit_text,
               value_text);
    }
    if ((n->has & HAS_MULTIPLE_OF) &&
        !validate_num_is_multiple(&value, &n->multiple_of,
                                  &n->multiple_of_decimal)) {
        ok = false;
        if (ctx->errs == NULL)
            return false;
        validate_num_format(&n->multiple_of, limit_text, sizeof(limit_text));
        validate_num_format(&value, value_text, sizeof(value_text));
        report(ctx, path, "must be a multiple of %s, got %s", limit_text,
               value_text);
    }
    return ok;
}

/* Counts code points, as JSON Schema string lengths do, by skipping UTF-8
 * continuation bytes. */
static size_t utf8_length(const char *s, size_t len)
{
    size_t count = 0;

    for (size_t i = 0; i < len; i++)
        count += ((unsigned char)s[i] & 0xC0) != 0x80;
    return count;
}

static const char *plural(size_t n, const char *one, const char *many)
{
    return n == 1 ? one : many;
}

static bool check_string(const node_t *n, const char *s, size_t len,
                         const path_t *path, context_t *ctx)
{
    bool ok = true;

    if (n->has & (HAS_MIN_LENGTH | HAS_MAX_LENGTH)) {
        size_t chars = utf8_length(s, len);

        if ((n->has & HAS_MIN_LENGTH) && chars < n->min_length) {
            ok = false;
            report(ctx, path, "must have at least %zu %s, got %zu",
                   n->min_length,
                   plural(n->min_length, "character", "characters"), chars);
        }
        if ((n->has & HAS_MAX_LENGTH) && chars > n->max_length) {
            ok = false;
            report(ctx, path, "must have at most %zu %s, got %zu",
                   n->max_length,
                   plural(n->max_length, "character", "characters"), chars);
        }
        if (!ok && ctx->errs == NULL)
            return false;
    }
    if (n->pattern.code != NULL &&
        !validate_regex_match(&n->pattern, ctx->schema->match_context, s,
                              len)) {
        ok = false;
        report(ctx, path, "must match pattern \"%s\"", n->pattern.source);
        if (ctx->errs == NULL)
            return false;
    }
    if ((n->has & HAS_DATE_TIME) && !validate_date_time_n(s, len)) {
        ok = false;
        report(ctx, path, "must be a date-time (RFC 3339)");
    }
    return ok;
}

static bool check_array(const node_t *n, const json_t *inst, const path_t *path,
                        context_t *ctx)
{
    size_t size = json_array_size(inst);
    bool ok = true;

    if ((n->has & HAS_MIN_ITEMS) && size < n->min_items) {
        ok = false;
        report(ctx, path, "must have at least %zu %s, got %zu", n->min_items,
               plural(n->min_items, "item", "items"), size);
    }
    if ((n->has & HAS_MAX_ITEMS) && size > n->max_items) {
        ok = false;
        report(ctx, path, "must have at most %zu %s, got %zu", n->max_items,
               plural(n->max_items, "item", "items"), size);
    }
    if (!ok && ctx->errs == NULL)
        return false;
    for (size_t i = 0; i < size && !ctx->stop; i++) {
        path_t item_path = {path, NULL, 0, i};
        const node_t *schema = NULL;
        const char *keyword = "items";

        if (i < n->prefix_items.count) {
            schema = n->prefix_items.items[i];
            keyword = "prefixItems";
        } else {
            schema = n->items;
        }
        if (schema != NULL && !check_json(schema, json_array_get(inst, i),
                                          &item_path, ctx, keyword)) {
            ok = false;
            if (ctx->errs == NULL)
                return false;
        }
    }
    if (n->has & HAS_UNIQUE_ITEMS) {
        /* NOTE: pairwise comparison is quadratic in the array size. Only
         * http.max_body_bytes bounds that size. */
        for (size_t i = 1; i < size; i++) {
            for (size_t j = 0; j < i; j++) {
                if (validate_json_equal(json_array_get(inst, i),
                                        json_array_get(inst, j))) {
                    report(ctx, path,
                           "must not contain duplicate items (items %zu and "
                           "%zu are equal)",
                           j, i);
                    return false;
                }
            }
        }
    }
    return ok;
}

static const property_t *find_property(const node_t *n, const char *key,
                                       size_t len)
{
    size_t lo = 0, hi = n->property_count;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const property_t *p = &n->properties[mid];
        size_t common = p->len < len ? p->len : len;
        int cmp = memcmp(p->name, key, common);

        if (cmp == 0)
            cmp = (p->len > len) - (p->len < len);
        if (cmp == 0)
            return p;
        if (cmp < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* Applies properties, patternProperties, additionalProperties and
 * propertyNames to one member. */
static bool check_member(const node_t *n, const char *key, size_t key_len,
                         const json_t *value, const path_t *path,
                         context_t *ctx)
{
    path_t member_path = {path, key, key_len, 0};
    const property_t *prop = find_property(n, key, key_len);
    bool matched = prop != NULL;
    bool ok = true;

    if (n->property_names != NULL) {
        instance_t name = {NULL, key, key_len};
        bool saved = ctx->property_name;

        ctx->property_name = true;
        ok = check_node(n->property_names, &name, &member_path, ctx,
                        "propertyNames");
        ctx->property_name = saved;
        if (!ok && (ctx->errs == NULL || ctx->stop))
            return false;
    }
    if (prop != NULL &&
        !check_json(prop->schema, value, &member_path, ctx, "properties")) {
        ok = false;
        if (ctx->errs == NULL || ctx->stop)
            return false;
    }
    for (size_t i = 0; i < n->pattern_property_count; i++) {
        const pattern_property_t *pp = &n->pattern_properties[i];

        if (!validate_regex_match(&pp->regex, ctx->schema->match_context, key,
                                  key_len))
            continue;
        matched = true;
        if (!check_json(pp->schema, value, &member_path, ctx,
                        "patternProperties")) {
            ok = false;
            if (ctx->errs == NULL || ctx->stop)
                return false;
        }
    }
    if (!matched && n->additional_properties != NULL &&
        !check_json(n->additional_properties, value, &member_path, ctx,
                    "additionalProperties"))
        ok = false;
    return ok;
}

static bool check_object(const node_t *n, const json_t *inst,
                         const path_t *path, context_t *ctx)
{
    size_t size = json_object_size(inst);
    bool ok = true;

    if ((n->has & HAS_MIN_PROPERTIES) && size < n->min_properties) {
        ok = false;
        report(ctx, path, "must have at least %zu %s, got %zu",
               n->min_properties,
               plural(n->min_properties, "property", "properties"), size);
    }
    if ((n->has & HAS_MAX_PROPERTIES) && size > n->max_properties) {
        ok = false;
        report(ctx, path, "must have at most %zu %s, got %zu",
               n->max_properties,
               plural(n->max_properties, "property", "properties"), size);
    }
    if (!ok && ctx->errs == NULL)
        return false;
    for (size_t i = 0; i < n->required.count && !ctx->stop; i++) {
        if (json_object_getn(inst, n->required.names[i], n->required.lens[i]) !=
            NULL)
            continue;
        path_t missing = {path, n->required.names[i], n->required.lens[i], 0};
        ok = false;
        report(ctx, &missing, "is required");
        if (ctx->errs == NULL)
            return false;
    }
    for (size_t i = 0; i < n->dependent_required_count && !ctx->stop; i++) {
        const dependent_required_t *d = &n->dependent_required[i];

        if (json_object_getn(inst, d->name, d->len) == NULL)
            continue;
        for (size_t j = 0; j < d->required.count; j++) {
            if (json_object_getn(inst, d->required.names[j],
                                 d->required.lens[j]) != NULL)
                continue;
            path_t missing = {path, d->required.names[j], d->required.lens[j],
                              0};
            ok = false;
            report(ctx, &missing, "is required when \"%.*s\" is present",
                   (int)d->len, d->name);
            if (ctx->errs == NULL)
                return false;
        }
    }
    if (n->property_count == 0 && n->pattern_property_count == 0 &&
        n->additional_properties == NULL && n->property_names == NULL)
        return ok;
    /* The iterator calls take a non-const object, but only read it. They
     * avoid the key-to-iterator lookup that json_object_keylen_foreach()
     * repeats on every step. */
    for (void *it = json_object_iter((json_t *)inst); it != NULL && !ctx->stop;
         it = json_object_iter_next((json_t *)inst, it)) {
        const char *key = json_object_iter_key(it);
        size_t key_len = json_object_iter_key_len(it);

        if (!check_member(n, key, key_len, json_object_iter_value(it), path,
                          ctx)) {
            ok = false;
            if (ctx->errs == NULL)
                return false;
        }
    }
    return ok;
}

/* Returns true if `inst` is valid against `n`, without recording errors. */
static bool matches(const node_t *n, const instance_t *inst, const path_t *path,
                    context_t *ctx)
{
    context_t quiet = *ctx;

    quiet.errs = NULL;
    quiet.failures = 0;
    quiet.stop = false;
    return check_node(n, inst, path, &quiet, NULL);
}

/* Compares the instance with a value from the schema as JSON values. */
static bool instance_equal(const instance_t *inst, const json_t *value)
{
    if (inst->json != NULL)
        return validate_json_equal(inst->json, value);
    return json_is_string(value) &&
           json_string_length(value) == inst->name_len &&
           memcmp(json_string_value(value), inst->name, inst->name_len) == 0;
}

static bool check_enum_const(const node_t *n, const instance_t *inst,
                             const path_t *path, context_t *ctx)
{
    char text[100];
    bool ok = true;

    if ((n->has & HAS_CONST) && !instance_equal(inst, n->const_value)) {
        ok = false;
        if (ctx->errs == NULL)
            return false;
        describe_value(n->const_value, text, sizeof(text));
        if (text[0] != '\0')
            report(ctx, path, "must be equal to %s", text);
        else
            report(ctx, path, "must be equal to the value of const");
    }
    if (n->has & HAS_ENUM) {
        size_t count = json_array_size(n->enum_values);

        for (size_t i = 0; i < count; i++) {
            if (instance_equal(inst, json_array_get(n->enum_values, i)))
                return ok;
        }
        if (ctx->errs == NULL)
            return false;
        describe_value(n->enum_values, text, sizeof(text));
        if (text[0] != '\0')
            report(ctx, path, "must be one of %s", text);
        else
            report(ctx, path, "must be one of the %zu values in enum", count);
        ok = false;
    }
    return ok;
}

static bool check_applicators(const node_t *n, const instance_t *inst,
                              const path_t *path, context_t *ctx)
{
    bool ok = true;

    for (size_t i = 0; i < n->all_of.count && !ctx->stop; i++) {
        if (!check_node(n->all_of.items[i], inst, path, ctx, "allOf")) {
            ok = false;
            if (ctx->errs == NULL)
                return false;
        }
    }
    if (n->any_of.count > 0) {
        bool any = false;
        for (size_t i = 0; i < n->any_of.count && !any; i++)
            any = matches(n->any_of.items[i], inst, path, ctx);
        if (!any) {
            ok = false;
            report(ctx, path, "must match at least one schema in anyOf");
            if (ctx->errs == NULL)
                return false;
        }
    }
    if (n->one_of.count > 0) {
        size_t matched = 0, first = 0, second = 0;
        for (size_t i = 0; i < n->one_of.count && matched < 2; i++) {
            if (!matches(n->one_of.items[i], inst, path, ctx))
                continue;
            if (matched++ == 0)
                first = i;
            else
                second = i;
        }
        if (matched == 0) {
            ok = false;
            report(ctx, path,
                   "must match exactly one schema in oneOf, "
                   "matched none");
        } else if (matched > 1) {
            ok = false;
            report(ctx, path,
                   "must match exactly one schema in oneOf, matched %zu and "
                   "%zu",
                   first, second);
        }
        if (!ok && ctx->errs == NULL)
            return false;
    }
    if (n->not_schema != NULL && matches(n->not_schema, inst, path, ctx)) {
        ok = false;
        report(ctx, path, "must not match the schema in not");
        if (ctx->errs == NULL)
            return false;
    }
    if (n->if_schema != NULL && !ctx->stop) {
        const node_t *branch = matches(n->if_schema, inst, path, ctx)
                                   ? n->then_schema
                                   : n->else_schema;
        const char *keyword = branch == n->then_schema ? "then" : "else";

        if (branch != NULL && !check_node(branch, inst, path, ctx, keyword))
            ok = false;
    }
    return ok;
}

/* Validates `inst` against `n`. `keyword` names the keyword that applied
 * `n`, for the message of a false schema. */
static bool check_node(const node_t *n, const instance_t *inst,
                       const path_t *path, context_t *ctx, const char *keyword)
{
    bool ok = true;

    if (n->is_bool) {
        if (n->bool_value)
            return true;
        report(ctx, path, "is not allowed (%s is false)",
               keyword != NULL ? keyword : "schema");
        return false;
    }
    if (ctx->depth >= MAX_DEPTH) {
        report(ctx, path, "is nested too deeply (more than %d levels)",
               MAX_DEPTH);
        return false;
    }
    ctx->depth++;
    if (n->types != 0 && !type_matches(n->types, inst)) {
        ok = false;
        report_type(ctx, path, n->types, inst);
        if (ctx->errs == NULL)
            goto done;
    }
    if (n->ref != NULL && !check_node(n->ref, inst, path, ctx, "$ref")) {
        ok = false;
        if (ctx->errs == NULL || ctx->stop)
            goto done;
    }
    if ((n->has & (HAS_CONST | HAS_ENUM)) &&
        !check_enum_const(n, inst, path, ctx)) {
        ok = false;
        if (ctx->errs == NULL || ctx->stop)
            goto done;
    }
    switch (instance_typeof(inst)) {
    case JSON_INTEGER:
    case JSON_REAL:
        if (!check_number(n, inst->json, path, ctx))
            ok = false;
        break;
    case JSON_STRING:
        if (inst->json != NULL)
            ok = check_string(n, json_string_value(inst->json),
                              json_string_length(inst->json), path, ctx) &&
                 ok;
        else
            ok = check_string(n, inst->name, inst->name_len, path, ctx) && ok;
        break;
    case JSON_ARRAY:
        if (!check_array(n, inst->json, path, ctx))
            ok = false;
        break;
    case JSON_OBJECT:
        if (!check_object(n, inst->json, path, ctx))
            ok = false;
        break;
    default:
        break;
    }
    if (!ok && (ctx->errs == NULL || ctx->stop))
        goto done;
    if (!check_applicators(n, inst, path, ctx))
        ok = false;

done:
    ctx->depth--;
    return ok;
}

int schema_validate(const schema_t *s, const json_t *instance,
                    validate_errors_t *errs)
{
    context_t ctx = {0};
    size_t before = errs != NULL ? errs->count : 0;

    ctx.schema = s;
    ctx.errs = errs;
    ctx.limit =
        errs != NULL && errs->limit != 0 ? errs->limit : DEFAULT_ERROR_LIMIT;
    if (check_json(s->root, instance, NULL, &ctx, NULL))
        return 0;
    /* An error that could not be stored for lack of memory still makes the
     * instance invalid. */
    if (errs != NULL && errs->count > before)
        return (int)(errs->count - before);
    return 1;
}

void validate_errors_init(validate_errors_t *errs)
{
    errs->items = NULL;
    errs->count = 0;
    errs->cap = 0;
    errs->limit = 0;
}

void validate_errors_clear(validate_errors_t *errs)
{
    for (size_t i = 0; i < errs->count; i++) {
        free(errs->items[i].pointer);
        free(errs->items[i].reason);
    }
    free(errs->items);
    errs->items = NULL;
    errs->count = 0;
    errs->cap = 0;
}
