"""The agent's pure converters: Kubernetes objects in, decisions out.

No I/O and no clock: the reconcile loop feeds them what its watch caches hold and
applies what they return, so every rule here is tested table-driven without a server
(pure converters and dumb stores, as in cilium's clustermesh).

* :func:`desired_exports`: (Services, EndpointSlices, ServiceExports) -> the export set
  to publish, and why each Service that asked to be exported was refused.
* :func:`plan_mirrors`: (snapshot, local cluster, existing Services and EndpointSlices,
  gateway endpoints) -> the mirror objects to create or update, the ones to delete, and
  name conflicts with users' Services.

Objects are the API server's JSON (camelCase dicts), as the watches deliver them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from federation import names
from federation.models import ExportedService, ServicePort, Snapshot

from . import _names as n

Obj = Mapping[str, Any]
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SPEC_HASH = "isthmus.io/spec-hash"


@dataclass(frozen=True, kw_only=True, order=True)
class ObjectRef:
    kind: str  # "Service" or "EndpointSlice"
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True)
class ExportPlan:
    exports: dict[str, ExportedService] = field(default_factory=dict)  # "ns/name" ->
    refused: dict[str, str] = field(default_factory=dict)  # "ns/name" -> why


@dataclass(frozen=True, kw_only=True)
class MirrorPlan:
    upserts: tuple[dict[str, Any], ...] = ()
    deletes: tuple[ObjectRef, ...] = ()
    conflicts: tuple[str, ...] = ()  # human-readable, one per blocked mirror


def _meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def key_of(obj: Obj) -> str:
    m = _meta(obj)
    return f"{m.get('namespace', '')}/{m.get('name', '')}"


# ---------------------------------------------------------------- export side

# appProtocol values (IANA names, Kubernetes' own kubernetes.io/*) and Istio-style
# port-name prefixes, to the protocols the gateway carries.  Anything else is opaque TCP,
# which always works (it rides an HTTP/2 CONNECT stream) — the safe default Istio uses.
_APP_PROTOCOLS = {
    "http": "HTTP",
    "http1": "HTTP",
    "http2": "HTTP2",
    "h2c": "HTTP2",
    "kubernetes.io/h2c": "HTTP2",
    "grpc": "GRPC",
    "grpc-web": "HTTP",
    "tcp": "TCP",
}
_NAME_PREFIXES = (("grpc", "GRPC"), ("http2", "HTTP2"), ("h2c", "HTTP2"), ("http", "HTTP"), ("tcp", "TCP"))


def port_protocol(port: Obj) -> str:
    app = str(port.get("appProtocol") or "").lower()
    if app:
        return _APP_PROTOCOLS.get(app, "TCP")
    name = str(port.get("name") or "").lower()
    for prefix, proto in _NAME_PREFIXES:
        if name == prefix or name.startswith(prefix + "-"):
            return proto
    return "TCP"


def ready_endpoints(namespace: str, service: str, slices: Iterable[Obj]) -> int:
    """Ready endpoints of a Service across its EndpointSlices (``ready`` unset means ready)."""
    seen: set[str] = set()
    for s in slices:
        m = _meta(s)
        if m.get("namespace") != namespace or (m.get("labels") or {}).get(n.SERVICE_NAME_LABEL) != service:
            continue
        for ep in s.get("endpoints") or ():
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            addresses = ep.get("addresses") or ()
            ident = (ep.get("targetRef") or {}).get("uid") or (addresses[0] if addresses else "")
            if ident:
                seen.add(ident)  # dual-stack slices list a pod twice: count it once
    return len(seen)


def parse_export_to(value: str) -> tuple[str, ...]:
    clusters = sorted({v.strip() for v in value.split(",") if v.strip()})
    for v in clusters:
        if not _LABEL.match(v):
            raise ValueError(
                f"{n.EXPORT_TO}: {v!r} is not a cluster name (lowercase RFC 1123 labels, comma-separated, "
                "e.g. \"west,central\")"
            )
    return tuple(clusters)


def _export_one(cluster: str, svc: Obj, slices: Iterable[Obj]) -> ExportedService:
    """Build one export or raise ValueError with the reason it is refused."""
    m = _meta(svc)
    ns, name = m.get("namespace", ""), m.get("name", "")
    labels = m.get("labels") or {}
    spec = svc.get("spec") or {}
    if n.MIRRORED_FROM in labels:
        raise ValueError("this Service is a mirror of an imported service; export the original in its own cluster")
    if ns == names.SYSTEM_NAMESPACE:
        raise ValueError(f"Services in {names.SYSTEM_NAMESPACE} are Isthmus' own and are not exported")
    if spec.get("type") == "ExternalName":
        raise ValueError("an ExternalName Service has no endpoints in this cluster; export the service it names instead")
    ports: list[ServicePort] = []
    skipped: list[str] = []
    for p in spec.get("ports") or ():
        if (p.get("protocol") or "TCP") != "TCP":
            skipped.append(f"{p.get('port')}/{p.get('protocol')}")
            continue
        ports.append(ServicePort(name=p.get("name") or "", port=int(p["port"]), protocol=port_protocol(p)))  # type: ignore[arg-type]
    if not ports:
        why = f" (skipped {', '.join(skipped)})" if skipped else ""
        raise ValueError(f"no TCP ports to export{why}: the gateway carries TCP, HTTP and gRPC only")
    export_to = parse_export_to(str((m.get("annotations") or {}).get(n.EXPORT_TO, "")))
    try:
        return ExportedService(
            cluster=cluster,
            namespace=ns,
            name=name,
            ports=tuple(sorted(ports, key=lambda p: p.port)),
            export_to=export_to,
            ready_endpoints=ready_endpoints(ns, name, slices),
            endpoints_known=True,  # counted from the EndpointSlices: a 0 here is a real 0
        )
    except ValidationError as exc:  # names are already RFC 1123: only a bad cluster gets here
        raise ValueError("; ".join(e["msg"] for e in exc.errors())) from None


def wants_export(svc: Obj, service_exports: set[str]) -> bool | str:
    """True/False, or the reason the annotation is unusable."""
    value = (_meta(svc).get("annotations") or {}).get(n.EXPORT)
    if value is None:
        return key_of(svc) in service_exports
    value = str(value).strip().lower()
    if value == "true":
        return True
    if value == "false":  # an explicit opt-out wins over a ServiceExport
        return False
    return f"{n.EXPORT} must be \"true\" or \"false\", not {value!r}"


def desired_exports(
    cluster: str, services: Iterable[Obj], slices: Iterable[Obj], service_exports: Iterable[Obj]
) -> ExportPlan:
    slices = list(slices)
    se_keys = {key_of(se) for se in service_exports}
    plan = ExportPlan()
    for svc in services:
        want = wants_export(svc, se_keys)
        if want is False:
            continue
        k = key_of(svc)
        if isinstance(want, str):
            plan.refused[k] = want
            continue
        try:
            plan.exports[k] = _export_one(cluster, svc, slices)
        except ValueError as exc:
            plan.refused[k] = str(exc)
    return plan


def export_status(revision: int | None, refusal: str | None) -> str:
    if refusal is not None:
        return f"refused: {refusal}"
    return f"exported at revision {revision}"


# ---------------------------------------------------------------- import side


def gateway_endpoints(slices: Iterable[Obj]) -> tuple[str, ...]:
    """Ready pod addresses of the local gateway (its Service's EndpointSlices)."""
    out: set[str] = set()
    for s in slices:
        m = _meta(s)
        if m.get("namespace") != names.SYSTEM_NAMESPACE or (m.get("labels") or {}).get(n.SERVICE_NAME_LABEL) != n.GATEWAY_SERVICE:
            continue
        for ep in s.get("endpoints") or ():
            if (ep.get("conditions") or {}).get("ready") is not False:
                out.update(ep.get("addresses") or ())
    return tuple(sorted(out))


def _port_name(p: ServicePort) -> str:
    name = p.name.lower()
    return name if _LABEL.match(name) and not name.isdigit() else f"port-{p.port}"


def _app_protocol(proto: str) -> str:
    return {"HTTP": "http", "HTTP2": "kubernetes.io/h2c", "GRPC": "grpc", "TCP": "tcp"}[proto]


def _with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH] = digest
    return obj


