/* JSON Schema (draft 2020-12) validation for the keywords telemetry schemas
 * use.
 *
 * A schema is compiled once, when the configuration loads. Compilation
 * rejects any keyword this validator does not implement, so a schema is never
 * half-enforced. Supported: type, properties, required,
 * additionalProperties, patternProperties, propertyNames, enum, const,
 * minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf,
 * minLength, maxLength, pattern, items, prefixItems, minItems, maxItems,
 * uniqueItems, minProperties, maxProperties, allOf, anyOf, oneOf, not,
 * if/then/else, dependentRequired, $defs, local $ref ("#", "#/$defs/x",
 * JSON Pointers into the same document), format "date-time", and the
 * annotations $schema, $id (root only), $comment, title, description,
 * default, examples, deprecated, readOnly, writeOnly.
 */
#ifndef INGESTD_VALIDATE_VALIDATE_H
#define INGESTD_VALIDATE_VALIDATE_H

#include <stddef.h>

#include <jansson.h>

typedef struct schema schema_t;

/* One failed check: where in the instance, and why. */
typedef struct validate_error {
    char *pointer; /* JSON Pointer into the instance, "" for the root */
    char *reason;  /* for example "must be <= 100, got 120.5" */
} validate_error_t;

typedef struct validate_errors {
    validate_error_t *items;
    size_t count;
    size_t cap;
    size_t limit; /* stop collecting past this many; 0 = 16 */
} validate_errors_t;

/* Compiles `doc` (borrowed; the schema keeps its own reference). On success
 * stores the schema in `*out` and returns 0. On failure returns ING_EINVAL
 * and writes a message naming the schema location and the reason into
 * `err`, for example "#/properties/x: unsupported keyword \"format\" value
 * \"email\"". */
int schema_compile(json_t *doc, schema_t **out, char *err, size_t errlen);

/* Validates `instance` against `s`. Returns 0 when it is valid, or the
 * number of errors appended to `errs` (at least 1) when it is not. Errors
 * from branches of anyOf/oneOf/not that failed are summarised at the
 * branching keyword, not listed one by one. `errs` may be NULL when only
 * the verdict matters, and then an invalid instance returns 1. Thread-safe:
 * a compiled schema is read-only. */
int schema_validate(const schema_t *s, const json_t *instance,
                    validate_errors_t *errs);

void schema_free(schema_t *s);

void validate_errors_init(validate_errors_t *errs);
void validate_errors_clear(validate_errors_t *errs);

/* Returns 1 if `s` is an RFC 3339 date-time ("2026-12-04T17:00:00Z",
 * "...+01:00", optional fraction), else 0. */
int validate_is_date_time(const char *s);

#endif
