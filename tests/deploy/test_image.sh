#!/bin/bash
# Builds the container image from deploy/Dockerfile with podman and tests
# the result: image settings, the runtime libraries, and ingestd serving a
# reading as the ingestd user from the image's own filesystem.
#
# Slow (a debootstrap of Debian 12 on the first run, then an image build
# of a few minutes) and needs root, podman, debootstrap and a Debian
# mirror, so it runs only with INGESTD_DEPLOY_TESTS=1:
#
#   INGESTD_DEPLOY_TESTS=1 tests/deploy/test_image.sh
#
# The base image debian:12-local is made with debootstrap from the mirror
# apt uses on this machine (DEBIAN_MIRROR overrides it) and kept for the
# next run; INGESTD_DEPLOY_REBUILD_BASE=1 makes it again.
#
# `podman run` fails in sandboxes that forbid setrlimit or cgroups, so
# the test does not depend on it: it exports the image's filesystem and
# runs ingestd there with chroot --userspec, bound to 127.0.0.1 only.
set -euo pipefail

if [ "${INGESTD_DEPLOY_TESTS:-0}" != 1 ]; then
    echo "test_image: skipped; set INGESTD_DEPLOY_TESTS=1 to build and" \
        "test the container image (slow, needs root and a Debian mirror)"
    exit 0
fi

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${INGESTD_DEPLOY_WORK:-/var/tmp/ingestd-deploy-test}
base_image=localhost/debian:12-local
image=localhost/ingestd:deploy-test
fs=$work/fs
ctr=""
pid=""
mounted=()

fail() {
    echo "test_image: FAIL: $*" >&2
    exit 1
}

cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[$i]}" 2>/dev/null || true
    done
    if [ -n "$ctr" ]; then
        podman rm -f "$ctr" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || fail "run as root: debootstrap, podman and chroot need it"
for tool in podman debootstrap curl; do
    command -v "$tool" >/dev/null ||
        fail "$tool is missing; run scripts/install-deps.sh deploy"
done

# Prints the URI of the Debian archive (not the security archive) that
# apt is configured with, from deb822 sources or the one-line format.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '/^URIs:/ { uri = $2 }
             /^Suites:/ && / bookworm( |$)/ && uri !~ /security/ {
                 print uri; exit }' "$f"
    done | head -n 1
    if [ -f /etc/apt/sources.list ]; then
        awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' \
            /etc/apt/sources.list
    fi
}

mkdir -p "$work"

# Step 1: the base image.
if [ "${INGESTD_DEPLOY_REBUILD_BASE:-0}" = 1 ] ||
    ! podman image exists "$base_image"; then
    mirror=${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}
    [ -n "$mirror" ] || fail "no bookworm mirror in the apt sources; set DEBIAN_MIRROR"
    echo "test_image: debootstrap bookworm from $mirror"
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" \
        >"$work/debootstrap.log" 2>&1 ||
        fail "debootstrap failed; see $work/debootstrap.log"
    tar -C "$work/rootfs" -c . | podman import - "$base_image" >/dev/null
    rm -rf "$work/rootfs"
fi

# Step 2: the image. Docker format keeps HEALTHCHECK, which OCI drops.
echo "test_image: building $image"
podman build --isolation=chroot --format docker \
    --build-arg BASE_IMAGE="$base_image" -f "$repo/deploy/Dockerfile" \
    -t "$image" "$repo" >"$work/build.log" 2>&1 ||
    fail "podman build failed; see $work/build.log"

# Step 3: the image settings.
inspect() {
    podman image inspect --format "$1" "$image"
}
[ "$(inspect '{{.Config.User}}')" = 10001:10001 ] ||
    fail "image user is $(inspect '{{.Config.User}}'), expected 10001:10001"
[ "$(inspect '{{.Config.StopSignal}}')" = SIGTERM ] ||
    fail "stop signal is $(inspect '{{.Config.StopSignal}}')"
inspect '{{json .Config.Volumes}}' | grep -q '"/var/lib/ingestd"' ||
    fail "/var/lib/ingestd is not a volume: $(inspect '{{json .Config.Volumes}}')"
inspect '{{json .Config.Healthcheck}}' | grep -q 'healthcheck' ||
    fail "no HEALTHCHECK: $(inspect '{{json .Config.Healthcheck}}')"
for port in 8080 1883 9100; do
    inspect '{{json .Config.ExposedPorts}}' | grep -q "\"$port/tcp\"" ||
        fail "port $port is not exposed"
done

# Step 4: podman run, tried once and reported, never required.
if run_out=$(timeout 60 podman run --rm "$image" --version 2>&1); then
    echo "test_image: podman run works: $run_out"
else
    echo "test_image: podman run failed here (expected in sandboxes);" \
        "testing a chroot of the image instead:"
    echo "$run_out" | sed 's/^/    /' | tail -n 3
