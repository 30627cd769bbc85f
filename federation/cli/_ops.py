"""``isthmus clusters``, ``isthmus services``, ``isthmus status``: what is joined, exported, applied.

Liveness (LIVE / STALE / EXPIRED / REVOKED) comes from each cluster's etcd lease: a
cluster heartbeats every ttl/3; STALE means two beats were missed (its exports are still
routed but will vanish when the lease runs out), EXPIRED that the lease is gone.
``isthmus revoke-cluster`` revokes a cluster through the federation (CRL, record, exports).
"""

from __future__ import annotations

import time
from typing import Any

import click

from ._common import connection_options, handle_errors, make_client, output_option, print_json, print_table, setup_logging


def _age(t: float) -> str:
    if not t:
        return "-"
    return _secs(time.time() - t)


def _secs(s_: float) -> str:
    if s_ < 0:
        return "-"
    s = int(s_)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


@click.command("clusters")
@connection_options
@output_option
@handle_errors
def clusters(federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """Clusters joined to the federation."""
    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        records, live = client.clusters_with_liveness()
    if output == "json":
        print_json(
            [
                {
                    **r.model_dump(mode="json", exclude={"ca_cert_pem", "previous_ca_certs_pem"}),
                    **_liveness_json(live.get(r.name)),
                }
                for r in records
            ]
        )
        return
    rows = []
    for r in records:
        lv = live.get(r.name)
        rows.append(
            (
                r.name,
                r.trust_domain,
                ",".join(r.gateway_addresses) or "-",
                ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-",
                lv.exports if lv else 0,
                _age(r.joined_at),
                _secs(lv.last_heartbeat_age) if lv else "-",
                ("REVOKED" if r.revoked else lv.state if lv else "-"),
            )
        )
    print_table("clusters", ("NAME", "TRUST DOMAIN", "GATEWAYS", "LABELS", "EXPORTS", "AGE", "HEARTBEAT", "STATE"), rows)


def _liveness_json(lv: Any) -> dict[str, Any]:
    if lv is None:
        return {"exports": 0, "state": "EXPIRED", "lease_ttl": 0, "lease_remaining": -1, "last_heartbeat_age": None,
                "published_at": None}
    return {
        "exports": lv.exports,
        "state": lv.state,
        "lease_ttl": lv.lease_ttl,
        "lease_remaining": lv.lease_remaining,
        "last_heartbeat_age": lv.last_heartbeat_age if lv.last_heartbeat_age >= 0 else None,
        "published_at": lv.published_at or None,
    }


@click.command("services")
@click.option("--cluster", default="", help="Only services exported by this cluster.")
@connection_options
@output_option
@handle_errors
def services(cluster: str, federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """Services exported to the federation, and where."""
    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        svcs = client.list_services(cluster)
    if output == "json":
        print_json([s.model_dump(mode="json") for s in svcs])
        return
    rows = [
        (
            f"{s.namespace}/{s.name}",
            s.cluster,
            ",".join(f"{p.port}/{p.protocol}" for p in s.ports) or "-",
            ",".join(s.export_to) or "*",
            s.ready_endpoints,
        )
        for s in svcs
    ]
    print_table("services", ("SERVICE", "CLUSTER", "PORTS", "EXPORT TO", "READY"), rows)


@click.command("status")
@connection_options
@output_option
@handle_errors
def status(federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """Cluster liveness, and the config revision every gateway applied: SYNCED, STALE or
    REJECTED rev N: reason (like istioctl proxy-status), whether it enforces the latest
    policy, and how long ago it last knew its config current (CONFIRMED)."""
    from rich.markup import escape  # the reason is the gateway's text, not table markup

    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        st = client.status()
    reported = {g.cluster for g in st.gateways}
    if output == "json":
        print_json(
            {
                "config_revision": st.config_revision,
                "policy_revision": st.policy_revision,
                "clusters": [{"cluster": lv.cluster, **_liveness_json(lv)} for lv in st.liveness],
                "gateways": [
                    {
                        "cluster": g.cluster,
                        "gateway_id": g.gateway_id,
                        "applied_revision": g.applied_revision,
                        "reported_at": g.reported_at,
                        "state": g.state,
                        "enforces_policy": g.enforces_policy,
                        "rejected_revision": g.rejected_revision or None,
                        "rejected_reason": g.rejected_reason or None,
                        "confirmed_at": g.confirmed_at or None,
                    }
                    for g in st.gateways
                ],
                "clusters_without_report": [c for c in st.clusters if c not in reported],
            }
        )
        return
    live_rows = [
        (
            lv.cluster,
            lv.state,
            lv.exports,
            _secs(lv.last_heartbeat_age),
            f"{lv.lease_remaining}s/{lv.lease_ttl}s" if lv.lease_ttl else "-",
        )
        for lv in st.liveness
    ]
    print_table("clusters", ("CLUSTER", "STATE", "EXPORTS", "HEARTBEAT", "LEASE LEFT"), live_rows)
    rows = [
        (g.cluster, escape(g.gateway_id), g.applied_revision, st.config_revision, escape(g.state),
         "yes" if g.enforces_policy else "NO", _age(g.confirmed_at), _age(g.reported_at))
        for g in st.gateways
    ]
    rows += [(c, "-", "-", st.config_revision, "NO REPORT", "-", "-", "-") for c in st.clusters if c not in reported]
    # CONFIRMED: how long ago the gateway last knew its config current (its watch delivered
    # something); it grows while the gateway's watch is down, though it keeps serving.
    print_table(
        f"gateways (config revision {st.config_revision}, policy revision {st.policy_revision})",
        ("CLUSTER", "GATEWAY", "APPLIED", "LATEST", "STATE", "POLICY", "CONFIRMED", "REPORTED"),
        rows,
    )


@click.command("revoke-cluster")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@handle_errors
def revoke_cluster(name: str, yes: bool, federation_addr: str | None, cert_dir: str | None) -> None:
    """Revoke cluster NAME through the federation (admin): its CAs go on the CRL, its record
    is marked revoked and its exports are dropped.  To come back it must join again."""
    setup_logging("warning")
    if not yes:
        click.confirm(f"revoke cluster {name}? Its gateways and agents stop working", abort=True)
    with make_client(federation_addr, cert_dir) as client:
        r = client.revoke_cluster(name)
    click.echo(f"revoked cluster {name}: {len(r.serials)} CA certificate(s) on the CRL, {r.withdrawn} export(s) dropped")
