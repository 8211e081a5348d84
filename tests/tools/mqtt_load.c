/* mqtt_load: an MQTT load generator for bench/mqtt.sh and bench/idle.sh,
 * built on libmosquitto (Debian libmosquitto-dev) as the client library.
 *
 * Load mode (the default): N clients connect, each with its own client id
 * and the user name and password of one line of the credentials file. Each
 * publishes M readings of about 160 bytes, keeping up to W of them in
 * flight. At QoS 1 a message is in flight from mosquitto_publish() until
 * its PUBACK, and the time between the two is its ack latency. At QoS 0 a
 * message is in flight until libmosquitto has written it to the socket.
 * The last message of each client is then sent at QoS 1. Its PUBACK comes
 * after the server has handled every earlier message on that connection,
 * so the measured duration includes the server's work and not only the
 * client's writes. When every client is done, one line goes to stdout:
 *
 *   MQTT_LOAD clients=N connected=N version=5 qos=1 window=W sent=N
 *     acked=N rejected=N errors=N duration_us=N rate=X p50_us=N p99_us=N
 *     max_us=N connect_us=N cpu_pct=X timed_out=0|1 tls=0|1
 *
 * rate is sent / duration, where duration runs from the first publish to
 * the last PUBACK. rejected counts MQTT 5 PUBACKs with a reason code of
 * 0x80 or more, errors counts failed connects, failed publishes and lost
 * connections. The latency fields cover the QoS 1 messages only, which at
 * QoS 0 are the last message of each client. cpu_pct
 * is this process's CPU time over the wall time, 100 per busy core, so a
 * value near 100 times the thread count means the generator is the limit.
 *
 * TLS (--cafile FILE): every client connects over TLS with
 * mosquitto_tls_set(), verifies the server's certificate against FILE
 * and checks that it names the -H address. --cert and --key add a client
 * certificate. libmosquitto loads the files into a TLS context per client,
 * so each client also runs a full handshake of its own. The handshake
 * runs in the event loop, after mosquitto_connect() and before CONNECT,
 * and its time counts in connect_us but not in the latencies.
 *
 * Idle mode (-I SECONDS): the clients connect and publish nothing. Once
 * every client has its CONNACK or has failed, "MQTT_IDLE connected=N
 * failed=N connect_us=N" goes to stdout. The clients then stay connected,
 * sending PINGREQ as their keep alive asks, for SECONDS or until SIGTERM
 * or SIGINT, and "MQTT_IDLE_END open=N lost=N" follows before they
 * disconnect.
 *
 * libmosquitto 2.0 opens a socket pair per client besides its connection,
 * so each client costs 3 file descriptors; the tool checks that
 * RLIMIT_NOFILE allows them before it starts. Sockets are driven from
 * epoll with mosquitto_loop_read(), mosquitto_loop_write() and
 * mosquitto_loop_misc(), one event loop per thread (-T), so that many
 * clients do not need a thread each.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <mqtt_protocol.h>

#define MAX_CLIENTS 20000
#define MAX_WINDOW 1024
#define MAX_THREADS 8
#define MAX_MESSAGES 10000000
#define MAX_FIELD 256
/* Clients of one thread that may wait for their CONNACK at once. More would
 * overflow the server's listen backlog, and then connect() waits for the
 * SYN to be retransmitted. */
#define CONNECT_BATCH 128
/* File descriptors besides the clients': stdio, epoll, spare. */
#define SPARE_FDS 32

typedef struct {
    char device_id[MAX_FIELD];
    char key[MAX_FIELD];
} credential_t;

typedef struct {
    const char *host;
    int port;
    const char *bind_address;
    const char *credentials_path;
    credential_t *credentials;
    int credential_count;
    int clients;
    long messages;
    int qos;
    int window;
    int version;
    const char *topic_template;
    const char *run;
    int threads;
    int max_seconds;
    int idle_seconds;
    int keepalive;
    /* TLS files; cafile NULL means plain TCP. */
    const char *cafile;
    const char *certfile;
    const char *keyfile;
} options_t;

typedef enum {
    CLIENT_NEW,
    CLIENT_CONNECTING,
    CLIENT_ACTIVE,
    CLIENT_DONE,
    CLIENT_FAILED
} client_state_t;

/* A message in flight: its packet id and when it was published. */
typedef struct {
    int mid;
    int qos;
    uint64_t sent_ns;
} slot_t;

struct worker;

typedef struct {
    struct worker *worker;
    struct mosquitto *mosq;
    int index;
    int fd;
    bool want_out;
    /* A QoS 0 message was written, so the window has room. */
    bool refill;
    client_state_t state;
    char client_id[MAX_FIELD];
    char topic[MAX_FIELD];
    const credential_t *cred;
    long published;
    long finished;
    int in_flight;
    slot_t *slots;
} client_t;

