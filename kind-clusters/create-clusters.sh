#!/usr/bin/env bash
# Create the three kind clusters (east, west, central) with distinct subnets.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need docker kind kubectl

for c in "${CLUSTERS[@]}"; do
    if kind get clusters 2>/dev/null | grep -qx "isthmus-$c"; then
        log "cluster isthmus-$c exists"
    else
        log "creating cluster isthmus-$c"
        kind create cluster --config "$HERE/$c.yaml" --wait 120s
    fi
done
