#!/usr/bin/env bash
# Benchmarks broker sinks: how many records per second ingestd forwards
# from its spool to a real broker on 127.0.0.1. The Python scripts run the
# brokers from tests/integration/brokers.py and document their steps:
#   nats, mqtt, redis  bench/sink_forward.py
#   rabbitmq           bench/sink_rabbitmq.py
#
# Usage: bench/sinks.sh [BROKER...]   (default: nats mqtt redis rabbitmq)
# Environment (all optional; the scripts document the rest):
#   BUILD          build folder with ingestd (default: build it in
#                  build-bench)
#   BENCH_RECORDS  readings to forward per broker
#   BENCH_BATCH    the sink's batch_records
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3
# A bound on each script, which bounds each of its own waits too.
RUN_TIMEOUT=1200

if [ "$#" -eq 0 ]; then
    set -- nats mqtt redis rabbitmq
fi
forward=()
rabbitmq=0
for broker in "$@"; do
    case "$broker" in
    nats | mqtt | redis) forward+=("$broker") ;;
    rabbitmq) rabbitmq=1 ;;
    *)
        echo "sinks.sh: unknown broker \"$broker\"; use nats, mqtt," \
            "redis or rabbitmq" >&2
        exit 2
        ;;
    esac
done

"$ROOT/scripts/install-deps.sh" test

if [ -z "${BUILD:-}" ]; then
    BUILD=$ROOT/build-bench
    echo "== building ingestd in $BUILD" >&2
    cmake -S "$ROOT" -B "$BUILD" -DWITH_TESTS=OFF >/dev/null
    cmake --build "$BUILD" --target ingestd nats_consume -j "$(nproc)" \
        >/dev/null
fi
export INGESTD_BIN=$BUILD/ingestd
if [ ! -x "$INGESTD_BIN" ]; then
    echo "sinks.sh: $INGESTD_BIN not found or not executable" >&2
    exit 1
fi

if [ "${#forward[@]}" -gt 0 ]; then
    timeout "$RUN_TIMEOUT" "$PY" "$ROOT/bench/sink_forward.py" \
        "${forward[@]}"
fi
if [ "$rabbitmq" = 1 ]; then
    timeout "$RUN_TIMEOUT" "$PY" "$ROOT/bench/sink_rabbitmq.py"
fi
