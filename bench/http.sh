#!/usr/bin/env bash
# Benchmarks ingestd's POST /v1/data against nginx configured to return 204
# for the same requests, on the same machine, with the same wrk script
# (bench/post.lua).
#
# For each durability mode (fsync, then none) and each connection count, wrk
# drives ingestd for BENCH_DURATION seconds; nginx gets the same runs once.
# The script then checks that the readings ingestd acknowledged are in the
# file sink's output, so the numbers count real, durable acknowledgements.
#
# Usage: bench/http.sh
# Environment (all optional):
#   BENCH_DURATION     seconds per wrk run (default 10)
#   BENCH_CONNECTIONS  connection counts (default "1 16 64 256")
#   BENCH_THREADS      wrk threads, at most the connection count (default 2)
#   BENCH_DURABILITY   ingestd spool modes to run (default "fsync none")
#   BENCH_WORKERS      ingestd http.workers and nginx worker_processes
#                      (default 0 for ingestd and auto for nginx: one per core)
#   BENCH_TMPDIR       parent of the temporary folder; must be on a real disk,
#                      because fsync on tmpfs costs nothing (default /var/tmp)
#   BENCH_SCHEMA       JSON Schema of the device type (default
#                      schemas/reading.json)
#   INGESTD            ingestd binary (default: build it in build-bench)
#   BENCH_KEEP         1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-"1 16 64 256"}
THREADS=${BENCH_THREADS:-2}
MODES=${BENCH_DURABILITY:-"fsync none"}
WORKERS=${BENCH_WORKERS:-0}
PY=/usr/bin/python3
# Bounds on every wait, so that a hung server cannot hang the benchmark.
START_TIMEOUT=20
STOP_TIMEOUT=30
DRAIN_TIMEOUT=120

case "$DURATION" in
'' | *[!0-9]*)
    echo "http.sh: BENCH_DURATION must be whole seconds, got \"$DURATION\"" >&2
    exit 2
    ;;
esac
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 600 ]; then
    echo "http.sh: BENCH_DURATION must be 1 to 600 seconds" >&2
    exit 2
fi
for c in $CONNECTIONS; do
    case "$c" in
    '' | *[!0-9]*)
        echo "http.sh: invalid connection count \"$c\" in BENCH_CONNECTIONS" >&2
        exit 2
        ;;
    esac
    if [ "$c" -lt 1 ] || [ "$c" -gt 4096 ]; then
        echo "http.sh: connection counts must be 1 to 4096, got $c" >&2
        exit 2
    fi
done
for m in $MODES; do
    if [ "$m" != fsync ] && [ "$m" != none ]; then
        echo "http.sh: BENCH_DURABILITY takes fsync and none, got \"$m\"" >&2
        exit 2
    fi
done

"$ROOT/scripts/install-deps.sh" test

if [ -z "${INGESTD:-}" ]; then
    INGESTD=$ROOT/build-bench/ingestd
    echo "== building ingestd in $ROOT/build-bench" >&2
    cmake -S "$ROOT" -B "$ROOT/build-bench" -DWITH_TESTS=OFF >/dev/null
    cmake --build "$ROOT/build-bench" --target ingestd -j "$(nproc)" \
        >/dev/null
fi
if [ ! -x "$INGESTD" ]; then
    echo "http.sh: ingestd binary $INGESTD not found or not executable" >&2
    exit 1
fi

SCHEMA=${BENCH_SCHEMA:-$ROOT/schemas/reading.json}
if [ ! -r "$SCHEMA" ]; then
    echo "http.sh: schema $SCHEMA not found; set BENCH_SCHEMA" >&2
    exit 1
fi

TMP=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ingestd-bench.XXXXXX")
PIDS=()

