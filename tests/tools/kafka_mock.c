/* kafka_mock: runs librdkafka's built-in mock Kafka cluster as a process, so
 * that integration tests and benchmarks can reach a Kafka cluster on
 * loopback without a JVM.
 *
 * Usage: kafka_mock [-b BROKERS] [TOPIC[:PARTITIONS]]...
 *
 * Prints the bootstrap servers ("127.0.0.1:port,...") as the first line on
 * stdout once the cluster accepts connections, then runs until SIGTERM or
 * SIGINT. SIGUSR1 takes every broker down (open connections are closed and
 * new ones refused); SIGUSR2 brings them up again. Topics named on the
 * command line are created with the given partition count (default 3);
 * without any, telemetry.default is created with 3 partitions. Other topics
 * are created on first use, as a broker with auto.create.topics.enable does.
 *
 * The mock cluster is an experimental librdkafka API (rdkafka_mock.h, used
 * here as shipped in Debian 12's librdkafka 2.0.2): it keeps every message
 * in memory and listens on 127.0.0.1 only.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define DEFAULT_BROKERS 3
#define DEFAULT_PARTITIONS 3
#define MAX_BROKERS 16

static void usage(void)
{
    fprintf(stderr,
            "usage: kafka_mock [-b BROKERS] [TOPIC[:PARTITIONS]]...\n"
            "  -b BROKERS  number of mock brokers, 1 to %d (default %d)\n"
            "  TOPIC       topic to create, with PARTITIONS partitions "
            "(default %d)\n",
            MAX_BROKERS, DEFAULT_BROKERS, DEFAULT_PARTITIONS);
}

/* Parses a positive integer no larger than `max`, or returns -1. */
static int parse_count(const char *text, int max)
{
    char *end;
    long value;

    errno = 0;
    value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 1 || value > max)
        return -1;
    return (int)value;
}

/* Creates the topic described by `spec` ("name" or "name:partitions").
 * Returns 0, or -1 after printing why to stderr. */
static int create_topic(rd_kafka_mock_cluster_t *cluster, const char *spec,
                        int brokers)
{
    char name[256];
    const char *colon = strrchr(spec, ':');
    int partitions = DEFAULT_PARTITIONS;
    size_t len = colon != NULL ? (size_t)(colon - spec) : strlen(spec);
    rd_kafka_resp_err_t err;

    if (len == 0 || len >= sizeof(name)) {
        fprintf(stderr, "kafka_mock: invalid topic name in \"%s\"\n", spec);
        return -1;
    }
    memcpy(name, spec, len);
    name[len] = '\0';
    if (colon != NULL) {
        partitions = parse_count(colon + 1, 10000);
        if (partitions < 0) {
            fprintf(stderr, "kafka_mock: invalid partition count in \"%s\"\n",
                    spec);
            return -1;
        }
    }
    /* Every broker stores a replica, as a replication factor of 3 does on
     * a real 3-broker cluster. */
    err = rd_kafka_mock_topic_create(cluster, name, partitions, brokers);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        fprintf(stderr, "kafka_mock: creating topic %s failed: %s\n", name,
                rd_kafka_err2str(err));
        return -1;
    }
    return 0;
}

/* Sets every broker down (`up` 0) or up (`up` 1) and logs it to stderr. */
static void set_brokers(rd_kafka_mock_cluster_t *cluster, int up)
{
    rd_kafka_resp_err_t err;

    if (up)
        err = rd_kafka_mock_broker_set_up(cluster, -1);
    else
        err = rd_kafka_mock_broker_set_down(cluster, -1);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        fprintf(stderr, "kafka_mock: setting brokers %s failed: %s\n",
                up ? "up" : "down", rd_kafka_err2str(err));
    else
        fprintf(stderr, "kafka_mock: all brokers %s\n", up ? "up" : "down");
}

/* Creates the producer handle that the mock cluster needs for its own
 * bookkeeping. It connects to nothing: bootstrap.servers stays empty. */
static rd_kafka_t *new_handle(void)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk;

    if (rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof(errstr)) !=
        RD_KAFKA_CONF_OK) {
        fprintf(stderr, "kafka_mock: %s\n", errstr);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (rk == NULL) {
        fprintf(stderr, "kafka_mock: creating the handle failed: %s\n",
                errstr);
        rd_kafka_conf_destroy(conf);
    }
    return rk;
}

int main(int argc, char **argv)
{
    rd_kafka_mock_cluster_t *cluster = NULL;
    rd_kafka_t *rk = NULL;
    int brokers = DEFAULT_BROKERS;
    int status = 1;
    sigset_t set;
    int opt, sig;

    while ((opt = getopt(argc, argv, "b:h")) != -1) {
        switch (opt) {
        case 'b':
            brokers = parse_count(optarg, MAX_BROKERS);
            if (brokers < 0) {
                usage();
                return 2;
            }
            break;
        case 'h':
            usage();
            return 0;
        default:
            usage();
            return 2;
        }
    }

    /* The signals are taken with sigwait, so they are blocked before the
     * librdkafka threads start and inherit the mask. */
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    rk = new_handle();
    if (rk == NULL)
        goto done;
    cluster = rd_kafka_mock_cluster_new(rk, brokers);
    if (cluster == NULL) {
        fprintf(stderr, "kafka_mock: creating the mock cluster failed\n");
        goto done;
    }
    if (optind == argc) {
        if (create_topic(cluster, "telemetry.default", brokers) < 0)
            goto done;
    }
    for (int i = optind; i < argc; i++) {
        if (create_topic(cluster, argv[i], brokers) < 0)
            goto done;
    }

    printf("%s\n", rd_kafka_mock_cluster_bootstraps(cluster));
    fflush(stdout);

    for (;;) {
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGUSR1)
            set_brokers(cluster, 0);
        else if (sig == SIGUSR2)
            set_brokers(cluster, 1);
        else
            break;
    }
    status = 0;

done:
    if (cluster != NULL)
        rd_kafka_mock_cluster_destroy(cluster);
    if (rk != NULL)
        rd_kafka_destroy(rk);
    return status;
}
