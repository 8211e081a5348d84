#!/usr/bin/env bash
# Benchmarks the cost of idempotency keys on HTTP ingest and the memory of
# the idempotency index.
#
# 1. One ingestd (spool durability fsync, file sink) serves three kinds of
#    wrk runs in turn, BENCH_ROUNDS times: no key, a new Idempotency-Key
#    header per request, and a new msg_id field per reading
#    (bench/post_idempotency.lua). Every key is new, so each request costs
#    one index insert, one more envelope field and the follower's log write.
# 2. bench/idempotency_memory.c fills an index with BENCH_KEYS keys and
#    prints its byte count, the RSS growth and insert and lookup times.
#
# Usage: bench/idempotency.sh
# Environment (all optional):
#   BENCH_DURATION     seconds per wrk run (default 10)
#   BENCH_ROUNDS       rounds of the three runs (default 2)
#   BENCH_CONNECTIONS  wrk connections (default 64)
#   BENCH_KEYS         keys for the memory run (default 1000000)
#   BENCH_TMPDIR       parent of the temporary folder, on a real disk
#                      (default /var/tmp)
#   BENCH_KEEP         1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-2}
CONNS=${BENCH_CONNECTIONS:-64}
KEYS=${BENCH_KEYS:-1000000}
PY=/usr/bin/python3
BUILD=$ROOT/build-bench-idem
START_TIMEOUT=20
STOP_TIMEOUT=30

for v in "$DURATION" "$ROUNDS" "$CONNS" "$KEYS"; do
    case "$v" in
    '' | *[!0-9]*)
        echo "idempotency.sh: settings must be whole numbers, got \"$v\"" >&2
        exit 2
        ;;
    esac
done
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 600 ] ||
    [ "$ROUNDS" -lt 1 ] || [ "$ROUNDS" -gt 10 ] ||
    [ "$CONNS" -lt 1 ] || [ "$CONNS" -gt 1024 ] ||
    [ "$KEYS" -lt 1 ] || [ "$KEYS" -gt 50000000 ]; then
    echo "idempotency.sh: BENCH_DURATION 1-600, BENCH_ROUNDS 1-10," \
        "BENCH_CONNECTIONS 1-1024, BENCH_KEYS 1-50000000" >&2
    exit 2
fi

echo "== building in $BUILD" >&2
cmake -S "$ROOT" -B "$BUILD" -DWITH_TESTS=OFF -DCMAKE_BUILD_TYPE=Release \
    >/dev/null
cmake --build "$BUILD" --target ingestd -j "$(nproc)" >/dev/null
# shellcheck disable=SC2046
cc -O2 -std=gnu17 -D_GNU_SOURCE -I"$ROOT/src" \
    "$ROOT/bench/idempotency_memory.c" "$BUILD/libingestd_pipeline.a" \
    "$BUILD/libingestd_spool.a" "$BUILD/libingestd_core.a" \
    $(pkg-config --libs jansson) -lpthread -lm -o "$BUILD/idempotency_memory"
INGESTD=$BUILD/ingestd

TMP=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ingestd-idem.XXXXXX")
SERVER_PID=

cleanup() {
    local waited=0
    if [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null; then
        while kill -0 "$SERVER_PID" 2>/dev/null; do
            if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
                kill -KILL "$SERVER_PID" 2>/dev/null || true
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "== kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'echo "idempotency.sh: interrupted" >&2; exit 130' INT TERM

free_port() {
    "$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

PORT=$(free_port)
ADMIN=$(free_port)
MQTT=$(free_port)
cat >"$TMP/ingestd.yaml" <<YAML
log:
  level: warn
data_dir: $TMP/data
http:
  listen: 127.0.0.1:$PORT
admin:
  listen: 127.0.0.1:$ADMIN
mqtt:
  listen: 127.0.0.1:$MQTT
auth:
  max_failures_per_minute: 0
device_types:
  default:
    schema: $ROOT/schemas/reading.json
sinks:
  - name: out
    type: file
    path: $TMP/data/out
YAML
KEY=$("$INGESTD" device add bench-1 -c "$TMP/ingestd.yaml" | awk '/^ *ik_/ {print $1}')
"$INGESTD" serve -c "$TMP/ingestd.yaml" >"$TMP/ingestd.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 $((START_TIMEOUT * 10))); do
    curl -fs --max-time 1 "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || {
        cat "$TMP/ingestd.log" >&2
        exit 1
    }
    sleep 0.1
done

printf '%-7s %-6s %10s %9s %9s %7s\n' round keys rps p50_us p99_us non2xx
for round in $(seq 1 "$ROUNDS"); do
    for mode in none header field; do
        out=$TMP/wrk.out
        BENCH_KEY=$KEY BENCH_IDEM=$mode BENCH_PREFIX="$round$mode" \
            timeout $((DURATION + 30)) wrk -t 2 -c "$CONNS" \
            -d "${DURATION}s" --timeout 10s \
            -s "$ROOT/bench/post_idempotency.lua" \
            "http://127.0.0.1:$PORT/v1/data" >"$out" 2>&1
        line=$(grep '^BENCH ' "$out")
        get() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$line"; }
        printf '%-7s %-6s %10s %9s %9s %7s\n' "$round" "$mode" "$(get rps)" \
            "$(get p50_us)" "$(get p99_us)" "$(get non2xx)"
    done
done
curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN/metrics" |
    grep -E '^ingestd_idempotency_(keys|bytes|hits_total|evictions_total)' ||
    true
ps -o rss= -p "$SERVER_PID" | awk '{printf "ingestd_rss_kib %s\n", $1}'

echo "== index memory, $KEYS keys" >&2
"$BUILD/idempotency_memory" "$KEYS"
