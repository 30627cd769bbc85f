#!/usr/bin/env bash
# Deploy the demo "hello" service (HTTP + gRPC, answers with its cluster's name) in west and
# central, exported with the isthmus.io/export annotation; east only gets the namespace.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need kubectl

for c in "${CLUSTERS[@]}"; do
    kubectl --context "$(ctx "$c")" create namespace demo --dry-run=client -o yaml | kubectl --context "$(ctx "$c")" apply -f -
done
for c in west central; do
    log "deploying hello in $c"
    sed -e "s/CLUSTER_NAME/$c/g" -e "s|ISTHMUS_IMAGE|$IMAGE|g" "$HERE/demo/hello.yaml" | kubectl --context "$(ctx "$c")" apply -f -
    kubectl --context "$(ctx "$c")" -n demo rollout status deployment/hello --timeout 180s
done
log "waiting for east's agent to mirror hello from west and central"
for _ in $(seq 1 60); do
    if kubectl --context "$(ctx east)" -n demo get service hello--west hello--central hello--isthmus >/dev/null 2>&1; then
        kubectl --context "$(ctx east)" -n demo get services -l isthmus.io/mirrored-from
        exit 0
    fi
    sleep 2
done
die "east has no mirrors of hello after 120s: kubectl --context $(ctx east) -n isthmus-system logs deploy/isthmus-agent"
