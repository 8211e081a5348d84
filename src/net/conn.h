/* Connection I/O: one accepted TCP connection, in plain text or TLS.
 *
 * The HTTP and MQTT listeners read and write plaintext through these
 * functions whether TLS is on or off. With TLS the connection runs OpenSSL
 * over memory BIOs: ciphertext that libuv reads goes into the read BIO,
 * SSL_do_handshake and SSL_read turn it into plaintext, and what SSL_write
 * and the handshake put into the write BIO is sent with uv_write. Nothing
 * blocks the event loop, and the handshake has its own timeout.
 *
 * Callbacks mirror libuv's, so the owner's code stays the same for both
 * kinds. Every callback runs on the loop thread, and none runs from inside
 * a net_conn_* call, except on_ready from net_conn_start for a plain
 * connection.
 */
#ifndef INGESTD_NET_CONN_H
#define INGESTD_NET_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "net/tls.h"

typedef struct net_conn net_conn_t;
typedef struct net_tls net_tls_t;

typedef struct net_conn_events {
    /* The connection can carry plaintext: at once for a plain connection,
     * after the handshake for TLS. The owner starts its protocol here. */
    void (*on_ready)(net_conn_t *c);
    /* Plaintext arrived (`nread` > 0, `data` valid during the call only),
     * or the connection ended: UV_EOF when the peer closed, another
     * negative libuv error on failure, a failed handshake or its timeout.
     * After an error the owner closes the connection. */
    void (*on_read)(net_conn_t *c, ssize_t nread, const char *data);
    /* A write queued with net_conn_write completed, or failed with a
     * negative `status`. */
    void (*on_written)(net_conn_t *c, int status);
    /* Last call: every handle is closed and the owner may free `c`. */
    void (*on_closed)(net_conn_t *c);
} net_conn_events_t;

struct net_conn {
    uv_tcp_t tcp;
    const net_conn_events_t *events;
    void *data;     /* the owner's pointer */
    net_tls_t *tls; /* NULL for a plain connection */
    uint64_t id;    /* for logs */
    char peer[64];  /* "ip:port", set by net_conn_accept */
    const char *listener; /* for logs, static */
    uv_shutdown_t shutdown;
    void (*on_shutdown)(net_conn_t *c, int status);
    int handles;      /* open libuv handles */
    int want_reading; /* the owner wants plaintext */
    int reading;      /* uv_read_start is in effect */
    int ready;
    int closing;
};

/* Initializes `c` on `loop` before accepting. `events` must outlive the
 * connection. Returns 0 or a negative libuv error. */
int net_conn_init(uv_loop_t *loop, net_conn_t *c,
                  const net_conn_events_t *events, void *data);

/* Accepts a connection from `server` into `c`, sets TCP_NODELAY and
 * fills c->peer. `listener` names the listener in logs. With `tls` (may
 * be NULL) the connection will speak TLS with the server's current
 * context, and the handshake must finish within `handshake_timeout_ms`.
 * Returns 0 or a negative libuv error; the owner then closes `c`. */
int net_conn_accept(uv_stream_t *server, net_conn_t *c,
                    const char *listener, tls_server_t *tls,
                    uint64_t handshake_timeout_ms);

/* Starts the connection: calls on_ready now for a plain connection, or
 * starts the TLS handshake. Returns 0 or a negative libuv error. */
int net_conn_start(net_conn_t *c);

/* Starts (`on` != 0) or stops delivering plaintext to on_read. */
void net_conn_set_reading(net_conn_t *c, int on);

/* Queues `len` plaintext bytes at `bytes` for sending. `data` (may be
 * NULL) is freed once written, also on failure. Returns 0 or a negative
 * libuv error. */
int net_conn_write(net_conn_t *c, char *data, const char *bytes, size_t len);

/* Returns the bytes queued in libuv and not yet written. With TLS this
 * counts ciphertext, a little more than the plaintext queued. */
size_t net_conn_write_queue_size(const net_conn_t *c);

/* Ends the sending side after the queued writes: sends TLS close_notify
 * first, then shuts the TCP connection down. `cb` runs when that is done
 * or failed. Returns 0 or a negative libuv error. */
int net_conn_shutdown(net_conn_t *c, void (*cb)(net_conn_t *c, int status));

/* Closes the connection at once; queued writes are dropped. on_closed
 * follows. Safe to call more than once. */
void net_conn_close(net_conn_t *c);

/* Returns 1 once net_conn_close was called. */
int net_conn_is_closing(const net_conn_t *c);

/* Returns the device identity of a verified client certificate, or NULL
 * on a plain connection or without a client certificate. */
const tls_peer_t *net_conn_peer_cert(const net_conn_t *c);

/* Returns "TLSv1.3" and such, or NULL on a plain connection. */
const char *net_conn_tls_version(const net_conn_t *c);

#endif
