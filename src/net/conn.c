/* Connection I/O over libuv, in plain text or through OpenSSL with memory
 * BIOs.
 *
 * A TLS connection owns a timer besides its socket. Before the handshake
 * ends the timer bounds its duration. Afterwards it hands over plaintext
 * that OpenSSL still buffers when the owner resumes reading, because no
 * socket read may come to push it out.
 */
#include "net/conn.h"

#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

#include "core/log.h"

#define READ_BUFFER 65536
#define PLAINTEXT_BUFFER 16384 /* one TLS record at most */

struct net_tls {
    SSL *ssl;
    BIO *rbio; /* ciphertext read from the socket; owned by `ssl` */
    BIO *wbio; /* ciphertext to send; owned by `ssl` */
    tls_server_t *server;
    uv_timer_t timer;
    uint64_t timeout_ms;
    tls_verdict_t verdict;
    int handshake_done;
    int counted;      /* the handshake's outcome is in the metrics */
    int failed;       /* the handshake failed; its alert is on the way */
    int fail_status;  /* reported to on_read once the alert is written */
    int eof;          /* the socket reached EOF */
    int ended;        /* on_read got its negative status */
    int delivering;   /* inside deliver(), which must not recurse */
};

typedef struct write_req {
    uv_write_t req;
    char *data; /* owned, or NULL */
    int notify; /* the owner's write: report it to on_written */
    int fail;   /* a handshake alert: report the failure once written */
} write_req_t;

/* Shared by every connection of a loop thread, because each callback
 * hands the bytes over (and the owner copies them) before libuv reads
 * again. */
static _Thread_local char read_buffer[READ_BUFFER];
static _Thread_local char plaintext_buffer[PLAINTEXT_BUFFER];

static void on_tls_timer(uv_timer_t *t);

static void peer_name(uv_tcp_t *tcp, char *buf, size_t size)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    char ip[INET6_ADDRSTRLEN] = "?";

    if (uv_tcp_getpeername(tcp, (struct sockaddr *)&ss, &len) != 0) {
        snprintf(buf, size, "?:0");
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        uv_ip6_name(a, ip, sizeof(ip));
        snprintf(buf, size, "[%s]:%d", ip, ntohs(a->sin6_port));
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        uv_ip4_name(a, ip, sizeof(ip));
        snprintf(buf, size, "%s:%d", ip, ntohs(a->sin_port));
    }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    *buf = uv_buf_init(read_buffer, sizeof(read_buffer));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Reads the socket while the owner wants plaintext, and always during
 * the handshake. */
static void update_reading(net_conn_t *c)
{
    net_tls_t *t = c->tls;
    int want;

    if (c->closing)
        return;
    if (t == NULL)
        want = c->want_reading;
    else if (t->failed || t->eof)
        want = 0;
    else
        want = !t->handshake_done || c->want_reading;
    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
            c->reading = 1;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

/* ---- Writing ---- */

static void on_write(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    net_conn_t *c = req->handle->data;
    int notify = w->notify, fail = w->fail;

    free(w->data);
    free(w);
    if (c->closing)
        return;
    if (fail) {
        c->tls->ended = 1;
        c->events->on_read(c, c->tls->fail_status, NULL);
        return;
    }
    if (notify || status < 0)
        c->events->on_written(c, status);
}

static int queue_write(net_conn_t *c, char *data, const char *bytes,
                       size_t len, int notify, int fail)
{
    write_req_t *w = malloc(sizeof(*w));
    uv_buf_t buf = uv_buf_init((char *)bytes, (unsigned int)len);
    int rc;

    if (w == NULL) {
        free(data);
        return UV_ENOMEM;
    }
    w->data = data;
    w->notify = notify;
    w->fail = fail;
    rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rc != 0) {
        free(data);
        free(w);
    }
    return rc;
}

/* Sends the ciphertext that OpenSSL wrote into the write BIO. Returns 0
 * when nothing was pending, 1 when a write was queued, or a negative
 * libuv error. */
static int flush(net_conn_t *c, int notify, int fail)
{
    size_t pending = BIO_ctrl_pending(c->tls->wbio);
    char *buf;
    int n, rc;

    if (pending == 0)
        return 0;
    buf = malloc(pending);
    if (buf == NULL)
        return UV_ENOMEM;
    n = BIO_read(c->tls->wbio, buf, (int)pending);
    if (n <= 0) {
        free(buf);
        return UV_EPROTO;
    }
    rc = queue_write(c, buf, buf, (size_t)n, notify, fail);
    return rc == 0 ? 1 : rc;
}