typedef struct worker {
    const options_t *opt;
    pthread_t thread;
    int epoll_fd;
    client_t *clients;
    int count;
    int next_connect;
    int connecting;
    /* Clients with refill set. */
    int refills;
    /* Totals of this thread. main() reads them after the join, except the
     * atomics, which it polls during idle mode. */
    atomic_int connected;
    atomic_int failed;
    int lost;
    int remaining;
    long sent;
    long acked;
    long rejected;
    long errors;
    uint64_t first_publish_ns;
    uint64_t last_done_ns;
    uint64_t connect_done_ns;
    uint32_t *latencies;
    long latency_count;
    long latency_capacity;
} worker_t;

static volatile sig_atomic_t stop_requested;
static atomic_bool hold_over;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: mqtt_load -p PORT -f CREDENTIALS [options]\n"
            "  -H ADDRESS   server IP address (default 127.0.0.1)\n"
            "  -p PORT      server port\n"
            "  -B ADDRESS   local address to connect from (default: any)\n"
            "  -f FILE      credentials, one \"device_id api_key\" per line;\n"
            "               client i uses line i modulo the line count\n"
            "  -c N         clients, 1 to %d (default 1)\n"
            "  -m M         messages per client, 1 to %d (default 1000)\n"
            "  -q QOS       0 or 1 (default 1)\n"
            "  -w W         messages in flight per client, 1 to %d "
            "(default 16)\n"
            "  -V VERSION   MQTT version: 311 or 5 (default 5)\n"
            "  -t TOPIC     topic with {device_id} (default "
            "devices/{device_id}/data)\n"
            "  -r RUN       run name, put into client ids and readings "
            "(default run)\n"
            "  -T THREADS   event loop threads, 1 to %d (default 1)\n"
            "  -d SECONDS   maximum run time in load mode (default 120)\n"
            "  -I SECONDS   idle mode: connect, publish nothing, hold this "
            "long\n"
            "  -k SECONDS   keep alive, 5 to 65535 (default 60)\n"
            "  --cafile FILE  connect over TLS and verify the server's\n"
            "                 certificate with the CA certificates in FILE\n"
            "                 (PEM)\n"
            "  --cert FILE    client certificate (PEM); needs --cafile and\n"
            "                 --key\n"
            "  --key FILE     private key of --cert (PEM, unencrypted)\n",
            MAX_CLIENTS, MAX_MESSAGES, MAX_WINDOW, MAX_THREADS);
}

/* Parses a whole number from min to max into *out. Returns 0, or -1 after
 * printing what is wrong. */
static int parse_long(const char *text, char flag, long min, long max,
                      long *out)
{
    char *end;
    long value;

    errno = 0;
    value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min ||
        value > max) {
        fprintf(stderr, "mqtt_load: -%c must be %ld to %ld, got \"%s\"\n",
                flag, min, max, text);
        return -1;
    }
    *out = value;
    return 0;
}

/* Reads "device_id api_key" lines, skipping blank lines and lines that
 * start with #. Returns 0, or -1 after printing why. */