def _mirror_objects(
    namespace: str, name: str, source: str | None, ports: list[ServicePort], gateway: tuple[str, ...], dns_suffix: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    mname = names.mirror_name(name, source)
    labels = {n.MIRRORED_FROM: source or n.FEDERATED, n.MANAGED_BY: n.AGENT}
    authority = names.outbound_host(name, namespace, source, dns_suffix)
    annotations = {n.REMOTE_SERVICE: f"{namespace}/{name}", n.REMOTE_AUTHORITY: authority}
    sports = [
        {
            "name": _port_name(p),
            "port": p.port,
            "protocol": "TCP",
            "appProtocol": _app_protocol(p.protocol),
            "targetPort": names.GATEWAY_OUTBOUND_PORT,
        }
        for p in ports
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": mname, "namespace": namespace, "labels": dict(labels), "annotations": dict(annotations)},
        "spec": {"type": "ClusterIP", "ports": sports},
    }
    family = "IPv6" if any(":" in a for a in gateway) else "IPv4"
    eps = [{"addresses": [a], "conditions": {"ready": True}} for a in gateway if (":" in a) == (family == "IPv6")]
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": mname,
            "namespace": namespace,
            "labels": {**labels, n.SERVICE_NAME_LABEL: mname, n.SLICE_MANAGED_BY: n.AGENT},
            "annotations": dict(annotations),
        },
        "addressType": family,
        "endpoints": eps,
        # Every port of a mirror lands on the gateway's outbound listener, which routes
        # by :authority (HTTP, gRPC) or CONNECT target; the mirror's annotation names it.
        "ports": [
            {"name": sp["name"], "port": names.GATEWAY_OUTBOUND_PORT, "protocol": "TCP", "appProtocol": sp["appProtocol"]}
            for sp in sports
        ],
    }
    return _with_hash(service), _with_hash(endpoint_slice)


