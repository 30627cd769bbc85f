"""``isthmus route ...``: work with TrafficRoutes (see ``federation/models.py``).

``set-weights`` changes one rule's weights in one step (canary pipelines); ``explain``
says where a request would go and why, from the federation's view or, with ``--live``,
from the calling cluster's gateway.  ``isthmus apply|get|delete`` handle whole routes.
"""

from __future__ import annotations

from typing import Any

import click

from ..names import GATEWAY_ADMIN_PORT
from ._common import connection_options, handle_errors, make_client, print_json, setup_logging


@click.group()
def route() -> None:
    """Traffic routes: canary weights and where a request would go."""


# ------------------------------------------------------------------ set-weights


def parse_weight(text: str) -> tuple[str, str, int]:
    """``CLUSTER=W`` or ``CLUSTER/SERVICE=W`` -> (cluster, service or "", weight); a
    click error naming the argument for anything else."""
    target, sep, value = text.partition("=")
    cluster, _, service = target.partition("/")
    if not sep or not cluster:
        raise click.BadParameter(f"{text!r}: expected CLUSTER=WEIGHT or CLUSTER/SERVICE=WEIGHT, e.g. west=20")
    try:
        weight = int(value.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: weight {value!r} is not a whole number (weights are non-negative "
                                 "integers, normalised over the rule)") from None
    if weight < 0:
        raise click.BadParameter(f"{text!r}: weight {weight} is negative (weights are non-negative integers)")
    return cluster.strip(), service.strip(), weight


@route.command("set-weights")
@click.argument("name")
@click.argument("weights", nargs=-1, required=True, metavar="CLUSTER[/SERVICE]=WEIGHT...")
@click.option("--rule", type=click.IntRange(min=0), default=None,
              help="The rule's index (0-based); default: the only rule, or the one that sends to every cluster given.")
@connection_options
@handle_errors
def set_weights(name: str, weights: tuple[str, ...], rule: int | None, federation_addr: str | None,
                cert_dir: str | None) -> None:
    """Change one rule's destination weights of TrafficRoute NAME in one step (admin).

    Destinations not named keep their weight. Concurrent calls never lose an update
    (compare-and-swap on the stored route). Prints the revision: gateways that report it
    (isthmus status) route with the new weights.

    Example: isthmus route set-weights cart east=80 west=20
    """
    parsed = []
    for i, w in enumerate(weights):
        try:
            parsed.append(parse_weight(w))
        except click.BadParameter as exc:
            exc.param_hint = f"WEIGHTS[{i}]"
            raise
    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        rev, new, r = client.set_route_weights(name, parsed, rule)
    split = " ".join(f"{d.cluster}/{new.destination_service(d.service)}={d.weight}" for d in new.rules[r].destinations)
    click.echo(f"TrafficRoute/{name} rules[{r}]: {split} (revision {rev})")


# ------------------------------------------------------------------ explain


def _parse_headers(values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{v!r}: write a header as NAME=VALUE, e.g. x-canary=1", param_hint="--header")
        out.append((name.strip().lower(), value))
    return out


def liveness_health(live: dict[str, Any]) -> Any:
    """The federation's health signal for :meth:`federation.traffic.RouteSet.explain`:
    a cluster whose lease says STALE or EXPIRED is out (revoked is in its record)."""
    from ..traffic import EXPIRED, STALE, Out

    def health(target: Any) -> Any:
        lv = live.get(target.cluster)
        if lv is None or lv.state not in ("STALE", "EXPIRED"):
            return None
        age = f"last heartbeat {lv.last_heartbeat_age:.0f}s ago" if lv.last_heartbeat_age >= 0 else ""
        return Out(STALE if lv.state == "STALE" else EXPIRED, age)

    return health


def _from_federation(host: str, source: str, method: str, path: str, headers: list[tuple[str, str]], tcp: bool,
                     federation_addr: str | None, cert_dir: str | None) -> dict[str, Any]:
    from ..models import Snapshot
    from ..traffic import Request, compile_routes

    with make_client(federation_addr, cert_dir) as client:
        records, live = client.clusters_with_liveness()
        services = client.list_services()
        routes = client.list_routes()
        revision = client.status().config_revision
    joined = sorted(r.name for r in records)
    if source not in joined:
        raise click.BadParameter(f"{source!r} is not a joined cluster (joined: {', '.join(joined) or 'none'})",
                                 param_hint="--from")
    snap = Snapshot(revision=revision, clusters=tuple(records), services=tuple(services), routes=tuple(routes))
    req = Request(method, path, raw=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers], tcp=tcp)
    return {"source": "federation", "cluster": source,
            **compile_routes(snap, source).explain(host, req, liveness_health(live))}


def _from_gateway(admin: str, host: str, source: str, method: str, path: str, headers: list[tuple[str, str]],
                  tcp: bool) -> dict[str, Any]:
    import httpx

    from .._errorboundary import CliError

    params: list[tuple[str, str]] = [("host", host), ("method", method), ("path", path)]
    params += [("header", f"{k}:{v}") for k, v in headers]
    if tcp:
        params.append(("tcp", "1"))
    url = admin.rstrip("/") + "/explain"
    try:
        r = httpx.get(url, params=params, timeout=10.0)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the gateway admin endpoint at {admin}: {exc}; run this where {source}'s "
                       "gateway admin listener is reachable (e.g. kubectl -n isthmus-system port-forward "
                       "deploy/isthmus-gateway 15000) or pass --admin URL") from None
    if r.status_code != 200:
        detail = r.text.strip()[:300]
        if r.status_code == 404:
            detail = "it has no /explain (an older gateway?)"
        raise CliError(f"the gateway admin endpoint at {admin} answered {r.status_code}: {detail}")
    try:
        doc = r.json()
    except ValueError:
        raise CliError(f"the gateway admin endpoint at {admin} did not answer JSON") from None
    if doc.get("cluster") != source:
        raise CliError(f"the gateway at {admin} is {doc.get('cluster')!r}'s, not {source!r}'s: "
                       f"pass --admin with {source}'s gateway admin URL", exit_code=2)
    return doc


