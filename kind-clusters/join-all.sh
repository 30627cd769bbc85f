#!/usr/bin/env bash
# Join every kind cluster with `isthmus join-cluster` (gateway on a NodePort: kind has no
# load balancer), then run `isthmus check` in each.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need docker kubectl isthmus python3

fed="$(federation_address)"
for c in "${CLUSTERS[@]}"; do
    log "joining $c to the federation at $fed"
    token_json="$(isthmus federation token create --cluster "$c" --ttl 15m --federation "$fed" --cert-dir "$WORK/admin" -o json)"
    token="$(printf '%s' "$token_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
    pin="$(printf '%s' "$token_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_pin"])')"
    isthmus join-cluster "$c" --context "$(ctx "$c")" --federation "$fed" --token "$token" --ca-pin "$pin" \
        --gateway-service-type NodePort --image "$IMAGE" --out-dir "$WORK/clusters/$c" --label "kind=$c"
done
for c in "${CLUSTERS[@]}"; do
    kubectl --context "$(ctx "$c")" -n isthmus-system rollout status deployment/isthmus-gateway --timeout 180s
    kubectl --context "$(ctx "$c")" -n isthmus-system rollout status deployment/isthmus-agent --timeout 180s
    isthmus check --context "$(ctx "$c")"
done