# Stops one process that this script started: SIGTERM, a bounded wait, then
# SIGKILL.
stop_pid() {
    local pid=$1 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            echo "http.sh: pid $pid did not stop in ${STOP_TIMEOUT}s;" \
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
trap 'echo "http.sh: interrupted" >&2; exit 130' INT TERM

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

# Prints the value of one Prometheus series, such as
# name{label="value"}, written exactly as /metrics writes it, or 0.
metric_series() {
    local port=$1 series=$2
    curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" |
        awk -v n="$series" '$1 == n { v = $2 } END { printf "%.0f\n", v }'
}

# Runs wrk against 127.0.0.1:$1 with $2 connections and stores its BENCH
# line in WRK_LINE. wrk runs in the background so that Ctrl-C reaches the
# trap at once, which then stops wrk by its PID.
run_wrk() {
    local port=$1 conns=$2 threads=$THREADS pid out
    if [ "$threads" -gt "$conns" ]; then
        threads=$conns
    fi
    out=$TMP/wrk.out
    timeout $((DURATION + 30)) wrk -t "$threads" -c "$conns" \
        -d "${DURATION}s" --timeout 10s -s "$ROOT/bench/post.lua" \
        "http://127.0.0.1:$port/v1/data" >"$out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if ! wait "$pid"; then
        forget_pid "$pid"
        echo "http.sh: wrk failed:" >&2
        cat "$out" >&2
        return 1
    fi
    forget_pid "$pid"
    if ! WRK_LINE=$(grep '^BENCH ' "$out"); then
        echo "http.sh: wrk printed no BENCH line:" >&2
        cat "$out" >&2
        return 1
    fi
}

# Prints the value of key $2 from a BENCH line $1.
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

# ---- nginx reference ------------------------------------------------------

declare -A NGINX_LINE

run_nginx() {
    local dir=$TMP/nginx port pid user_line="" workers=auto c
    mkdir -p "$dir/tmp"
    port=$(free_port)
    if [ "$WORKERS" != 0 ]; then
        workers=$WORKERS
    fi
    # As root, nginx would switch its workers to "nobody", who cannot write
    # into this folder; run them as the current user instead.
    if [ "$(id -u)" = 0 ]; then
        user_line="user $(id -un) $(id -gn);"
    fi
    cat >"$dir/nginx.conf" <<EOF
$user_line
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections 8192;
}
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default;
    # ingestd does not, so lift the limit to compare like with like.
    keepalive_requests 100000000;
    keepalive_timeout 60s;
    server {
        listen 127.0.0.1:$port;
        location = /v1/data {
            client_max_body_size 1m;
            if (\$request_method = POST) {
                return 204;
            }
            return 405;
        }
    }
}
EOF
    nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_port "$port" "$pid"; then
        echo "http.sh: nginx did not start; its error log:" >&2
        cat "$dir/error.log" >&2 || true
        return 1
    fi
    echo "== nginx $(nginx -v 2>&1 | sed 's/.*\///'), worker_processes" \
        "$workers, port $port" >&2
    for c in $CONNECTIONS; do
        BENCH_KEY="" run_wrk "$port" "$c"
        NGINX_LINE[$c]=$WRK_LINE
        echo "   nginx c=$c: ${NGINX_LINE[$c]}" >&2
    done
    stop_pid "$pid"
    forget_pid "$pid"
}

# ---- ingestd --------------------------------------------------------------

declare -A INGESTD_LINE FSYNCS
declare -A CHECK