static int read_credentials(options_t *opt)
{
    FILE *f;
    char line[2 * MAX_FIELD + 8];
    credential_t *list = NULL;
    int count = 0, capacity = 0, rc = -1;

    f = fopen(opt->credentials_path, "r");
    if (f == NULL) {
        fprintf(stderr, "mqtt_load: cannot open credentials file %s: %s\n",
                opt->credentials_path, strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char id[MAX_FIELD], key[MAX_FIELD];

        if (line[0] == '#' || line[0] == '\n')
            continue;
        if (sscanf(line, "%255s %255s", id, key) != 2) {
            fprintf(stderr,
                    "mqtt_load: invalid line %d in %s: expected "
                    "\"device_id api_key\"\n",
                    count + 1, opt->credentials_path);
            goto error;
        }
        if (count == capacity) {
            credential_t *grown;

            capacity = capacity ? capacity * 2 : 64;
            grown = realloc(list, (size_t)capacity * sizeof(*list));
            if (grown == NULL) {
                fprintf(stderr, "mqtt_load: out of memory\n");
                goto error;
            }
            list = grown;
        }
        snprintf(list[count].device_id, MAX_FIELD, "%s", id);
        snprintf(list[count].key, MAX_FIELD, "%s", key);
        count++;
    }
    if (count == 0) {
        fprintf(stderr, "mqtt_load: no credentials in %s\n",
                opt->credentials_path);
        goto error;
    }
    opt->credentials = list;
    opt->credential_count = count;
    list = NULL;
    rc = 0;
error:
    free(list);
    fclose(f);
    return rc;
}

/* Expands {device_id} in the topic template. Returns 0, or -1 when the
 * result does not fit. */
static int format_topic(char *out, size_t size, const char *template,
                        const char *device_id)
{
    const char *mark = strstr(template, "{device_id}");
    int n;

    if (mark == NULL)
        n = snprintf(out, size, "%s", template);
    else
        n = snprintf(out, size, "%.*s%s%s", (int)(mark - template), template,
                     device_id, mark + strlen("{device_id}"));
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* Formats reading number `seq` of a client. Values vary with seq so that
 * no two consecutive readings are equal. With a device id of 10
 * characters and a run name of 8 the reading is about 160 bytes. */
static int format_reading(char *out, size_t size, const client_t *c,
                          long seq)
{
    struct timespec ts;
    struct tm tm;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    return snprintf(out, size,
                    "{\"device_id\":\"%s\",\"timestamp\":"
                    "\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\","
                    "\"sensor_value\":%.2f,\"temperature\":%.1f,"
                    "\"humidity\":%.1f,\"battery\":%ld,\"run\":\"%s\","
                    "\"seq\":%ld}",
                    c->cred->device_id, tm.tm_year + 1900, tm.tm_mon + 1,
                    tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                    ts.tv_nsec / 1000000, 40 + (seq % 20) * 0.75,
                    21.5 + (seq % 7) * 0.1, 48 + (seq % 11) * 0.5,
                    87 - seq % 5, c->worker->opt->run, seq);
}

static void record_latency(worker_t *w, uint64_t ns)
{
    uint64_t us = ns / 1000;

    if (w->latency_count == w->latency_capacity)
        return;
    w->latencies[w->latency_count++] = us > UINT32_MAX ? UINT32_MAX
                                                       : (uint32_t)us;
}

static void finish_client(client_t *c, client_state_t state)
{
    if (c->state == CLIENT_DONE || c->state == CLIENT_FAILED)
        return;
    if (c->state == CLIENT_CONNECTING)
        c->worker->connecting--;
    c->state = state;
    c->worker->remaining--;
}

/* Publishes up to `budget` messages while the client has room in its
 * window and messages left. */
static void fill_window(client_t *c, int budget)
{
    worker_t *w = c->worker;
    const options_t *opt = w->opt;
    char payload[512];

    while (budget-- > 0 && c->state == CLIENT_ACTIVE &&
           c->in_flight < opt->window && c->published < opt->messages) {
        int qos = opt->qos, len, rc, i;
        long seq;
        slot_t *slot;

        /* At QoS 0 the last message goes at QoS 1, so that its PUBACK
         * shows when the server has handled the whole run. */
        if (c->published == opt->messages - 1)
            qos = 1;
        for (i = 0; i < opt->window; i++) {
            if (c->slots[i].mid == 0)
                break;
        }
        /* The slot and the counters are set before the publish call,
         * because libmosquitto may write a QoS 0 message and call
         * on_publish before mosquitto_publish() returns. It stores the
         * packet id into slot->mid before it sends, and until then -1
         * marks the slot as taken. */
        slot = &c->slots[i];
        slot->mid = -1;
        slot->qos = qos;
        seq = c->published++;
        c->in_flight++;
        w->sent++;
        len = format_reading(payload, sizeof(payload), c, seq);
        if (w->first_publish_ns == 0)
            w->first_publish_ns = now_ns();
        slot->sent_ns = now_ns();
        if (opt->version == 5)
            rc = mosquitto_publish_v5(c->mosq, &slot->mid, c->topic, len,
                                      payload, qos, false, NULL);
        else
            rc = mosquitto_publish(c->mosq, &slot->mid, c->topic, len,
                                   payload, qos, false);
        if (rc != MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "mqtt_load: publish by %s failed: %s\n",
                    c->client_id, mosquitto_strerror(rc));
            slot->mid = 0;
            c->in_flight--;
            w->errors++;
            finish_client(c, CLIENT_FAILED);
            mosquitto_disconnect(c->mosq);
            return;
        }
    }
}

static void on_connect(struct mosquitto *mosq, void *data, int rc, int flags,
                       const mosquitto_property *props)
{
    client_t *c = data;
    worker_t *w = c->worker;

    (void)mosq;
    (void)flags;
    (void)props;
    if (c->state != CLIENT_CONNECTING)
        return;
    if (rc != 0) {
        fprintf(stderr, "mqtt_load: %s: CONNACK rejected the connection: "
                        "%s\n",
                c->client_id,
                w->opt->version == 5 ? mosquitto_reason_string(rc)
                                     : mosquitto_connack_string(rc));
        w->errors++;
        atomic_fetch_add(&w->failed, 1);
        finish_client(c, CLIENT_FAILED);
        return;
    }
    w->connecting--;
    c->state = CLIENT_ACTIVE;
    atomic_fetch_add(&w->connected, 1);
    if (w->opt->idle_seconds == 0)
        fill_window(c, w->opt->window);
}

static void on_publish(struct mosquitto *mosq, void *data, int mid,
                       int reason, const mosquitto_property *props)
{
    client_t *c = data;
    worker_t *w = c->worker;
    uint64_t now = now_ns();
    int i, qos;

    (void)mosq;
    (void)props;
    for (i = 0; i < w->opt->window; i++) {
        if (c->slots[i].mid == mid)
            break;
    }
    if (i == w->opt->window)
        return;
    if (c->slots[i].qos == 1) {
        record_latency(w, now - c->slots[i].sent_ns);
        if (reason >= 0x80)
            w->rejected++;
        else
            w->acked++;
    }
    qos = c->slots[i].qos;
    c->slots[i].mid = 0;
    c->in_flight--;
    c->finished++;
    if (c->finished == w->opt->messages) {
        w->last_done_ns = now;
        finish_client(c, CLIENT_DONE);
        mosquitto_disconnect(c->mosq);
        return;
    }
    /* A PUBACK frees a slot for the next message, which goes out after
     * this read. A written QoS 0 message must not publish the next one
     * from here, because libmosquitto is still in its write loop and would
     * write that one too. One client could then keep the thread busy until
     * its socket is full. The worker loop refills such clients in turn. */
    if (qos == 1) {
        fill_window(c, 1);
    } else if (!c->refill) {
        c->refill = true;
        w->refills++;
    }
}

static void on_disconnect(struct mosquitto *mosq, void *data, int rc,
                          const mosquitto_property *props)
{
    client_t *c = data;
    worker_t *w = c->worker;

    (void)mosq;
    (void)props;
    if (c->state == CLIENT_DONE || c->state == CLIENT_FAILED)
        return;
    fprintf(stderr, "mqtt_load: %s: connection lost: %s\n", c->client_id,
            w->opt->version == 5 ? mosquitto_reason_string(rc)
                                 : mosquitto_strerror(rc));
    if (c->state == CLIENT_CONNECTING)
        atomic_fetch_add(&w->failed, 1);
    else
        w->lost++;
    w->errors++;
    finish_client(c, CLIENT_FAILED);
}

/* Arms EPOLLOUT while libmosquitto has bytes queued for the socket. */
static void update_interest(client_t *c)
{
    struct epoll_event ev;
    bool want = mosquitto_want_write(c->mosq);

    if (c->fd < 0 || want == c->want_out)
        return;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(c->worker->epoll_fd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = want;
}

/* Notices when libmosquitto has closed the client's socket, after an
 * error or after sending DISCONNECT. Closing removed the socket from the
 * epoll set, and its number may already belong to another client, so it
 * must not be passed to epoll_ctl() again. */
static void sync_socket(client_t *c)
{
    if (c->fd >= 0 && mosquitto_socket(c->mosq) != c->fd)
        c->fd = -1;
}

/* Handles the return code of a mosquitto_loop_*() call. libmosquitto
 * reports a lost connection to on_disconnect, which counts it; other
 * errors are counted here. */
static void check_loop_rc(client_t *c, int rc)
{
    if (rc != MOSQ_ERR_SUCCESS && c->state != CLIENT_DONE &&
        c->state != CLIENT_FAILED) {
        c->worker->errors++;
        if (c->state == CLIENT_CONNECTING)
            atomic_fetch_add(&c->worker->failed, 1);
        else
            c->worker->lost++;
        fprintf(stderr, "mqtt_load: %s: %s\n", c->client_id,
                mosquitto_strerror(rc));
        finish_client(c, CLIENT_FAILED);
        mosquitto_disconnect(c->mosq);
    }
    sync_socket(c);
}

/* Starts the TCP connection and sends CONNECT. The TCP connect itself
 * blocks, which on loopback takes microseconds. With TLS, libmosquitto
 * sends CONNECT only after the handshake, which the event loop drives. */
static void start_client(client_t *c)
{
    worker_t *w = c->worker;
    const options_t *opt = w->opt;
    struct epoll_event ev;
    int rc;

    c->state = CLIENT_CONNECTING;
    w->connecting++;
    if (opt->version == 5)
        rc = mosquitto_connect_bind_v5(c->mosq, opt->host, opt->port,
                                       opt->keepalive, opt->bind_address,
                                       NULL);
    else
        rc = mosquitto_connect_bind(c->mosq, opt->host, opt->port,
                                    opt->keepalive, opt->bind_address);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "mqtt_load: %s: connect to %s:%d failed: %s\n",
                c->client_id, opt->host, opt->port,
                rc == MOSQ_ERR_ERRNO ? strerror(errno)
                                     : mosquitto_strerror(rc));
        w->errors++;
        atomic_fetch_add(&w->failed, 1);
        finish_client(c, CLIENT_FAILED);
        return;
    }
    c->fd = mosquitto_socket(c->mosq);
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    if (epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        fprintf(stderr, "mqtt_load: epoll_ctl failed: %s\n", strerror(errno));
        w->errors++;
        atomic_fetch_add(&w->failed, 1);
        finish_client(c, CLIENT_FAILED);
        c->fd = -1;
        return;
    }
    c->want_out = false;
    update_interest(c);
}

