/* Message ids: UUID version 7 (RFC 9562), time-ordered and unique. */
#ifndef INGESTD_CORE_IDS_H
#define INGESTD_CORE_IDS_H

#include <stddef.h>
#include <stdint.h>

#define UUID_STR_LEN 37 /* 36 characters and the terminating NUL */

/* Writes a new UUIDv7 in its canonical text form into `out`. Ids made by one
 * process are strictly increasing, also within one millisecond. Thread-safe.
 * Returns 0, or ING_EIO when the random source fails. */
int ids_uuid7(char out[UUID_STR_LEN]);

/* Fills `buf` with `len` bytes from the kernel's random source.
 * Returns 0 or ING_EIO. */
int ids_random_bytes(void *buf, size_t len);

#endif
