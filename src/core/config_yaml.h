/* The YAML side of config loading, shared by config.c and config_yaml.c.
 *
 * The file is read with libyaml's event API into a small tree of nodes that
 * keep their line numbers, so that every error can name its line. Aliases,
 * a second document and nesting past CONFIG_MAX_DEPTH are rejected while
 * reading. Not part of the config interface: use config.h.
 */
#ifndef INGESTD_CORE_CONFIG_YAML_H
#define INGESTD_CORE_CONFIG_YAML_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include <jansson.h>
#include <yaml.h>

/* Maximum nesting of mappings and sequences. The recursive walks over the
 * tree (freeing, converting inline schemas) stay well inside the stack with
 * this bound, and no sensible config or schema nests deeper. */
#define CONFIG_MAX_DEPTH 64

/* Maximum number of bytes of a bad value quoted in an error message, and
 * the buffer size config_quote needs to show that many escaped bytes. */
#define CONFIG_SHOWN_VALUE_MAX 60
#define CONFIG_QUOTE_SIZE (4 * CONFIG_SHOWN_VALUE_MAX + 8)

/* One YAML node with the line it starts on. */
typedef struct config_node config_node_t;
struct config_node {
    yaml_node_type_t kind;
    char *text;            /* scalar value, NUL-terminated */
    size_t len;            /* scalar length, which may count inner NUL bytes */
    char *tag;             /* explicit tag such as "tag:yaml.org,2002:str" */
    bool plain;            /* plain scalar without a tag, resolved by content */
    unsigned long line;    /* 1-based */
    config_node_t **items; /* mapping: key, value, key, value...; sequence */
    size_t count;
    size_t cap;
};

/* The caller's error buffer and the file name that starts each message. */
typedef struct config_error {
    const char *file;
    char *buf;
    size_t size; /* 0 when the caller passed no buffer */
} config_error_t;

/* Writes "FILE:LINE: " (or "FILE: " when `line` is 0) and the formatted
 * message into the error buffer. Returns ING_ECONFIG. */
int config_fail(config_error_t *error, unsigned long line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Writes "FILE: out of memory". Returns ING_ENOMEM. */
int config_fail_nomem(config_error_t *error);

/* Formats `text` for an error message: in double quotes, with quotes,
 * backslashes and control characters escaped, and cut after
 * CONFIG_SHOWN_VALUE_MAX bytes. Returns `buf`, which should have
 * CONFIG_QUOTE_SIZE bytes. */
const char *config_quote(char *buf, size_t size, const char *text);

/* Reads the single YAML document in `f` into a tree owned by the caller.
 * Stores NULL in `*root` for a file with no document. Returns 0,
 * ING_ECONFIG with a message naming the line (and column for syntax
 * errors), or ING_ENOMEM. */
int config_yaml_read(config_error_t *error, FILE *f, config_node_t **root);

/* Frees `n` and its children. Accepts NULL. */
void config_node_free(config_node_t *n);

/* Returns whether `n` is a YAML null: an empty plain scalar, ~, null or a
 * scalar tagged !!null. */
bool config_node_is_null(const config_node_t *n);

/* Returns "no value", "a scalar", "a mapping" or "a sequence" for
 * messages. */
const char *config_node_describe(const config_node_t *n);

/* Rejects a key that appears twice in the mapping `map`. `path` is the
 * mapping's dotted name for messages, "" at the top level. Returns 0 or
 * ING_ECONFIG. */
int config_node_check_keys(config_error_t *error, const config_node_t *map,
                           const char *path);

/* Converts the subtree `n` into a new JSON value. Plain scalars resolve by
 * the YAML 1.2 core schema: null, booleans, integers and floats become JSON
 * literals, and other scalars become strings. `path` names `n` in messages.
 * Returns 0, ING_ECONFIG (a duplicate key, a tag other than !!str, or a
 * number JSON cannot hold) or ING_ENOMEM. */
int config_node_to_json(config_error_t *error, const config_node_t *n,
                        const char *path, json_t **out);

#endif
