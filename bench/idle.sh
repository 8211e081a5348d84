#!/usr/bin/env bash
# Measures how much memory ingestd needs per idle connection, for MQTT,
# WebSocket and HTTP keep-alive, and checks that it stays responsive while
# they are open.
#
# For each kind, a fresh ingestd starts, a few connections of that kind
# are opened and closed to warm it up, and its VmRSS (from
# /proc/PID/status) is read. Then IDLE_CONNECTIONS connections are opened
# and held:
#   mqtt  CONNECT from mqtt_load -I, then only PINGREQ at the keep alive
#   ws    GET /v1/ws with the key in the Authorization header, then nothing
#         but pongs (bench/idle_clients.py ws)
#   http  one POST /v1/data, then nothing (bench/idle_clients.py http)
# With all of them open, the script reads VmRSS again, the connection
# gauge on /metrics, and sends one HTTP POST (and for mqtt one QoS 1
# publish with mosquitto_pub), which must get 202 (and a PUBACK). Then it
# closes the connections and stops ingestd.
#
# File descriptors: this machine limits each process to 20,000, and the
# limit cannot be raised, so ingestd can hold about 19,900 connections.
# libmosquitto uses 3 descriptors per client, so mqtt_load processes take
# at most IDLE_PER_PROCESS clients each, and so do the Python clients.
# Each client process connects from its own address 127.0.0.x. A bind()
# to port 0 searches the address's ephemeral ports for a free one, which
# took 50 s for 18,000 connections from one address, against 1.5 s from
# three.
#
# Usage: bench/idle.sh
# Environment (all optional):
#   IDLE_CONNECTIONS  connections per kind, 1 to 18000 (default 10000)
#   IDLE_KINDS        kinds to measure (default "mqtt ws http")
#   IDLE_HOLD         seconds the connections stay open after the
#                     measurement (default 5)
#   IDLE_DEVICES      devices registered; connections use their keys in
#                     turn (default 100)
#   IDLE_PER_PROCESS  connections per client process, at most 6000
#                     (default 6000)
#   BENCH_TMPDIR      parent of the temporary folder (default /var/tmp)
#   BENCH_SCHEMA      JSON Schema of the device type (default
#                     schemas/reading.json)
#   BUILD             build folder with ingestd and mqtt_load (default:
#                     build them in build-bench)
#   BENCH_KEEP        1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${IDLE_CONNECTIONS:-10000}
KINDS=${IDLE_KINDS:-"mqtt ws http"}
HOLD=${IDLE_HOLD:-5}
DEVICES=${IDLE_DEVICES:-100}
PER_PROCESS=${IDLE_PER_PROCESS:-6000}
PY=/usr/bin/python3
# Bounds on every wait, so that a hung process cannot hang the benchmark.
START_TIMEOUT=20
STOP_TIMEOUT=30
OPEN_TIMEOUT=180

check_number() {
    local value=$1 name=$2 low=$3 high=$4
    case "$value" in
    '' | *[!0-9]*)
        echo "idle.sh: $name must be a whole number, got \"$value\"" >&2
        exit 2
        ;;
    esac
    if [ "$value" -lt "$low" ] || [ "$value" -gt "$high" ]; then
        echo "idle.sh: $name must be $low to $high, got $value" >&2
        exit 2
    fi
}

check_number "$COUNT" IDLE_CONNECTIONS 1 18000
check_number "$HOLD" IDLE_HOLD 1 600
check_number "$DEVICES" IDLE_DEVICES 1 10000
check_number "$PER_PROCESS" IDLE_PER_PROCESS 1 6000
for k in $KINDS; do
    case "$k" in
    mqtt | ws | http) ;;
    *)
        echo "idle.sh: IDLE_KINDS takes mqtt, ws and http, got \"$k\"" >&2
        exit 2
        ;;
    esac
done
if [ "$(ulimit -n)" != unlimited ] &&
    [ $((COUNT + 200)) -gt "$(ulimit -n)" ]; then
    echo "idle.sh: ingestd needs about $((COUNT + 200)) file descriptors" \
        "for $COUNT connections, but the limit is $(ulimit -n);" \
        "lower IDLE_CONNECTIONS" >&2
    exit 2
