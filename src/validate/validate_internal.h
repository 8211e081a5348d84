/* The compiled form of a schema, shared by the files of the validate module.
 *
 * schema_compile() turns each schema object into one node_t whose fields are
 * the keywords it contains, already checked and converted: numbers as
 * num_t, regular expressions compiled, local $ref targets resolved to nodes.
 * Validation only reads these nodes.
 */
#ifndef INGESTD_VALIDATE_INTERNAL_H
#define INGESTD_VALIDATE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>

#include "validate/validate.h"

/* Bits of node_t.types, one per JSON Schema type name. */
enum {
    TYPE_NULL = 1 << 0,
    TYPE_BOOLEAN = 1 << 1,
    TYPE_OBJECT = 1 << 2,
    TYPE_ARRAY = 1 << 3,
    TYPE_NUMBER = 1 << 4,
    TYPE_STRING = 1 << 5,
    TYPE_INTEGER = 1 << 6,
};

/* Bits of node_t.has, one per keyword whose presence a zero value cannot
 * show. */
enum {
    HAS_MINIMUM = 1 << 0,
    HAS_MAXIMUM = 1 << 1,
    HAS_EXCLUSIVE_MINIMUM = 1 << 2,
    HAS_EXCLUSIVE_MAXIMUM = 1 << 3,
    HAS_MULTIPLE_OF = 1 << 4,
    HAS_MIN_LENGTH = 1 << 5,
    HAS_MAX_LENGTH = 1 << 6,
    HAS_MIN_ITEMS = 1 << 7,
    HAS_MAX_ITEMS = 1 << 8,
    HAS_MIN_PROPERTIES = 1 << 9,
    HAS_MAX_PROPERTIES = 1 << 10,
    HAS_CONST = 1 << 11,
    HAS_ENUM = 1 << 12,
    HAS_UNIQUE_ITEMS = 1 << 13,
    HAS_DATE_TIME = 1 << 14,
};

/* A JSON number exactly as the document gave it: an integer or a double. */
typedef struct num {
    bool is_int;
    json_int_t i;
    double d;
} num_t;

/* A finite decimal mantissa * 10^exponent, with the sign dropped, used by
 * multipleOf so that 0.0075 is an exact multiple of 0.0001. */
typedef struct decimal {
    uint64_t mantissa;
    int exponent;
} decimal_t;

typedef struct schema_regex {
    pcre2_code *code;
    const char *source; /* borrowed from the schema document */
} schema_regex_t;

typedef struct node node_t;

typedef struct property {
    const char *name; /* borrowed from the schema document */
    size_t len;
    node_t *schema;
} property_t;

typedef struct pattern_property {
    schema_regex_t regex;
    node_t *schema;
} pattern_property_t;

typedef struct name_list {
    const char **names; /* borrowed from the schema document */
    size_t *lens;
    size_t count;
} name_list_t;

typedef struct dependent_required {
    const char *name;
    size_t len;
    name_list_t required;
} dependent_required_t;

typedef struct node_list {
    node_t **items;
    size_t count;
} node_list_t;

/* One compiled schema. A boolean schema is a node with only `is_bool` set,
 * and a schema object is a node whose fields hold its keywords. */
struct node {
    bool is_bool;
    bool bool_value;
    uint8_t types; /* TYPE_* bits, 0 when "type" is absent */
    uint32_t has;  /* HAS_* bits */

    num_t minimum, maximum, exclusive_minimum, exclusive_maximum;
    num_t multiple_of;
    decimal_t multiple_of_decimal;
    size_t min_length, max_length;
    schema_regex_t pattern; /* code is NULL when absent */

    node_list_t prefix_items;
    node_t *items;
    size_t min_items, max_items;

    property_t *properties; /* sorted by name for binary search */
    size_t property_count;
    pattern_property_t *pattern_properties;
    size_t pattern_property_count;
    node_t *additional_properties;
    node_t *property_names;
    name_list_t required;
    dependent_required_t *dependent_required;
    size_t dependent_required_count;
    size_t min_properties, max_properties;

    const json_t *const_value; /* borrowed from the schema document */
    const json_t *enum_values;

    node_list_t all_of, any_of, one_of;
    node_t *not_schema;
    node_t *if_schema, *then_schema, *else_schema;
    node_t *ref;

    /* Compile-time bookkeeping for the $ref cycle check. */
    uint8_t visit_state;
    const char *location; /* owned, "#/..." */
};

struct schema {
    json_t *doc;    /* a reference held for the borrowed strings and values */
    node_t *root;   /* also nodes[0] */
    node_t **nodes; /* every node, for schema_free() */
    size_t node_count, node_cap;
    pcre2_match_context *match_context;
};

/* State of one schema_compile() call (compile.c). */
typedef struct compiler {
    schema_t *schema;
    const json_t *root_doc;
    struct map_entry {
        const json_t *key;
        node_t *node;
    } * map; /* open addressing: schema value -> its node */
    size_t map_cap, map_count;
    char *location; /* "#/properties/x" for the schema being compiled */
    size_t location_len, location_cap;
    char *err;
    size_t errlen;
    int rc;
} compiler_t;

int validate_compiler_fail(compiler_t *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
node_t *validate_compile_subschema(compiler_t *c, const json_t *value,
                                   const char *segment, size_t segment_len,
                                   const char *segment2, size_t segment2_len);
int validate_compile_ref(compiler_t *c, node_t *n, const json_t *value);

/* A keyword that compilation accepts (keywords.c). `compile` checks the
 * keyword's value and stores it in the node. `field` selects the node field
 * when several keywords share one handler. */
typedef struct keyword {
    const char *name;
    int (*compile)(compiler_t *c, node_t *n, const struct keyword *kw,
                   const json_t *value);
    int field;
} keyword_t;

const keyword_t *validate_keyword_find(const char *name, size_t len);

/* Numbers (number.c). */
void validate_num_from_json(const json_t *value, num_t *out);
int validate_num_compare(const num_t *a, const num_t *b);
bool validate_num_is_integral(const num_t *n);
bool validate_num_to_decimal(const num_t *n, decimal_t *out);
bool validate_num_is_multiple(const num_t *n, const num_t *divisor,
                              const decimal_t *divisor_decimal);
void validate_num_format(const num_t *n, char *buf, size_t size);
bool validate_json_equal(const json_t *a, const json_t *b);

/* Regular expressions (regex.c). */
int validate_regex_compile(schema_regex_t *re, const char *source, size_t len,
                           char *err, size_t errlen);
void validate_regex_free(schema_regex_t *re);
pcre2_match_context *validate_regex_match_context(void);
bool validate_regex_match(const schema_regex_t *re,
                          const pcre2_match_context *mctx, const char *s,
                          size_t len);

/* Date-time (date_time.c). */
bool validate_date_time_n(const char *s, size_t len);

#endif
