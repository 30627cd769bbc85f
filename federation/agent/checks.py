"""``isthmus check``: pre- and post-install checks, in the style of ``linkerd check``.

Each check is a function that returns a :class:`Result` (or raises :class:`CheckFailed`
with a hint).  Checks in a category run in order; when one marked ``fatal`` fails, the
rest of its category is skipped (nothing sensible can follow a dead API server).
Output: √/× lines grouped by category with a hint under each failure, or JSON
(``-o json``, linkerd's shape: ``{"success", "categories": [{"categoryName", "checks": [...]}]}``).
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography import x509

import trust

from . import manifests as m
from . import _names as n
from ._install import gateway_address_of
from ._kube import AgentError
from ._rest import Rest

MIN_KUBERNETES = (1, 30)  # ValidatingAdmissionPolicy (the agent's write guard) is GA in 1.30


class CheckFailed(Exception):
    def __init__(self, error: str, hint: str, warning: bool = False) -> None:
        super().__init__(error)
        self.error, self.hint, self.warning = error, hint, warning


@dataclass
class Result:
    description: str
    result: str  # success | warning | error | skipped
    error: str = ""
    hint: str = ""


@dataclass
class Category:
    categoryName: str  # noqa: N815 - linkerd's JSON field name
    checks: list[Result] = field(default_factory=list)


@dataclass
class Context:
    rest: Rest
    federation: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


Check = tuple[str, Callable[[Context], str | None], bool]  # description, fn (returns a note), fatal


# ---------------------------------------------------------------- pre-install


def _api_reachable(ctx: Context) -> str | None:
    try:
        v = ctx.rest.request("GET", "/version")
    except AgentError as exc:
        raise CheckFailed(str(exc), "check your kube-context (kubectl config current-context) and that the API server is up") from None
    ctx.state["version"] = v
    return v.get("gitVersion")


def _version_ok(ctx: Context) -> str | None:
    v = ctx.state.get("version") or {}
    try:
        major, minor = int(v.get("major", "0")), int("".join(ch for ch in v.get("minor", "0") if ch.isdigit()) or 0)
    except ValueError:
        raise CheckFailed(f"cannot read the Kubernetes version from {v!r}", "is this a Kubernetes API server?") from None
    if (major, minor) < MIN_KUBERNETES:
        raise CheckFailed(
            f"Kubernetes {major}.{minor} is older than {MIN_KUBERNETES[0]}.{MIN_KUBERNETES[1]}",
            "the agent's write guard is a ValidatingAdmissionPolicy (GA in 1.30): upgrade the cluster",
        )
    return None


def _namespace_free_or_ours(ctx: Context) -> str | None:
    ns = ctx.rest.get("v1", "Namespace", m.NAMESPACE)
    if ns is None:
        return "not yet created"
    owner = ((ns.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/part-of")
    if owner != "isthmus":
        raise CheckFailed(f"namespace {m.NAMESPACE} exists and was not created by Isthmus",
                          "delete it or label it app.kubernetes.io/part-of=isthmus if it is yours for Isthmus")
    return "exists (Isthmus)"


def _mcs_crd(ctx: Context) -> str | None:
    try:
        ctx.rest.request("GET", f"/apis/{n.MCS_GROUP}/{n.MCS_VERSION}/{n.MCS_PLURAL}")
    except AgentError:
        raise CheckFailed("the MCS ServiceExport CRD is not installed", "optional: only the isthmus.io/export annotation works "
                          "until you install it (kubectl apply -f https://github.com/kubernetes-sigs/mcs-api/tree/master/config/crd)",
                          warning=True) from None
    return None


def _federation_reachable(ctx: Context) -> str | None:
    if not ctx.federation:
        raise CheckFailed("no federation address given", "pass --federation HOST:PORT (or set ISTHMUS_FEDERATION)", warning=True)
    for address in ctx.federation:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
                pass
        except (OSError, ValueError) as exc:
            raise CheckFailed(f"cannot reach the federation at {address}: {exc}",
                              "check the address and that port (and the join port, +1) is open from here") from None
    return None


PRE: list[tuple[str, list[Check]]] = [
    ("kubernetes-api", [("can reach the Kubernetes API", _api_reachable, True),
                        (f"is running Kubernetes {MIN_KUBERNETES[0]}.{MIN_KUBERNETES[1]} or newer", _version_ok, False)]),
    ("pre-install", [(f"namespace {m.NAMESPACE} is free or Isthmus'", _namespace_free_or_ours, False),
                     ("MCS ServiceExport CRD is installed", _mcs_crd, False)]),
    ("federation", [("can reach the federation service", _federation_reachable, False)]),
]


# ---------------------------------------------------------------- post-install


def _namespace_exists(ctx: Context) -> str | None:
    if ctx.rest.get("v1", "Namespace", m.NAMESPACE) is None:
        raise CheckFailed(f"namespace {m.NAMESPACE} does not exist", "run `isthmus join-cluster NAME ...`")
    return None


def _config_present(ctx: Context) -> str | None:
    cm = ctx.rest.get("v1", "ConfigMap", m.CONFIG_MAP, m.NAMESPACE)
    if cm is None:
        raise CheckFailed(f"ConfigMap {m.CONFIG_MAP} is missing", "run `isthmus join-cluster NAME ...` again (it converges)")
    data = cm.get("data") or {}
    missing = [k for k in ("cluster", "federation", "gateway.yaml") if not data.get(k)]
    if missing:
        raise CheckFailed(f"ConfigMap {m.CONFIG_MAP} lacks {', '.join(missing)}", "run `isthmus join-cluster NAME ...` again")
    ctx.state["config"] = data
    if not ctx.federation:
        ctx.federation = [a for a in data["federation"].split(",") if a]
    return f"cluster {data['cluster']}"


_SECRET_KEYS = {
    m.SECRET_CA: ("ca.crt", "ca.key", "chain.pem", "bundle.pem"),
    m.SECRET_GATEWAY: ("cert.pem", "key.pem", "bundle.pem"),
    m.SECRET_AGENT: ("cert.pem", "key.pem", "bundle.pem"),
    m.SECRET_TRUST: ("bundle.pem", "crl.pem"),
}


def _secrets_present(ctx: Context) -> str | None:
    for name, keys in _SECRET_KEYS.items():
        s = ctx.rest.get("v1", "Secret", name, m.NAMESPACE)
        if s is None:
            raise CheckFailed(f"Secret {name} is missing", "run `isthmus join-cluster NAME ...` again (it restores it)")
        missing = [k for k in keys if k not in (s.get("data") or {})]
        if missing:
            raise CheckFailed(f"Secret {name} lacks {', '.join(missing)}", "run `isthmus join-cluster NAME ...` again")
        ctx.state[name] = s
    return None


def _certs_valid(ctx: Context) -> str | None:
    now = dt.datetime.now(dt.timezone.utc)
    notes = []
    for name in (m.SECRET_GATEWAY, m.SECRET_AGENT):
        s = ctx.state.get(name)
        if s is None:
            raise CheckFailed("certificates not checked: the Secrets are missing", "fix the check above first")
        cert = x509.load_pem_x509_certificate(base64.b64decode(s["data"]["cert.pem"]))
        left = cert.not_valid_after_utc - now
        if left.total_seconds() <= 0:
            raise CheckFailed(f"{name}: certificate expired {-left} ago", "run `isthmus join-cluster NAME ...` again to re-issue it")
        if trust.rotation_due(cert, now):
            raise CheckFailed(f"{name}: certificate expires in {left}", "run `isthmus join-cluster NAME ...` to re-issue it", warning=True)
        notes.append(f"{name.split('-')[1]} {int(left.total_seconds() // 3600)}h left")
    return ", ".join(notes)


def _deployment_available(name: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        d = ctx.rest.get("apps/v1", "Deployment", name, m.NAMESPACE)
        if d is None:
            raise CheckFailed(f"Deployment {name} is missing", "run `isthmus join-cluster NAME ...` again")
        want = (d.get("spec") or {}).get("replicas", 1)
        have = (d.get("status") or {}).get("availableReplicas", 0)
        if have < 1:
            raise CheckFailed(f"Deployment {name}: {have}/{want} replicas available",
                              f"kubectl -n {m.NAMESPACE} describe deploy/{name}; kubectl -n {m.NAMESPACE} logs deploy/{name}")
        return f"{have}/{want} available"

    return check


def _gateway_address(ctx: Context) -> str | None:
    svc = ctx.rest.get("v1", "Service", n.GATEWAY_SERVICE, m.NAMESPACE)
    if svc is None:
        raise CheckFailed(f"Service {n.GATEWAY_SERVICE} is missing", "run `isthmus join-cluster NAME ...` again")
    nodes = ctx.rest.list("v1", "Node") if (svc.get("spec") or {}).get("type") == "NodePort" else []
    address = gateway_address_of(svc, nodes)
    if not address:
        raise CheckFailed("the gateway Service has no address", "no load-balancer controller? re-run join-cluster with --gateway-service-type NodePort")
    registered = (ctx.state.get("config") or {}).get("gateway-address", "")
    if registered and registered != address:
        raise CheckFailed(f"the gateway is at {address} but {registered} is registered", "run `isthmus join-cluster NAME --token T` to register it")
    return address


def _registered(ctx: Context) -> str | None:
    import tempfile
    from pathlib import Path

    from federation.client import FederationClient

    s, cluster = ctx.state.get(m.SECRET_AGENT), (ctx.state.get("config") or {}).get("cluster")
    if s is None or not cluster or not ctx.federation:
        raise CheckFailed("not checked: the agent's Secret or the ConfigMap is missing", "fix the checks above first")
    with tempfile.TemporaryDirectory() as tmp:
        files = {Path(tmp) / k: (base64.b64decode(s["data"][k]), 0o600) for k in ("cert.pem", "key.pem", "bundle.pem")}
        trust.write_files(files)
        try:
            with FederationClient(ctx.federation, tmp, timeout=5.0) as c:
                records = {r.name: r for r in c.list_clusters()}
        except Exception as exc:  # noqa: BLE001 - any failure here is the check's result
            raise CheckFailed(f"cannot query the federation: {exc}", "check the federation address and the agent certificate") from None
    record = records.get(cluster)
    if record is None:
        raise CheckFailed(f"cluster {cluster} is not registered in the federation", "run `isthmus join-cluster` again with a new token")
    if record.revoked:
        raise CheckFailed(f"cluster {cluster} is revoked", "leave and join again with a new name or a fresh CA")
    return ", ".join(record.gateway_addresses) or "no gateway address"


POST: list[tuple[str, list[Check]]] = [
    ("kubernetes-api", [("can reach the Kubernetes API", _api_reachable, True)]),
    ("isthmus-install", [
        (f"namespace {m.NAMESPACE} exists", _namespace_exists, True),
        (f"ConfigMap {m.CONFIG_MAP} is complete", _config_present, False),
        ("Secrets hold the CA, certificates, bundle and CRL", _secrets_present, False),
        ("gateway and agent certificates are valid", _certs_valid, False),
    ]),
    ("isthmus-workloads", [
        ("gateway Deployment is available", _deployment_available(n.GATEWAY_SERVICE), False),
        ("agent Deployment is available", _deployment_available(m.AGENT_SA), False),
        ("gateway Service has an address and it is registered", _gateway_address, False),
    ]),
    ("federation", [("cluster is registered in the federation", _registered, False)]),
]


def run_checks(ctx: Context, plan: list[tuple[str, list[Check]]]) -> list[Category]:
    out: list[Category] = []
    for name, checks in plan:
        cat = Category(name)
        dead = False
        for description, fn, fatal in checks:
            if dead:
                cat.checks.append(Result(description, "skipped", hint="an earlier check in this category failed"))
                continue
            try:
                note = fn(ctx)
                cat.checks.append(Result(description + (f" ({note})" if note else ""), "success"))
            except CheckFailed as exc:
                cat.checks.append(Result(description, "warning" if exc.warning else "error", exc.error, exc.hint))
                dead = fatal and not exc.warning
            except AgentError as exc:
                cat.checks.append(Result(description, "error", str(exc), "check the API server and your permissions"))
                dead = fatal
        out.append(cat)
    return out


def success(categories: list[Category]) -> bool:
    return all(r.result in ("success", "warning") for c in categories for r in c.checks)


def as_json(categories: list[Category]) -> dict[str, Any]:
    return {"success": success(categories), "categories": [asdict(c) for c in categories]}


def as_text(categories: list[Category]) -> str:
    marks = {"success": "√", "warning": "‼", "error": "×", "skipped": "-"}
    lines: list[str] = []
    for c in categories:
        lines += [c.categoryName, "-" * len(c.categoryName)]
        for r in c.checks:
            lines.append(f"{marks[r.result]} {r.description}")
            if r.error:
                lines.append(f"    {r.error}")
            if r.hint and r.result != "success":
                lines.append(f"    hint: {r.hint}")
        lines.append("")
    lines.append(f"Status check results are {'√' if success(categories) else '×'}")
    return "\n".join(lines)
