#!/usr/bin/env bash
# Delete the three kind clusters and the local work folder (trust root, join folders).
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need kind

for c in "${CLUSTERS[@]}"; do
    log "deleting cluster isthmus-$c"
    kind delete cluster --name "isthmus-$c" || true
done
case "$WORK" in
    "$HERE"/.work) rm -rf "$WORK" ;;
    *) log "leaving $WORK in place (not the default work folder)" ;;
esac
