#!/bin/sh
# Renders the Kubernetes manifests with `kubectl kustomize` and checks
# their key fields, validates deploy/compose.yaml, and verifies the
# systemd unit, all offline. `make test` runs the same checks, because
# they live in tests/integration/test_deploy_manifests.py.
#
# Usage: tests/deploy/test_manifests.sh  (INGESTD_BIN defaults to
# build/ingestd, which check-config runs on the mounted configs)
set -eu
cd "$(dirname "$0")/../.."
INGESTD_BIN=${INGESTD_BIN:-$(pwd)/build/ingestd}
export INGESTD_BIN
exec /usr/bin/python3 -m pytest -q tests/integration/test_deploy_manifests.py
