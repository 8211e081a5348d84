#!/usr/bin/env bash
# Benchmarks the Kafka sink: how many records per second ingestd forwards
# from its spool to Kafka, against kcat producing the same envelopes with
# the same producer settings. Both write into librdkafka's mock cluster
# (tests/tools/kafka_mock.c), which runs 3 brokers on 127.0.0.1 and keeps
# the messages in memory.
#
# 1. ingestd starts with a file sink and a kafka sink whose address is a
#    closed port on 127.0.0.1, and BENCH_RECORDS readings are posted over
#    HTTP. The file sink writes the envelopes out; the kafka sink cannot
#    deliver, so every record stays in the spool for it.
# 2. ingestd is stopped, the kafka sink is pointed at the mock cluster, and
#    ingestd is started again. The time from that start until the sink's
#    lag on /metrics is 0 gives ingestd's records per second. The rate
#    after the first committed batch is printed too, without the start.
# 3. kcat -P produces the envelopes from the file sink's output, keyed by
#    device id, with enable.idempotence=true, acks=all and the same
#    linger.ms, to another topic. Its run time gives kcat's records per
#    second.
#
# Usage: bench/kafka.sh
# Environment (all optional):
#   BENCH_RECORDS   readings to forward (default 100000, at most 2000000)
#   BENCH_DEVICES   devices the readings are spread over (default 16)
#   BENCH_LINGER    linger.ms for both producers (default 5)
#   BENCH_BATCH     the kafka sink's batch_records (default 512)
#   BENCH_TMPDIR    parent of the temporary folder (default /var/tmp)
#   BUILD           build folder with ingestd and kafka_mock (default: build
#                   them in build-bench)
#   BENCH_KEEP      1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RECORDS=${BENCH_RECORDS:-100000}
DEVICES=${BENCH_DEVICES:-16}
LINGER=${BENCH_LINGER:-5}
BATCH=${BENCH_BATCH:-512}
PY=/usr/bin/python3
# Bounds on every wait, so that a hung process cannot hang the benchmark.
START_TIMEOUT=20
STOP_TIMEOUT=30
FORWARD_TIMEOUT=600

for v in RECORDS DEVICES LINGER BATCH; do
    case "${!v}" in
    '' | *[!0-9]*)
        echo "kafka.sh: BENCH_$v must be a whole number, got \"${!v}\"" >&2
        exit 2
        ;;
    esac
done
if [ "$RECORDS" -lt 1 ] || [ "$RECORDS" -gt 2000000 ]; then
    echo "kafka.sh: BENCH_RECORDS must be 1 to 2000000" >&2
    exit 2
fi
if [ "$DEVICES" -lt 1 ] || [ "$DEVICES" -gt 1000 ]; then
    echo "kafka.sh: BENCH_DEVICES must be 1 to 1000" >&2
    exit 2
fi

"$ROOT/scripts/install-deps.sh" test

if [ -z "${BUILD:-}" ]; then
    BUILD=$ROOT/build-bench
    echo "== building ingestd and kafka_mock in $BUILD" >&2
    cmake -S "$ROOT" -B "$BUILD" -DWITH_TESTS=OFF >/dev/null
    cmake --build "$BUILD" --target ingestd kafka_mock -j "$(nproc)" \
        >/dev/null
fi
INGESTD=$BUILD/ingestd
KAFKA_MOCK=$BUILD/kafka_mock
for b in "$INGESTD" "$KAFKA_MOCK"; do
    if [ ! -x "$b" ]; then
        echo "kafka.sh: $b not found or not executable" >&2
        exit 1
    fi
done

TMP=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ingestd-kafka-bench.XXXXXX")
PIDS=()

# Stops one process that this script started: SIGTERM, a bounded wait, then
# SIGKILL.
stop_pid() {
    local pid=$1 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            echo "kafka.sh: pid $pid did not stop in ${STOP_TIMEOUT}s;" \
                "sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$pid" 2>/dev/null || true
}

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

