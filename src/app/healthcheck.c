/* `ingestd healthcheck`: one GET to the admin listener over a plain TCP
 * socket, for container HEALTHCHECK lines and other probes that should
 * not need curl in the image. */
#include "app/app.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/config.h"
#include "core/errors.h"

/* Upper bound on one probe, connect to status line. Container runtimes
 * and Kubernetes apply their own timeout on top. */
#define PROBE_TIMEOUT_MS 5000

/* Only the status line is read; the body is ignored. */
#define STATUS_LINE_MAX 256

/* A resolved socket address and the text used in the Host header. */
typedef struct target {
    struct sockaddr_storage addr;
    socklen_t addr_len;
    char host[80];
} target_t;

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Parses "IPv4:port" or "[IPv6]:port". A wildcard address becomes the
 * loopback address of its family, because a listener bound to every
 * address also accepts on loopback, and the wildcard itself cannot be
 * connected to portably. */
static int parse_target(const char *listen, target_t *t, char *err,
                        size_t errlen)
{
    char host[64];
    const char *port_text;
    size_t host_len;
    char *end;
    long port;

    memset(t, 0, sizeof(*t));
    if (listen[0] == '[') {
        const char *close = strchr(listen, ']');
        if (close == NULL || close[1] != ':')
            goto invalid;
        host_len = (size_t)(close - listen - 1);
        port_text = close + 2;
        if (host_len == 0 || host_len >= sizeof(host))
            goto invalid;
        memcpy(host, listen + 1, host_len);
    } else {
        const char *colon = strrchr(listen, ':');
        if (colon == NULL)
            goto invalid;
        host_len = (size_t)(colon - listen);
        port_text = colon + 1;
        if (host_len == 0 || host_len >= sizeof(host))
            goto invalid;
        memcpy(host, listen, host_len);
    }
    host[host_len] = '\0';
    errno = 0;
    port = strtol(port_text, &end, 10);
    if (errno != 0 || *port_text == '\0' || *end != '\0' || port < 1 ||
        port > 65535)
        goto invalid;

    if (listen[0] == '[') {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&t->addr;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
            goto invalid;
        if (IN6_IS_ADDR_UNSPECIFIED(&a6->sin6_addr)) {
            a6->sin6_addr = in6addr_loopback;
            snprintf(host, sizeof(host), "::1");
        }
        t->addr_len = sizeof(*a6);
        snprintf(t->host, sizeof(t->host), "[%s]:%ld", host, port);
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)&t->addr;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
            goto invalid;
        if (a4->sin_addr.s_addr == htonl(INADDR_ANY)) {
            a4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            snprintf(host, sizeof(host), "127.0.0.1");
        }
        t->addr_len = sizeof(*a4);
        snprintf(t->host, sizeof(t->host), "%s:%ld", host, port);
    }
    return 0;

invalid:
    snprintf(err, errlen,
             "invalid address \"%s\": expected IPv4:port or [IPv6]:port",
             listen);
    return ING_EINVAL;
}

/* Waits until `fd` is ready for `events` or the deadline passes. */
static int wait_fd(int fd, short events, int64_t deadline, char *err,
                   size_t errlen, const char *what)
{
    struct pollfd p = {.fd = fd, .events = events};

    for (;;) {
        int64_t left = deadline - now_ms();
        int n;

        if (left <= 0) {
            snprintf(err, errlen, "%s timed out after %d ms", what,
                     PROBE_TIMEOUT_MS);
            return ING_EIO;
        }
        n = poll(&p, 1, (int)left);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR) {
            snprintf(err, errlen, "poll failed: %s", strerror(errno));
            return ING_EIO;
        }
    }
}

static int connect_target(const target_t *t, int64_t deadline, int *out,
                          char *err, size_t errlen)
{
    int fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC |
                    SOCK_NONBLOCK, 0);
    int so_error = 0;
    socklen_t len = sizeof(so_error);
    int rc;

    if (fd < 0) {
        snprintf(err, errlen, "socket failed: %s", strerror(errno));
        return ING_EIO;
    }
    if (connect(fd, (const struct sockaddr *)&t->addr, t->addr_len) != 0) {
        if (errno != EINPROGRESS) {
            snprintf(err, errlen, "connect to %s failed: %s", t->host,
                     strerror(errno));
            rc = ING_EIO;
            goto error;
        }
        rc = wait_fd(fd, POLLOUT, deadline, err, errlen, "connect");
        if (rc != 0)
            goto error;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
        if (so_error != 0) {
            snprintf(err, errlen, "connect to %s failed: %s", t->host,
                     strerror(so_error));
            rc = ING_EIO;
            goto error;
        }
    }
    *out = fd;
    return 0;