fi

"$ROOT/scripts/install-deps.sh" test

if [ -z "${BUILD:-}" ]; then
    BUILD=$ROOT/build-bench
    echo "== building ingestd and mqtt_load in $BUILD" >&2
    cmake -S "$ROOT" -B "$BUILD" -DWITH_TESTS=OFF >/dev/null
    cmake --build "$BUILD" --target ingestd mqtt_load -j "$(nproc)" \
        >/dev/null
fi
INGESTD=$BUILD/ingestd
MQTT_LOAD=$BUILD/mqtt_load
for b in "$INGESTD" "$MQTT_LOAD"; do
    if [ ! -x "$b" ]; then
        echo "idle.sh: $b not found or not executable; set BUILD" >&2
        exit 1
    fi
done

SCHEMA=${BENCH_SCHEMA:-$ROOT/schemas/reading.json}
if [ ! -r "$SCHEMA" ]; then
    echo "idle.sh: schema $SCHEMA not found; set BENCH_SCHEMA" >&2
    exit 1
fi

TMP=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ingestd-bench-idle.XXXXXX")
PIDS=()

# Stops one process that this script started: SIGTERM, a bounded wait, then
# SIGKILL.
stop_pid() {
    local pid=$1 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            echo "idle.sh: pid $pid did not stop in ${STOP_TIMEOUT}s;" \
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
trap 'echo "idle.sh: interrupted" >&2; exit 130' INT TERM

free_port() {
    "$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Waits until something accepts TCP connections on 127.0.0.1:$1, while the
# process $2 is alive.
wait_port() {
    local port=$1 pid=$2 i
    for i in $(seq 1 $((START_TIMEOUT * 10))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if "$PY" -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
            "$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Prints the value of one Prometheus series, such as
# name{label="value"}, written exactly as /metrics writes it, or 0.
metric_series() {
    local port=$1 series=$2
    curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" |
        awk -v n="$series" '$1 == n { v = $2 } END { printf "%.0f\n", v }'
}

rss_kib() {
    awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"
}

# Prints the value of key $2 from a result line $1.
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

write_config() {
    local dir=$1 http=$2 admin=$3 mqtt=$4
    # Every connection limit is above the count, and the idle timeouts
    # are longer than the whole run, so that only the clients end the
    # connections.
    cat >"$dir/ingestd.yaml" <<EOF
log:
  level: warn
data_dir: $dir/data
http:
  listen: 127.0.0.1:$http
  max_connections: 20000
  idle_timeout: 30m
admin:
  listen: 127.0.0.1:$admin
ws:
  idle_timeout: 30m
mqtt:
  listen: 127.0.0.1:$mqtt
  max_connections: 20000
spool:
  durability: fsync
default_device_type: default
device_types:
  default:
    schema: $SCHEMA
sinks:
  - name: file
    type: file
    path: $dir/data/out
EOF
}

register_devices() {
    local dir=$1 creds=$2 i id key
    : >"$creds"
    for i in $(seq 1 "$DEVICES"); do
        id=$(printf 'idle-%05d' "$i")
        if ! key=$("$INGESTD" device add "$id" -c "$dir/ingestd.yaml" |
            grep '^ik_'); then
            echo "idle.sh: \`ingestd device add $id\` printed no API key" >&2
            return 1
        fi
        echo "$id $key" >>"$creds"
    done
}

# Starts the client processes that open $2 idle connections of kind $1,
# with run name $3. Their PIDs go to CLIENT_PIDS and their output to
# $TMP/client-N.out.
start_clients() {
    local kind=$1 count=$2 run=$3 p=0 share left=$2 pid base
    # Each kind connects from its own addresses, because the ports of the
    # previous kind's connections stay in TIME_WAIT for a minute.
    case "$kind" in
    mqtt) base=10 ;;
    ws) base=20 ;;
    http) base=30 ;;
    esac
    CLIENT_PIDS=()
    rm -f "$TMP"/client-*.out
    while [ "$left" -gt 0 ]; do
        share=$left
        if [ "$share" -gt "$PER_PROCESS" ]; then
            share=$PER_PROCESS
        fi
        case "$kind" in
        mqtt)
            "$MQTT_LOAD" -p "$MQTT_PORT" -f "$CREDS" -c "$share" \
                -I "$OPEN_TIMEOUT" -d "$OPEN_TIMEOUT" -k 60 \
                -B "127.0.0.$((base + p))" -r "$run-$p" \
                >"$TMP/client-$p.out" 2>"$TMP/client-$p.err" &
            ;;
        *)
            "$PY" "$ROOT/bench/idle_clients.py" "$kind" --port "$HTTP_PORT" \
                --credentials "$CREDS" --count "$share" \
                --hold "$OPEN_TIMEOUT" --max-seconds "$OPEN_TIMEOUT" \
                --bind "127.0.0.$((base + p))" \
                >"$TMP/client-$p.out" 2>"$TMP/client-$p.err" &
            ;;
        esac
        pid=$!
        PIDS+=("$pid")
        CLIENT_PIDS+=("$pid")
        left=$((left - share))
        p=$((p + 1))
    done
}

