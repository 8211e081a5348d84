/* Flow control inside the pipeline module: the spool's congestion state
 * with high and low marks, the per-device limit check of every submit,
 * and the rejection counters. Not part of the module interface (see
 * pipeline.h).
 */
#ifndef INGESTD_PIPELINE_FLOW_H
#define INGESTD_PIPELINE_FLOW_H

#include <stdint.h>

#include "auth/auth.h"
#include "core/config.h"
#include "pipeline/limits.h"
#include "spool/spool.h"

typedef struct pipeline_flow pipeline_flow_t;

/* Creates the flow-control state for `cfg` (borrowed, must outlive it)
 * over `spool`. Returns 0 or ING_ENOMEM. */
int pipeline_flow_create(const config_t *cfg, spool_t *spool,
                         pipeline_flow_t **out);
void pipeline_flow_destroy(pipeline_flow_t *f);

/* Returns 1 while the spool is past its high mark and has not yet dropped
 * below its low mark, or is full. Thread-safe. */
int pipeline_flow_congested(pipeline_flow_t *f);

/* Charges `readings` readings of `bytes` stored bytes to device `dev`.
 * Returns 0, ING_ERATE or ING_EQUOTA with the wait in `*retry_after_ms`. */
int pipeline_flow_take(pipeline_flow_t *f, const auth_device_t *dev,
                       uint64_t readings, uint64_t bytes,
                       uint64_t *retry_after_ms);

/* Counts one item turned away for `reason`: in ingestd_throttled_total
 * when `retrying`, else in ingestd_rejected_total. */
void pipeline_flow_count(const char *protocol, const char *reason,
                         int retrying);

limits_t *pipeline_flow_limits(pipeline_flow_t *f);

#endif
