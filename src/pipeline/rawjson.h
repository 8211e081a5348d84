/* Byte-level helpers over JSON text, so that a reading can be stored as the
 * device sent it instead of as jansson serializes it again (jansson turns
 * 0.1 into 0.10000000000000001, 1E2 into 100.0 and -0 into 0).
 *
 * The input is meant to be text that jansson already accepted, but every
 * function checks its bounds and returns ING_EINVAL for text it cannot
 * follow, so malformed input never reads past `len`.
 */
#ifndef INGESTD_PIPELINE_RAWJSON_H
#define INGESTD_PIPELINE_RAWJSON_H

#include <stddef.h>

/* A byte range of a JSON text. */
typedef struct rawjson_span {
    size_t off;
    size_t len;
} rawjson_span_t;

/* Copies the JSON value in `text` to `out` without the whitespace outside
 * strings; strings are copied byte for byte. `out` must hold `len` bytes,
 * and the output is not NUL-terminated. Stores the output's length in
 * `*out_len`. Returns 0, ING_ETOOBIG when arrays and objects nest deeper
 * than `max_depth` (0: no limit), or ING_EINVAL for an unterminated
 * string or unbalanced brackets. */
int rawjson_minify(const char *text, size_t len, char *out, size_t *out_len,
                   size_t max_depth);

/* Finds the elements of the array that `text` contains (whitespace around
 * it allowed), storing up to `cap` spans in `spans` and the element count
 * in `*count`. Returns 0, ING_ETOOBIG when there are more than `cap`
 * elements, or ING_EINVAL when `text` is not an array. */
int rawjson_array_elements(const char *text, size_t len,
                           rawjson_span_t *spans, size_t cap, size_t *count);

/* Finds the value of member `key` in the object that `text` contains. Keys
 * written with escapes are decoded before they are compared. When a key
 * occurs twice, the last one wins, as in jansson without
 * JSON_REJECT_DUPLICATES. Returns 1 with the span in `*value`, 0 when
 * there is no such member, or ING_EINVAL when `text` is not an object. */
int rawjson_object_member(const char *text, size_t len, const char *key,
                          rawjson_span_t *value);

#endif