# Waits until every client process has printed its line on opening its
# connections, and sums them into OPENED and FAILED. The wait is bounded by
# OPEN_TIMEOUT.
wait_opened() {
    local waited=0 f line ready i
    while [ "$waited" -lt $((OPEN_TIMEOUT * 10)) ]; do
        ready=0
        for i in "${!CLIENT_PIDS[@]}"; do
            f=$TMP/client-$i.out
            if grep -qs '^\(MQTT_\)\?IDLE ' "$f"; then
                ready=$((ready + 1))
            fi
        done
        [ "$ready" -eq "${#CLIENT_PIDS[@]}" ] && break
        sleep 0.1
        waited=$((waited + 1))
    done
    OPENED=0
    FAILED=0
    CONNECT_US=0
    for f in "$TMP"/client-*.out; do
        line=$(grep -m1 '^\(MQTT_\)\?IDLE ' "$f" || true)
        OPENED=$((OPENED + $(field "$line" open) + $(field "$line" connected)))
        FAILED=$((FAILED + $(field "$line" failed)))
        if [ "$(field "$line" connect_us)" -gt "$CONNECT_US" ]; then
            CONNECT_US=$(field "$line" connect_us)
        fi
    done
}

# Stops the client processes and sums the connections that the server
# closed while they were held into LOST.
stop_clients() {
    local pid f line
    for pid in "${CLIENT_PIDS[@]}"; do
        stop_pid "$pid"
        forget_pid "$pid"
    done
    LOST=0
    for f in "$TMP"/client-*.out; do
        line=$(grep -m1 'IDLE_END ' "$f" || true)
        LOST=$((LOST + $(field "$line" lost)))
    done
}

post_reading() {
    local key=$1 device=$2
    curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{time_total}' \
        -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        --data "{\"device_id\":\"$device\",\"timestamp\":\"2026-12-04T17:00:00Z\",\"sensor_value\":1}" \
        "http://127.0.0.1:$HTTP_PORT/v1/data" || echo "000 0"
}

declare -A RESULT

