/* The supported keywords: each handler checks that the keyword's value has
 * the form draft 2020-12 requires and stores it in the node. A keyword
 * missing from the table makes compilation fail, so a schema is never
 * enforced in part.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "validate/validate_internal.h"

#define DRAFT_2020_12 "https://json-schema.org/draft/2020-12/schema"

/* Values of keyword_t.field for the handlers shared by several keywords. */
enum {
    F_NONE,
    F_MINIMUM,
    F_MAXIMUM,
    F_EXCLUSIVE_MINIMUM,
    F_EXCLUSIVE_MAXIMUM,
    F_MIN_LENGTH,
    F_MAX_LENGTH,
    F_MIN_ITEMS,
    F_MAX_ITEMS,
    F_MIN_PROPERTIES,
    F_MAX_PROPERTIES,
    F_ITEMS,
    F_ADDITIONAL_PROPERTIES,
    F_PROPERTY_NAMES,
    F_NOT,
    F_IF,
    F_THEN,
    F_ELSE,
    F_ALL_OF,
    F_ANY_OF,
    F_ONE_OF,
    F_PREFIX_ITEMS,
};

static const char *type_of(const json_t *v)
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

static int expected(compiler_t *c, const keyword_t *kw, const char *what,
                    const json_t *value)
{
    return validate_compiler_fail(c, "invalid \"%s\": expected %s, got %s",
                                  kw->name, what, type_of(value));
}

static int compile_annotation(compiler_t *c, node_t *n, const keyword_t *kw,
                              const json_t *value)
{
    return 0;
}

static int compile_string_annotation(compiler_t *c, node_t *n,
                                     const keyword_t *kw, const json_t *value)
{
    return json_is_string(value) ? 0 : expected(c, kw, "a string", value);
}

static int compile_boolean_annotation(compiler_t *c, node_t *n,
                                      const keyword_t *kw, const json_t *value)
{
    return json_is_boolean(value) ? 0 : expected(c, kw, "a boolean", value);
}

static int compile_examples(compiler_t *c, node_t *n, const keyword_t *kw,
                            const json_t *value)
{
    return json_is_array(value) ? 0 : expected(c, kw, "an array", value);
}

static int compile_schema_uri(compiler_t *c, node_t *n, const keyword_t *kw,
                              const json_t *value)
{
    const char *uri = json_string_value(value);

    if (uri == NULL)
        return expected(c, kw, "a string", value);
    if (strcmp(uri, DRAFT_2020_12) != 0 && strcmp(uri, DRAFT_2020_12 "#") != 0)
        return validate_compiler_fail(c,
                                      "unsupported keyword \"$schema\" value "
                                      "\"%s\": only \"" DRAFT_2020_12
                                      "\" is supported",
                                      uri);
    return 0;
}

/* Accepts "$id" on the root only. Below the root it would start a new
 * schema resource with its own base URI, which $ref resolution here does
 * not track. */
static int compile_id(compiler_t *c, node_t *n, const keyword_t *kw,
                      const json_t *value)
{
    if (n != c->schema->nodes[0])
        return validate_compiler_fail(c, "unsupported keyword \"$id\" "
                                         "below the root (embedded schema "
                                         "resources)");
    return json_is_string(value) ? 0 : expected(c, kw, "a string", value);
}

static int compile_ref(compiler_t *c, node_t *n, const keyword_t *kw,
                       const json_t *value)
{
    return validate_compile_ref(c, n, value);
}

static int compile_defs(compiler_t *c, node_t *n, const keyword_t *kw,
                        const json_t *value)
{
    const char *key;
    size_t key_len;
    json_t *member;

    if (!json_is_object(value))
        return expected(c, kw, "an object", value);
    /* Every definition compiles, used or not, so that an unsupported
     * keyword in one is reported when the schema loads. */
    json_object_keylen_foreach ((json_t *)value, key, key_len, member) {
        if (validate_compile_subschema(c, member, kw->name, strlen(kw->name),
                                       key, key_len) == NULL)
            return -1;
    }
    return 0;
}