static int setup_client(worker_t *w, client_t *c, int index)
{
    const options_t *opt = w->opt;
    int rc;

    c->worker = w;
    c->index = index;
    c->fd = -1;
    c->state = CLIENT_NEW;
    c->cred = &opt->credentials[index % opt->credential_count];
    snprintf(c->client_id, sizeof(c->client_id), "%s-%d", opt->run, index);
    if (format_topic(c->topic, sizeof(c->topic), opt->topic_template,
                     c->cred->device_id) != 0) {
        fprintf(stderr, "mqtt_load: topic too long\n");
        return -1;
    }
    c->slots = calloc((size_t)opt->window, sizeof(*c->slots));
    c->mosq = mosquitto_new(c->client_id, true, c);
    if (c->slots == NULL || c->mosq == NULL) {
        fprintf(stderr, "mqtt_load: creating client %d failed: %s\n", index,
                strerror(errno));
        return -1;
    }
    mosquitto_int_option(c->mosq, MOSQ_OPT_PROTOCOL_VERSION,
                         opt->version == 5 ? MQTT_PROTOCOL_V5
                                           : MQTT_PROTOCOL_V311);
    /* Nagle's algorithm would hold small PUBLISH packets back until the
     * server's ACK, which adds client delay to the measured latency. */
    mosquitto_int_option(c->mosq, MOSQ_OPT_TCP_NODELAY, 1);
    if (opt->cafile != NULL) {
        rc = mosquitto_tls_set(c->mosq, opt->cafile, NULL, opt->certfile,
                               opt->keyfile, NULL);
        if (rc != MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "mqtt_load: setting TLS options failed: %s\n",
                    mosquitto_strerror(rc));
            return -1;
        }
    }
    /* The tool keeps its own window, so libmosquitto's must not be
     * smaller. */
    mosquitto_max_inflight_messages_set(c->mosq, (unsigned)opt->window);
    rc = mosquitto_username_pw_set(c->mosq, c->cred->device_id,
                                   c->cred->key);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "mqtt_load: setting credentials failed: %s\n",
                mosquitto_strerror(rc));
        return -1;
    }
    mosquitto_connect_v5_callback_set(c->mosq, on_connect);
    mosquitto_publish_v5_callback_set(c->mosq, on_publish);
    mosquitto_disconnect_v5_callback_set(c->mosq, on_disconnect);
    return 0;
}