/* ---- The handshake ---- */

static void count_handshake(net_conn_t *c, enum tls_handshake_result result)
{
    net_tls_t *t = c->tls;

    if (t->counted)
        return;
    t->counted = 1;
    tls_metrics_handshake(c->listener, result, t->verdict.reason);
}

/* Ends a failed handshake: sends the alert that OpenSSL queued, then
 * reports `status` to the owner. */
static void fail_handshake(net_conn_t *c, enum tls_handshake_result result,
                           int status)
{
    net_tls_t *t = c->tls;

    count_handshake(c, result);
    t->failed = 1;
    t->fail_status = status;
    uv_timer_stop(&t->timer);
    update_reading(c);
    if (flush(c, 0, 1) == 1)
        return;
    t->ended = 1;
    c->events->on_read(c, status, NULL);
}

static void handshake_failed(net_conn_t *c)
{
    net_tls_t *t = c->tls;
    tls_verdict_t *v = &t->verdict;
    enum tls_handshake_result result;

    tls_explain_failure(t->ssl, v);
    result = v->reason != NULL ? TLS_HANDSHAKE_CERT_REJECTED
                               : TLS_HANDSHAKE_FAILED;
    log_write_limited("tls_handshake_failed", 20, LOG_LEVEL_WARN,
                      "tls handshake failed",
                      "conn=%llu listener=%s peer=%s reason=%s "
                      "detail=\"%s\"",
                      (unsigned long long)c->id, c->listener, c->peer,
                      v->reason != NULL ? v->reason : "protocol",
                      v->detail);
    fail_handshake(c, result, UV_ECONNABORTED);
}

static void handshake_done(net_conn_t *c)
{
    net_tls_t *t = c->tls;
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;

    t->handshake_done = 1;
    uv_timer_stop(&t->timer);
    count_handshake(c, TLS_HANDSHAKE_OK);
    SSL_get0_alpn_selected(t->ssl, &alpn, &alpn_len);
    log_debug("tls handshake completed",
              "conn=%llu listener=%s peer=%s version=%s cipher=%s "
              "alpn=%.*s device=%s",
              (unsigned long long)c->id, c->listener, c->peer,
              SSL_get_version(t->ssl), SSL_get_cipher_name(t->ssl),
              alpn_len > 0 ? (int)alpn_len : 1,
              alpn_len > 0 ? (const char *)alpn : "-",
              t->verdict.have_peer ? t->verdict.peer.device_id : "-");
    c->ready = 1;
    c->events->on_ready(c);
}

/* Advances the handshake with the bytes in the read BIO. Returns 1 once
 * it is complete and the owner still has the connection. */
static int advance_handshake(net_conn_t *c)
{
    net_tls_t *t = c->tls;
    int rc = SSL_do_handshake(t->ssl);
    int err;

    if (rc == 1) {
        if (flush(c, 0, 0) < 0) {
            fail_handshake(c, TLS_HANDSHAKE_FAILED, UV_EPIPE);
            return 0;
        }
        handshake_done(c);
        return !c->closing;
    }
    err = SSL_get_error(t->ssl, rc);
    if (err == SSL_ERROR_WANT_READ) {
        if (flush(c, 0, 0) < 0)
            fail_handshake(c, TLS_HANDSHAKE_FAILED, UV_EPIPE);
        return 0;
    }
    handshake_failed(c);
    return 0;
}

/* ---- Reading ---- */

/* Reports the end of the input to the owner once. */
static void end_input(net_conn_t *c, int status)
{
    c->tls->ended = 1;
    c->events->on_read(c, status, NULL);
}

