/* Lets tests run the sink runner with their own sink_ops and short retry
 * delays. Not part of the module interface.
 */
#ifndef INGESTD_SINKS_SINKS_INTERNAL_H
#define INGESTD_SINKS_SINKS_INTERNAL_H

#include <stdint.h>

#include "sinks/sink.h"

/* Exponential backoff after a failed delivery: the delay starts at
 * `initial_ms`, doubles per failure up to `max_ms`, and each wait is drawn
 * uniformly from [0, delay] (full jitter). */
typedef struct sinks_backoff {
    uint64_t initial_ms;
    uint64_t max_ms;
} sinks_backoff_t;

/* Like sinks_start, but sink i uses `ops[i]` instead of the ops of its
 * kind, and `backoff` instead of 100 ms doubling to 30 s. */
int sinks_start_with(const config_t *cfg, const sink_ops_t *const *ops,
                     const sinks_backoff_t *backoff, spool_t *spool,
                     sinks_t **out, char *err, size_t errlen);

#endif