static void handle_event(client_t *c, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        check_loop_rc(c, mosquitto_loop_read(c->mosq, 1));
    /* Callbacks queue packets without writing them, so write after every
     * read as well as when the socket has room again. */
    if (c->fd >= 0 && mosquitto_want_write(c->mosq))
        check_loop_rc(c, mosquitto_loop_write(c->mosq, 1));
    if (c->fd >= 0)
        update_interest(c);
}

/* Gives each client whose QoS 0 messages were written one window's worth
 * of new messages, written at once because this is outside a callback. */
static void refill_clients(worker_t *w)
{
    int i;

    for (i = 0; i < w->next_connect; i++) {
        client_t *c = &w->clients[i];

        if (!c->refill)
            continue;
        c->refill = false;
        w->refills--;
        if (c->state != CLIENT_ACTIVE || c->fd < 0)
            continue;
        fill_window(c, w->opt->window);
        check_loop_rc(c, MOSQ_ERR_SUCCESS);
        if (c->fd >= 0)
            update_interest(c);
    }
}

static bool should_stop(const worker_t *w, uint64_t deadline_ns)
{
    if (stop_requested)
        return true;
    if (w->opt->idle_seconds > 0)
        return atomic_load(&hold_over);
    return w->remaining == 0 || now_ns() >= deadline_ns;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    struct epoll_event events[256];
    uint64_t deadline, last_misc = now_ns();
    int i, n;

    deadline = now_ns() + (uint64_t)w->opt->max_seconds * 1000000000u;
    w->remaining = w->count;
    while (!should_stop(w, deadline)) {
        while (w->next_connect < w->count && w->connecting < CONNECT_BATCH &&
               !stop_requested)
            start_client(&w->clients[w->next_connect++]);
        if (w->connect_done_ns == 0 && w->next_connect == w->count &&
            w->connecting == 0)
            w->connect_done_ns = now_ns();
        n = epoll_wait(w->epoll_fd, events, 256, w->refills ? 0 : 100);
        for (i = 0; i < n; i++)
            handle_event(events[i].data.ptr, events[i].events);
        if (w->refills > 0)
            refill_clients(w);
        if (now_ns() - last_misc >= 1000000000u) {
            /* Sends PINGREQ when a keep alive is due. */
            for (i = 0; i < w->next_connect; i++) {
                client_t *c = &w->clients[i];

                if (c->fd >= 0 && c->state == CLIENT_ACTIVE) {
                    check_loop_rc(c, mosquitto_loop_misc(c->mosq));
                    if (c->fd >= 0)
                        update_interest(c);
                }
            }
            last_misc = now_ns();
        }
    }
    return NULL;
}

