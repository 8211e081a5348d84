/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
 * ext4 and SCTP. The SSE4.2 crc32 instruction computes the same function.
 * It is picked at run time when the CPU has it, and the slicing-by-8 table
 * version serves every other CPU.
 */
#include "spool/crc32c.h"

#include <pthread.h>
#include <string.h>

#include "spool/spool.h"

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#define CRC32C_POLY 0x82F63B78u

static uint32_t table[8][256];
static uint32_t (*crc_impl)(uint32_t, const void *, size_t);
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* Builds the slicing tables: table[0] is the classic byte-at-a-time table,
 * and table[k][b] is the CRC of byte b followed by k zero bytes, so that
 * eight input bytes can be folded in with eight independent lookups. */
static void build_table(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t crc = b;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (CRC32C_POLY & (0u - (crc & 1u)));
        table[0][b] = crc;
    }
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t crc = table[0][b];
        for (int k = 1; k < 8; k++) {
            crc = (crc >> 8) ^ table[0][crc & 0xff];
            table[k][b] = crc;
        }
    }
}

static uint32_t table_update(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                             (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        crc = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^
              table[5][(lo >> 16) & 0xff] ^ table[4][lo >> 24] ^
              table[3][p[4]] ^ table[2][p[5]] ^ table[1][p[6]] ^ table[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len-- > 0)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

uint32_t crc32c_table(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&init_once, build_table);
    return ~table_update(~crc, data, len);
}

#if defined(__x86_64__)
int crc32c_hw_available(void)
{
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

__attribute__((target("sse4.2"))) uint32_t
crc32c_hw(uint32_t crc, const void *data, size_t len)
{
    const uint8_t *p = data;
    uint64_t c = ~crc;

    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, sizeof(word));
        c = _mm_crc32_u64(c, word);
        p += 8;
        len -= 8;
    }
    while (len-- > 0)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#else
int crc32c_hw_available(void)
{
    return 0;
}

uint32_t crc32c_hw(uint32_t crc, const void *data, size_t len)
{
    return crc32c_table(crc, data, len);
}
#endif

static void pick_impl(void)
{
    pthread_once(&init_once, build_table);
    crc_impl = crc32c_hw_available() ? crc32c_hw : crc32c_table;
}

uint32_t spool_crc32c(uint32_t crc, const void *data, size_t len)
{
    static pthread_once_t pick_once = PTHREAD_ONCE_INIT;

    pthread_once(&pick_once, pick_impl);
    return crc_impl(crc, data, len);
}