def _entry(e: dict[str, Any]) -> str:
    name = f"{e['cluster']}/{e['service']}"
    if e["state"] == "out":
        return f"{name:24} out: {e['detail']}"
    parts = [f"{name:24}", e["state"]]
    if e.get("effective_weight"):
        parts.append(f"{e['effective_weight']:g}%")
    if e.get("detail") and e["state"] != "serving":
        parts.append(f"({e['detail']})")
    return " ".join(parts)


def render(doc: dict[str, Any]) -> list[str]:
    """An explanation (``RouteSet.explain``'s document) as lines for a terminal."""
    req = doc["request"]
    what = "TCP connection" if req["tcp"] else f"{req['method']} {req['path']}"
    view = (f"gateway of {doc['cluster']}, applied revision {doc.get('applied_revision')}"
            if doc.get("source") == "gateway" else f"federation, revision {doc['revision']}")
    res = doc["result"]
    lines = [f"{what} to {doc['host']} from {doc['from']} ({view})",
             f"  result:       {res['outcome']} ({res['status']}{' ' + res['flags'] if res['flags'] else ''})"
             + (f": {res['detail']}" if res["detail"] else "")]
    if doc["pinned"]:
        lines.append(f"  pinned:       {doc['pinned']} (a per-cluster name is never re-routed)")
    if doc["route"] or doc["rules"]:
        rule = "none matched" if doc["rule"] is None and doc["route"] else f"rule {doc['rule']}"
        lines.append(f"  route:        {doc['route'] or '(none: even spread)'}, {rule}")
        for r in doc["rules"]:
            if not r["matched"]:
                lines.append(f"    rule {r['index']} skipped: {r['why']}")
    loc = doc.get("locality")  # (absent from an older gateway's /explain)
    if loc and loc.get("mode"):
        lines.append(f"  locality:     {loc['mode']}, from the {loc['from']} "
                     f"(the caller's region: {loc['region'] or 'none: the label is not set'})")
    if doc["destinations"]:
        lines.append("  destinations:")
        for d in doc["destinations"]:
            lines.append(f"    {_entry(d)}   weight {d['weight']}")
    if doc["failover"]:
        lines.append("  failover order:")
        for f in doc["failover"]:
            lines.append(f"    {f['step'] + 1}. {f['spec']:>8} -> {_entry(f)}")
    if doc["serving"]:
        lines.append("  serving:      " + ", ".join(f"{s['cluster']}/{s['service']} {s['effective_weight']:g}%"
                                                   for s in doc["serving"]))
    if doc["clusters"]:
        lines.append("  exporting clusters:")
        for c in doc["clusters"]:
            role = f" [{c['role']}]" if c.get("role") else ""
            lines.append(f"    {_entry(c)}{role}")
    return lines


@route.command("explain")
@click.argument("host")
@click.option("--from", "source", required=True, metavar="CLUSTER", help="The calling cluster.")
@click.option("--method", default="GET", show_default=True, metavar="M", help="HTTP method.")
@click.option("--path", default="/", show_default=True, metavar="P", help="Request path (a query is ignored).")
@click.option("--header", "headers", multiple=True, metavar="K=V", help="A request header (repeatable).")
@click.option("--tcp", is_flag=True, help="A TCP connection: only destinations and failover apply.")
@click.option("--live", is_flag=True,
              help="Ask the calling cluster's gateway (its admin endpoint): what it is really doing, "
                   "with its own view of peer health.")
@click.option("--admin", "admin_url", envvar="ISTHMUS_GATEWAY_ADMIN", metavar="URL",
              default=f"http://127.0.0.1:{GATEWAY_ADMIN_PORT}", show_default=True,
              help="With --live: the calling cluster's gateway admin URL. Env: ISTHMUS_GATEWAY_ADMIN.")
@connection_options
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@handle_errors
def explain(host: str, source: str, method: str, path: str, headers: tuple[str, ...], tcp: bool, live: bool,
            admin_url: str, federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """Where a request to HOST from cluster --from would go, and why — no traffic is sent.

    The rule that matches, each destination's effective weight after health, the
    failover order, and for every exporting cluster why it is in or out.  Without --live
    the answer comes from the federation (clusters, their liveness, services, routes);
    with --live from the calling cluster's gateway, which runs the same selection.
    """
    setup_logging("warning")
    if not path.startswith("/"):
        raise click.BadParameter(f"{path!r} must start with '/'", param_hint="--path")
    parsed = _parse_headers(headers)
    method = method.upper()
    if live:
        doc = _from_gateway(admin_url, host, source, method, path, parsed, tcp)
    else:
        doc = _from_federation(host, source, method, path, parsed, tcp, federation_addr, cert_dir)
    if output == "json":
        print_json(doc)
        return
    for line in render(doc):
        click.echo(line)