error:
    close(fd);
    return rc;
}

static int send_all(int fd, const char *buf, size_t len, int64_t deadline,
                    char *err, size_t errlen)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            snprintf(err, errlen, "send failed: %s", strerror(errno));
            return ING_EIO;
        }
        if (wait_fd(fd, POLLOUT, deadline, err, errlen, "send") != 0)
            return ING_EIO;
    }
    return 0;
}

/* Reads until the end of the status line and returns its status code. */
static int read_status(int fd, int64_t deadline, char *err, size_t errlen)
{
    char line[STATUS_LINE_MAX + 1];
    size_t used = 0;
    int status = 0;
    char *eol;

    for (;;) {
        ssize_t n = recv(fd, line + used, STATUS_LINE_MAX - used, 0);

        if (n > 0) {
            used += (size_t)n;
            line[used] = '\0';
            if (strstr(line, "\r\n") != NULL || used == STATUS_LINE_MAX)
                break;
            continue;
        }
        if (n == 0)
            break;
        if (errno != EAGAIN && errno != EINTR) {
            snprintf(err, errlen, "receive failed: %s", strerror(errno));
            return ING_EIO;
        }
        if (wait_fd(fd, POLLIN, deadline, err, errlen, "response") != 0)
            return ING_EIO;
    }
    line[used] = '\0';
    eol = strstr(line, "\r\n");
    if (eol != NULL)
        *eol = '\0';
    if (sscanf(line, "HTTP/1.%*1[01] %3d", &status) != 1 || status < 100 ||
        status > 599) {
        snprintf(err, errlen, "invalid HTTP status line \"%.64s\"", line);
        return ING_EIO;
    }
    return status;
}

int healthcheck_probe(const char *listen, const char *path, char *err,
                      size_t errlen)
{
    int64_t deadline = now_ms() + PROBE_TIMEOUT_MS;
    char request[512];
    target_t t;
    int fd = -1;
    int rc;

    rc = parse_target(listen, &t, err, errlen);
    if (rc != 0)
        return rc;
    rc = connect_target(&t, deadline, &fd, err, errlen);
    if (rc != 0)
        return rc;
    snprintf(request, sizeof(request),
             "GET %s HTTP/1.1\r\nHost: %s\r\n"
             "User-Agent: ingestd-healthcheck\r\nConnection: close\r\n\r\n",
             path, t.host);
    rc = send_all(fd, request, strlen(request), deadline, err, errlen);
    if (rc == 0)
        rc = read_status(fd, deadline, err, errlen);
    close(fd);
    return rc;
}

int app_healthcheck(const char *config_path, int argc, char **argv)
{
    const char *path = "/healthz";
    char err[1024];
    config_t *cfg;
    int status;
    int code;

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--ready") == 0) {
            path = "/readyz";
            continue;
        }
        fprintf(stderr, "ingestd: healthcheck: unexpected argument \"%s\"; "
                "the only option is --ready\n", argv[i]);
        return 2;
    }
    if (config_load(config_path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 2;
    }
    if (cfg->admin.listen == NULL || cfg->admin.listen[0] == '\0') {
        fprintf(stderr, "ingestd: healthcheck: the admin listener is off "
                "in %s; set admin.listen\n", config_path);
        config_free(cfg);
        return 2;
    }
    status = healthcheck_probe(cfg->admin.listen, path, err, sizeof(err));
    if (status < 0) {
        fprintf(stderr, "ingestd: healthcheck: GET %s on %s failed: %s\n",
                path, cfg->admin.listen, err);
        code = 1;
    } else if (status != 200) {
        fprintf(stderr, "ingestd: healthcheck: GET %s on %s returned %d\n",
                path, cfg->admin.listen, status);
        code = 1;
    } else {
        printf("GET %s on %s returned 200\n", path, cfg->admin.listen);
        code = 0;
    }
    config_free(cfg);
    return code;
}