static int type_bit(const char *name)
{
    static const struct {
        const char *name;
        int bit;
    } types[] = {
        {"null", TYPE_NULL},       {"boolean", TYPE_BOOLEAN},
        {"object", TYPE_OBJECT},   {"array", TYPE_ARRAY},
        {"number", TYPE_NUMBER},   {"string", TYPE_STRING},
        {"integer", TYPE_INTEGER},
    };

    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (strcmp(name, types[i].name) == 0)
            return types[i].bit;
    }
    return 0;
}

static int compile_type(compiler_t *c, node_t *n, const keyword_t *kw,
                        const json_t *value)
{
    const char *name;
    int bit;

    if (json_is_string(value)) {
        bit = type_bit(json_string_value(value));
        if (bit == 0)
            return validate_compiler_fail(c,
                                          "invalid \"type\": unknown type "
                                          "\"%s\"",
                                          json_string_value(value));
        n->types = (uint8_t)bit;
        return 0;
    }
    if (!json_is_array(value) || json_array_size(value) == 0)
        return expected(c, kw, "a type name or a non-empty array of them",
                        value);
    for (size_t i = 0; i < json_array_size(value); i++) {
        name = json_string_value(json_array_get(value, i));
        bit = name != NULL ? type_bit(name) : 0;
        if (bit == 0)
            return validate_compiler_fail(c,
                                          "invalid \"type\": element %zu "
                                          "is not a type name",
                                          i);
        if (n->types & bit)
            return validate_compiler_fail(c,
                                          "invalid \"type\": \"%s\" "
                                          "appears twice",
                                          name);
        n->types |= (uint8_t)bit;
    }
    return 0;
}

static int compile_enum(compiler_t *c, node_t *n, const keyword_t *kw,
                        const json_t *value)
{
    if (!json_is_array(value))
        return expected(c, kw, "an array", value);
    n->enum_values = value;
    n->has |= HAS_ENUM;
    return 0;
}

static int compile_const(compiler_t *c, node_t *n, const keyword_t *kw,
                         const json_t *value)
{
    n->const_value = value;
    n->has |= HAS_CONST;
    return 0;
}

static int compile_bound(compiler_t *c, node_t *n, const keyword_t *kw,
                         const json_t *value)
{
    num_t *target;

    if (!json_is_number(value))
        return expected(c, kw, "a number", value);
    switch (kw->field) {
    case F_MINIMUM:
        target = &n->minimum;
        n->has |= HAS_MINIMUM;
        break;
    case F_MAXIMUM:
        target = &n->maximum;
        n->has |= HAS_MAXIMUM;
        break;
    case F_EXCLUSIVE_MINIMUM:
        target = &n->exclusive_minimum;
        n->has |= HAS_EXCLUSIVE_MINIMUM;
        break;
    default:
        target = &n->exclusive_maximum;
        n->has |= HAS_EXCLUSIVE_MAXIMUM;
        break;
    }
    validate_num_from_json(value, target);
    return 0;
}

static int compile_multiple_of(compiler_t *c, node_t *n, const keyword_t *kw,
                               const json_t *value)
{
    if (!json_is_number(value) || json_number_value(value) <= 0)
        return expected(c, kw, "a number greater than 0", value);
    validate_num_from_json(value, &n->multiple_of);
    if (!validate_num_to_decimal(&n->multiple_of, &n->multiple_of_decimal))
        return expected(c, kw, "a finite number", value);
    n->has |= HAS_MULTIPLE_OF;
    return 0;
}