/* Hands decrypted plaintext to the owner while it wants some. */
static void deliver(net_conn_t *c)
{
    net_tls_t *t = c->tls;

    if (t->delivering)
        return;
    t->delivering = 1;
    while (c->want_reading && !c->closing && !t->ended) {
        int n = SSL_read(t->ssl, plaintext_buffer, sizeof(plaintext_buffer));
        int err;

        if (n > 0) {
            c->events->on_read(c, n, plaintext_buffer);
            continue;
        }
        err = SSL_get_error(t->ssl, n);
        if (err == SSL_ERROR_WANT_READ) {
            if (t->eof)
                end_input(c, UV_EOF);
            break;
        }
        if (err == SSL_ERROR_ZERO_RETURN) {
            /* The peer sent close_notify. */
            end_input(c, UV_EOF);
            break;
        }
        log_debug("tls read failed", "conn=%llu listener=%s peer=%s "
                  "error=%s",
                  (unsigned long long)c->id, c->listener, c->peer,
                  ERR_reason_error_string(ERR_peek_error())
                      ? ERR_reason_error_string(ERR_peek_error())
                      : "protocol error");
        ERR_clear_error();
        end_input(c, UV_EPROTO);
        break;
    }
    t->delivering = 0;
    /* SSL_read may have queued a reply, such as a KeyUpdate. */
    if (!c->closing && flush(c, 0, 0) < 0 && !t->ended)
        end_input(c, UV_EPIPE);
    update_reading(c);
}

static void on_tls_read(net_conn_t *c, ssize_t nread, const uv_buf_t *buf)
{
    net_tls_t *t = c->tls;

    if (nread < 0) {
        t->eof = 1;
        update_reading(c);
        if (!t->handshake_done) {
            log_debug("tls handshake ended by the client",
                      "conn=%llu listener=%s peer=%s error=%s",
                      (unsigned long long)c->id, c->listener, c->peer,
                      uv_strerror((int)nread));
            fail_handshake(c, TLS_HANDSHAKE_CLOSED, (int)nread);
            return;
        }
        if (nread == UV_EOF) {
            deliver(c); /* plaintext still buffered comes first */
            return;
        }
        if (!t->ended)
            end_input(c, (int)nread);
        return;
    }
    if (BIO_write(t->rbio, buf->base, (int)nread) != (int)nread) {
        fail_handshake(c, TLS_HANDSHAKE_FAILED, UV_ENOMEM);
        return;
    }
    if (!t->handshake_done && !advance_handshake(c))
        return;
    deliver(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    net_conn_t *c = s->data;

    if (nread == 0 || c->closing)
        return;
    if (c->tls == NULL) {
        c->events->on_read(c, nread, buf->base);
        return;
    }
    if (c->tls->failed || c->tls->ended)
        return;
    on_tls_read(c, nread, buf);
}

static void on_tls_timer(uv_timer_t *timer)
{
    net_conn_t *c = timer->data;
    net_tls_t *t = c->tls;

    if (c->closing || t->failed)
        return;
    if (t->handshake_done) {
        deliver(c);
        return;
    }
    log_write_limited("tls_handshake_timeout", 10, LOG_LEVEL_INFO,
                      "tls handshake timed out",
                      "conn=%llu listener=%s peer=%s timeout_ms=%llu",
                      (unsigned long long)c->id, c->listener, c->peer,
                      (unsigned long long)t->timeout_ms);
    fail_handshake(c, TLS_HANDSHAKE_TIMEOUT, UV_ETIMEDOUT);
}

/* ---- Interface ---- */

int net_conn_init(uv_loop_t *loop, net_conn_t *c,
                  const net_conn_events_t *events, void *data)
{
    int rc = uv_tcp_init(loop, &c->tcp);

    if (rc != 0)
        return rc;
    c->tcp.data = c;
    c->events = events;
    c->data = data;
    c->handles = 1;
    c->listener = "?";
    snprintf(c->peer, sizeof(c->peer), "?:0");
    return 0;
}

static int attach_tls(net_conn_t *c, tls_server_t *server,
                      uint64_t timeout_ms)
{
    net_tls_t *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return UV_ENOMEM;
    t->ssl = tls_server_new_ssl(server);
    t->rbio = BIO_new(BIO_s_mem());
    t->wbio = BIO_new(BIO_s_mem());
    if (t->ssl == NULL || t->rbio == NULL || t->wbio == NULL) {
        BIO_free(t->rbio);
        BIO_free(t->wbio);
        SSL_free(t->ssl);
        free(t);
        ERR_clear_error();
        return UV_ENOMEM;
    }
    /* An empty read BIO means "wait for more", not end of file. */
    BIO_set_mem_eof_return(t->rbio, -1);
    SSL_set_bio(t->ssl, t->rbio, t->wbio);
    tls_attach_verdict(t->ssl, &t->verdict);
    t->server = server;
    t->timeout_ms = timeout_ms;
    uv_timer_init(c->tcp.loop, &t->timer);
    t->timer.data = c;
    c->handles++;
    c->tls = t;
    return 0;
}

int net_conn_accept(uv_stream_t *server, net_conn_t *c,
                    const char *listener, tls_server_t *tls,
                    uint64_t handshake_timeout_ms)
{
    int rc = uv_accept(server, (uv_stream_t *)&c->tcp);

    if (rc != 0)
        return rc;
    c->listener = listener;
    uv_tcp_nodelay(&c->tcp, 1);
    peer_name(&c->tcp, c->peer, sizeof(c->peer));
    if (tls == NULL)
        return 0;
    return attach_tls(c, tls, handshake_timeout_ms);
}

int net_conn_start(net_conn_t *c)
{
    net_tls_t *t = c->tls;

    if (t == NULL) {
        c->ready = 1;
        c->events->on_ready(c);
        return 0;
    }
    if (t->timeout_ms > 0)
        uv_timer_start(&t->timer, on_tls_timer, t->timeout_ms, 0);
    update_reading(c);
    return c->reading ? 0 : UV_EIO;
}

void net_conn_set_reading(net_conn_t *c, int on)
{
    net_tls_t *t = c->tls;

    c->want_reading = on != 0;
    update_reading(c);
    if (t == NULL || !on || !t->handshake_done || t->ended || c->closing)
        return;
    /* Plaintext that OpenSSL buffered while the owner paused would wait
     * for a socket read that may never come. */
    if (SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(t->rbio) > 0 || t->eof)
        uv_timer_start(&t->timer, on_tls_timer, 0, 0);
}

int net_conn_write(net_conn_t *c, char *data, const char *bytes, size_t len)
{
    net_tls_t *t = c->tls;
    int rc;

    if (c->closing) {
        free(data);
        return UV_ECANCELED;
    }
    if (t == NULL)
        return queue_write(c, data, bytes, len, 1, 0);
    if (!t->handshake_done || t->failed) {
        free(data);
        return UV_ENOTCONN;
    }
    /* A memory BIO takes any amount, so SSL_write encrypts all of it. */
    while (len > 0) {
        int chunk = len > INT32_MAX ? INT32_MAX : (int)len;
        int n = SSL_write(t->ssl, bytes, chunk);

        if (n <= 0) {
            ERR_clear_error();
            free(data);
            return UV_EPROTO;
        }
        bytes += n;
        len -= (size_t)n;
    }
    free(data);
    rc = flush(c, 1, 0);
    return rc < 0 ? rc : 0;
}

size_t net_conn_write_queue_size(const net_conn_t *c)
{
    return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    net_conn_t *c = req->data;

    if (!c->closing && c->on_shutdown != NULL)
        c->on_shutdown(c, status);
}

int net_conn_shutdown(net_conn_t *c, void (*cb)(net_conn_t *c, int status))
{
    net_tls_t *t = c->tls;

    if (c->closing)
        return UV_ECANCELED;
    if (t != NULL && t->handshake_done && !t->failed) {
        /* The first SSL_shutdown call queues close_notify and does not
         * wait for the peer's. */
        if (SSL_shutdown(t->ssl) < 0)
            ERR_clear_error();
        if (flush(c, 0, 0) < 0)
            return UV_EPIPE;
    }
    c->on_shutdown = cb;
    c->shutdown.data = c;
    return uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown);
}

