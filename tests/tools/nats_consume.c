/* Prints the messages of a JetStream stream, for the NATS sink tests and
 * bench/sinks.sh, because Debian 12 packages no NATS command line client.
 *
 * Usage: nats_consume URL STREAM [count]
 *
 * Prints the stream's message count with "count", or else every message
 * stored when it starts, read with an ordered consumer, one JSON object a
 * line: {"seq":N,"subject":"...","headers":{"k":"v"},"data":"..."}. A
 * header with several values prints its first one. Exits 1 on an error.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nats/nats.h>

/* Wait for each message of the ordered consumer. */
#define NEXT_MSG_TIMEOUT_MS 10000

static void print_json_string(const char *s, int len)
{
    putchar('"');
    for (int i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];

        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void print_message(natsMsg *msg, uint64_t seq)
{
    const char **keys = NULL;
    int count = 0;

    printf("{\"seq\":%" PRIu64 ",\"subject\":", seq);
    print_json_string(natsMsg_GetSubject(msg),
                      (int)strlen(natsMsg_GetSubject(msg)));
    printf(",\"headers\":{");
    if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
        for (int i = 0; i < count; i++) {
            const char *value = "";

            natsMsgHeader_Get(msg, keys[i], &value);
            printf("%s", i ? "," : "");
            print_json_string(keys[i], (int)strlen(keys[i]));
            putchar(':');
            print_json_string(value, (int)strlen(value));
        }
        free((void *)keys);
    }
    printf("},\"data\":");
    print_json_string(natsMsg_GetData(msg), natsMsg_GetDataLength(msg));
    printf("}\n");
}

static int fail(const char *what, natsStatus st)
{
    fprintf(stderr, "nats_consume: %s failed: %s\n", what,
            natsStatus_GetText(st));
    return 1;
}

/* Reads the stream from its first message up to `last_seq`. */
static int read_stream(jsCtx *js, const char *stream, const char *subject,
                       uint64_t last_seq)
{
    natsSubscription *sub = NULL;
    jsSubOptions so;
    natsStatus st;
    int rc = 0;

    jsSubOptions_Init(&so);
    so.Stream = stream;
    so.Ordered = true;
    st = js_SubscribeSync(&sub, js, subject, NULL, &so, NULL);
    if (st != NATS_OK)
        return fail("creating an ordered consumer", st);
    for (;;) {
        natsMsg *msg = NULL;
        jsMsgMetaData *meta = NULL;
        uint64_t seq;

        st = natsSubscription_NextMsg(&msg, sub, NEXT_MSG_TIMEOUT_MS);
        if (st != NATS_OK) {
            rc = fail("reading the next message", st);
            break;
        }
        st = natsMsg_GetMetaData(&meta, msg);
        if (st != NATS_OK) {
            natsMsg_Destroy(msg);
            rc = fail("reading message metadata", st);
            break;
        }
        seq = meta->Sequence.Stream;
        jsMsgMetaData_Destroy(meta);
        print_message(msg, seq);
        natsMsg_Destroy(msg);
        if (seq >= last_seq)
            break;
    }
    natsSubscription_Destroy(sub);
    return rc;
}

int main(int argc, char **argv)
{
    natsConnection *conn = NULL;
    jsCtx *js = NULL;
    jsStreamInfo *si = NULL;
    natsStatus st;
    int rc = 1;

    if (argc < 3 || (argc == 4 && strcmp(argv[3], "count") != 0) ||
        argc > 4) {
        fprintf(stderr, "usage: nats_consume URL STREAM [count]\n");
        return 2;
    }
    st = natsConnection_ConnectTo(&conn, argv[1]);
    if (st != NATS_OK)
        return fail("connecting", st);
    st = natsConnection_JetStream(&js, conn, NULL);
    if (st != NATS_OK) {
        rc = fail("creating the jetstream context", st);
        goto done;
    }
    st = js_GetStreamInfo(&si, js, argv[2], NULL, NULL);
    if (st != NATS_OK) {
        rc = fail("reading the stream info", st);
        goto done;
    }
    if (argc == 4) {
        printf("%" PRIu64 "\n", si->State.Msgs);
        rc = 0;
    } else if (si->State.Msgs == 0) {
        rc = 0;
    } else {
        rc = read_stream(js, argv[2], si->Config->Subjects[0],
                         si->State.LastSeq);
    }

done:
    jsStreamInfo_Destroy(si);
    jsCtx_Destroy(js);
    natsConnection_Destroy(conn);
    fflush(stdout);
    return rc;
}
