#include "core/ids.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "core/errors.h"

int ids_random_bytes(void *buf, size_t len)
{
    unsigned char *p = buf;

    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);
        if (n < 0)
            return ING_EIO;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static pthread_mutex_t uuid_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t last_ms;
static uint64_t last_counter;

/* Layout: 48-bit Unix milliseconds, version 7, then a 12-bit counter in
 * rand_a and the top 18 bits of rand_b as a monotonic counter seeded at
 * random each millisecond (RFC 9562 section 6.2, method 1), then random. */
int ids_uuid7(char out[UUID_STR_LEN])
{
    unsigned char b[16];
    struct timespec ts;
    uint64_t ms, counter;

    if (ids_random_bytes(b, sizeof(b)) != 0)
        return ING_EIO;
    clock_gettime(CLOCK_REALTIME, &ts);
    ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;

    pthread_mutex_lock(&uuid_lock);
    if (ms > last_ms) {
        last_ms = ms;
        /* Seed the 30-bit counter with 29 random bits so that it has room
         * to grow within the millisecond. */
        last_counter = (((uint64_t)b[6] << 21) | ((uint64_t)b[7] << 13) |
                        ((uint64_t)b[8] << 5) | (b[9] >> 3)) &
                       0x1fffffff;
    } else {
        last_counter++;
        if (last_counter > 0x3fffffff) {
            /* Counter overflow: borrow the next millisecond. */
            last_ms++;
            last_counter = 0;
        }
        ms = last_ms;
    }
    counter = last_counter;
    pthread_mutex_unlock(&uuid_lock);

    b[0] = (unsigned char)(ms >> 40);
    b[1] = (unsigned char)(ms >> 32);
    b[2] = (unsigned char)(ms >> 24);
    b[3] = (unsigned char)(ms >> 16);
    b[4] = (unsigned char)(ms >> 8);
    b[5] = (unsigned char)ms;
    b[6] = (unsigned char)(0x70 | ((counter >> 26) & 0x0f));
    b[7] = (unsigned char)(counter >> 18);
    b[8] = (unsigned char)(0x80 | ((counter >> 12) & 0x3f));
    b[9] = (unsigned char)(counter >> 4);
    b[10] = (unsigned char)((counter & 0x0f) << 4 | (b[10] & 0x0f));

    snprintf(out, UUID_STR_LEN,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
             b[11], b[12], b[13], b[14], b[15]);
    return 0;
}
