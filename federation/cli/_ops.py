"""``isthmus clusters``, ``isthmus services``, ``isthmus status``: what is joined, exported, applied.

Liveness (LIVE / STALE / EXPIRED / REVOKED) counts both signs of life a cluster gives:
its exporter's etcd lease (heartbeats every ttl/3; two missed beats are STALE, its
exports still routed until the lease runs out) and its gateways' status reports (leased
too).  The federation decides it (``federation/server/_store.py``, ``Liveness.state``);
these commands show it, and ``isthmus status --help`` says what every column means.
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
    """Clusters joined to the federation.  STATE counts its exporter's lease and its
    gateways' reports (LIVE with "no exports": a gateway reports, no exporter); see
    `isthmus status --help`."""
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
                _exports(lv) if lv else "no exports",
                _age(r.joined_at),
                _secs(lv.last_heartbeat_age) if lv else "-",
                ("REVOKED" if r.revoked else lv.state if lv else "-"),
            )
        )
    print_table("clusters", ("NAME", "TRUST DOMAIN", "GATEWAYS", "LABELS", "EXPORTS", "AGE", "HEARTBEAT", "STATE"), rows)


def _exports(lv: Any) -> str | int:
    # No export lease: nothing exported (an exporter never ran, or it stopped).
    return "no exports" if lv.lease_ttl <= 0 and not lv.exports else lv.exports


def _ready(s: Any) -> str | int:
    # File exports do not know their endpoints: unknown, not 0 (which would mean "none ready").
    return s.ready_endpoints if s.endpoints_known else "-"


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
    """Services exported to the federation, and where.  READY is the exporter's count of
    ready endpoints, or "-" where it does not know it (file exports: `isthmus export`)."""
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
            _ready(s),
        )
        for s in svcs
    ]
    print_table("services", ("SERVICE", "CLUSTER", "PORTS", "EXPORT TO", "READY"), rows)


@click.command("status")
@connection_options
@output_option
@handle_errors
def status(federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """Cluster liveness, and the config revision every gateway applied (like istioctl
    proxy-status).

    \b
    Clusters.  STATE counts every sign of life: LIVE when its exporter (the agent
    or `isthmus export`) heartbeats its export lease, or a gateway of it reports;
    a cluster whose gateway reports but that has no exporter is LIVE with EXPORTS
    "no exports".  STALE: neither is current, the exports are still routed until
    the lease runs out; EXPIRED: no export lease and no gateway; REVOKED.
    GATEWAYS: its gateway rows below; HEARTBEAT and LEASE LEFT: the export lease.

    \b
    Gateways: one row per gateway process, named <cluster>/<host>-<pid>.  Revisions
    are config revisions: APPLIED is the one the gateway holds (its /config says the
    same), LATEST the newest config change this federation replica has streamed.
      SYNCED              APPLIED = LATEST
      SYNCED (ahead)      APPLIED > LATEST: it got a newer change from another
                          replica first
      STALE               APPLIED < LATEST: it has not applied the latest change
      STALE (no report)   no report for 2/3 of its status lease (crashed, or cut
                          off from the federation); the row disappears when the
                          lease ends (`isthmus federation serve --status-ttl`)
      REJECTED rev N: reason   it could not build revision N; serves APPLIED
      NO REPORT           a joined cluster none of whose gateways reports
    POLICY, ROUTES: whether it enforces the newest policy change and the newest
    TrafficRoute change (the header names their revisions).  CONFIRMED: how long ago it last knew its config current (it grows
    while its watch is down, though it keeps serving); REPORTED: its last report.
    """
    from rich.markup import escape  # the reason is the gateway's text, not table markup

    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        st = client.status()
    per_cluster: dict[str, int] = {}
    for g in st.gateways:
        per_cluster[g.cluster] = per_cluster.get(g.cluster, 0) + 1
    if output == "json":
        print_json(
            {
                "config_revision": st.config_revision,  # LATEST
                "policy_revision": st.policy_revision,  # the newest policy change
                "route_revision": st.route_revision,  # the newest TrafficRoute or TrafficPolicy change
                "clusters": [{"cluster": lv.cluster, **_liveness_json(lv), "gateways": per_cluster.get(lv.cluster, 0)}
                             for lv in st.liveness],
                "gateways": [
                    {
                        "cluster": g.cluster,
                        "gateway_id": g.gateway_id,
                        "applied_revision": g.applied_revision,
                        "reported_at": g.reported_at,
                        "state": g.state,
                        "synced": g.synced,
                        "reporting": not g.silent,
                        "enforces_policy": g.enforces_policy,
                        "routes_applied": g.routes_applied,
                        "rejected_revision": g.rejected_revision or None,
                        "rejected_reason": g.rejected_reason or None,
                        "confirmed_at": g.confirmed_at or None,
                    }
                    for g in st.gateways
                ],
                "clusters_without_report": [c for c in st.clusters if c not in per_cluster],
            }
        )
        return
    live_rows = [
        (
            lv.cluster,
            lv.state,
            per_cluster.get(lv.cluster, 0),
            _exports(lv),
            _secs(lv.last_heartbeat_age),
            f"{lv.lease_remaining}s/{lv.lease_ttl}s" if lv.lease_ttl else "-",
        )
        for lv in st.liveness
    ]
    print_table("clusters", ("CLUSTER", "STATE", "GATEWAYS", "EXPORTS", "HEARTBEAT", "LEASE LEFT"), live_rows)
    rows = [
        (g.cluster, g.gateway_id, g.applied_revision, st.config_revision, escape(g.state),
         "yes" if g.enforces_policy else "NO", "yes" if g.routes_applied else "NO",
         _age(g.confirmed_at), _age(g.reported_at))
        for g in st.gateways
    ]
    rows += [(c, "-", "-", st.config_revision, "NO REPORT", "-", "-", "-", "-")
             for c in st.clusters if c not in per_cluster]
    print_table(
        f"gateways (latest config revision {st.config_revision}; newest policy change: revision "
        f"{st.policy_revision}; newest route or traffic-policy change: revision {st.route_revision})",
        ("CLUSTER", "GATEWAY", "APPLIED", "LATEST", "STATE", "POLICY", "ROUTES", "CONFIRMED", "REPORTED"),
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
