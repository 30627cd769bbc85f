#!/usr/bin/env bash
# A cross-cluster gRPC call: a pod in east calls hello in west through east's gateway
# (mirror Service hello--west), then the federated name (any cluster exporting hello).
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need kubectl

call() {
    local target="$1" authority="$2"
    kubectl --context "$(ctx east)" -n demo run "grpc-call-$RANDOM" --rm -i --restart=Never --quiet \
        --image "$IMAGE" --command -- python3 -c \
        "from federation.demo.samples import grpc_say; print(grpc_say('$target', 'kind', authority='$authority'))"
}

log "east -> west (hello--west.demo)"
out="$(call hello--west.demo.svc.cluster.local:9090 hello.demo.west.isthmus.local:9090)"
printf '%s\n' "$out"
case "$out" in *"from west"*) ;; *) die "expected an answer from west" ;; esac

log "east -> any cluster exporting hello (hello--isthmus.demo)"
call hello--isthmus.demo.svc.cluster.local:9090 hello.demo.isthmus.local:9090
log "cross-cluster gRPC works"