static int compare_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return (x > y) - (x < y);
}

static uint32_t percentile(const uint32_t *sorted, long count, int pct)
{
    long i;

    if (count == 0)
        return 0;
    i = (count * pct + 99) / 100 - 1;
    if (i < 0)
        i = 0;
    return sorted[i];
}

static double cpu_seconds(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* Checks that the file of option --name can be opened for reading, so
 * that a wrong path gets a message with the reason instead of
 * mosquitto_tls_set()'s bare "Invalid function arguments". */
static int check_readable(const char *path, const char *name)
{
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        fprintf(stderr, "mqtt_load: cannot open --%s file %s: %s\n", name,
                path, strerror(errno));
        return -1;
    }
    fclose(f);
    return 0;
}

/* Checks that the TLS options go together and name readable files. */
static int check_tls_options(const options_t *opt)
{
    if ((opt->certfile == NULL) != (opt->keyfile == NULL)) {
        fprintf(stderr, "mqtt_load: --cert and --key must be given "
                        "together\n");
        return -1;
    }
    if (opt->certfile != NULL && opt->cafile == NULL) {
        fprintf(stderr, "mqtt_load: --cert needs --cafile to verify the "
                        "server\n");
        return -1;
    }
    if (opt->cafile != NULL && check_readable(opt->cafile, "cafile") != 0)
        return -1;
    if (opt->certfile != NULL &&
        (check_readable(opt->certfile, "cert") != 0 ||
         check_readable(opt->keyfile, "key") != 0))
        return -1;
    return 0;
}

/* Values of the long options, above every short option character. */
enum { OPT_CAFILE = 256, OPT_CERT, OPT_KEY };

static int parse_options(int argc, char **argv, options_t *opt)
{
    static const struct option long_options[] = {
        {"cafile", required_argument, NULL, OPT_CAFILE},
        {"cert", required_argument, NULL, OPT_CERT},
        {"key", required_argument, NULL, OPT_KEY},
        {NULL, 0, NULL, 0},
    };
    long v;
    int ch;

    memset(opt, 0, sizeof(*opt));
    opt->host = "127.0.0.1";
    opt->clients = 1;
    opt->messages = 1000;
    opt->qos = 1;
    opt->window = 16;
    opt->version = 5;
    opt->topic_template = "devices/{device_id}/data";
    opt->run = "run";
    opt->threads = 1;
    opt->max_seconds = 120;
    opt->keepalive = 60;
    while ((ch = getopt_long(argc, argv, "H:p:B:f:c:m:q:w:V:t:r:T:d:I:k:h",
                             long_options, NULL)) != -1) {
        switch (ch) {
        case OPT_CAFILE: opt->cafile = optarg; break;
        case OPT_CERT: opt->certfile = optarg; break;
        case OPT_KEY: opt->keyfile = optarg; break;
        case 'H': opt->host = optarg; break;
        case 'B': opt->bind_address = optarg; break;
        case 'f': opt->credentials_path = optarg; break;
        case 't': opt->topic_template = optarg; break;
        case 'r': opt->run = optarg; break;
        case 'h': usage(stdout); exit(0);
        case 'p':
            if (parse_long(optarg, 'p', 1, 65535, &v) != 0)
                return -1;
            opt->port = (int)v;
            break;
        case 'c':
            if (parse_long(optarg, 'c', 1, MAX_CLIENTS, &v) != 0)
                return -1;
            opt->clients = (int)v;
            break;
        case 'm':
            if (parse_long(optarg, 'm', 1, MAX_MESSAGES, &v) != 0)
                return -1;
            opt->messages = v;
            break;
        case 'q':
            if (parse_long(optarg, 'q', 0, 1, &v) != 0)
                return -1;
            opt->qos = (int)v;
            break;
        case 'w':
            if (parse_long(optarg, 'w', 1, MAX_WINDOW, &v) != 0)
                return -1;
            opt->window = (int)v;
            break;
        case 'V':
            if (strcmp(optarg, "311") == 0) {
                opt->version = 311;
            } else if (strcmp(optarg, "5") == 0) {
                opt->version = 5;
            } else {
                fprintf(stderr, "mqtt_load: -V must be 311 or 5, got \"%s\"\n",
                        optarg);
                return -1;
            }
            break;
        case 'T':
            if (parse_long(optarg, 'T', 1, MAX_THREADS, &v) != 0)
                return -1;
            opt->threads = (int)v;
            break;
        case 'd':
            if (parse_long(optarg, 'd', 1, 3600, &v) != 0)
                return -1;
            opt->max_seconds = (int)v;
            break;
        case 'I':
            if (parse_long(optarg, 'I', 1, 3600, &v) != 0)
                return -1;
            opt->idle_seconds = (int)v;
            break;
        case 'k':
            if (parse_long(optarg, 'k', 5, 65535, &v) != 0)
                return -1;
            opt->keepalive = (int)v;
            break;
        default: usage(stderr); return -1;
        }
    }
    if (optind != argc || opt->port == 0 || opt->credentials_path == NULL) {
        fprintf(stderr, "mqtt_load: -p PORT and -f CREDENTIALS are required, "
                        "and no other arguments\n");
        usage(stderr);
        return -1;
    }
    if (check_tls_options(opt) != 0)
        return -1;
    if (opt->threads > opt->clients)
        opt->threads = opt->clients;
    return 0;
}

