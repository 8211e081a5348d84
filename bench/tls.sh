#!/usr/bin/env bash
# Measures what TLS costs ingestd: full TLS handshakes per second, resumed
# handshakes per second, handshakes with a verified client certificate,
# and POST /v1/data throughput over HTTPS against plain HTTP in the same
# run.
#
# Handshakes: `openssl s_time` opens a new TCP connection for each
# handshake against https.listen for BENCH_DURATION seconds, once with
# -new (full handshakes), once with -reuse (session resumption with
# tickets), and once with -new and a client certificate against a server
# with tls.client_auth optional, which also verifies the chain and the CRL
# and looks the device up in the registry. s_time is one process, so the
# client's CPU counts against the rate on a small machine.
#
# Ingest: wrk with bench/post.lua, BENCH_CONNECTIONS keep-alive
# connections, against http.listen and then https.listen of the same
# server. wrk performs one handshake per connection, so this measures the
# cost of encryption on a busy connection, not of handshakes.
#
# MQTT: tests/tools/mqtt_load publishes at QoS 1 with BENCH_MQTT_CLIENTS
# clients to mqtt.listen and then, with --cafile, to mqtts.listen of a
# third server, which also runs a file sink. Each client opens one
# connection, so this too measures encryption on busy connections more
# than handshakes. After each pass the script waits until the sink has
# written everything, so that the second pass does not share the CPU with
# the first one's forwarding. At the end it counts each pass's readings in
# the sink's output, which must equal the PUBACKs that mqtt_load counted.
#
# Usage: bench/tls.sh
# Environment (all optional):
#   BENCH_DURATION     seconds per measurement (default 10)
#   BENCH_CONNECTIONS  wrk connections (default 64)
#   BENCH_THREADS      wrk threads (default 2)
#   BENCH_DURABILITY   spool durability, fsync or none (default none, so
#                      that the fsync wait does not hide the CPU cost)
#   BENCH_WORKERS      ingestd http.workers (default 0: one per core)
#   BENCH_MQTT_CLIENTS MQTT clients per pass (default 16)
#   BENCH_MQTT_MESSAGES
#                      messages per MQTT pass, split over its clients
#                      (default 200000)
#   BENCH_WINDOW       QoS 1 messages in flight per MQTT client
#                      (default 16)
#   BENCH_MAX_SECONDS  time limit of one MQTT pass (default 120)
#   BENCH_TMPDIR       parent of the temporary folder (default /var/tmp)
#   INGESTD            ingestd binary (default: build it and mqtt_load
#                      in build-bench)
#   MQTT_LOAD          mqtt_load binary (default: mqtt_load next to
#                      INGESTD)
#   BENCH_KEEP         1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
MODE=${BENCH_DURABILITY:-none}
WORKERS=${BENCH_WORKERS:-0}
MQTT_CLIENTS=${BENCH_MQTT_CLIENTS:-16}
MQTT_MESSAGES=${BENCH_MQTT_MESSAGES:-200000}
WINDOW=${BENCH_WINDOW:-16}
MAX_SECONDS=${BENCH_MAX_SECONDS:-120}
PY=/usr/bin/python3
START_TIMEOUT=20
STOP_TIMEOUT=30
DRAIN_TIMEOUT=120

fail() {
    echo "tls.sh: $*" >&2
    exit 2
}

case "$DURATION" in
'' | *[!0-9]*) fail "BENCH_DURATION must be whole seconds, got \"$DURATION\"" ;;
esac
[ "$DURATION" -ge 1 ] && [ "$DURATION" -le 600 ] ||
    fail "BENCH_DURATION must be 1 to 600 seconds"
case "$CONNECTIONS" in
'' | *[!0-9]*) fail "BENCH_CONNECTIONS must be a number, got \"$CONNECTIONS\"" ;;
esac
[ "$CONNECTIONS" -ge 1 ] && [ "$CONNECTIONS" -le 4096 ] ||
    fail "BENCH_CONNECTIONS must be 1 to 4096"
[ "$MODE" = fsync ] || [ "$MODE" = none ] ||
    fail "BENCH_DURABILITY takes fsync or none, got \"$MODE\""

# Checks that $1 (the value of variable $2) is a whole number from $3 to
# $4.
check_number() {
    case "$1" in
    '' | *[!0-9]*) fail "$2 must be a whole number, got \"$1\"" ;;
    esac
    [ "$1" -ge "$3" ] && [ "$1" -le "$4" ] || fail "$2 must be $3 to $4"
}

