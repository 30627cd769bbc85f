"""``join-cluster`` and ``leave-cluster``: bootstrap (and remove) Isthmus in one Kubernetes cluster.

join, step by step (each step converges, so running it again after a failure or a change
picks up where it stopped and duplicates nothing):

1. ``isthmus-system`` namespace, then the gateway Service (LoadBalancer by default, or
   NodePort), and wait — with visible progress — until it has an address.  The address
   is known *before* joining so the one-time token registers it in one call.
2. Join the federation (``federation._join.join``: key and CSR made here, the root pinned,
   the token spent).  Skipped when this cluster already joined with the same gateway
   address: the CA and certificates are taken from the join folder, or restored from the
   cluster's own Secrets if the folder is gone (another machine ran the first join).
3. The ConfigMap and the four Secrets, then the gateway and agent workloads
   (``manifests.install``; the same objects as ``deploy/overlays/cluster``).

leave reverses it: withdraw the cluster's exports, delete mirrors and everything join
created, and revoke the cluster's CA in the federation's trust folder (the federation
service publishes the new CRL to every gateway).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509

import trust
from federation import names
from federation._errors import FederationError

from . import manifests as m
from . import _names as n
from ._rest import Ref, Rest

log = structlog.get_logger("federation.agent.install")

Progress = Callable[[str], None]


class InstallError(FederationError):
    """join-cluster / leave-cluster cannot go on; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class JoinOptions:
    name: str
    federation: tuple[str, ...]
    out_dir: Path
    token: str = ""
    ca_pin: str = ""
    image: str = m.IMAGE
    service_type: str = "LoadBalancer"
    gateway_address: str = ""  # skip waiting: register this HOST:PORT
    join_address: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    validity: str = ""
    wait_timeout: float = 600.0
    poll_interval: float = 1.0


@dataclass
class JoinReport:
    gateway_address: str = ""
    joined: str = ""  # "joined" | "rejoined" | "already joined"
    applied: list[tuple[str, str]] = field(default_factory=list)  # (object, outcome)


# ---------------------------------------------------------------- gateway address


def gateway_address_of(service: dict[str, Any], nodes: Sequence[dict[str, Any]]) -> str:
    """HOST:PORT peers use to reach this gateway, or "" while it has none yet."""
    spec, status = service.get("spec") or {}, service.get("status") or {}
    port = next((p for p in spec.get("ports") or () if p.get("port") == names.GATEWAY_INBOUND_PORT), None)
    if spec.get("type") == "LoadBalancer":
        for ing in (status.get("loadBalancer") or {}).get("ingress") or ():
            host = ing.get("ip") or ing.get("hostname")
            if host:
                return _hostport(host, names.GATEWAY_INBOUND_PORT)
        return ""
    if spec.get("type") == "NodePort":
        node_port = (port or {}).get("nodePort")
        if not node_port:
            return ""
        for wanted in ("ExternalIP", "InternalIP"):
            for node in nodes:
                for a in (node.get("status") or {}).get("addresses") or ():
                    if a.get("type") == wanted and a.get("address"):
                        return _hostport(a["address"], node_port)
    return ""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_for_gateway_address(rest: Rest, opts: JoinOptions, say: Progress) -> str:
    start = time.monotonic()
    last_note = -1.0
    while True:
        svc = rest.get("v1", "Service", n.GATEWAY_SERVICE, m.NAMESPACE) or {}
        nodes = rest.list("v1", "Node") if opts.service_type == "NodePort" else []
        address = gateway_address_of(svc, nodes)
        if address:
            return address
        waited = time.monotonic() - start
        if waited > opts.wait_timeout:
            hint = (
                "the cluster has no load-balancer controller? Use --gateway-service-type NodePort, or pass "
                "--gateway-address HOST:PORT"
                if opts.service_type == "LoadBalancer"
                else "no node reports an address; pass --gateway-address HOST:PORT"
            )
            raise InstallError(
                f"join-cluster: the gateway Service got no address in {opts.wait_timeout:.0f}s ({hint})"
            )
        if waited - last_note >= 10 or last_note < 0:
            say(f"waiting for the gateway's {opts.service_type} address ({waited:.0f}s)")
            last_note = waited
        time.sleep(max(0.05, min(opts.poll_interval, opts.wait_timeout - waited)))


# ---------------------------------------------------------------- the join folder


def _joined_as(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "federation.json").read_text())
    except (OSError, ValueError):
        return None