static void on_handle_closed(uv_handle_t *h)
{
    net_conn_t *c = h->data;

    if (--c->handles > 0)
        return;
    if (c->tls != NULL) {
        SSL_free(c->tls->ssl);
        free(c->tls);
        c->tls = NULL;
    }
    c->events->on_closed(c);
}

void net_conn_close(net_conn_t *c)
{
    net_tls_t *t = c->tls;

    if (c->closing)
        return;
    c->closing = 1;
    c->reading = 0;
    if (t != NULL) {
        /* A connection closed during its handshake, for example by a
         * drain. */
        if (!t->handshake_done)
            count_handshake(c, TLS_HANDSHAKE_CLOSED);
        uv_timer_stop(&t->timer);
        uv_close((uv_handle_t *)&t->timer, on_handle_closed);
    }
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

int net_conn_is_closing(const net_conn_t *c)
{
    return c->closing;
}

const tls_peer_t *net_conn_peer_cert(const net_conn_t *c)
{
    if (c->tls == NULL || !c->tls->handshake_done ||
        !c->tls->verdict.have_peer)
        return NULL;
    return &c->tls->verdict.peer;
}

const char *net_conn_tls_version(const net_conn_t *c)
{
    return c->tls != NULL ? SSL_get_version(c->tls->ssl) : NULL;
}