check_number "$MQTT_CLIENTS" BENCH_MQTT_CLIENTS 1 1000
check_number "$MQTT_MESSAGES" BENCH_MQTT_MESSAGES 1 10000000
check_number "$WINDOW" BENCH_WINDOW 1 64
check_number "$MAX_SECONDS" BENCH_MAX_SECONDS 1 3600
MQTT_PER_CLIENT=$((MQTT_MESSAGES / MQTT_CLIENTS))
[ "$MQTT_PER_CLIENT" -ge 1 ] || MQTT_PER_CLIENT=1

"$ROOT/scripts/install-deps.sh" test

if [ -z "${INGESTD:-}" ]; then
    INGESTD=$ROOT/build-bench/ingestd
    echo "== building ingestd and mqtt_load in $ROOT/build-bench" >&2
    cmake -S "$ROOT" -B "$ROOT/build-bench" -DWITH_TESTS=OFF >/dev/null
    cmake --build "$ROOT/build-bench" --target ingestd mqtt_load \
        -j "$(nproc)" >/dev/null
fi
MQTT_LOAD=${MQTT_LOAD:-$(dirname "$INGESTD")/mqtt_load}
[ -x "$INGESTD" ] || fail "ingestd binary $INGESTD not found"
[ -x "$MQTT_LOAD" ] ||
    fail "mqtt_load binary $MQTT_LOAD not found; set MQTT_LOAD"

TMP=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ingestd-tls-bench.XXXXXX")
SERVER_PID=""

