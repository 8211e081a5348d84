/* Unit tests of the ws module: the opening handshake's key functions, and
 * ws connections over an in-memory stream that records what is written. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ws/ws.h"

/* ---- Handshake ---- */

static void ws_accept_rfc_example(void **state)
{
    char accept[WS_ACCEPT_LEN + 1];

    (void)state;
    /* The example in RFC 6455 section 1.3. */
    assert_int_equal(ws_handshake_accept("dGhlIHNhbXBsZSBub25jZQ==", accept),
                     0);
    assert_string_equal(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

static void ws_accept_rejects_invalid_key(void **state)
{
    char accept[WS_ACCEPT_LEN + 1];

    (void)state;
    assert_int_not_equal(ws_handshake_accept("c2hvcnQ=", accept), 0);
}

static void ws_key_valid_cases(void **state)
{
    static const struct {
        const char *key;
        int valid;
    } cases[] = {
        {"dGhlIHNhbXBsZSBub25jZQ==", 1},  {"AAAAAAAAAAAAAAAAAAAAAA==", 1},
        {"ab+/AAAAAAAAAAAAAAAAAA==", 1},  {"", 0},
        {"dGhlIHNhbXBsZSBub25jZQ=", 0},   /* 23 characters */
        {"dGhlIHNhbXBsZSBub25jZQ===", 0}, /* 25 characters */
        {"dGhlIHNhbXBsZSBub25jZQAA", 0},  /* 18 bytes, no padding */
        {"dGhlIHNhbXBsZSBub25jZ*==", 0},  /* not base64 */
        {"dGhlIHNhbXBsZSBub25j ==", 0},
    };

    (void)state;
    assert_int_equal(ws_handshake_key_valid(NULL), 0);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        print_message("key \"%s\"\n", cases[i].key);
        assert_int_equal(ws_handshake_key_valid(cases[i].key), cases[i].valid);
    }
}

/* ---- Connections over an in-memory stream ---- */

typedef struct fake {
    uv_loop_t loop;
    unsigned char out[8192]; /* everything the connection wrote */
    size_t out_len;
    int reading;
    int close_called;
    ws_conn_t *ws;
    char texts[4][256]; /* text messages the handler received */
    size_t text_lens[4];
    int text_count;
    int binary_count;
    int closed; /* the handler's on_close ran */
    uint16_t close_code;
} fake_t;

static int fake_write(void *ctx, char *data, size_t len)
{
    fake_t *f = ctx;

    assert_true(f->out_len + len <= sizeof(f->out));
    memcpy(f->out + f->out_len, data, len);
    f->out_len += len;
    free(data);
    return 0;
}

static size_t fake_write_queue_size(void *ctx)
{
    (void)ctx;
    return 0;
}

static void fake_set_reading(void *ctx, int on)
{
    ((fake_t *)ctx)->reading = on;
}

static void fake_close(void *ctx)
{
    ((fake_t *)ctx)->close_called = 1;
}

static const ws_stream_ops_t fake_ops = {
    .write = fake_write,
    .write_queue_size = fake_write_queue_size,
    .set_reading = fake_set_reading,
    .close = fake_close,
};

static void on_text(ws_conn_t *ws, const char *data, size_t len, void *arg)
{
    fake_t *f = arg;

    (void)ws;
    assert_true(f->text_count < 4);
    assert_true(len < sizeof(f->texts[0]));
    memcpy(f->texts[f->text_count], data, len);
    f->text_lens[f->text_count++] = len;
}

static void on_binary(ws_conn_t *ws, const uint8_t *data, size_t len, void *arg)
{
    (void)ws;
    (void)data;
    (void)len;
    ((fake_t *)arg)->binary_count++;
}

static void on_close(ws_conn_t *ws, uint16_t code, void *arg)
{
    fake_t *f = arg;

    (void)ws;
    f->closed = 1;
    f->close_code = code;
}

static const ws_handler_t handler = {
    .on_text = on_text,
    .on_binary = on_binary,
    .on_close = on_close,
};

static int setup(void **state)
{
    fake_t *f = calloc(1, sizeof(*f));
    ws_stream_t stream = {
        .ops = &fake_ops,
        .loop = NULL,
        .conn_id = 1,
        .peer = "127.0.0.1:1",
    };
    ws_options_t opts = {
        /* Room for a few fragments, each of which counts 96 bytes on
         * top of its payload. */
        .max_message_size = 200,
        .idle_timeout_ms = 60000,
        .ping_interval_ms = 30000,
    };

    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    stream.ctx = f;
    stream.loop = &f->loop;
    f->ws = ws_conn_open(&stream, &opts, &handler, f);
    assert_non_null(f->ws);
    *state = f;
    return 0;
}

/* Reports the stream closed and runs the loop until the connection freed
 * itself. */
static void close_stream(fake_t *f)
{
    if (!f->closed) {
        ws_conn_on_stream_closed(f->ws);
        uv_run(&f->loop, UV_RUN_DEFAULT);
    }
}

static int teardown(void **state)
{
    fake_t *f = *state;

    close_stream(f);
    assert_int_equal(f->closed, 1);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

/* Builds a client frame (masked unless `masked` is 0) into `buf` and
 * returns its length. Payloads stay under 126 bytes. */
static size_t frame(unsigned char *buf, int fin, int opcode,
                    const void *payload, size_t len, int masked)
{
    static const unsigned char key[4] = {0x12, 0x34, 0x56, 0x78};
    const unsigned char *p = payload;
    size_t n = 0;

    assert_true(len < 126);
    buf[n++] = (unsigned char)((fin ? 0x80 : 0) | opcode);
    buf[n++] = (unsigned char)((masked ? 0x80 : 0) | len);
    if (masked) {
        memcpy(buf + n, key, 4);
        n += 4;
    }
    for (size_t i = 0; i < len; i++)
        buf[n++] = masked ? (unsigned char)(p[i] ^ key[i % 4]) : p[i];
    return n;
}

static void feed(fake_t *f, const unsigned char *buf, size_t len)
{
    ws_conn_on_read(f->ws, (const char *)buf, len);
}

/* Returns the close code of the close frame in the output, or 0. */
static unsigned out_close_code(const fake_t *f)
{
    size_t i = 0;

    while (i + 2 <= f->out_len) {
        size_t len = f->out[i + 1] & 0x7F;
        assert_true(len < 126);
        if ((f->out[i] & 0x0F) == 0x8)
            return len >= 2 ? (unsigned)(f->out[i + 2] << 8 | f->out[i + 3])
                            : 1005;
        i += 2 + len;
    }
    return 0;
}

static void ws_conn_delivers_text(void **state)
{
    fake_t *f = *state;
    unsigned char buf[64];

    assert_int_equal(f->reading, 1);
    feed(f, buf, frame(buf, 1, 0x1, "hello", 5, 1));
    assert_int_equal(f->text_count, 1);
    assert_int_equal(f->text_lens[0], 5);
    assert_memory_equal(f->texts[0], "hello", 5);
    assert_int_equal(f->out_len, 0);
}

static void ws_conn_reassembles_fragments(void **state)
{
    fake_t *f = *state;
    unsigned char buf[128];
    size_t n = 0;

    n += frame(buf + n, 0, 0x1, "{\"a\":", 5, 1);
    n += frame(buf + n, 0, 0x0, "1", 1, 1);
    /* A ping between fragments is allowed and gets a pong. */
    n += frame(buf + n, 1, 0x9, "p", 1, 1);
    n += frame(buf + n, 1, 0x0, "}", 1, 1);
    /* Byte by byte, as a slow network would deliver them. */
    for (size_t i = 0; i < n; i++)
        feed(f, buf + i, 1);
    assert_int_equal(f->text_count, 1);
    assert_int_equal(f->text_lens[0], 7);
    assert_memory_equal(f->texts[0], "{\"a\":1}", 7);
    assert_int_equal(f->out_len, 3);
    assert_int_equal(f->out[0], 0x8A); /* pong */
    assert_int_equal(f->out[2], 'p');
}

static void ws_conn_unmasked_frame_closes_1002(void **state)
{
    fake_t *f = *state;
    unsigned char buf[64];

    feed(f, buf, frame(buf, 1, 0x1, "hello", 5, 0));
    assert_int_equal(f->text_count, 0);
    assert_int_equal(out_close_code(f), 1002);
    assert_int_equal(f->close_called, 1);
    close_stream(f);
    assert_int_equal(f->close_code, 1002);
}

static void ws_conn_invalid_utf8_closes_1007(void **state)
{
    fake_t *f = *state;
    unsigned char buf[64];

    feed(f, buf, frame(buf, 1, 0x1, "ok\xC3\x28", 4, 1));
    assert_int_equal(f->text_count, 0);
    assert_int_equal(out_close_code(f), 1007);
    assert_int_equal(f->close_called, 1);
}

static void ws_conn_too_big_closes_1009(void **state)
{
    fake_t *f = *state;
    unsigned char buf[256];
    char payload[120];
    size_t n = 0;

    /* Two fragments of 120 bytes exceed the limit of 200 together. */
    memset(payload, 'x', sizeof(payload));
    n += frame(buf + n, 0, 0x1, payload, sizeof(payload), 1);
    n += frame(buf + n, 1, 0x0, payload, sizeof(payload), 1);
    feed(f, buf, n);
    assert_int_equal(f->text_count, 0);
    assert_int_equal(out_close_code(f), 1009);
}

static void ws_conn_answers_client_close(void **state)
{
    fake_t *f = *state;
    unsigned char buf[64];
    const unsigned char payload[] = {0x03, 0xE8, 'b', 'y', 'e'};

    feed(f, buf, frame(buf, 1, 0x8, payload, sizeof(payload), 1));
    assert_int_equal(out_close_code(f), 1000);
    assert_int_equal(f->close_called, 1);
    close_stream(f);
    assert_int_equal(f->close_code, 1000);
}

static void ws_conn_close_waits_for_peer(void **state)
{
    fake_t *f = *state;
    unsigned char buf[64];
    const unsigned char payload[] = {0x03, 0xF0};

    ws_conn_close(f->ws, 1008, "bad key");
    assert_int_equal(out_close_code(f), 1008);
    assert_memory_equal(f->out + 4, "bad key", 7);
    /* The TCP connection stays open until the peer's close frame. */
    assert_int_equal(f->close_called, 0);
    assert_int_equal(ws_conn_send_text(f->ws, "late", 4), -6);
    feed(f, buf, frame(buf, 1, 0x1, "dropped", 7, 1));
    assert_int_equal(f->text_count, 0);
    feed(f, buf, frame(buf, 1, 0x8, payload, sizeof(payload), 1));
    assert_int_equal(f->close_called, 1);
    close_stream(f);
    assert_int_equal(f->close_code, 1008);
}

static void ws_conn_sends_text_frame(void **state)
{
    fake_t *f = *state;

    assert_int_equal(ws_conn_send_text(f->ws, "hi", 2), 0);
    assert_int_equal(f->out_len, 4);
    assert_int_equal(f->out[0], 0x81);
    assert_int_equal(f->out[1], 2);
    assert_memory_equal(f->out + 2, "hi", 2);
}

static void ws_conn_pause_stops_reading(void **state)
{
    fake_t *f = *state;
    unsigned char buf[64];

    ws_conn_pause(f->ws, 1);
    assert_int_equal(f->reading, 0);
    feed(f, buf, frame(buf, 1, 0x1, "held", 4, 1));
    assert_int_equal(f->text_count, 0);
    ws_conn_pause(f->ws, 0);
    /* The held message is handed over from the loop, not from inside
     * the application's call. */
    assert_int_equal(f->text_count, 0);
    uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(f->text_count, 1);
    assert_memory_equal(f->texts[0], "held", 4);
    assert_int_equal(f->reading, 1);
}

static void ws_conn_stream_end_reports_1006(void **state)
{
    fake_t *f = *state;

    close_stream(f);
    assert_int_equal(f->close_code, 1006);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ws_accept_rfc_example),
        cmocka_unit_test(ws_accept_rejects_invalid_key),
        cmocka_unit_test(ws_key_valid_cases),
        cmocka_unit_test_setup_teardown(ws_conn_delivers_text, setup, teardown),
        cmocka_unit_test_setup_teardown(ws_conn_reassembles_fragments, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_unmasked_frame_closes_1002,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(ws_conn_invalid_utf8_closes_1007, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_too_big_closes_1009, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_answers_client_close, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_close_waits_for_peer, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_sends_text_frame, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_pause_stops_reading, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(ws_conn_stream_end_reports_1006, setup,
                                        teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
