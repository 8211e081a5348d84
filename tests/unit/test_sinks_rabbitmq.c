/* Unit tests for the RabbitMQ sink's checks that need no broker: the
 * default credentials and a refused connection. The broker itself is
 * tested in tests/integration/test_sink_rabbitmq.py. */
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/errors.h"
#include "sinks/sink.h"

static config_sink_t sample_config(const char *address)
{
    config_sink_t cfg = {0};

    cfg.name = "rabbit";
    cfg.kind = CONFIG_SINK_RABBITMQ;
    cfg.timeout_ms = 1000;
    cfg.address = (char *)address;
    cfg.topic = "{device_type}.{device_id}";
    cfg.exchange = "telemetry";
    cfg.vhost = "/";
    return cfg;
}

static void rabbitmq_open_needs_username_off_loopback(void **state)
{
    /* 192.0.2.0/24 is reserved for documentation. open never connects,
     * so nothing is sent to it. */
    config_sink_t cfg = sample_config("192.0.2.10:5672");
    void *sink = NULL;
    char err[256] = "";

    assert_int_equal(
        sink_rabbitmq_ops.open(&cfg, NULL, &sink, err, sizeof(err)),
        ING_ECONFIG);
    assert_null(sink);
    assert_non_null(strstr(err, "set username and password"));
}

static void rabbitmq_open_accepts_guest_on_loopback(void **state)
{
    static const char *const addresses[] = {
        "127.0.0.1:5672", "[::1]:5672", "localhost:5672", "127.1.2.3:1"};

    for (size_t i = 0; i < sizeof(addresses) / sizeof(addresses[0]); i++) {
        config_sink_t cfg = sample_config(addresses[i]);
        void *sink = NULL;
        char err[256] = "";

        assert_int_equal(
            sink_rabbitmq_ops.open(&cfg, NULL, &sink, err, sizeof(err)), 0);
        assert_non_null(sink);
        sink_rabbitmq_ops.close(sink);
    }
}

static void rabbitmq_open_accepts_username_off_loopback(void **state)
{
    config_sink_t cfg = sample_config("192.0.2.10:5672");
    void *sink = NULL;
    char err[256] = "";

    cfg.username = "ingestd";
    cfg.password = "secret";
    assert_int_equal(
        sink_rabbitmq_ops.open(&cfg, NULL, &sink, err, sizeof(err)), 0);
    sink_rabbitmq_ops.close(sink);
}

/* Returns a socket bound to a port on 127.0.0.1 that does not listen, so
 * connecting to it is refused. Stores the port in `port`. */
static int bind_closed_port(int *port)
{
    struct sockaddr_in addr = {.sin_family = AF_INET};
    socklen_t len = sizeof(addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    assert_true(fd >= 0);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&addr, &len), 0);
    *port = ntohs(addr.sin_port);
    return fd;
}

static void rabbitmq_deliver_refused_connection_fails(void **state)
{
    static const char record[] =
        "{\"message_id\":\"m1\",\"device_id\":\"dev-1\","
        "\"device_type\":\"default\",\"protocol\":\"http\"}";
    spool_record_t rec = {.data = record, .len = sizeof(record) - 1};
    sink_outcome_t out = {.status = SINK_RECORD_RETRY};
    char address[32];
    char err[256] = "";
    void *sink = NULL;
    int port;
    int fd = bind_closed_port(&port);
    config_sink_t cfg;

    snprintf(address, sizeof(address), "127.0.0.1:%d", port);
    cfg = sample_config(address);
    assert_int_equal(
        sink_rabbitmq_ops.open(&cfg, NULL, &sink, err, sizeof(err)), 0);
    assert_int_equal(sink_rabbitmq_ops.deliver(sink, &rec, 1, &out),
                     ING_EIO);
    assert_int_equal(out.status, SINK_RECORD_RETRY);
    sink_rabbitmq_ops.close(sink);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(rabbitmq_open_needs_username_off_loopback),
        cmocka_unit_test(rabbitmq_open_accepts_guest_on_loopback),
        cmocka_unit_test(rabbitmq_open_accepts_username_off_loopback),
        cmocka_unit_test(rabbitmq_deliver_refused_connection_fails),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
