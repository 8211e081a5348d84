/* Sinks deliver spooled records to their destination.
 *
 * Each configured sink runs on its own thread with its own spool reader:
 * it reads a batch, hands it to the sink's deliver function, and commits the
 * reader's cursor only after deliver returned success, which a sink returns
 * only once its destination acknowledged (or, for the file sink, synced)
 * every record of the batch. A failed delivery is retried from the
 * committed cursor with exponential backoff and jitter, so delivery is at
 * least once and in spool order.
 */
#ifndef INGESTD_SINKS_SINK_H
#define INGESTD_SINKS_SINK_H

#include <stddef.h>
#include <stdint.h>

#include "core/config.h"
#include "spool/spool.h"

typedef struct sink_ops {
    const char *kind; /* "file" */

    /* Creates the sink's state from its configuration. Returns 0 or a
     * negative ing_error with a message in `err`. */
    int (*open)(const config_sink_t *cfg, void **state, char *err,
                size_t errlen);

    /* Delivers `n` records. Returns 0 only when every record is stored at
     * the destination; a negative ing_error makes the runner retry the
     * batch later. */
    int (*deliver)(void *state, const spool_record_t *recs, size_t n);

    void (*close)(void *state);
} sink_ops_t;

extern const sink_ops_t sink_file_ops;

typedef struct sinks sinks_t;

/* Opens a reader and starts a thread for each sink in `cfg`. Returns 0 or a
 * negative ing_error with a message in `err`. */
int sinks_start(const config_t *cfg, spool_t *spool, sinks_t **out, char *err,
                size_t errlen);

/* Stops the sinks: each finishes or abandons its current batch within
 * `timeout_ms` (what is not committed stays in the spool for the next
 * start), then closes its reader. */
void sinks_stop(sinks_t *s, uint64_t timeout_ms);

/* Returns 1 when every sink delivered its last batch without error. */
int sinks_healthy(sinks_t *s);

#endif