write_ingestd_config() {
    local dir=$1 port=$2 admin=$3 mode=$4
    cat >"$dir/ingestd.yaml" <<EOF
log:
  level: warn
data_dir: $dir/data
http:
  listen: 127.0.0.1:$port
  workers: $WORKERS
  max_connections: 8192
admin:
  listen: 127.0.0.1:$admin
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

# Counts the records in the file sink's output.
output_lines() {
    local out=$1
    if compgen -G "$out/*.ndjson" >/dev/null; then
        cat "$out"/*.ndjson | wc -l
    else
        echo 0
    fi
}

run_ingestd() {
    local mode=$1 dir=$TMP/ingestd-$1 port admin pid key c line
    local before after acked=0 lines=0 stable=0 waited=0 prev=-1 unique
    local served
    mkdir -p "$dir"
    port=$(free_port)
    admin=$(free_port)
    write_ingestd_config "$dir" "$port" "$admin" "$mode"
    if ! key=$("$INGESTD" device add bench-1 -c "$dir/ingestd.yaml" |
        grep '^ik_'); then
        echo "http.sh: \`ingestd device add\` printed no API key" >&2
        return 1
    fi
    "$INGESTD" serve -c "$dir/ingestd.yaml" 2>"$dir/ingestd.log" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_port "$port" "$pid"; then
        echo "http.sh: ingestd did not start; its log:" >&2
        cat "$dir/ingestd.log" >&2
        return 1
    fi
    echo "== ingestd durability=$mode workers=$WORKERS port $port" >&2
    for c in $CONNECTIONS; do
        before=$(metric_sum "$admin" ingestd_spool_fsync_seconds_count)
        BENCH_KEY=$key BENCH_DEVICE=bench-1 run_wrk "$port" "$c"
        line=$WRK_LINE
        after=$(metric_sum "$admin" ingestd_spool_fsync_seconds_count)
        INGESTD_LINE[$mode,$c]=$line
        FSYNCS[$mode,$c]=$((after - before))
        acked=$((acked + $(field "$line" requests) - $(field "$line" non2xx)))
        echo "   ingestd/$mode c=$c: $line fsyncs=${FSYNCS[$mode,$c]}" >&2
    done

    # Wait until the sink has written everything: the output stops growing
    # for 2 s after reaching at least what wrk saw acknowledged.
    while [ "$waited" -lt $((DRAIN_TIMEOUT * 2)) ]; do
        lines=$(output_lines "$dir/data/out")
        if [ "$lines" -eq "$prev" ] && [ "$lines" -ge "$acked" ]; then
            stable=$((stable + 1))
            [ "$stable" -ge 4 ] && break
        else
            stable=0
        fi
        prev=$lines
        sleep 0.5
        waited=$((waited + 1))
    done
    served=$(metric_series "$admin" \
        'ingestd_http_requests_total{listener="api",status="202"}')
    unique=0
    if compgen -G "$dir/data/out/*.ndjson" >/dev/null; then
        unique=$(cat "$dir/data/out"/*.ndjson |
            grep -o '"message_id":"[^"]*"' | sort -u | wc -l)
    fi
    stop_pid "$pid"
    forget_pid "$pid"

    # wrk stops with up to one request in flight per connection. ingestd
    # may acknowledge those after wrk stopped counting, so the output must
    # match ingestd's own count of 202 responses, and be at least wrk's.
    local summary="ingestd sent $served 202 responses (wrk counted $acked);"
    summary="$summary output has $lines records, $unique distinct ids"
    if [ "$lines" -eq "$served" ] && [ "$lines" -ge "$acked" ] &&
        [ "$unique" -eq "$lines" ]; then
        CHECK[$mode]="ok: $summary"
    else
        CHECK[$mode]="FAILED: $summary (expected $served distinct records)"
        CHECK_FAILED=1
    fi
    echo "   ${CHECK[$mode]}" >&2
}

# ---- report ---------------------------------------------------------------

ms() {
    awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'
}

report() {
    local mode c n i ratio fs per
    echo
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo |
        sed 's/.*: //')), shared by servers and wrk"
    echo "Spool folder on: $(findmnt -n -o FSTYPE -T "$TMP") ($TMP)"
    echo "wrk: $THREADS threads, ${DURATION}s per run, 1 reading per request"
    echo

    printf '%-10s %6s %10s %10s %6s %15s %15s %8s %10s\n' \
        durability conns nginx_rps ingestd_rps ratio \
        "nginx_p50/p99" "ingestd_p50/p99" fsyncs acks/fsync
    for mode in $MODES; do
        for c in $CONNECTIONS; do
            n=${NGINX_LINE[$c]}
            i=${INGESTD_LINE[$mode,$c]}
            ratio=$(awk -v a="$(field "$i" rps)" -v b="$(field "$n" rps)" \
                'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
            fs=${FSYNCS[$mode,$c]}
            per=$(awk -v r="$(field "$i" requests)" -v f="$fs" \
                'BEGIN { if (f > 0) printf "%.1f", r / f; else print "-" }')
            printf '%-10s %6s %10.0f %10.0f %6s %15s %15s %8s %10s\n' \
                "$mode" "$c" "$(field "$n" rps)" "$(field "$i" rps)" \
                "$ratio" \
                "$(ms "$(field "$n" p50_us)")/$(ms "$(field "$n" p99_us)")" \
                "$(ms "$(field "$i" p50_us)")/$(ms "$(field "$i" p99_us)")" \
                "$fs" "$per"
            if [ "$(field "$i" non2xx)" != 0 ]; then
                echo "  note: ingestd answered $(field "$i" non2xx)" \
                    "requests with a status other than 2xx"
            fi
        done
    done
    echo "Latencies in ms. ratio = ingestd_rps / nginx_rps."

    echo
    for mode in $MODES; do
        echo "Output check ($mode): ${CHECK[$mode]}"
    done
}

CHECK_FAILED=0
run_nginx
for m in $MODES; do
    run_ingestd "$m"
done
report
exit "$CHECK_FAILED"