/* Checks that every client's 3 file descriptors fit under RLIMIT_NOFILE. */
static int check_fd_limit(const options_t *opt)
{
    struct rlimit rl;
    long needed = 3L * opt->clients + SPARE_FDS + opt->threads;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)needed > rl.rlim_cur) {
        fprintf(stderr,
                "mqtt_load: %d clients need %ld file descriptors (3 each), "
                "but the limit is %llu; run more processes with fewer "
                "clients each\n",
                opt->clients, needed, (unsigned long long)rl.rlim_cur);
        return -1;
    }
    return 0;
}

static int setup_workers(const options_t *opt, worker_t *workers)
{
    int t, i, first = 0;

    for (t = 0; t < opt->threads; t++) {
        worker_t *w = &workers[t];
        int share = opt->clients / opt->threads +
                    (t < opt->clients % opt->threads ? 1 : 0);

        w->opt = opt;
        w->count = share;
        w->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        w->clients = calloc((size_t)share, sizeof(*w->clients));
        if (opt->idle_seconds == 0)
            w->latency_capacity = share * opt->messages;
        w->latencies = calloc((size_t)w->latency_capacity + 1,
                              sizeof(*w->latencies));
        if (w->epoll_fd < 0 || w->clients == NULL || w->latencies == NULL) {
            fprintf(stderr, "mqtt_load: setting up thread %d failed: %s\n", t,
                    strerror(errno));
            return -1;
        }
        for (i = 0; i < share; i++) {
            if (setup_client(w, &w->clients[i], first + i) != 0)
                return -1;
        }
        first += share;
    }
    return 0;
}

/* Waits for the connect phase, prints MQTT_IDLE, holds until the hold time
 * ends or a signal arrives, and tells the threads to stop. */
static void run_idle(const options_t *opt, worker_t *workers,
                     uint64_t start_ns)
{
    uint64_t hold_end = 0;
    bool announced = false;
    int t, connected, failed;

    while (!stop_requested) {
        connected = failed = 0;
        for (t = 0; t < opt->threads; t++) {
            connected += atomic_load(&workers[t].connected);
            failed += atomic_load(&workers[t].failed);
        }
        if (!announced && connected + failed == opt->clients) {
            printf("MQTT_IDLE connected=%d failed=%d connect_us=%" PRIu64
                   "\n",
                   connected, failed, (now_ns() - start_ns) / 1000);
            fflush(stdout);
            announced = true;
            hold_end = now_ns() + (uint64_t)opt->idle_seconds * 1000000000u;
        }
        if (announced && now_ns() >= hold_end)
            break;
        /* Bounds the connect phase as well as the hold. */
        if (!announced &&
            now_ns() - start_ns >= (uint64_t)opt->max_seconds * 1000000000u) {
            printf("MQTT_IDLE connected=%d failed=%d connect_us=%" PRIu64
                   " timed_out=1\n",
                   connected, opt->clients - connected,
                   (now_ns() - start_ns) / 1000);
            fflush(stdout);
            break;
        }
        usleep(100000);
    }
    atomic_store(&hold_over, true);
}

