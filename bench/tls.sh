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
# MQTT: tests/tools/mqtt_load has no TLS option, so the MQTTS ingest rate
# is not measured here.
#
# Usage: bench/tls.sh
# Environment (all optional):
#   BENCH_DURATION     seconds per measurement (default 10)
#   BENCH_CONNECTIONS  wrk connections (default 64)
#   BENCH_THREADS      wrk threads (default 2)
#   BENCH_DURABILITY   spool durability, fsync or none (default none, so
#                      that the fsync wait does not hide the CPU cost)
#   BENCH_WORKERS      ingestd http.workers (default 0: one per core)
#   BENCH_TMPDIR       parent of the temporary folder (default /var/tmp)
#   INGESTD            ingestd binary (default: build it in build-bench)
#   BENCH_KEEP         1 keeps the temporary folder for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
MODE=${BENCH_DURABILITY:-none}
WORKERS=${BENCH_WORKERS:-0}
PY=/usr/bin/python3
START_TIMEOUT=20
STOP_TIMEOUT=30

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

"$ROOT/scripts/install-deps.sh" test

if [ -z "${INGESTD:-}" ]; then
    INGESTD=$ROOT/build-bench/ingestd
    echo "== building ingestd in $ROOT/build-bench" >&2
    cmake -S "$ROOT" -B "$ROOT/build-bench" -DWITH_TESTS=OFF >/dev/null
    cmake --build "$ROOT/build-bench" --target ingestd -j "$(nproc)" \
        >/dev/null
fi
[ -x "$INGESTD" ] || fail "ingestd binary $INGESTD not found"

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

# Starts ingestd with tls.client_auth $1 and prints nothing; the API key
# of device bench-1 is in $TMP/key.
start_server() {
    local client_auth=$1 dir=$TMP/ingestd-$1
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

start_server none
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

start_server optional
echo "== handshakes with a client certificate, tls.client_auth optional" >&2
MTLS=$(handshakes "$HTTPS_PORT" -new -cert "$PKI/dev-1.crt" \
    -key "$PKI/dev-1.key")
echo "   full with client certificate: $MTLS/s" >&2
stop_server

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