static int compile_count(compiler_t *c, node_t *n, const keyword_t *kw,
                         const json_t *value)
{
    static const struct {
        size_t offset;
        uint32_t bit;
    } fields[] = {
        [F_MIN_LENGTH] = {offsetof(node_t, min_length), HAS_MIN_LENGTH},
        [F_MAX_LENGTH] = {offsetof(node_t, max_length), HAS_MAX_LENGTH},
        [F_MIN_ITEMS] = {offsetof(node_t, min_items), HAS_MIN_ITEMS},
        [F_MAX_ITEMS] = {offsetof(node_t, max_items), HAS_MAX_ITEMS},
        [F_MIN_PROPERTIES] = {offsetof(node_t, min_properties),
                              HAS_MIN_PROPERTIES},
        [F_MAX_PROPERTIES] = {offsetof(node_t, max_properties),
                              HAS_MAX_PROPERTIES},
    };
    size_t count;

    /* Draft 2020-12 lets a count be written as 2.0. */
    if (json_is_integer(value) && json_integer_value(value) >= 0) {
        count = (size_t)json_integer_value(value);
    } else if (json_is_real(value) && json_real_value(value) >= 0 &&
               json_real_value(value) < 9007199254740992.0 &&
               floor(json_real_value(value)) == json_real_value(value)) {
        count = (size_t)json_real_value(value);
    } else {
        return expected(c, kw, "a non-negative integer", value);
    }
    *(size_t *)((char *)n + fields[kw->field].offset) = count;
    n->has |= fields[kw->field].bit;
    return 0;
}

static int compile_pattern(compiler_t *c, node_t *n, const keyword_t *kw,
                           const json_t *value)
{
    char message[256];

    if (!json_is_string(value))
        return expected(c, kw, "a string", value);
    if (validate_regex_compile(&n->pattern, json_string_value(value),
                               json_string_length(value), message,
                               sizeof(message)) != 0)
        return validate_compiler_fail(c, "invalid \"pattern\" \"%s\": %s",
                                      json_string_value(value), message);
    return 0;
}

static int compile_format(compiler_t *c, node_t *n, const keyword_t *kw,
                          const json_t *value)
{
    if (!json_is_string(value))
        return expected(c, kw, "a string", value);
    if (strcmp(json_string_value(value), "date-time") != 0)
        return validate_compiler_fail(c,
                                      "unsupported keyword \"format\" value "
                                      "\"%s\"",
                                      json_string_value(value));
    n->has |= HAS_DATE_TIME;
    return 0;
}

/* Compiles a keyword whose value is one schema. */
static int compile_single(compiler_t *c, node_t *n, const keyword_t *kw,
                          const json_t *value)
{
    node_t *sub = validate_compile_subschema(c, value, kw->name,
                                             strlen(kw->name), NULL, 0);

    if (sub == NULL)
        return -1;
    switch (kw->field) {
    case F_ITEMS:
        n->items = sub;
        break;
    case F_ADDITIONAL_PROPERTIES:
        n->additional_properties = sub;
        break;
    case F_PROPERTY_NAMES:
        n->property_names = sub;
        break;
    case F_NOT:
        n->not_schema = sub;
        break;
    case F_IF:
        n->if_schema = sub;
        break;
    case F_THEN:
        n->then_schema = sub;
        break;
    default:
        n->else_schema = sub;
        break;
    }
    return 0;
}

/* Compiles a keyword whose value is a non-empty array of schemas. */
static int compile_list(compiler_t *c, node_t *n, const keyword_t *kw,
                        const json_t *value)
{
    node_list_t *list;
    char index[24];

    if (!json_is_array(value) || json_array_size(value) == 0)
        return expected(c, kw, "a non-empty array of schemas", value);
    switch (kw->field) {
    case F_ALL_OF:
        list = &n->all_of;
        break;
    case F_ANY_OF:
        list = &n->any_of;
        break;
    case F_ONE_OF:
        list = &n->one_of;
        break;
    default:
        list = &n->prefix_items;
        break;
    }
    list->items = calloc(json_array_size(value), sizeof(*list->items));
    if (list->items == NULL)
        return validate_compiler_fail(c, "out of memory");
    for (size_t i = 0; i < json_array_size(value); i++) {
        int len = snprintf(index, sizeof(index), "%zu", i);
        list->items[i] =
            validate_compile_subschema(c, json_array_get(value, i), kw->name,
                                       strlen(kw->name), index, (size_t)len);
        if (list->items[i] == NULL)
            return -1;
        list->count++;
    }
    return 0;
}

