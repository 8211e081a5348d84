/* Reconnect and retry delays: exponential backoff with jitter, so that many
 * ingestd instances that lost the same broker do not reconnect in step. */
#include "bridge/bridge_internal.h"

uint64_t bridge_backoff_ms(unsigned attempt, uint64_t min_ms, uint64_t max_ms,
                           uint64_t random)
{
    uint64_t cap = min_ms;

    if (max_ms < min_ms)
        max_ms = min_ms;
    for (unsigned i = 0; i < attempt && cap < max_ms; i++)
        cap = cap > max_ms / 2 ? max_ms : cap * 2;
    if (cap > max_ms)
        cap = max_ms;
    return min_ms + random % (cap - min_ms + 1);
}
