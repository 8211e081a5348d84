#!/bin/sh
# Installs the Debian 12 packages that building, running and testing ingestd
# need. Packages already present are skipped, so a second run is quick.
# Usage: scripts/install-deps.sh [build|test|fuzz|deploy]
set -eu

build_pkgs="build-essential cmake pkg-config libuv1-dev node-llhttp \
libjansson-dev libyaml-dev libsqlite3-dev libssl-dev libpcre2-dev \
libwslay-dev libpaho-mqtt-dev librdkafka-dev libhiredis-dev \
librabbitmq-dev libnats-dev libmosquitto-dev libsystemd-dev"
test_pkgs="libcmocka-dev curl openssl python3 python3-requests python3-pytest \
sqlite3 wrk nginx-light mosquitto mosquitto-clients \
python3-websockets kcat python3-paho-mqtt redis-server redis-tools \
rabbitmq-server python3-pika nats-server python3-cryptography \
haproxy prometheus python3-yaml"
# kubectl renders the Kubernetes manifests in the tests. Debian's
# kubernetes-client ships /usr/bin/kubectl, which another package (such as
# Google's kubectl) may already own, so it is added only when no kubectl
# is on PATH.
if ! command -v kubectl >/dev/null 2>&1; then
    test_pkgs="$test_pkgs kubernetes-client"
fi
fuzz_pkgs="clang"
# tests/deploy/test_image.sh: a Debian base image and the image build.
deploy_pkgs="debootstrap podman"

want="$build_pkgs"
case "${1:-build}" in
build) ;;
test) want="$want $test_pkgs" ;;
fuzz) want="$want $test_pkgs $fuzz_pkgs" ;;
deploy) want="$want $test_pkgs $deploy_pkgs" ;;
*)
    echo "usage: scripts/install-deps.sh [build|test|fuzz|deploy]" >&2
    exit 2
    ;;
esac

missing=""
for p in $want; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
        grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages:$missing" >&2
    echo "install-deps: run this script as root to install them" >&2
    exit 1
fi

echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The nginx package is only a benchmark reference; keep its service from
# starting on port 80 while it installs.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