static int compare_properties(const void *a, const void *b)
{
    const property_t *x = a, *y = b;
    size_t len = x->len < y->len ? x->len : y->len;
    int rc = memcmp(x->name, y->name, len);

    if (rc != 0)
        return rc;
    return (x->len > y->len) - (x->len < y->len);
}

static int compile_properties(compiler_t *c, node_t *n, const keyword_t *kw,
                              const json_t *value)
{
    const char *key;
    size_t key_len;
    json_t *member;

    if (!json_is_object(value))
        return expected(c, kw, "an object", value);
    n->properties = calloc(json_object_size(value) + 1, sizeof(*n->properties));
    if (n->properties == NULL)
        return validate_compiler_fail(c, "out of memory");
    json_object_keylen_foreach ((json_t *)value, key, key_len, member) {
        property_t *p = &n->properties[n->property_count];

        p->name = key;
        p->len = key_len;
        p->schema = validate_compile_subschema(c, member, kw->name,
                                               strlen(kw->name), key, key_len);
        if (p->schema == NULL)
            return -1;
        n->property_count++;
    }
    qsort(n->properties, n->property_count, sizeof(*n->properties),
          compare_properties);
    return 0;
}

static int compile_pattern_properties(compiler_t *c, node_t *n,
                                      const keyword_t *kw, const json_t *value)
{
    const char *key;
    size_t key_len;
    json_t *member;
    char message[256];

    if (!json_is_object(value))
        return expected(c, kw, "an object", value);
    n->pattern_properties =
        calloc(json_object_size(value) + 1, sizeof(*n->pattern_properties));
    if (n->pattern_properties == NULL)
        return validate_compiler_fail(c, "out of memory");
    json_object_keylen_foreach ((json_t *)value, key, key_len, member) {
        pattern_property_t *p =
            &n->pattern_properties[n->pattern_property_count];

        if (validate_regex_compile(&p->regex, key, key_len, message,
                                   sizeof(message)) != 0)
            return validate_compiler_fail(c,
                                          "invalid \"patternProperties\" "
                                          "pattern \"%s\": %s",
                                          key, message);
        n->pattern_property_count++;
        p->schema = validate_compile_subschema(c, member, kw->name,
                                               strlen(kw->name), key, key_len);
        if (p->schema == NULL)
            return -1;
    }
    return 0;
}

/* Fills `list` from an array of distinct property names. */
static int compile_name_list(compiler_t *c, const char *keyword,
                             name_list_t *list, const json_t *value)
{
    size_t count = json_array_size(value);

    if (!json_is_array(value))
        return validate_compiler_fail(c,
                                      "invalid \"%s\": expected an "
                                      "array of strings",
                                      keyword);
    list->names = calloc(count + 1, sizeof(*list->names));
    list->lens = calloc(count + 1, sizeof(*list->lens));
    if (list->names == NULL || list->lens == NULL)
        return validate_compiler_fail(c, "out of memory");
    for (size_t i = 0; i < count; i++) {
        const json_t *name = json_array_get(value, i);

        if (!json_is_string(name))
            return validate_compiler_fail(c,
                                          "invalid \"%s\": element %zu "
                                          "is not a string",
                                          keyword, i);
        for (size_t j = 0; j < i; j++) {
            if (validate_json_equal(name, json_array_get(value, j)))
                return validate_compiler_fail(c,
                                              "invalid \"%s\": \"%s\" "
                                              "appears twice",
                                              keyword, json_string_value(name));
        }
        list->names[i] = json_string_value(name);
        list->lens[i] = json_string_length(name);
        list->count++;
    }
    return 0;
}

static int compile_required(compiler_t *c, node_t *n, const keyword_t *kw,
                            const json_t *value)
{
    return compile_name_list(c, kw->name, &n->required, value);
}