def _registered_addresses(out_dir: Path) -> tuple[str, ...]:
    try:
        return tuple(json.loads((out_dir / "cluster.json").read_text()).get("gateway_addresses") or ())
    except (OSError, ValueError):
        return ()


def restore_from_cluster(rest: Rest, out_dir: Path) -> bool:
    """Rebuild a join folder from the Secrets and ConfigMap a previous join-cluster created."""
    secrets = {name: rest.get("v1", "Secret", name, m.NAMESPACE) for name in m.SECRETS}
    cm = rest.get("v1", "ConfigMap", m.CONFIG_MAP, m.NAMESPACE)
    if cm is None or any(s is None or not s.get("data") for s in secrets.values()):
        return False

    def data(secret: str, key: str) -> bytes:
        return base64.b64decode(secrets[secret]["data"][key])  # type: ignore[index]

    files: dict[Path, tuple[bytes, int]] = {}
    for key in ("ca.crt", "ca.key", "chain.pem", "bundle.pem"):
        files[out_dir / "ca" / key] = (data(m.SECRET_CA, key), 0o600 if key.endswith(".key") else 0o644)
    for sub, secret in (("gateway", m.SECRET_GATEWAY), ("agent", m.SECRET_AGENT)):
        for key in ("cert.pem", "key.pem", "bundle.pem"):
            files[out_dir / sub / key] = (data(secret, key), 0o600 if key == "key.pem" else 0o644)
    files[out_dir / "bundle.pem"] = (data(m.SECRET_TRUST, "bundle.pem"), 0o644)
    files[out_dir / "crl.pem"] = (data(m.SECRET_TRUST, "crl.pem"), 0o644)
    d = cm.get("data") or {}
    ca = x509.load_pem_x509_certificate(files[out_dir / "ca" / "ca.crt"][0])
    meta = {"cluster": d.get("cluster", ""), "trust_domain": trust.trust_domain_of(ca) or "",
            "addresses": [a for a in d.get("federation", "").split(",") if a]}
    files[out_dir / "federation.json"] = (json.dumps(meta, indent=2).encode(), 0o644)
    files[out_dir / "cluster.json"] = (json.dumps({"gateway_addresses": [a for a in [d.get("gateway-address", "")] if a]}).encode(), 0o644)
    trust.write_files(files)
    return True


def _refresh_leaves(out_dir: Path, cluster_td: str, say: Progress) -> None:
    """Re-issue the gateway and agent certificates if they are due for rotation."""
    from federation._join import issue_identities

    due = False
    for sub in ("gateway", "agent"):
        try:
            due = due or trust.rotation_due(trust.load_cert(out_dir / sub / "cert.pem"), dt.datetime.now(dt.timezone.utc))
        except (trust.TrustError, OSError):
            due = True
    if due:
        say("re-issuing the gateway and agent certificates (due for rotation)")
        issue_identities(out_dir, cluster_td)


# ---------------------------------------------------------------- join / leave


def join_cluster(rest: Rest, opts: JoinOptions, say: Progress = lambda s: None) -> JoinReport:
    trust.validate_cluster_name(opts.name)
    if opts.name == names.FEDERATED_SUFFIX:
        raise InstallError(f"join-cluster: the name {opts.name!r} is reserved (federated mirrors use it); pick another")
    report = JoinReport()
    existing_cm = rest.get("v1", "ConfigMap", m.CONFIG_MAP, m.NAMESPACE)
    if existing_cm and (existing_cm.get("data") or {}).get("cluster") not in (None, opts.name):
        raise InstallError(
            f"join-cluster: this Kubernetes cluster already joined as {existing_cm['data']['cluster']!r}; "
            f"run `isthmus leave-cluster {existing_cm['data']['cluster']}` first or pick the right --context"
        )
    objs = m.install(opts.name, opts.federation, None, opts.image, opts.service_type)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objs}

    say("namespace isthmus-system")
    _apply(rest, by_kind[("Namespace", m.NAMESPACE)], report)
    _apply(rest, by_kind[("Service", n.GATEWAY_SERVICE)], report)
    address = opts.gateway_address or wait_for_gateway_address(rest, opts, say)
    report.gateway_address = address
    say(f"gateway address {address}")

    joined = _joined_as(opts.out_dir)
    if (joined is None or joined.get("cluster") != opts.name) and restore_from_cluster(rest, opts.out_dir):
        say(f"restored the join folder {opts.out_dir} from the cluster's Secrets")
        joined = _joined_as(opts.out_dir)
    if joined is not None and joined.get("cluster") == opts.name:
        if address in _registered_addresses(opts.out_dir):
            report.joined = "already joined"
            _refresh_leaves(opts.out_dir, joined["trust_domain"], say)
        else:
            if not opts.token:
                raise InstallError(
                    f"join-cluster: the gateway address changed to {address}; registering it needs a new join token "
                    f"(isthmus federation token create --cluster {opts.name}) passed with --token"
                )
            say("re-joining to register the new gateway address")
            _join(opts, address, cert_dir=opts.out_dir / "agent")
            report.joined = "rejoined"
    else:
        if not opts.token or not opts.ca_pin:
            raise InstallError("join-cluster: --token and --ca-pin are needed for the first join (isthmus federation token create)")
        say(f"joining the federation at {', '.join(opts.federation)}")
        _join(opts, address)
        report.joined = "joined"

    final = m.install(opts.name, opts.federation, opts.out_dir, opts.image, opts.service_type, address)
    for obj in final:
        if obj["kind"] == "Namespace":
            continue
        _apply(rest, obj, report)
    say(f"applied {len(final)} objects; the gateway and agent start in the background "
        f"(kubectl -n {m.NAMESPACE} rollout status deploy/{n.GATEWAY_SERVICE}; isthmus check)")
    return report


