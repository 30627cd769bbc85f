#!/usr/bin/env bash
# Build the Isthmus image (deploy/image/Dockerfile) and load it into every kind cluster.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need docker kind

log "building $IMAGE"
docker build -t "$IMAGE" -f "$REPO/deploy/image/Dockerfile" "$REPO"
for c in "${CLUSTERS[@]}"; do
    log "loading $IMAGE into isthmus-$c"
    kind load docker-image "$IMAGE" --name "isthmus-$c"
done