fi

# Step 5: the image's filesystem, extracted with owners kept. A mount
# left by an interrupted run would make rm -rf reach into /proc or /dev.
if grep -q " $fs/" /proc/self/mounts; then
    fail "mounts left under $fs by an earlier run; unmount them first"
fi
rm -rf "$fs"
mkdir -p "$fs"
ctr=$(podman create "$image")
podman export "$ctr" | tar -x -p -C "$fs"
podman rm "$ctr" >/dev/null
ctr=""

[ ! -e "$fs/usr/bin/cc" ] || fail "the runtime image contains a compiler"
[ ! -e "$fs/usr/bin/cmake" ] || fail "the runtime image contains cmake"
for dir in /var/lib/ingestd /var/lib/ingestd-registry; do
    [ "$(stat -c %u:%g "$fs$dir")" = 10001:10001 ] ||
        fail "$dir is owned by $(stat -c %u:%g "$fs$dir"), not 10001:10001"
done

mount -t proc proc "$fs/proc"
mounted+=("$fs/proc")
for dev in null zero urandom random; do
    touch "$fs/dev/$dev"
    mount --bind "/dev/$dev" "$fs/dev/$dev"
    mounted+=("$fs/dev/$dev")
done

as_ingestd() {
    chroot --userspec=10001:10001 "$fs" "$@"
}

# The dynamic loader resolves every NEEDED library before main runs, so
# --version fails if a runtime package is missing.
version=$(as_ingestd /usr/local/bin/ingestd --version) ||
    fail "ingestd does not start in the image; a runtime library is missing?"
echo "test_image: $version runs in the image"
as_ingestd /usr/local/bin/ingestd check-config -c /etc/ingestd/ingestd.yaml \
    >/dev/null || fail "the image's own config does not load"

# Step 6: serve on loopback with the image's config, its listeners moved
# from 0.0.0.0 to free ports on 127.0.0.1.
read -r http_port mqtt_port admin_port < <(/usr/bin/python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
sed -e "s/0\.0\.0\.0:8080/127.0.0.1:$http_port/" \
    -e "s/0\.0\.0\.0:1883/127.0.0.1:$mqtt_port/" \
    -e "s/0\.0\.0\.0:9100/127.0.0.1:$admin_port/" \
    "$fs/etc/ingestd/ingestd.yaml" >"$fs/etc/ingestd/test.yaml"
! grep -q '0\.0\.0\.0' "$fs/etc/ingestd/test.yaml" ||
    fail "test config still binds 0.0.0.0"
config=/etc/ingestd/test.yaml

key=$(as_ingestd /usr/local/bin/ingestd device add sensor-1 -c "$config" |
    grep '^ik_') || fail "device add failed"

# A plain command, not the function: then $! is chroot, which execs
# ingestd, so the signals below reach ingestd itself.
chroot --userspec=10001:10001 "$fs" /usr/local/bin/ingestd serve \
    -c "$config" >"$work/serve.log" 2>&1 &
pid=$!
ready=0
for _ in $(seq 100); do
    if as_ingestd /usr/local/bin/ingestd healthcheck --ready -c "$config" \
        >/dev/null 2>&1; then
        ready=1
        break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
[ "$ready" = 1 ] || fail "ingestd not ready within 10 s: $(cat "$work/serve.log")"
as_ingestd /usr/local/bin/ingestd healthcheck -c "$config" >/dev/null ||
    fail "healthcheck of /healthz failed"

body='{"device_id":"sensor-1","timestamp":"2026-12-04T17:00:00Z","sensor_value":42.5}'
status=$(curl -s -o "$work/post.out" -w '%{http_code}' --max-time 10 \
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d "$body" "http://127.0.0.1:$http_port/v1/data")
[ "$status" = 202 ] || fail "POST returned $status: $(cat "$work/post.out")"
id=$(/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["ids"][0])' \
    <"$work/post.out")

delivered=0
for _ in $(seq 100); do
    if cat "$fs"/var/lib/ingestd/out/*.ndjson 2>/dev/null | grep -q "$id"; then
        delivered=1
        break
    fi
    sleep 0.1
done
[ "$delivered" = 1 ] || fail "reading $id not in the file sink output"

kill -TERM "$pid"
code=0
wait "$pid" || code=$?
pid=""
[ "$code" = 0 ] || fail "ingestd exited with $code after SIGTERM: $(tail -n 20 "$work/serve.log")"

owners=$(find "$fs/var/lib/ingestd" ! -user 10001 -printf '%p\n')
[ -z "$owners" ] || fail "files not owned by the ingestd user: $owners"

echo "test_image: OK ($image: healthcheck, POST 202, file sink, SIGTERM exit 0)"
