"""A small generic Kubernetes REST layer for installing manifests (join-cluster, leave-cluster, check).

The typed ``kubernetes`` API classes need one method per kind; installing a list of
heterogeneous manifests wants one ``apply(obj)`` instead.  This maps apiVersion/kind to
the REST path and goes through the official client's ``ApiClient`` (so kubeconfig auth,
TLS and proxies all work as in kubectl).

``apply`` is create-or-merge-patch: it converges (running it twice changes nothing and
duplicates nothing) and keeps what the cluster allocated (a Service's clusterIP and
nodePorts).  Server-side apply would be nicer on a real API server, but the emulator the
tests run against does not implement it; the merge-patch path behaves the same for the
fields we own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from ._kube import AgentError, convert_error

# kind -> (plural, namespaced)
KINDS: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "Service": ("services", True),
    "ConfigMap": ("configmaps", True),
    "Secret": ("secrets", True),
    "Deployment": ("deployments", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "EndpointSlice": ("endpointslices", True),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "ValidatingAdmissionPolicy": ("validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("validatingadmissionpolicybindings", False),
    "Node": ("nodes", False),
}


class NotFound(AgentError):
    pass


@dataclass(frozen=True)
class Ref:
    api_version: str
    kind: str
    name: str
    namespace: str = ""

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Ref:
        m = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], m["name"], m.get("namespace", ""))

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name}" + (f" -n {self.namespace}" if self.namespace else "")


def collection_path(api_version: str, kind: str, namespace: str = "", all_namespaces: bool = False) -> str:
    plural, namespaced = KINDS[kind]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced and not (all_namespaces and not namespace):
        if not namespace:
            raise ValueError(f"{kind} is namespaced: a namespace is needed")
        return f"{base}/namespaces/{namespace}/{plural}"
    return f"{base}/{plural}"


def _contains(have: Any, want: Any) -> bool:
    """Does ``have`` already hold every field of ``want`` (lists compared whole)?"""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _contains(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(_contains(h, w) for h, w in zip(have, want))
    return have == want


class Rest:
    def __init__(self, api: client.ApiClient, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: list[tuple[str, str]] | None = None) -> Any:
        what = f"{method} {path}"
        try:
            m, url, headers, b, _ = self.api.param_serialize(
                method, path, query_params=query or [], header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body, auth_settings=["BearerToken"],
            )
            resp = self.api.call_api(m, url, headers, b, _request_timeout=self.timeout)
            resp.read()
        except Exception as exc:
            raise convert_error(exc, what) from None
        if resp.status == 404:
            raise NotFound(f"kubernetes: {what}: not found")
        if not 200 <= resp.status < 300:
            exc = client.ApiException(status=resp.status, reason=resp.reason)
            exc.body = resp.data.decode(errors="replace") if isinstance(resp.data, bytes) else resp.data
            raise convert_error(exc, what)
        return json.loads(resp.data) if resp.data else None

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        try:
            return self.request("GET", f"{collection_path(api_version, kind, namespace)}/{name}")
        except NotFound:
            return None

    def list(self, api_version: str, kind: str, namespace: str = "", label_selector: str = "") -> list[dict[str, Any]]:
        """Objects of a kind (in every namespace when ``namespace`` is empty)."""
        query = [("labelSelector", label_selector)] if label_selector else []
        try:
            body = self.request("GET", collection_path(api_version, kind, namespace, all_namespaces=True), query=query)
        except NotFound:
            return []
        return list((body or {}).get("items") or ())

    def apply(self, obj: dict[str, Any]) -> str:
        """Create, or bring an existing object up to ``obj``; returns created/configured/unchanged."""
        ref = Ref.of(obj)
        path = collection_path(ref.api_version, ref.kind, ref.namespace)
        have = self.get(ref.api_version, ref.kind, ref.name, ref.namespace)
        if have is None:
            self.request("POST", path, obj)
            return "created"
        want = _keep_allocated(obj, have)
        if _contains(have, want):
            return "unchanged"
        self.request("PATCH", f"{path}/{ref.name}", want, "application/merge-patch+json")
        return "configured"

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "") -> bool:
        try:
            self.request("DELETE", f"{collection_path(api_version, kind, namespace)}/{name}",
                         {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
            return True
        except NotFound:
            return False


def _keep_allocated(want: dict[str, Any], have: dict[str, Any]) -> dict[str, Any]:
    """A Service's ports list is replaced whole by a merge patch: carry over allocated nodePorts."""
    if want.get("kind") != "Service":
        return want
    allocated = {p.get("name"): p.get("nodePort") for p in (have.get("spec") or {}).get("ports") or () if p.get("nodePort")}
    if not allocated or want["spec"].get("type") not in ("NodePort", "LoadBalancer"):
        return want
    out = json.loads(json.dumps(want))
    for p in out["spec"]["ports"]:
        if p.get("name") in allocated and "nodePort" not in p:
            p["nodePort"] = allocated[p["name"]]
    return out