def _ref(obj: Obj) -> ObjectRef:
    m = _meta(obj)
    return ObjectRef(kind=obj.get("kind") or "", namespace=m.get("namespace", ""), name=m.get("name", ""))


def plan_mirrors(
    snapshot: Snapshot,
    cluster: str,
    services: Iterable[Obj],
    slices: Iterable[Obj],
    gateway: tuple[str, ...] = (),
    dns_suffix: str = names.DNS_SUFFIX,
) -> MirrorPlan:
    """Mirrors for every service exported to ``cluster``; existing objects come from the caches.

    ``services`` and ``slices`` are everything the agent sees (mirrors and users'
    objects alike); only objects carrying the mirror labels are ever updated or deleted.
    """
    live = {c.name for c in snapshot.clusters if not c.revoked}
    by_key: dict[tuple[str, str], dict[str, ExportedService]] = {}
    for s in snapshot.services:
        if s.visible_to(cluster) and s.cluster in live and s.cluster != names.FEDERATED_SUFFIX:
            by_key.setdefault((s.namespace, s.name), {})[s.cluster] = s

    desired: dict[ObjectRef, dict[str, Any]] = {}
    for (ns, name), sources in sorted(by_key.items()):
        merged: dict[int, ServicePort] = {}
        for src in sorted(sources):
            svc = sources[src]
            for obj in _mirror_objects(ns, name, src, list(svc.ports), gateway, dns_suffix):
                desired[_ref(obj)] = obj
            for p in svc.ports:
                merged.setdefault(p.port, p)  # first cluster (by name) decides a shared port's protocol
        for obj in _mirror_objects(ns, name, None, [merged[k] for k in sorted(merged)], gateway, dns_suffix):
            desired[_ref(obj)] = obj

    existing: dict[ObjectRef, Obj] = {}
    foreign: set[ObjectRef] = set()
    tagged = [("Service", o) for o in services] + [("EndpointSlice", o) for o in slices]
    for kind, obj in tagged:
        obj = {**obj, "kind": kind}  # list responses leave kind out of their items
        if n.is_mirror(obj):
            existing[_ref(obj)] = obj
        else:
            foreign.add(_ref(obj))

    upserts: list[dict[str, Any]] = []
    conflicts: list[str] = []
    blocked: set[tuple[str, str]] = set()
    for ref, obj in desired.items():
        if ref in foreign:
            blocked.add((ref.namespace, ref.name))
            if ref.kind == "Service":
                conflicts.append(
                    f"Service {ref.namespace}/{ref.name} exists and is not an Isthmus mirror: "
                    f"rename it to import {obj['metadata']['annotations'][n.REMOTE_SERVICE]} "
                    f"({obj['metadata']['labels'][n.MIRRORED_FROM]}) here"
                )
    for ref, obj in desired.items():
        if (ref.namespace, ref.name) in blocked:
            continue
        have = existing.get(ref)
        if have is None or (_meta(have).get("annotations") or {}).get(SPEC_HASH) != obj["metadata"]["annotations"][SPEC_HASH]:
            upserts.append(obj)
    deletes = sorted(ref for ref in existing if ref not in desired)
    # Services before their slices on create; slices before their Services on delete.
    upserts.sort(key=lambda o: (o["kind"] != "Service", o["metadata"]["namespace"], o["metadata"]["name"]))
    deletes.sort(key=lambda r: (r.kind == "Service", r.namespace, r.name))
    return MirrorPlan(upserts=tuple(upserts), deletes=tuple(deletes), conflicts=tuple(conflicts))

