#!/usr/bin/env bash
# Benchmarks ingestd's MQTT listener against mosquitto, and its WebSocket
# endpoint GET /v1/ws, on the same machine.
#
# mqtt_load (tests/tools/mqtt_load.c) drives mosquitto and then ingestd
# with the same clients and readings, at QoS 0 and 1, for each client
# count. mosquitto runs with persistence false and no subscribers, so it
# sends PUBACK from memory, without any fsync, and drops each message. For
# ingestd, each durability mode (fsync, then none) gets its own run, and
# bench/ws_load.py drives /v1/ws after the MQTT runs. Every reading
# carries the name of its run, so that at the end the script can count the
# readings of each run in the file sink's output. They must equal the
# PUBACKs (QoS 1), the messages sent (QoS 0) and the WebSocket acks.
#
# Usage: bench/mqtt.sh
# Environment (all optional):
#   BENCH_MESSAGES     messages per run, split over its clients
#                      (default 100000)
#   BENCH_CLIENTS      client counts (default "1 16 64")
#   BENCH_QOS          QoS levels (default "0 1")
#   BENCH_VERSIONS     MQTT versions, 311 and 5 (default "5")
#   BENCH_WINDOW       messages in flight per client (default 16)
#   BENCH_DURABILITY   ingestd spool modes to run (default "fsync none")
#   BENCH_THREADS      mqtt_load threads (default 1)
#   BENCH_WS           1 runs the WebSocket part, 0 skips it (default 1)
#   BENCH_WS_PROCESSES ws_load.py processes (default 1)
#   BENCH_MAX_SECONDS  time limit of one run (default 120)
#   BENCH_TMPDIR       parent of the temporary folder; must be on a real
#                      disk, because fsync on tmpfs costs nothing
#                      (default /var/tmp)
#   BENCH_SCHEMA       JSON Schema of the device type (default
#                      schemas/reading.json)
#   BUILD              build folder with ingestd and mqtt_load (default:
#                      build them in build-bench)
#   BENCH_KEEP         1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESSAGES=${BENCH_MESSAGES:-100000}
CLIENTS=${BENCH_CLIENTS:-"1 16 64"}
QOS_LEVELS=${BENCH_QOS:-"0 1"}
VERSIONS=${BENCH_VERSIONS:-5}
WINDOW=${BENCH_WINDOW:-16}
MODES=${BENCH_DURABILITY:-"fsync none"}
THREADS=${BENCH_THREADS:-1}
WS=${BENCH_WS:-1}
WS_PROCESSES=${BENCH_WS_PROCESSES:-1}
MAX_SECONDS=${BENCH_MAX_SECONDS:-120}
PY=/usr/bin/python3
# Bounds on every wait, so that a hung server cannot hang the benchmark.
START_TIMEOUT=20
STOP_TIMEOUT=30
DRAIN_TIMEOUT=120

# Checks that variable $1 (named $2 for messages) is a whole number from
# $3 to $4.
check_number() {
    local value=$1 name=$2 low=$3 high=$4
    case "$value" in
    '' | *[!0-9]*)
        echo "mqtt.sh: $name must be a whole number, got \"$value\"" >&2
        exit 2
        ;;
    esac
    if [ "$value" -lt "$low" ] || [ "$value" -gt "$high" ]; then
        echo "mqtt.sh: $name must be $low to $high, got $value" >&2
        exit 2
    fi
}

check_number "$MESSAGES" BENCH_MESSAGES 1 10000000
check_number "$WINDOW" BENCH_WINDOW 1 64
check_number "$THREADS" BENCH_THREADS 1 8
check_number "$WS_PROCESSES" BENCH_WS_PROCESSES 1 8
check_number "$MAX_SECONDS" BENCH_MAX_SECONDS 1 3600
for c in $CLIENTS; do
    check_number "$c" "a count in BENCH_CLIENTS" 1 1000
done
for q in $QOS_LEVELS; do
    check_number "$q" "a level in BENCH_QOS" 0 1
done
for v in $VERSIONS; do
    if [ "$v" != 311 ] && [ "$v" != 5 ]; then
        echo "mqtt.sh: BENCH_VERSIONS takes 311 and 5, got \"$v\"" >&2
        exit 2
    fi
done
for m in $MODES; do
    if [ "$m" != fsync ] && [ "$m" != none ]; then
        echo "mqtt.sh: BENCH_DURABILITY takes fsync and none, got \"$m\"" >&2
        exit 2
    fi
