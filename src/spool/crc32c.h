/* CRC32C implementations behind spool_crc32c, exposed so that tests can
 * check that the table and the SSE4.2 versions agree. Not part of the
 * module interface.
 */
#ifndef INGESTD_SPOOL_CRC32C_H
#define INGESTD_SPOOL_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Table-driven CRC32C (slicing by 8), continuing from `crc` (start at 0).
 * Works on every CPU. */
uint32_t crc32c_table(uint32_t crc, const void *data, size_t len);

/* Returns 1 when this CPU has the SSE4.2 crc32 instruction. */
int crc32c_hw_available(void);

/* CRC32C with the SSE4.2 crc32 instruction. Call only when
 * crc32c_hw_available() returned 1. */
uint32_t crc32c_hw(uint32_t crc, const void *data, size_t len);

#endif
