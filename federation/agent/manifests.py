"""The per-cluster install (gateway + agent) as Kubernetes objects, rendered from Python.

``isthmus join-cluster`` applies exactly these objects; ``deploy/base/{namespace,gateway,agent}``
hold the same objects as kustomize files, and a golden test (tests/agent/test_manifests.py)
checks that ``kubectl kustomize deploy/overlays/cluster`` (and ``cluster-nodeport``) renders
what :func:`workloads` returns, so the two cannot drift apart.  What is specific to one
cluster — the ConfigMap ``isthmus-config`` and the four Secrets — is rendered only here
(:func:`cluster_config`, :func:`secrets`); deploy/README.md lists their keys for anyone
installing by hand.

Names here are stable API (the agent, the gateway's probes and the kind scripts use them).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from federation import names

from . import _names as n

VERSION = "0.1.0"
IMAGE = f"ghcr.io/isthmus-project/isthmus:{VERSION}"
NAMESPACE = names.SYSTEM_NAMESPACE
AGENT_HEALTH_PORT = 15020

CONFIG_MAP = "isthmus-config"
SECRET_CA = "isthmus-cluster-ca"
SECRET_GATEWAY = "isthmus-gateway-tls"
SECRET_AGENT = "isthmus-agent-tls"
SECRET_TRUST = "isthmus-trust"
SECRETS = (SECRET_CA, SECRET_GATEWAY, SECRET_AGENT, SECRET_TRUST)
SERVICE_TYPES = ("LoadBalancer", "NodePort")

Obj = dict[str, Any]


def labels(component: str) -> dict[str, str]:
    """Kubernetes recommended labels."""
    return {
        "app.kubernetes.io/name": f"isthmus-{component}",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "isthmus",
        "app.kubernetes.io/version": VERSION,
        "app.kubernetes.io/managed-by": "isthmus",
    }


def _selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": f"isthmus-{component}"}


def _meta(name: str, component: str, namespaced: bool = True, **extra: Any) -> Obj:
    m: Obj = {"name": name, "labels": labels(component)}
    if namespaced:
        m["namespace"] = NAMESPACE
    m.update(extra)
    return m


def namespace() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {**labels("system"), "pod-security.kubernetes.io/enforce": "restricted"}},
    }


_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probe(path: str, port: int, period: int) -> Obj:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": 3}


# ---------------------------------------------------------------- gateway


def gateway_objects(image: str = IMAGE, service_type: str = "LoadBalancer", replicas: int = 2) -> list[Obj]:
    if service_type not in SERVICE_TYPES:
        raise ValueError(f"gateway service type {service_type!r}: use one of {', '.join(SERVICE_TYPES)}")
    name = n.GATEWAY_SERVICE
    container = {
        "name": "gateway",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["gateway", "run", "--config", "/etc/isthmus/config/gateway.yaml"],
        "env": [{"name": "ISTHMUS_LOG_FORMAT", "value": "json"}],
        "ports": [
            {"name": "tls-inbound", "containerPort": names.GATEWAY_INBOUND_PORT, "protocol": "TCP"},
            {"name": "outbound", "containerPort": names.GATEWAY_OUTBOUND_PORT, "protocol": "TCP"},
            {"name": "http-admin", "containerPort": names.GATEWAY_ADMIN_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": _probe("/healthz", names.GATEWAY_ADMIN_PORT, 10),
        "readinessProbe": _probe("/readyz", names.GATEWAY_ADMIN_PORT, 5),
        "resources": {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}},
        "securityContext": _SECURITY,
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/isthmus/config", "readOnly": True},
            {"name": "tls", "mountPath": "/etc/isthmus/gateway", "readOnly": True},
            {"name": "trust", "mountPath": "/etc/isthmus/trust", "readOnly": True},
            {"name": "state", "mountPath": "/var/lib/isthmus/gateway"},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, "gateway"),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector("gateway")},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels("gateway"),
                    # Istio-style metrics on the admin port (deploy/monitoring scrapes these).
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(names.GATEWAY_ADMIN_PORT), "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": False,  # the gateway never calls the Kubernetes API
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"fsGroup": 10001},
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": CONFIG_MAP, "items": [{"key": "gateway.yaml", "path": "gateway.yaml"}]}},
                        {"name": "tls", "secret": {"secretName": SECRET_GATEWAY, "defaultMode": 0o440}},
                        {"name": "trust", "secret": {"secretName": SECRET_TRUST, "defaultMode": 0o444}},
                        {"name": "state", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, "gateway"),
        "spec": {
            "type": service_type,
            "selector": _selector("gateway"),
            # Only the inbound mTLS listener is exposed; the outbound listener is reached
            # by mirror Services through the agent's EndpointSlices, never from outside.
            "ports": [{"name": "tls-inbound", "port": names.GATEWAY_INBOUND_PORT, "targetPort": names.GATEWAY_INBOUND_PORT, "protocol": "TCP"}],
        },
    }
    if service_type == "LoadBalancer":
        service["spec"]["externalTrafficPolicy"] = "Local"  # keep the peer's address; no extra hop
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, "gateway"),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector("gateway")}},
    }
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, "gateway"), "automountServiceAccountToken": False}
    return [sa, deployment, service, pdb]


# ---------------------------------------------------------------- agent

AGENT_SA = names.AGENT_SERVICE_ACCOUNT
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"

# CEL for the admission policy below: RBAC cannot say "only objects with this label" or
# "only this annotation", so a ValidatingAdmissionPolicy (GA in Kubernetes 1.30) does.
_MINE = (
    "has({o}.metadata.labels) && 'isthmus.io/mirrored-from' in {o}.metadata.labels"
    " && 'app.kubernetes.io/managed-by' in {o}.metadata.labels"
    " && {o}.metadata.labels['app.kubernetes.io/managed-by'] == 'isthmus-agent'"
)
_STATUS_ONLY = (
    "request.resource.resource == 'services' && object.spec == oldObject.spec"
    " && (has(object.metadata.labels) ? object.metadata.labels : {}) == (has(oldObject.metadata.labels) ? oldObject.metadata.labels : {})"
    " && variables.newAnnotations.all(k, k == 'isthmus.io/export-status'"
    " || (k in variables.oldAnnotations && variables.oldAnnotations[k] == variables.newAnnotations[k]))"
    " && variables.oldAnnotations.all(k, k == 'isthmus.io/export-status' || k in variables.newAnnotations)"
)


def agent_objects(image: str = IMAGE) -> list[Obj]:
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(AGENT_SA, "agent")}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(AGENT_SA, "agent", namespaced=False),
        "rules": [
            # Read what may be exported; write mirrors (the admission policy narrows
            # writes to mirror objects and the export-status annotation).
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": [n.MCS_GROUP], "resources": [n.MCS_PLURAL], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(AGENT_SA, "agent", namespaced=False),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": AGENT_SA},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": NAMESPACE}],
    }
    # Certificate rotation: read the cluster CA, rewrite the two leaf Secrets; nothing else.
    secrets_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(AGENT_SA, "agent"),
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SECRET_CA], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SECRET_GATEWAY, SECRET_AGENT], "verbs": ["get", "update", "patch"]},
        ],
    }
    secrets_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(AGENT_SA, "agent"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT_SA},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": NAMESPACE}],
    }
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": _meta("isthmus-agent-writes", "agent", namespaced=False),
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["services"], "operations": ["CREATE", "UPDATE", "DELETE"]},
                    {"apiGroups": ["discovery.k8s.io"], "apiVersions": ["v1"], "resources": ["endpointslices"], "operations": ["CREATE", "UPDATE", "DELETE"]},
                ]
            },
            "matchConditions": [{"name": "only-the-agent", "expression": f"request.userInfo.username == '{AGENT_USER}'"}],
            "variables": [
                {"name": "newAnnotations", "expression": "request.operation == 'UPDATE' && has(object.metadata.annotations) ? object.metadata.annotations : {}"},
                {"name": "oldAnnotations", "expression": "request.operation == 'UPDATE' && has(oldObject.metadata.annotations) ? oldObject.metadata.annotations : {}"},
            ],
            "validations": [
                {
                    "expression": (
                        f"request.operation == 'CREATE' ? ({_MINE.format(o='object')})"
                        f" : request.operation == 'DELETE' ? ({_MINE.format(o='oldObject')})"
                        f" : ((({_MINE.format(o='oldObject')}) && ({_MINE.format(o='object')})) || ({_STATUS_ONLY}))"
                    ),
                    "message": (
                        "isthmus-agent may write only mirror Services and EndpointSlices (labelled isthmus.io/mirrored-from "
                        "and managed by isthmus-agent) and the isthmus.io/export-status annotation"
                    ),
                    "reason": "Forbidden",
                }
            ],
        },
    }
    policy_binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": _meta("isthmus-agent-writes", "agent", namespaced=False),
        "spec": {"policyName": "isthmus-agent-writes", "validationActions": ["Deny"]},
    }
    container = {
        "name": "agent",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["agent", "run", "--health-listen", f"0.0.0.0:{AGENT_HEALTH_PORT}"],
        "env": [
            {"name": "ISTHMUS_LOG_FORMAT", "value": "json"},
            {"name": "ISTHMUS_CERT_DIR", "value": "/etc/isthmus/agent"},
            {"name": "ISTHMUS_CLUSTER", "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": "cluster"}}},
            {"name": "ISTHMUS_FEDERATION", "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": "federation"}}},
        ],
        "ports": [{"name": "http-health", "containerPort": AGENT_HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": _probe("/healthz", AGENT_HEALTH_PORT, 10),
        "readinessProbe": _probe("/readyz", AGENT_HEALTH_PORT, 5),
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": "500m", "memory": "384Mi"}},
        "securityContext": _SECURITY,
        "volumeMounts": [{"name": "tls", "mountPath": "/etc/isthmus/agent", "readOnly": True}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(AGENT_SA, "agent"),
        "spec": {
            # One reconcile loop per cluster: two agents would publish over each other.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _selector("agent")},
            "template": {
                "metadata": {"labels": labels("agent")},
                "spec": {
                    "serviceAccountName": AGENT_SA,
                    "securityContext": {"fsGroup": 10001},
                    "containers": [container],
                    "volumes": [{"name": "tls", "secret": {"secretName": SECRET_AGENT, "defaultMode": 0o440}}],
                },
            },
        },
    }
    return [sa, role, binding, secrets_role, secrets_binding, policy, policy_binding, deployment]


def workloads(image: str = IMAGE, service_type: str = "LoadBalancer") -> list[Obj]:
    """Everything that is the same in every cluster (what deploy/overlays/cluster renders)."""
    return [namespace(), *gateway_objects(image, service_type), *agent_objects(image)]


# ---------------------------------------------------------------- cluster-specific


def gateway_config(cluster: str, federation: Sequence[str]) -> str:
    cfg = {
        "cluster": cluster,
        "inbound": {"host": "0.0.0.0", "port": names.GATEWAY_INBOUND_PORT},
        "outbound": {"host": "0.0.0.0", "port": names.GATEWAY_OUTBOUND_PORT},
        # Kubelet probes and Prometheus reach the admin port on the pod IP.
        "admin": {"host": "0.0.0.0", "port": names.GATEWAY_ADMIN_PORT},
        # Pods without a sidecar call mirror Services in plain text; the hop between
        # gateways is mTLS regardless.
        "outbound_allow_plain": True,
        "tls": {
            "cert_file": "/etc/isthmus/gateway/cert.pem",
            "key_file": "/etc/isthmus/gateway/key.pem",
            "bundle_file": "/etc/isthmus/gateway/bundle.pem",
            "crl_file": "/etc/isthmus/trust/crl.pem",
        },
        "federation": {"address": federation[0] if federation else ""},
        "last_known_good": "/var/lib/isthmus/gateway/last-known-good.json",
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def cluster_config(cluster: str, federation: Sequence[str], gateway_address: str = "") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(CONFIG_MAP, "system"),
        "data": {
            "cluster": cluster,
            "federation": ",".join(federation),
            "gateway-address": gateway_address,
            "gateway.yaml": gateway_config(cluster, federation),
        },
    }


def _secret(name: str, component: str, files: dict[str, bytes | None]) -> Obj:
    # Values are base64 in `data`; None (dry run) leaves the key out so nothing secret is printed.
    data = {k: base64.b64encode(v).decode() for k, v in sorted(files.items()) if v is not None}
    obj: Obj = {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, component), "type": "Opaque", "data": data}
    missing = sorted(k for k, v in files.items() if v is None)
    if missing:
        obj["metadata"]["annotations"] = {"isthmus.io/filled-by": "join-cluster", "isthmus.io/keys": ",".join(missing)}
    return obj


def secrets(out_dir: Path | None) -> list[Obj]:
    """The four Secrets, from a join folder (federation/_join.py layout); None: dry-run placeholders."""

    def read(rel: str) -> bytes | None:
        return None if out_dir is None else (out_dir / rel).read_bytes()

    return [
        _secret(SECRET_CA, "system", {"ca.crt": read("ca/ca.crt"), "ca.key": read("ca/ca.key"), "chain.pem": read("ca/chain.pem"), "bundle.pem": read("ca/bundle.pem")}),
        _secret(SECRET_GATEWAY, "gateway", {"cert.pem": read("gateway/cert.pem"), "key.pem": read("gateway/key.pem"), "bundle.pem": read("gateway/bundle.pem")}),
        _secret(SECRET_AGENT, "agent", {"cert.pem": read("agent/cert.pem"), "key.pem": read("agent/key.pem"), "bundle.pem": read("agent/bundle.pem")}),
        _secret(SECRET_TRUST, "system", {"bundle.pem": read("bundle.pem"), "crl.pem": read("crl.pem")}),
    ]


def install(cluster: str, federation: Sequence[str], out_dir: Path | None, image: str = IMAGE,
            service_type: str = "LoadBalancer", gateway_address: str = "") -> list[Obj]:
    """Everything join-cluster applies, in apply order."""
    objs = workloads(image, service_type)
    return [objs[0], cluster_config(cluster, federation, gateway_address), *secrets(out_dir), *objs[1:]]


def to_yaml(objs: Sequence[Obj]) -> str:
    return "".join("---\n" + yaml.safe_dump(json.loads(json.dumps(o)), sort_keys=False) for o in objs)


def object_key(obj: Obj) -> tuple[str, str, str]:
    m = obj.get("metadata") or {}
    return obj.get("kind", ""), m.get("namespace", ""), m.get("name", "")