done
# One device per client of the largest run.
DEVICES=0
for c in $CLIENTS; do
    [ "$c" -gt "$DEVICES" ] && DEVICES=$c
done

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
        echo "mqtt.sh: $b not found or not executable; set BUILD" >&2
        exit 1
    fi
done

SCHEMA=${BENCH_SCHEMA:-$ROOT/schemas/reading.json}
if [ ! -r "$SCHEMA" ]; then
    echo "mqtt.sh: schema $SCHEMA not found; set BENCH_SCHEMA" >&2
    exit 1
fi

TMP=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ingestd-bench-mqtt.XXXXXX")
PIDS=()

# Stops one process that this script started: SIGTERM, a bounded wait, then
# SIGKILL.
stop_pid() {
    local pid=$1 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            echo "mqtt.sh: pid $pid did not stop in ${STOP_TIMEOUT}s;" \
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
trap 'echo "mqtt.sh: interrupted" >&2; exit 130' INT TERM

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

# Sums the samples of one Prometheus metric (every label set) from the
# admin listener. Prints 0 when the metric is absent.
metric_sum() {
    local port=$1 name=$2
    curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" |
        awk -v n="$name" '
            $1 == n || index($1, n "{") == 1 { s += $NF }
            END { printf "%.0f\n", s }'
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

# Prints the CPU use of processes other than the server and the load
# generator during a run, in percent of one core: the machine's busy time
# from $1 ticks on, over $2 ms, minus the server's $3 % and the load
# generator's $4 %. Anything above a few percent means that other work
# shared the cores and the run is not comparable.
other_pct() {
    local busy
    busy=$(cpu_pct $(($(busy_ticks) - $1)) "$2")
    echo $((busy - $3 - $4 < 0 ? 0 : busy - $3 - $4))
}

now_ms() {
    date +%s%3N
}

# Prints CPU use in percent of one core from a tick count $1 over $2 ms.
cpu_pct() {
    awk -v t="$1" -v ms="$2" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (ms > 0) printf "%.0f", 100 * t / hz / (ms / 1000) }'
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

# Runs a load generator in the background, so that Ctrl-C reaches the trap
# at once, which then stops it by its PID. $1 is the prefix of its result
# line, which is stored in LOAD_LINE; the rest is the command.
run_load() {
    local prefix=$1 pid out=$TMP/load.out
    shift
    timeout $((MAX_SECONDS + 60)) "$@" >"$out" 2>"$TMP/load.err" &
    pid=$!
    PIDS+=("$pid")
    if ! wait "$pid"; then
        forget_pid "$pid"
        echo "mqtt.sh: $(basename "$1") failed:" >&2
        cat "$out" "$TMP/load.err" >&2
        return 1
    fi
    forget_pid "$pid"
    if ! LOAD_LINE=$(grep "^$prefix " "$out"); then
        echo "mqtt.sh: $(basename "$1") printed no $prefix line:" >&2
        cat "$out" "$TMP/load.err" >&2
        return 1
    fi
    if [ -s "$TMP/load.err" ]; then
        echo "   stderr of $(basename "$1") (first lines):" >&2
        head -n 5 "$TMP/load.err" | sed 's/^/     /' >&2
    fi
}

# Runs mqtt_load against port $1 with credentials $2, version $3, QoS $4,
# $5 clients and run name $6; the result is in LOAD_LINE.
run_mqtt_load() {
    local port=$1 creds=$2 version=$3 qos=$4 clients=$5 run=$6
    local per=$((MESSAGES / clients))
    [ "$per" -ge 1 ] || per=1
    run_load MQTT_LOAD "$MQTT_LOAD" -p "$port" -f "$creds" -V "$version" \
        -q "$qos" -c "$clients" -m "$per" -w "$WINDOW" -T "$THREADS" \
        -d "$MAX_SECONDS" -r "$run"
}

# ---- mosquitto reference --------------------------------------------------

declare -A MOSQ_LINE MOSQ_CPU MOSQ_OTHER

run_mosquitto() {
    local dir=$TMP/mosquitto port pid v q c before start line busy elapsed
    mkdir -p "$dir"
    port=$(free_port)
    cat >"$dir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
EOF
    # ingestd sets TCP_NODELAY on its connections, and so does mqtt_load;
    # set_tcp_nodelay makes mosquitto do the same, since by default its
    # PUBACKs wait for Nagle's algorithm.
    # mqtt_load sends user names and passwords; mosquitto accepts any with
    # allow_anonymous true and no password file. Devices need no
    # registration there.
    for c in $(seq 1 "$DEVICES"); do
        printf 'bench-%04d x\n' "$c"
    done >"$dir/creds"
    mosquitto -c "$dir/mosquitto.conf" 2>"$dir/mosquitto.log" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_port "$port" "$pid"; then
        echo "mqtt.sh: mosquitto did not start; its log:" >&2
        cat "$dir/mosquitto.log" >&2
        return 1
    fi
    echo "== mosquitto $(mosquitto -h 2>&1 | sed -n '1s/.*version //p')," \
        "port $port" >&2
    for v in $VERSIONS; do
        for q in $QOS_LEVELS; do
            for c in $CLIENTS; do
                before=$(cpu_ticks "$pid")
                busy=$(busy_ticks)
                start=$(now_ms)
                run_mqtt_load "$port" "$dir/creds" "$v" "$q" "$c" \
                    "mosq-$v-$q-$c"
                line=$LOAD_LINE
                elapsed=$(($(now_ms) - start))
                MOSQ_CPU[$v,$q,$c]=$(cpu_pct $(($(cpu_ticks "$pid") - \
                    before)) "$elapsed")
                MOSQ_OTHER[$v,$q,$c]=$(other_pct "$busy" "$elapsed" \
                    "${MOSQ_CPU[$v,$q,$c]}" "$(field "$line" cpu_pct)")
                MOSQ_LINE[$v,$q,$c]=$line
                echo "   mosquitto v$v qos$q c=$c: $line" >&2
            done
        done
    done
    stop_pid "$pid"
    forget_pid "$pid"
}

# ---- ingestd --------------------------------------------------------------

declare -A INGESTD_LINE INGESTD_CPU INGESTD_OTHER FSYNCS WS_LINE WS_CPU
declare -A WS_OTHER CHECK

write_ingestd_config() {
    local dir=$1 http=$2 admin=$3 mqtt=$4 mode=$5
    cat >"$dir/ingestd.yaml" <<EOF
log:
  level: warn
data_dir: $dir/data
http:
  listen: 127.0.0.1:$http
  max_connections: 8192
admin:
  listen: 127.0.0.1:$admin
mqtt:
  listen: 127.0.0.1:$mqtt
  max_connections: 8192
  receive_maximum: 64
spool:
  durability: $mode
  max_size: 4GiB
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

# Registers the devices bench-0001... and writes "device_id api_key" lines
# to $2.
register_devices() {
    local dir=$1 creds=$2 i id key
    : >"$creds"
    for i in $(seq 1 "$DEVICES"); do
        id=$(printf 'bench-%04d' "$i")
        if ! key=$("$INGESTD" device add "$id" -c "$dir/ingestd.yaml" |
            grep '^ik_'); then
            echo "mqtt.sh: \`ingestd device add $id\` printed no API key" >&2
            return 1
        fi
        echo "$id $key" >>"$creds"
    done
}

# Counts the records of each run name in the file sink's output, as
# "name count" lines in $2.
count_runs() {
    local out=$1 counts=$2
    if compgen -G "$out/*.ndjson" >/dev/null; then
        cat "$out"/*.ndjson | grep -o '"run":"[^"]*"' |
            sed 's/"run":"\(.*\)"/\1/' | sort | uniq -c |
            awk '{ print $2, $1 }' >"$counts"
    else
        : >"$counts"
    fi
}

output_lines() {
    local out=$1
    if compgen -G "$out/*.ndjson" >/dev/null; then
        cat "$out"/*.ndjson | wc -l
    else
        echo 0
    fi
}

# Waits until the sink's output reaches $2 records and stops growing.
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
}

run_ingestd() {
    local mode=$1 dir=$TMP/ingestd-$1 http admin mqtt pid v q c line
    local before fs_before start expected=0 run busy elapsed
    mkdir -p "$dir"
    http=$(free_port)
    admin=$(free_port)
    mqtt=$(free_port)
    write_ingestd_config "$dir" "$http" "$admin" "$mqtt" "$mode"
    register_devices "$dir" "$dir/creds"
    "$INGESTD" serve -c "$dir/ingestd.yaml" 2>"$dir/ingestd.log" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_port "$mqtt" "$pid" || ! wait_port "$http" "$pid"; then
        echo "mqtt.sh: ingestd did not start; its log:" >&2
        cat "$dir/ingestd.log" >&2
        return 1
    fi
    echo "== ingestd durability=$mode mqtt port $mqtt, http port $http" >&2
    : >"$dir/expected"
    for v in $VERSIONS; do
        for q in $QOS_LEVELS; do
            for c in $CLIENTS; do
                run="$mode-$v-$q-$c"
                fs_before=$(metric_sum "$admin" \
                    ingestd_spool_fsync_seconds_count)
                before=$(cpu_ticks "$pid")
                busy=$(busy_ticks)
                start=$(now_ms)
                run_mqtt_load "$mqtt" "$dir/creds" "$v" "$q" "$c" "$run"
                line=$LOAD_LINE
                elapsed=$(($(now_ms) - start))
                INGESTD_CPU[$mode,$v,$q,$c]=$(cpu_pct \
                    $(($(cpu_ticks "$pid") - before)) "$elapsed")
                INGESTD_OTHER[$mode,$v,$q,$c]=$(other_pct "$busy" \
                    "$elapsed" "${INGESTD_CPU[$mode,$v,$q,$c]}" \
                    "$(field "$line" cpu_pct)")
                FSYNCS[$mode,$v,$q,$c]=$(($(metric_sum "$admin" \
                    ingestd_spool_fsync_seconds_count) - fs_before))
                INGESTD_LINE[$mode,$v,$q,$c]=$line
                echo "   ingestd/$mode v$v qos$q c=$c: $line" \
                    "fsyncs=${FSYNCS[$mode,$v,$q,$c]}" >&2
                # QoS 1: every PUBACKed message must be stored. QoS 0:
                # every message sent, since the final QoS 1 message of
                # each client was acknowledged after all of them.
                if [ "$q" = 1 ]; then
                    echo "$run $(field "$line" acked) PUBACKs" \
                        >>"$dir/expected"
                else
                    echo "$run $(field "$line" sent) messages sent" \
                        >>"$dir/expected"
                fi
            done
        done
    done
    if [ "$WS" = 1 ]; then
        for c in $CLIENTS; do
            run="$mode-ws-$c"
            before=$(cpu_ticks "$pid")
            busy=$(busy_ticks)
            start=$(now_ms)
            run_load WS_LOAD "$PY" "$ROOT/bench/ws_load.py" --port "$http" \
                --credentials "$dir/creds" --connections "$c" \
                --messages $((MESSAGES / c > 0 ? MESSAGES / c : 1)) \
                --window "$WINDOW" --processes "$WS_PROCESSES" \
                --run "$run" --max-seconds "$MAX_SECONDS"
            line=$LOAD_LINE
            elapsed=$(($(now_ms) - start))
            WS_CPU[$mode,$c]=$(cpu_pct $(($(cpu_ticks "$pid") - before)) \
                "$elapsed")
            WS_OTHER[$mode,$c]=$(other_pct "$busy" "$elapsed" \
                "${WS_CPU[$mode,$c]}" "$(field "$line" cpu_pct)")
            WS_LINE[$mode,$c]=$line
            echo "   ingestd/$mode ws c=$c: $line" >&2
            echo "$run $(field "$line" acked) WebSocket acks" \
                >>"$dir/expected"
        done
    fi

    expected=$(awk '{ s += $2 } END { print s + 0 }' "$dir/expected")
    wait_drained "$dir/data/out" "$expected"
    stop_pid "$pid"
    forget_pid "$pid"
    check_output "$mode" "$dir"
}

# Compares the records of each run in the output with the acknowledgements
# that its load generator counted, and checks that message ids are unique.
check_output() {
    local mode=$1 dir=$2 run want what stored lines unique bad=""
    count_runs "$dir/data/out" "$dir/counts"
    while read -r run want what; do
        stored=$(awk -v r="$run" '$1 == r { print $2 }' "$dir/counts")
        stored=${stored:-0}
        if [ "$stored" != "$want" ]; then
            bad="$bad $run: $stored stored, $want $what;"
        fi
    done <"$dir/expected"
    lines=$(output_lines "$dir/data/out")
    unique=0
    if [ "$lines" -gt 0 ]; then
        unique=$(cat "$dir/data/out"/*.ndjson |
            grep -o '"message_id":"[^"]*"' | sort -u | wc -l)
    fi
    if [ -z "$bad" ] && [ "$unique" -eq "$lines" ]; then
        CHECK[$mode]="ok: each run stored exactly what was acknowledged;"
        CHECK[$mode]="${CHECK[$mode]} $lines records, $unique distinct ids"
    else
        CHECK[$mode]="FAILED:$bad $lines records, $unique distinct ids"
        CHECK_FAILED=1
    fi
    echo "   ${CHECK[$mode]}" >&2
}

# ---- report ---------------------------------------------------------------

ms() {
    awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'
}

# Prints "p50/p99" in ms from a result line, or "-" for QoS 0.
latency() {
    if [ "$2" = 0 ]; then
        echo "-"
    else
        echo "$(ms "$(field "$1" p50_us)")/$(ms "$(field "$1" p99_us)")"
    fi
}

report_mqtt() {
    local mode v q c m i ratio fs per errors
    printf '%-6s %-4s %-3s %5s %9s %9s %6s %13s %13s %7s %6s %s\n' \
        durab ver qos cli mosq_mps ingd_mps ratio "mosq_p50/p99" \
        "ingd_p50/p99" fsyncs per_fs "cpu mosq/load/other ingd/load/other"
    for mode in $MODES; do
        for v in $VERSIONS; do
            for q in $QOS_LEVELS; do
                for c in $CLIENTS; do
                    m=${MOSQ_LINE[$v,$q,$c]}
                    i=${INGESTD_LINE[$mode,$v,$q,$c]}
                    ratio=$(awk -v a="$(field "$i" rate)" \
                        -v b="$(field "$m" rate)" \
                        'BEGIN { if (b > 0) printf "%.2f", a / b
                                 else print "-" }')
                    fs=${FSYNCS[$mode,$v,$q,$c]}
                    per=$(awk -v r="$(field "$i" sent)" -v f="$fs" \
                        'BEGIN { if (f > 0) printf "%.1f", r / f
                                 else print "-" }')
                    printf '%-6s %-4s %-3s %5s %9.0f %9.0f %6s %13s %13s' \
                        "$mode" "$v" "$q" "$c" "$(field "$m" rate)" \
                        "$(field "$i" rate)" "$ratio" "$(latency "$m" "$q")" \
                        "$(latency "$i" "$q")"
                    printf ' %7s %6s %s/%s/%s %s/%s/%s\n' "$fs" "$per" \
                        "${MOSQ_CPU[$v,$q,$c]}" "$(field "$m" cpu_pct)" \
                        "${MOSQ_OTHER[$v,$q,$c]}" \
                        "${INGESTD_CPU[$mode,$v,$q,$c]}" \
                        "$(field "$i" cpu_pct)" \
                        "${INGESTD_OTHER[$mode,$v,$q,$c]}"
                    errors=$(($(field "$m" errors) + $(field "$m" rejected) + \
                        $(field "$i" errors) + $(field "$i" rejected)))
                    if [ "$errors" != 0 ]; then
                        echo "  note: errors or rejections: mosquitto" \
                            "$(field "$m" errors)/$(field "$m" rejected)," \
                            "ingestd $(field "$i" errors)/$(field "$i" rejected)"
                    fi
                done
            done
        done
    done
    echo "mps = messages per second; latencies in ms from publish to PUBACK"
    echo "(QoS 1 only). ratio = ingestd / mosquitto. per_fs = messages per"
    echo "fsync. cpu in % of one core, for the mosquitto run and the ingestd"
    echo "run: server / load generator / other processes on the machine."
}

report_ws() {
    local mode c w
    printf '%-6s %5s %9s %15s %6s %s\n' durab conns acks/s \
        "ack_p50/p99" errors "cpu ingd/load/other"
    for mode in $MODES; do
        for c in $CLIENTS; do
            w=${WS_LINE[$mode,$c]}
            printf '%-6s %5s %9.0f %15s %6s %s\n' "$mode" "$c" \
                "$(field "$w" rate)" "$(latency "$w" 1)" \
                $(($(field "$w" errors) + $(field "$w" rejected))) \
                "${WS_CPU[$mode,$c]}/$(field "$w" cpu_pct)/${WS_OTHER[$mode,$c]}"
        done
    done
    echo "Latencies in ms from send to ack; ws_load.py with $WS_PROCESSES" \
        "process(es), window $WINDOW."
}

report() {
    local mode
    echo
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo |
        sed 's/.*: //')), shared by the servers and the load generators"
    echo "Spool folder on: $(findmnt -n -o FSTYPE -T "$TMP") ($TMP)"
    echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "mqtt_load: $THREADS thread(s), window $WINDOW, $MESSAGES messages" \
        "per run. mosquitto acknowledges QoS 1 from memory, without fsync."
    echo
    report_mqtt
    if [ "$WS" = 1 ]; then
        echo
        report_ws
    fi
    echo
    for mode in $MODES; do
        echo "Output check ($mode): ${CHECK[$mode]}"
    done
}

CHECK_FAILED=0
run_mosquitto
for m in $MODES; do
    run_ingestd "$m"
done
report
exit "$CHECK_FAILED"