stop_server() {
    local waited=0
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    while kill -0 "$SERVER_PID" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            kill -KILL "$SERVER_PID" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

cleanup() {
    stop_server
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "== kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT INT TERM

free_port() {
    "$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

wait_port() {
    local port=$1 i
    for i in $(seq 1 $((START_TIMEOUT * 10))); do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        if "$PY" -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
            "$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

echo "== making test certificates in $TMP/pki" >&2
"$PY" - "$ROOT/tests/integration" "$TMP/pki" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import tls_certs
tls_certs.make_pki(sys.argv[2])
EOF
PKI=$TMP/pki/ca

HTTP_PORT=$(free_port)
HTTPS_PORT=$(free_port)
ADMIN_PORT=$(free_port)
MQTT_PORT=$(free_port)
MQTTS_PORT=$(free_port)

# Starts ingestd with tls.client_auth $1 in $TMP/ingestd-$2 and prints
# nothing. The API key of device bench-1 goes to $TMP/key. With $3 = sink it
# adds a file sink that writes to $TMP/ingestd-$2/data/out, and registers
# the MQTT devices bench-0001... with their keys in $TMP/mqtt-creds.
start_server() {
    local client_auth=$1 dir=$TMP/ingestd-$2 sink=${3:-} i id key
    mkdir -p "$dir"
    cat >"$dir/ingestd.yaml" <<EOF
log:
  level: warn
data_dir: $dir/data
http:
  listen: 127.0.0.1:$HTTP_PORT
  workers: $WORKERS
  max_connections: 8192
admin:
  listen: 127.0.0.1:$ADMIN_PORT
mqtt:
  listen: 127.0.0.1:$MQTT_PORT
mqtts:
  listen: 127.0.0.1:$MQTTS_PORT
https:
  listen: 127.0.0.1:$HTTPS_PORT
tls:
  cert_file: $PKI/server.crt
  key_file: $PKI/server.key
  ca_file: $PKI/ca.crt
  crl_file: $PKI/crl.pem
  client_auth: $client_auth
spool:
  durability: $MODE
device_types:
  default:
    schema: $ROOT/schemas/reading.json
EOF
    if [ "$sink" = sink ]; then
        cat >>"$dir/ingestd.yaml" <<EOF
sinks:
  - name: file
    type: file
    path: $dir/data/out
EOF
        : >"$TMP/mqtt-creds"
        for i in $(seq 1 "$MQTT_CLIENTS"); do
            id=$(printf 'bench-%04d' "$i")
            key=$("$INGESTD" device add "$id" -c "$dir/ingestd.yaml" |
                grep -o 'ik_[A-Za-z0-9_-]*') ||
                fail "\`ingestd device add $id\` printed no API key"
            echo "$id $key" >>"$TMP/mqtt-creds"
        done
    fi
    "$INGESTD" device add bench-1 -c "$dir/ingestd.yaml" |
        grep -o 'ik_[A-Za-z0-9_-]*' >"$TMP/key"
    "$INGESTD" device add dev-1 -c "$dir/ingestd.yaml" >/dev/null
    "$INGESTD" serve -c "$dir/ingestd.yaml" 2>"$dir/ingestd.log" &
    SERVER_PID=$!
    if ! wait_port "$HTTPS_PORT"; then
        cat "$dir/ingestd.log" >&2
        fail "ingestd did not start"
    fi
}

# Runs openssl s_time with arguments $@ and prints handshakes per second
# of wall-clock time, since s_time rounds its own real time to seconds.
handshakes() {
    local port=$1 out start end
    shift
    start=$(date +%s.%N)
    out=$(timeout $((DURATION + 30)) openssl s_time \
        -connect "127.0.0.1:$port" -CAfile "$PKI/ca.crt" \
        -time "$DURATION" "$@" 2>&1) || true
    end=$(date +%s.%N)
    echo "$out" | awk -v t="$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" '
        /connections in .* real seconds/ {
            printf "%.0f", $1 / t; found = 1; exit }
        END { if (!found) printf "failed" }'
}

# Runs wrk against $1 (a URL) and prints requests per second and p99.
ingest_rate() {
    local url=$1 out
    out=$(BENCH_KEY=$(cat "$TMP/key") BENCH_DEVICE=bench-1 \
        timeout $((DURATION + 30)) wrk -t "$THREADS" -c "$CONNECTIONS" \
        -d "${DURATION}s" --timeout 10s -s "$ROOT/bench/post.lua" \
        "$url/v1/data" 2>&1) || fail "wrk failed: $out"
    echo "$out" | awk '/^BENCH / {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "rps=%.0f p99_us=%s non2xx=%s", v["rps"], v["p99_us"],
            v["non2xx"]; found = 1 }
        END { if (!found) printf "failed" }'
}

# Prints the value of key $2 from a "key=value ..." line $1, or 0.
field() {
    local kv
    for kv in $1; do
        if [ "${kv%%=*}" = "$2" ]; then
            echo "${kv#*=}"
            return
        fi
    done
    echo 0
}

# Prints the CPU time of process $1 in clock ticks (user + system).
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# Prints the busy CPU time of the whole machine in clock ticks: user,
# nice, system, irq, softirq and steal from /proc/stat.
busy_ticks() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

# Prints CPU use in percent of one core from a tick count $1 over $2 ms.
cpu_pct() {
    awk -v t="$1" -v ms="$2" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (ms > 0) printf "%.0f", 100 * t / hz / (ms / 1000) }'
}

# Prints the records in the file sink's output folder $1.
output_lines() {
    if compgen -G "$1/*.ndjson" >/dev/null; then
        cat "$1"/*.ndjson | wc -l
    else
        echo 0
    fi
}

# Waits until the file sink's output folder $1 contains at least $2 records
# and has stopped growing for 2 s, or DRAIN_TIMEOUT passes.
wait_drained() {
    local out=$1 expected=$2 lines prev=-1 stable=0 waited=0
    while [ "$waited" -lt $((DRAIN_TIMEOUT * 2)) ]; do
        lines=$(output_lines "$out")
        if [ "$lines" -eq "$prev" ] && [ "$lines" -ge "$expected" ]; then
            stable=$((stable + 1))
            [ "$stable" -ge 4 ] && return 0
        else
            stable=0
        fi
        prev=$lines
        sleep 0.5
        waited=$((waited + 1))
    done
    echo "tls.sh: the file sink wrote $lines of $expected records in" \
        "${DRAIN_TIMEOUT}s" >&2
}

# Runs mqtt_load at QoS 1 against port $1 with run name $2 and the extra
# arguments $3... and sets MQTT_LINE to its result line. It also sets, in
# percent of one core, MQTT_CPU to ingestd's CPU use during the pass and
# MQTT_OTHER to that of all other processes except mqtt_load. MQTT_OTHER
# was 10 to 14% in runs with no other known work, so only a clearly higher
# value means that other work shared the cores.
mqtt_pass() {
    local port=$1 run=$2 before busy start elapsed
    shift 2
    before=$(cpu_ticks "$SERVER_PID")
    busy=$(busy_ticks)
    start=$(date +%s%3N)
    if ! timeout $((MAX_SECONDS + 30)) "$MQTT_LOAD" -p "$port" \
        -f "$TMP/mqtt-creds" -q 1 -c "$MQTT_CLIENTS" \
        -m "$MQTT_PER_CLIENT" -w "$WINDOW" -d "$MAX_SECONDS" -r "$run" \
        "$@" >"$TMP/$run.out" 2>"$TMP/$run.err"; then
        cat "$TMP/$run.out" "$TMP/$run.err" >&2
        fail "mqtt_load failed in pass $run"
    fi
    MQTT_LINE=$(grep '^MQTT_LOAD ' "$TMP/$run.out") || {
        cat "$TMP/$run.err" >&2
        fail "mqtt_load printed no result line in pass $run"
    }
    elapsed=$(($(date +%s%3N) - start))
    MQTT_CPU=$(cpu_pct $(($(cpu_ticks "$SERVER_PID") - before)) "$elapsed")
    busy=$(cpu_pct $(($(busy_ticks) - busy)) "$elapsed")
    MQTT_OTHER=$((busy - MQTT_CPU - $(field "$MQTT_LINE" cpu_pct)))
    [ "$MQTT_OTHER" -ge 0 ] || MQTT_OTHER=0
    if [ -s "$TMP/$run.err" ]; then
        echo "   stderr of mqtt_load (first lines):" >&2
        head -n 5 "$TMP/$run.err" | sed 's/^/     /' >&2
    fi
}

# Prints the readings of run $2 in the file sink's output folder $1.
stored_of_run() {
    if compgen -G "$1/*.ndjson" >/dev/null; then
        cat "$1"/*.ndjson | grep -c "\"run\":\"$2\"" || true
    else
        echo 0
    fi
}

# Prints a pass's result line $1, ingestd's CPU use $2 and that of other
# processes $3 as a table cell.
mqtt_cell() {
    awk -v r="$(field "$1" rate)" -v p50="$(field "$1" p50_us)" \
        -v p99="$(field "$1" p99_us)" -v cpu="$2" \
        -v load="$(field "$1" cpu_pct)" -v other="$3" 'BEGIN {
            printf "%.0f messages/s, p50 %.1f ms, p99 %.1f ms, ", r,
                p50 / 1000, p99 / 1000
            printf "CPU ingestd %d%%, mqtt_load %d%%, other %d%%", cpu, load,
                other }'
}

# openssl s_server, one blocking process, as the reference for what
# s_time can drive on this machine.
REF_PORT=$(free_port)
timeout $((DURATION * 2 + 30)) openssl s_server -quiet -accept \
    "127.0.0.1:$REF_PORT" -cert "$PKI/server.crt" -key "$PKI/server.key" \
    </dev/null >/dev/null 2>&1 &
REF_PID=$!
sleep 0.5
echo "== handshakes against openssl s_server" >&2
REF_FULL=$(handshakes "$REF_PORT" -new)
REF_RESUMED=$(handshakes "$REF_PORT" -reuse -tls1_2)
kill -TERM "$REF_PID" 2>/dev/null || true
wait "$REF_PID" 2>/dev/null || true
echo "   full: $REF_FULL/s, resumed (TLS 1.2): $REF_RESUMED/s" >&2

start_server none http
echo "== handshakes, tls.client_auth none" >&2
FULL=$(handshakes "$HTTPS_PORT" -new)
# s_time never reads the TLS 1.3 tickets that arrive after the handshake,
# so resumption is measured with TLS 1.2 tickets.
RESUMED=$(handshakes "$HTTPS_PORT" -reuse -tls1_2)
echo "   full: $FULL/s, resumed (TLS 1.2): $RESUMED/s" >&2
echo "== POST /v1/data, $CONNECTIONS connections, durability $MODE" >&2
PLAIN=$(ingest_rate "http://127.0.0.1:$HTTP_PORT")
TLS=$(ingest_rate "https://127.0.0.1:$HTTPS_PORT")
echo "   http:  $PLAIN" >&2
echo "   https: $TLS" >&2
stop_server

start_server optional mtls
echo "== handshakes with a client certificate, tls.client_auth optional" >&2
MTLS=$(handshakes "$HTTPS_PORT" -new -cert "$PKI/dev-1.crt" \
    -key "$PKI/dev-1.key")
echo "   full with client certificate: $MTLS/s" >&2
stop_server

# Run names are 8 characters, as mqtt_load's reading size assumes.
start_server none mqtt sink
MQTT_OUT=$TMP/ingestd-mqtt/data/out
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
echo "== MQTT QoS 1, $MQTT_CLIENTS clients, $MQTT_PER_CLIENT messages" \
    "each, window $WINDOW, durability $MODE" >&2
mqtt_pass "$MQTT_PORT" mqtt-tcp
MQTT_TCP=$MQTT_LINE
MQTT_TCP_CPU=$MQTT_CPU
MQTT_TCP_OTHER=$MQTT_OTHER
echo "   mqtt:  $MQTT_TCP ingestd_cpu_pct=$MQTT_TCP_CPU" \
    "other_cpu_pct=$MQTT_TCP_OTHER" >&2
wait_drained "$MQTT_OUT" "$(field "$MQTT_TCP" acked)"
mqtt_pass "$MQTTS_PORT" mqtt-tls --cafile "$PKI/ca.crt"
MQTT_TLS=$MQTT_LINE
MQTT_TLS_CPU=$MQTT_CPU
MQTT_TLS_OTHER=$MQTT_OTHER
echo "   mqtts: $MQTT_TLS ingestd_cpu_pct=$MQTT_TLS_CPU" \
    "other_cpu_pct=$MQTT_TLS_OTHER" >&2
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)
wait_drained "$MQTT_OUT" \
    $(($(field "$MQTT_TCP" acked) + $(field "$MQTT_TLS" acked)))
stop_server

# The sink's output must contain exactly as many readings of each pass as
# mqtt_load counted PUBACKs, and the pass must have had no errors.
MQTT_CHECK=""
for pass in "mqtt-tcp:$MQTT_TCP" "mqtt-tls:$MQTT_TLS"; do
    run=${pass%%:*}
    line=${pass#*:}
    stored=$(stored_of_run "$MQTT_OUT" "$run")
    acked=$(field "$line" acked)
    echo "   $run: $stored stored, $acked acked, errors" \
        "$(field "$line" errors), rejected $(field "$line" rejected)," \
        "timed out $(field "$line" timed_out)" >&2
    if [ "$stored" != "$acked" ] || [ "$(field "$line" errors)" != 0 ] ||
        [ "$(field "$line" rejected)" != 0 ] ||
        [ "$(field "$line" timed_out)" != 0 ]; then
        MQTT_CHECK="$MQTT_CHECK $run stored $stored of $acked acked,"
        MQTT_CHECK="$MQTT_CHECK errors $(field "$line" errors),"
        MQTT_CHECK="$MQTT_CHECK rejected $(field "$line" rejected);"
    fi
done
MQTT_CHECK=${MQTT_CHECK:+FAILED:$MQTT_CHECK}
MQTT_CHECK=${MQTT_CHECK:-ok}
MQTT_RATIO=$(awk -v a="$(field "$MQTT_TLS" rate)" \
    -v b="$(field "$MQTT_TCP" rate)" \
    'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }')

echo
echo "| Measurement | Result |"
echo "| --- | --- |"
echo "| Full handshakes, openssl s_server | $REF_FULL/s |"
echo "| Resumed handshakes (TLS 1.2), openssl s_server | $REF_RESUMED/s |"
echo "| Full handshakes (s_time -new) | $FULL/s |"
echo "| Resumed handshakes (s_time -reuse -tls1_2) | $RESUMED/s |"
echo "| Full handshakes with a client certificate | $MTLS/s |"
echo "| POST /v1/data over http | $PLAIN |"
echo "| POST /v1/data over https | $TLS |"
echo "| MQTT QoS 1 over mqtt, $MQTT_CLIENTS clients |" \
    "$(mqtt_cell "$MQTT_TCP" "$MQTT_TCP_CPU" "$MQTT_TCP_OTHER") |"
echo "| MQTT QoS 1 over mqtts, $MQTT_CLIENTS clients |" \
    "$(mqtt_cell "$MQTT_TLS" "$MQTT_TLS_CPU" "$MQTT_TLS_OTHER") |"
echo "| MQTTS rate / MQTT rate | $MQTT_RATIO |"
echo "| MQTT stored == PUBACKed | $MQTT_CHECK |"
echo "| Load average (1 min) before / after the MQTT passes |" \
    "$LOAD_BEFORE / $LOAD_AFTER |"
[ "$MQTT_CHECK" = ok ] || exit 1