run_kind() {
    local kind=$1 dir=$TMP/$1 admin pid before after gauge gauge_after
    local post mqtt_pub="-" device key per
    mkdir -p "$dir"
    HTTP_PORT=$(free_port)
    MQTT_PORT=$(free_port)
    admin=$(free_port)
    CREDS=$dir/creds
    write_config "$dir" "$HTTP_PORT" "$admin" "$MQTT_PORT"
    register_devices "$dir" "$CREDS"
    read -r device key <"$CREDS"
    "$INGESTD" serve -c "$dir/ingestd.yaml" 2>"$dir/ingestd.log" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_port "$HTTP_PORT" "$pid" || ! wait_port "$MQTT_PORT" "$pid"
    then
        echo "idle.sh: ingestd did not start; its log:" >&2
        cat "$dir/ingestd.log" >&2
        return 1
    fi
    echo "== $kind: ingestd pid $pid, $COUNT connections" >&2

    # Warm-up: the first connections of a kind may allocate memory that
    # stays for the process's lifetime, which is no cost per connection.
    post_reading "$key" "$device" >/dev/null
    start_clients "$kind" 200 warm
    wait_opened
    stop_clients
    sleep 1
    before=$(rss_kib "$pid")

    start_clients "$kind" "$COUNT" idle
    wait_opened
    # Lets ingestd finish the handshakes still in progress.
    sleep 2
    after=$(rss_kib "$pid")
    case "$kind" in
    mqtt) gauge=$(metric_series "$admin" ingestd_mqtt_connections) ;;
    ws) gauge=$(metric_series "$admin" ingestd_ws_connections) ;;
    http)
        gauge=$(metric_series "$admin" \
            'ingestd_http_connections{listener="api"}')
        ;;
    esac
    post=$(post_reading "$key" "$device")
    if [ "$kind" = mqtt ]; then
        if timeout 15 mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -V mqttv5 \
            -q 1 -i idle-check -u "$device" -P "$key" \
            -t "devices/$device/data" \
            -m "{\"device_id\":\"$device\",\"timestamp\":\"2026-12-04T17:00:00Z\",\"sensor_value\":2}"
        then
            mqtt_pub=ok
        else
            mqtt_pub=FAILED
            CHECK_FAILED=1
        fi
    fi
    sleep "$HOLD"
    stop_clients
    sleep 1
    case "$kind" in
    mqtt) gauge_after=$(metric_series "$admin" ingestd_mqtt_connections) ;;
    ws) gauge_after=$(metric_series "$admin" ingestd_ws_connections) ;;
    http)
        # The scrape's own connection is on the admin listener.
        gauge_after=$(metric_series "$admin" \
            'ingestd_http_connections{listener="api"}')
        ;;
    esac
    stop_pid "$pid"
    forget_pid "$pid"

    per=$(awk -v a="$after" -v b="$before" -v n="$OPENED" \
        'BEGIN { if (n > 0) printf "%.1f", (a - b) / n; else print "-" }')
    RESULT[$kind]="$OPENED $FAILED $CONNECT_US $before $after $per $gauge"
    RESULT[$kind]="${RESULT[$kind]} $gauge_after ${post% *} ${post#* }"
    RESULT[$kind]="${RESULT[$kind]} $mqtt_pub $LOST"
    echo "   open=$OPENED failed=$FAILED rss_kib=$before->$after" \
        "per_conn_kib=$per gauge=$gauge post=$post mqtt_pub=$mqtt_pub" \
        "lost=$LOST gauge_after_close=$gauge_after" >&2
    if [ "$OPENED" -ne "$COUNT" ] || [ "$gauge" -ne "$OPENED" ] ||
        [ "${post% *}" != 202 ] || [ "$LOST" -ne 0 ]; then
        CHECK_FAILED=1
    fi
}

report() {
    local kind open failed connect_us before after per gauge gauge_after
    local status seconds mqtt_pub lost
    echo
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo |
        sed 's/.*: //')), shared by ingestd and the clients"
    echo "Open files limit: $(ulimit -n) per process"
    echo
    printf '%-5s %6s %6s %8s %9s %9s %9s %6s %6s %10s %8s %5s\n' kind open \
        failed open_s rss_before rss_after kib/conn gauge closed \
        post_ms mqtt_pub lost
    for kind in $KINDS; do
        read -r open failed connect_us before after per gauge gauge_after \
            status seconds mqtt_pub lost <<<"${RESULT[$kind]}"
        printf '%-5s %6s %6s %8.1f %9s %9s %9s %6s %6s %10s %8s %5s\n' \
            "$kind" "$open" "$failed" \
            "$(awk -v u="$connect_us" 'BEGIN { print u / 1e6 }')" \
            "$((before / 1024))M" "$((after / 1024))M" "$per" "$gauge" \
            "$gauge_after" \
            "$status/$(awk -v s="$seconds" 'BEGIN { printf "%.1f", s * 1000 }')" \
            "$mqtt_pub" "$lost"
    done
    echo "rss in MiB (VmRSS, after a warm-up of 200 connections). kib/conn ="
    echo "(rss_after - rss_before) / open. gauge = the connection gauge on"
    echo "/metrics with all open, closed = the same 1 s after they closed."
    echo "post = status/ms of one POST /v1/data sent while all were open."
}

CHECK_FAILED=0
for k in $KINDS; do
    run_kind "$k"
done
report
exit "$CHECK_FAILED"
