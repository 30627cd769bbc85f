#!/usr/bin/env bash
# Make the federation root (trust folder + an admin certificate) on this machine and run the
# federation service with its 3-member etcd in the central cluster, reachable from the
# other clusters on a node port of central's node.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need docker kubectl isthmus

mkdir -p "$WORK"
chmod 700 "$WORK"
if [ ! -f "$WORK/trust/root.crt" ]; then
    log "creating the federation root in $WORK/trust"
    isthmus trust init --dir "$WORK/trust" --trust-domain isthmus.local
    isthmus trust issue-admin ops --dir "$WORK/trust" --out-dir "$WORK/admin"
fi

context="$(ctx "$FEDERATION_CLUSTER")"
ip="$(node_ip "$FEDERATION_CLUSTER")"
kubectl --context "$context" apply -f - <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: isthmus-system
  labels:
    app.kubernetes.io/part-of: isthmus
YAML
log "storing the trust folder in Secret isthmus-federation-trust"
files=()
for f in root.crt root.key bundle.pem crl.pem; do
    [ -f "$WORK/trust/$f" ] && files+=("--from-file=$WORK/trust/$f")
done
kubectl --context "$context" -n isthmus-system create secret generic isthmus-federation-trust "${files[@]}" \
    --dry-run=client -o yaml | kubectl --context "$context" apply -f -

# A throw-away overlay: the kind image, node ports, and the node IP in the server certificate.
overlay="$WORK/federation-overlay"
mkdir -p "$overlay"
cat >"$overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $REPO/deploy/overlays/federation
images:
  - name: ghcr.io/isthmus-project/isthmus
    newName: ${IMAGE%:*}
    newTag: ${IMAGE##*:}
patches:
  - target: {kind: Service, name: isthmus-federation}
    patch: |-
      - {op: replace, path: /spec/type, value: NodePort}
      - {op: add, path: /spec/ports/0/nodePort, value: $FED_NODE_PORT}
      - {op: add, path: /spec/ports/1/nodePort, value: $((FED_NODE_PORT + 1))}
  - target: {kind: Deployment, name: isthmus-federation}
    patch: |-
      - {op: add, path: /spec/template/spec/containers/0/args/-, value: --advertise=$ip}
YAML
log "installing the federation service and etcd in $context"
kubectl --context "$context" apply -k "$overlay"
kubectl --context "$context" -n isthmus-system rollout status statefulset/isthmus-etcd --timeout 300s
kubectl --context "$context" -n isthmus-system rollout status deployment/isthmus-federation --timeout 300s
log "federation at $(federation_address)"
