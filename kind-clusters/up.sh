#!/usr/bin/env bash
# Everything, in order: clusters, image, federation, joins, demo, a cross-cluster gRPC call.
# Tear down with ./down.sh.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need docker kind kubectl isthmus python3

"$HERE/create-clusters.sh"
"$HERE/build-image.sh"
"$HERE/install-federation.sh"
"$HERE/join-all.sh"
"$HERE/deploy-demo.sh"
"$HERE/call.sh"
