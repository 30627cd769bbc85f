"""``isthmus clusters``, ``isthmus services``, ``isthmus status``: what is joined, exported, applied."""

from __future__ import annotations

import time

import click

from ._cli_common import connection_options, handle_errors, make_client, output_option, print_json, print_table, setup_logging


def _age(t: float) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
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
        records = client.list_clusters()
        services = client.list_services()
    counts: dict[str, int] = {}
    for s in services:
        counts[s.cluster] = counts.get(s.cluster, 0) + 1
    if output == "json":
        print_json([{**r.model_dump(mode="json", exclude={"ca_cert_pem"}), "exports": counts.get(r.name, 0)} for r in records])
        return
    rows = [
        (
            r.name,
            r.trust_domain,
            ",".join(r.gateway_addresses) or "-",
            ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-",
            counts.get(r.name, 0),
            _age(r.joined_at),
            "REVOKED" if r.revoked else "OK",
        )
        for r in records
    ]
    print_table("clusters", ("NAME", "TRUST DOMAIN", "GATEWAYS", "LABELS", "EXPORTS", "AGE", "STATE"), rows)


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
    """Config revision applied by every gateway: SYNCED or STALE (like istioctl proxy-status)."""
    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        st = client.status()
    reported = {g.cluster for g in st.gateways}
    if output == "json":
        print_json(
            {
                "config_revision": st.config_revision,
                "gateways": [
                    {
                        "cluster": g.cluster,
                        "gateway_id": g.gateway_id,
                        "applied_revision": g.applied_revision,
                        "reported_at": g.reported_at,
                        "state": g.state,
                    }
                    for g in st.gateways
                ],
                "clusters_without_report": [c for c in st.clusters if c not in reported],
            }
        )
        return
    rows = [(g.cluster, g.gateway_id, g.applied_revision, st.config_revision, g.state, _age(g.reported_at)) for g in st.gateways]
    rows += [(c, "-", "-", st.config_revision, "NO REPORT", "-") for c in st.clusters if c not in reported]
    print_table(f"status (config revision {st.config_revision})", ("CLUSTER", "GATEWAY", "APPLIED", "LATEST", "STATE", "REPORTED"), rows)