static int compile_dependent_required(compiler_t *c, node_t *n,
                                      const keyword_t *kw, const json_t *value)
{
    const char *key;
    size_t key_len;
    json_t *member;

    if (!json_is_object(value))
        return expected(c, kw, "an object", value);
    n->dependent_required =
        calloc(json_object_size(value) + 1, sizeof(*n->dependent_required));
    if (n->dependent_required == NULL)
        return validate_compiler_fail(c, "out of memory");
    json_object_keylen_foreach ((json_t *)value, key, key_len, member) {
        dependent_required_t *d =
            &n->dependent_required[n->dependent_required_count++];

        d->name = key;
        d->len = key_len;
        if (compile_name_list(c, kw->name, &d->required, member) != 0)
            return -1;
    }
    return 0;
}

static int compile_unique_items(compiler_t *c, node_t *n, const keyword_t *kw,
                                const json_t *value)
{
    if (!json_is_boolean(value))
        return expected(c, kw, "a boolean", value);
    if (json_is_true(value))
        n->has |= HAS_UNIQUE_ITEMS;
    return 0;
}

static const keyword_t keywords[] = {
    {"$comment", compile_string_annotation, F_NONE},
    {"$defs", compile_defs, F_NONE},
    {"$id", compile_id, F_NONE},
    {"$ref", compile_ref, F_NONE},
    {"$schema", compile_schema_uri, F_NONE},
    {"additionalProperties", compile_single, F_ADDITIONAL_PROPERTIES},
    {"allOf", compile_list, F_ALL_OF},
    {"anyOf", compile_list, F_ANY_OF},
    {"const", compile_const, F_NONE},
    {"default", compile_annotation, F_NONE},
    {"dependentRequired", compile_dependent_required, F_NONE},
    {"deprecated", compile_boolean_annotation, F_NONE},
    {"description", compile_string_annotation, F_NONE},
    {"else", compile_single, F_ELSE},
    {"enum", compile_enum, F_NONE},
    {"examples", compile_examples, F_NONE},
    {"exclusiveMaximum", compile_bound, F_EXCLUSIVE_MAXIMUM},
    {"exclusiveMinimum", compile_bound, F_EXCLUSIVE_MINIMUM},
    {"format", compile_format, F_NONE},
    {"if", compile_single, F_IF},
    {"items", compile_single, F_ITEMS},
    {"maxItems", compile_count, F_MAX_ITEMS},
    {"maxLength", compile_count, F_MAX_LENGTH},
    {"maxProperties", compile_count, F_MAX_PROPERTIES},
    {"maximum", compile_bound, F_MAXIMUM},
    {"minItems", compile_count, F_MIN_ITEMS},
    {"minLength", compile_count, F_MIN_LENGTH},
    {"minProperties", compile_count, F_MIN_PROPERTIES},
    {"minimum", compile_bound, F_MINIMUM},
    {"multipleOf", compile_multiple_of, F_NONE},
    {"not", compile_single, F_NOT},
    {"oneOf", compile_list, F_ONE_OF},
    {"pattern", compile_pattern, F_NONE},
    {"patternProperties", compile_pattern_properties, F_NONE},
    {"prefixItems", compile_list, F_PREFIX_ITEMS},
    {"properties", compile_properties, F_NONE},
    {"propertyNames", compile_single, F_PROPERTY_NAMES},
    {"readOnly", compile_boolean_annotation, F_NONE},
    {"required", compile_required, F_NONE},
    {"then", compile_single, F_THEN},
    {"title", compile_string_annotation, F_NONE},
    {"type", compile_type, F_NONE},
    {"uniqueItems", compile_unique_items, F_NONE},
    {"writeOnly", compile_boolean_annotation, F_NONE},
};

const keyword_t *validate_keyword_find(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(keywords) / sizeof(keywords[0]); i++) {
        if (strlen(keywords[i].name) == len &&
            memcmp(keywords[i].name, name, len) == 0)
            return &keywords[i];
    }
    return NULL;
}