static void report_load(const options_t *opt, worker_t *workers,
                        uint64_t start_ns, double cpu_start)
{
    uint64_t first = 0, last = 0, connect_done = 0, wall;
    long sent = 0, acked = 0, rejected = 0, errors = 0, count = 0, unfinished;
    uint32_t *all;
    int t, connected = 0;
    double duration_s, cpu;

    for (t = 0; t < opt->threads; t++) {
        worker_t *w = &workers[t];

        if (w->first_publish_ns && (!first || w->first_publish_ns < first))
            first = w->first_publish_ns;
        if (w->last_done_ns > last)
            last = w->last_done_ns;
        if (w->connect_done_ns > connect_done)
            connect_done = w->connect_done_ns;
        sent += w->sent;
        acked += w->acked;
        rejected += w->rejected;
        errors += w->errors;
        count += w->latency_count;
        connected += atomic_load(&w->connected);
    }
    /* Messages whose PUBACK never came before the time limit are errors. */
    unfinished = (long)opt->clients * opt->messages;
    for (t = 0; t < opt->threads; t++) {
        int i;

        for (i = 0; i < workers[t].count; i++)
            unfinished -= workers[t].clients[i].finished;
    }
    all = malloc((size_t)(count + 1) * sizeof(*all));
    count = 0;
    for (t = 0; all != NULL && t < opt->threads; t++) {
        memcpy(all + count, workers[t].latencies,
               (size_t)workers[t].latency_count * sizeof(*all));
        count += workers[t].latency_count;
    }
    if (all != NULL)
        qsort(all, (size_t)count, sizeof(*all), compare_u32);
    else
        count = 0;
    wall = now_ns() - start_ns;
    cpu = cpu_seconds() - cpu_start;
    duration_s = first && last > first ? (double)(last - first) / 1e9 : 0;
    printf("MQTT_LOAD clients=%d connected=%d version=%d qos=%d window=%d "
           "sent=%ld acked=%ld rejected=%ld errors=%ld duration_us=%.0f "
           "rate=%.1f p50_us=%" PRIu32 " p99_us=%" PRIu32 " max_us=%" PRIu32
           " connect_us=%" PRIu64 " cpu_pct=%.0f timed_out=%d tls=%d\n",
           opt->clients, connected, opt->version, opt->qos, opt->window, sent,
           acked, rejected, errors + (unfinished > 0 ? unfinished : 0),
           duration_s * 1e6, duration_s > 0 ? sent / duration_s : 0.0,
           percentile(all, count, 50), percentile(all, count, 99),
           count ? all[count - 1] : 0,
           connect_done > start_ns ? (connect_done - start_ns) / 1000 : 0,
           wall ? 100.0 * cpu / ((double)wall / 1e9) : 0.0,
           unfinished > 0 ? 1 : 0, opt->cafile != NULL);
    fflush(stdout);
    free(all);
}

int main(int argc, char **argv)
{
    options_t opt;
    worker_t *workers = NULL;
    struct sigaction sa;
    uint64_t start_ns;
    double cpu_start;
    int t, i, started = 0, rc = 1, open_at_end = 0, lost = 0;

    if (parse_options(argc, argv, &opt) != 0)
        return 2;
    if (read_credentials(&opt) != 0 || check_fd_limit(&opt) != 0)
        return 2;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    mosquitto_lib_init();
    workers = calloc((size_t)opt.threads, sizeof(*workers));
    if (workers == NULL || setup_workers(&opt, workers) != 0)
        goto done;

    start_ns = now_ns();
    cpu_start = cpu_seconds();
    for (t = 0; t < opt.threads; t++) {
        if (pthread_create(&workers[t].thread, NULL, worker_main,
                           &workers[t]) != 0) {
            fprintf(stderr, "mqtt_load: starting thread %d failed\n", t);
            stop_requested = 1;
            break;
        }
        started++;
    }
    if (opt.idle_seconds > 0 && started == opt.threads)
        run_idle(&opt, workers, start_ns);
    for (t = 0; t < started; t++)
        pthread_join(workers[t].thread, NULL);

    if (opt.idle_seconds > 0) {
        for (t = 0; t < opt.threads; t++) {
            for (i = 0; i < workers[t].count; i++)
                open_at_end += workers[t].clients[i].state == CLIENT_ACTIVE;
            lost += workers[t].lost;
        }
        printf("MQTT_IDLE_END open=%d lost=%d\n", open_at_end, lost);
        fflush(stdout);
    } else {
        report_load(&opt, workers, start_ns, cpu_start);
    }
    rc = 0;
done:
    for (t = 0; workers != NULL && t < opt.threads; t++) {
        for (i = 0; i < workers[t].count; i++) {
            client_t *c = &workers[t].clients[i];

            if (c->mosq != NULL) {
                if (c->state == CLIENT_ACTIVE) {
                    /* Keeps on_disconnect from reporting a lost
                     * connection. */
                    c->state = CLIENT_DONE;
                    mosquitto_disconnect(c->mosq);
                }
                mosquitto_destroy(c->mosq);
            }
            free(c->slots);
        }
        free(workers[t].clients);
        free(workers[t].latencies);
        if (workers[t].epoll_fd > 0)
            close(workers[t].epoll_fd);
    }
    free(workers);
    free(opt.credentials);
    mosquitto_lib_cleanup();
    return rc;
}
