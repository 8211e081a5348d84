/* The devices table as registry export and import see it. Not part of the
 * module interface.
 */
#ifndef INGESTD_AUTH_REGISTRY_IO_INTERNAL_H
#define INGESTD_AUTH_REGISTRY_IO_INTERNAL_H

#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>

/* How a column's value is written in JSON. */
enum auth_io_kind {
    AUTH_IO_TEXT,    /* string */
    AUTH_IO_INTEGER, /* integer */
    AUTH_IO_REAL,    /* number */
    AUTH_IO_BOOLEAN, /* true or false, stored as 1 or 0 */
    AUTH_IO_HASH,    /* 32-byte blob as 64 hex digits */
    AUTH_IO_BLOB,    /* blob of any length as hex digits */
    AUTH_IO_SECRET,  /* HS256 secret as base64url */
    AUTH_IO_ANY,     /* string, integer or number, stored as it is */
};

struct auth_io_column {
    char *name;
    enum auth_io_kind kind;
    int not_null;    /* the column is NOT NULL, so the member is required */
    int nonnegative; /* integers must be 0 or more */
};

/* The columns of the devices table, in table order. */
struct auth_io_schema {
    struct auth_io_column *columns;
    size_t count;
    /* Statements over every column in this order. select_sql has no WHERE
     * clause. insert_sql binds column i to ?(i + 1), and update_sql does the
     * same and binds the id of the row to change to ?(count + 1). */
    char *select_sql;
    char *insert_sql;
    char *update_sql;
};

/* Reads the columns of the devices table of `db` with PRAGMA table_info.
 * Known columns get their kind by name, others by their declared type, as
 * SQLite chooses a column affinity. Returns 0, ING_ENOMEM or ING_EDB. */
int auth_io_schema_read(sqlite3 *db, struct auth_io_schema *s);

void auth_io_schema_free(struct auth_io_schema *s);

/* Returns the index of column `name`, or -1. */
int auth_io_schema_find(const struct auth_io_schema *s, const char *name);

/* Writes `len` bytes as lowercase hex and a NUL into `out`, which needs
 * room for len * 2 + 1 characters. */
void auth_io_hex_encode(const uint8_t *in, size_t len, char *out);

#endif