def _join(opts: JoinOptions, address: str, cert_dir: Path | None = None) -> None:
    from federation._join import join

    join(
        opts.name,
        list(opts.federation),
        opts.token,
        opts.ca_pin,
        opts.out_dir,
        gateway_addresses=[address],
        labels=opts.labels,
        join_address=opts.join_address,
        cert_dir=cert_dir,
        validity=opts.validity,
    )


def _apply(rest: Rest, obj: dict[str, Any], report: JoinReport) -> None:
    outcome = rest.apply(obj)
    report.applied.append((str(Ref.of(obj)), outcome))
    log.info("object.applied", object=str(Ref.of(obj)), outcome=outcome)


@dataclass
class LeaveReport:
    withdrawn: int | None = None
    deleted: list[str] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)


def leave_cluster(rest: Rest, name: str, out_dir: Path, trust_dir: Path | None, keep_namespace: bool = False,
                  say: Progress = lambda s: None) -> LeaveReport:
    trust.validate_cluster_name(name)
    report = LeaveReport()
    cm = rest.get("v1", "ConfigMap", m.CONFIG_MAP, m.NAMESPACE)
    owner = ((cm or {}).get("data") or {}).get("cluster")
    if owner not in (None, name):
        raise InstallError(f"leave-cluster: this Kubernetes cluster is {owner!r}, not {name!r}; check --context")

    # 1. Withdraw exports with the cluster's own identity (best effort: the lease lapses anyway).
    federation = [a for a in ((cm or {}).get("data") or {}).get("federation", "").split(",") if a]
    if _joined_as(out_dir) is None and cm is not None:
        restore_from_cluster(rest, out_dir)
    if federation and (out_dir / "agent" / "cert.pem").is_file():
        from federation.client import FederationClient

        try:
            with FederationClient(federation, out_dir / "agent", timeout=5.0) as c:
                report.withdrawn = c.withdraw(name)
            say(f"withdrew {report.withdrawn} exported services")
        except FederationError as exc:
            say(f"could not withdraw exports ({exc}); they vanish when the lease lapses")

    # 2. Mirrors, then everything join-cluster created (reverse order).
    for kind, api_version in (("EndpointSlice", "discovery.k8s.io/v1"), ("Service", "v1")):
        for obj in rest.list(api_version, kind, label_selector=f"{n.MANAGED_BY}={n.AGENT}"):
            if n.is_mirror(obj):
                md = obj["metadata"]
                if rest.delete(api_version, kind, md["name"], md.get("namespace", "")):
                    report.deleted.append(f"{kind.lower()}/{md['name']} -n {md.get('namespace', '')}")
    for obj in reversed(m.install(name, (), None)):
        if obj["kind"] == "Namespace" and keep_namespace:
            continue
        ref = Ref.of(obj)
        if rest.delete(ref.api_version, ref.kind, ref.name, ref.namespace):
            report.deleted.append(str(ref))
    say(f"deleted {len(report.deleted)} objects")

    # 3. Revoke: the federation's trust folder gets a CRL entry for the cluster's CA.
    if trust_dir is not None:
        report.revoked = trust.TrustDir(trust_dir).revoke_cluster(name)
        say(f"revoked {len(report.revoked)} CA certificate(s) of {name} in {trust_dir}")
    return report
