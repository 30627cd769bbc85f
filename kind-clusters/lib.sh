#!/usr/bin/env bash
# Shared settings and helpers for the kind-clusters scripts (sourced, not run).
# Needs: docker, kind (>= 0.23, Kubernetes >= 1.30), kubectl, python3 with isthmus
# installed (`python3 -m pip install .` at the repo root) for the `isthmus` CLI.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# Where the federation's trust folder, the admin certificate and join folders go.
WORK="${ISTHMUS_KIND_WORK:-$HERE/.work}"
IMAGE="${ISTHMUS_IMAGE:-isthmus:dev}"
# shellcheck disable=SC2034  # used by the scripts that source this file
CLUSTERS=(east west central)
FEDERATION_CLUSTER="central"   # hosts the federation service (and is a member too)
FED_NODE_PORT=30743            # mTLS API; the join port is this + 1 (30744)
export HERE REPO WORK IMAGE FEDERATION_CLUSTER FED_NODE_PORT

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is required (see kind-clusters/README.md)"
    done
}

ctx() { printf 'kind-isthmus-%s' "$1"; }

# The IP of a kind cluster's node on the shared "kind" docker network.
node_ip() {
    docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "isthmus-$1-control-plane"
}

federation_address() { printf '%s:%s' "$(node_ip "$FEDERATION_CLUSTER")" "$FED_NODE_PORT"; }