cleanup() {
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do
        stop_pid "$p"
    done
    PIDS=()
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "== kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'echo "kafka.sh: interrupted" >&2; exit 130' INT TERM

free_port() {
    "$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

now_ns() {
    date +%s%N
}

# Prints the value of one Prometheus series, written exactly as /metrics
# writes it, or "-" when it is absent or the request failed.
metric_series() {
    local port=$1 series=$2
    { curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" || true; } |
        awk -v n="$series" '$1 == n { v = $2 } END {
            if (v == "") print "-"; else printf "%.0f\n", v }'
}

# Waits until /readyz on 127.0.0.1:$1 returns 200, while process $2 lives.
wait_ready() {
    local port=$1 pid=$2 i
    for i in $(seq 1 $((START_TIMEOUT * 20))); do
        kill -0 "$pid" 2>/dev/null || return 1
        if curl -fsS --max-time 1 -o /dev/null \
            "http://127.0.0.1:$port/readyz" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# Counts the messages in topic $1 of the mock cluster as the sum of its
# partitions' end offsets. Reading the topic with kcat -C -e can stop early
# on the mock cluster.
topic_count() {
    local p last total=0
    for p in 0 1 2; do
        last=$(timeout 60 kcat -C -b "$BOOTSTRAP" -t "$1" -p "$p" -o -1 \
            -c 1 -e -q -f '%o')
        if [ -n "$last" ]; then
            total=$((total + last + 1))
        fi
    done
    echo "$total"
}

write_config() {
    local address=$1 timeout=$2
    cat >"$TMP/ingestd.yaml" <<EOF
log:
  level: warn
data_dir: $TMP/data
http:
  listen: 127.0.0.1:$PORT
  max_readings_per_request: 500
  max_body_bytes: 1MiB
admin:
  listen: 127.0.0.1:$ADMIN
spool:
  max_size: 4GiB
default_device_type: default
device_types:
  default:
    schema_inline: {"type": "object", "required": ["sensor_value"]}
sinks:
  - name: file
    type: file
    path: $TMP/data/out
  - name: kafka
    type: kafka
    address: $address
    topic: bench.ingestd
    linger: ${LINGER}ms
    timeout: $timeout
    retry_min: 10ms
    retry_max: 100ms
    batch_records: $BATCH
EOF
}

start_ingestd() {
    "$INGESTD" serve -c "$TMP/ingestd.yaml" 2>>"$TMP/ingestd.log" &
    INGESTD_PID=$!
    PIDS+=("$INGESTD_PID")
    if ! wait_ready "$ADMIN" "$INGESTD_PID"; then
        echo "kafka.sh: ingestd did not start; its log:" >&2
        tail -n 40 "$TMP/ingestd.log" >&2
        exit 1
    fi
}

# ---- mock cluster ---------------------------------------------------------

"$KAFKA_MOCK" bench.ingestd:3 bench.kcat:3 >"$TMP/bootstrap" \
    2>"$TMP/kafka_mock.log" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
for _ in $(seq 1 $((START_TIMEOUT * 10))); do
    [ -s "$TMP/bootstrap" ] && break
    sleep 0.1
done
BOOTSTRAP=$(head -n 1 "$TMP/bootstrap")
if [ -z "$BOOTSTRAP" ]; then
    echo "kafka.sh: kafka_mock printed no bootstrap servers" >&2
    exit 1
fi
echo "== mock cluster at $BOOTSTRAP" >&2

# ---- fill the spool -------------------------------------------------------

PORT=$(free_port)
ADMIN=$(free_port)
CLOSED=$(free_port)
# A short timeout, so that the stop does not wait long for the batch that
# cannot be delivered.
write_config "127.0.0.1:$CLOSED" 1s
declare -a KEYS
for d in $(seq 1 "$DEVICES"); do
    if ! KEYS[d]=$("$INGESTD" device add "bench-$d" -c "$TMP/ingestd.yaml" |
        grep '^ik_'); then
        echo "kafka.sh: \`ingestd device add\` printed no API key" >&2
        exit 1
    fi
done
printf '%s\n' "${KEYS[@]}" >"$TMP/keys"
start_ingestd
echo "== posting $RECORDS readings" >&2
timeout 600 "$PY" - "$PORT" "$RECORDS" "$TMP/keys" <<'EOF'
import http.client
import json
import sys

port, records = int(sys.argv[1]), int(sys.argv[2])
keys = open(sys.argv[3]).read().split()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
sent = 0
while sent < records:
    d = (sent // 500) % len(keys)
    n = min(500, records - sent)
    body = json.dumps([{"device_id": f"bench-{d + 1}",
                        "sensor_value": (sent + i) % 101, "seq": sent + i}
                       for i in range(n)])
    conn.request("POST", "/v1/data", body, {
        "Authorization": f"Bearer {keys[d]}",
        "Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read()
    if r.status != 202:
        sys.exit(f"POST returned {r.status}: {text[:200]!r}")
    sent += n
EOF
# Wait for the file sink, whose output is kcat's input.
for _ in $(seq 1 $((FORWARD_TIMEOUT * 10))); do
    lines=$(cat "$TMP/data/out"/*.ndjson 2>/dev/null | wc -l)
    [ "$lines" -ge "$RECORDS" ] && break
    sleep 0.1
done
if [ "$lines" -lt "$RECORDS" ]; then
    echo "kafka.sh: the file sink wrote $lines of $RECORDS records" >&2
    exit 1
fi
stop_pid "$INGESTD_PID"
forget_pid "$INGESTD_PID"

# ---- ingestd forwarding ---------------------------------------------------

write_config "$BOOTSTRAP" 30s
LAG_SERIES='ingestd_sink_lag_bytes{sink="kafka"}'
echo "== ingestd forwarding $RECORDS records from its spool" >&2
T0=$(now_ns)
start_ingestd
lag=-
TF=""
FIRST=0
for _ in $(seq 1 $((FORWARD_TIMEOUT * 50))); do
    lag=$(metric_series "$ADMIN" "$LAG_SERIES")
    [ "$lag" = 0 ] && break
    # The first committed batch ends the start: process start, connection,
    # metadata and the idempotent producer's id.
    if [ -z "$TF" ]; then
        FIRST=$(metric_series "$ADMIN" 'ingestd_sink_records_total{sink="kafka"}')
        if [ "$FIRST" != - ] && [ "$FIRST" -gt 0 ]; then
            TF=$(now_ns)
        fi
    fi
    sleep 0.02
done
T1=$(now_ns)
if [ -z "$TF" ]; then
    TF=$T0
    FIRST=0
fi
if [ "$lag" != 0 ]; then
    echo "kafka.sh: the kafka sink's lag is $lag after ${FORWARD_TIMEOUT}s" >&2
    exit 1
fi
RETRIES=$(metric_series "$ADMIN" 'ingestd_sink_retries_total{sink="kafka"}')
stop_pid "$INGESTD_PID"
forget_pid "$INGESTD_PID"
INGESTD_COUNT=$(topic_count bench.ingestd)

# ---- kcat producing -------------------------------------------------------

# Lines of "<device id><TAB><envelope>", so that kcat -K keys them as the
# sink does.
cat "$TMP/data/out"/*.ndjson |
    "$PY" -c 'import json, sys
for line in sys.stdin:
    sys.stdout.write(json.loads(line)["device_id"] + "\t" + line)' \
        >"$TMP/kcat.in"
echo "== kcat producing $RECORDS records" >&2
K0=$(now_ns)
timeout "$FORWARD_TIMEOUT" kcat -P -b "$BOOTSTRAP" -t bench.kcat -K '\t' \
    -X enable.idempotence=true -X acks=all -X linger.ms="$LINGER" \
    -X partitioner=murmur2_random <"$TMP/kcat.in"
K1=$(now_ns)
KCAT_COUNT=$(topic_count bench.kcat)

# ---- report ---------------------------------------------------------------

rate() {
    awk -v n="$1" -v ns="$2" 'BEGIN { printf "%.0f", n / (ns / 1e9) }'
}
INGESTD_RATE=$(rate "$RECORDS" $((T1 - T0)))
STEADY_RATE=$(rate $((RECORDS - FIRST)) $((T1 - TF)))
KCAT_RATE=$(rate "$RECORDS" $((K1 - K0)))
echo
echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo |
    sed 's/.*: //')), shared by ingestd, kcat and the mock cluster"
echo "Records: $RECORDS over $DEVICES devices, $(head -n 1 \
    "$TMP/kcat.in" | cut -f 2 | wc -c) bytes for the first envelope"
echo "librdkafka $(kcat -V 2>&1 | sed -n 's/.*librdkafka \([0-9.]*\).*/\1/p')," \
    "linger.ms $LINGER, enable.idempotence, acks=all," \
    "ingestd batch_records $BATCH"
printf '%-8s %10s %12s %10s\n' producer seconds records/s in_topic
printf '%-8s %10.2f %12s %10s\n' ingestd \
    "$(awk -v ns=$((T1 - T0)) 'BEGIN { print ns / 1e9 }')" \
    "$INGESTD_RATE" "$INGESTD_COUNT"
printf '%-8s %10.2f %12s %10s\n' kcat \
    "$(awk -v ns=$((K1 - K0)) 'BEGIN { print ns / 1e9 }')" \
    "$KCAT_RATE" "$KCAT_COUNT"
echo "ratio ingestd/kcat: $(awk -v a="$INGESTD_RATE" -v b="$KCAT_RATE" \
    'BEGIN { printf "%.2f", a / b }')"
echo "ingestd after its first batch: $STEADY_RATE records/s" \
    "($((RECORDS - FIRST)) records in" \
    "$(awk -v ns=$((T1 - TF)) 'BEGIN { printf "%.2f", ns / 1e9 }') s;" \
    "the start took $(awk -v ns=$((TF - T0)) 'BEGIN { printf "%.2f", ns / 1e9 }') s)"
echo "ingestd sink retries: $RETRIES (each retry may resend a batch)"
if [ "$INGESTD_COUNT" -lt "$RECORDS" ] || [ "$KCAT_COUNT" -lt "$RECORDS" ]; then
    echo "kafka.sh: failed: a topic contains fewer than $RECORDS messages" >&2
    exit 1
fi
