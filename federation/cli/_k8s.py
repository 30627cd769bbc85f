"""Kubernetes verbs: ``join-cluster``, ``leave-cluster``, ``check`` and ``agent run``.

Thin click layer over :mod:`federation.agent` (its public names); errors become one
clear line and exit 2 (bad input) or 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._common import AddressList, log_level_option, setup_logging
from .. import names


def _default_out_dir(name: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("isthmus")) / "clusters" / name


def _rest(kubeconfig: str | None, context: str | None):  # type: ignore[no-untyped-def]
    from ..agent import Rest, load_api_client

    return Rest(load_api_client(kubeconfig, context))


def _say(msg: str) -> None:
    click.echo(f"• {msg}", err=True)


def _fail(exc: Exception) -> None:
    """One line and exit 2 (bad input) or 1, as every command (federation/_errorboundary.py)."""
    from .._errorboundary import to_click

    raise to_click(exc) from None


def kube_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--context", default=None, help="kube-context to use (default: the current one).")(f)
    f = click.option("--kubeconfig", default=None, envvar="KUBECONFIG", help="kubeconfig file (default: ~/.kube/config).")(f)
    return f


def _labels(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--label")
        out[k] = v
    return out


@click.command("join-cluster")
@click.argument("name")
@click.option("--federation", "federation_addr", envvar="ISTHMUS_FEDERATION", required=True, type=AddressList(),
              help="Federation address(es) HOST:PORT[,...]. Env: ISTHMUS_FEDERATION.")
@click.option("--token", envvar="ISTHMUS_JOIN_TOKEN", default="", help="One-time join token (not needed to re-run after a join).")
@click.option("--ca-pin", default="", help="sha256:<hex> pin of the federation root (printed with the token).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Join folder (cluster CA key, certificates); default: the user data dir / clusters/NAME.")
@click.option("--gateway-service-type", type=click.Choice(["LoadBalancer", "NodePort"]), default="LoadBalancer", show_default=True)
@click.option("--gateway-address", default="", help="Register this HOST:PORT instead of waiting for the Service's address.")
@click.option("--image", default=None, help="Isthmus image (default: the release's).")
@click.option("--join-address", default=None, help="Join port address; default: the federation port + 1.")
@click.option("--label", multiple=True, help="KEY=VALUE cluster label, e.g. region=eu-west-1 (repeatable).")
@click.option("--validity", default="", help="Requested cluster CA validity, e.g. 90d.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the gateway's address.")
@click.option("--dry-run", is_flag=True, help="Print the manifests (Secrets without their data) and change nothing.")
@kube_options
def join_cluster(name: str, federation_addr: str, token: str, ca_pin: str, out_dir: Path | None, gateway_service_type: str,
                 gateway_address: str, image: str | None, join_address: str | None, label: tuple[str, ...], validity: str,
                 timeout: float, dry_run: bool, kubeconfig: str | None, context: str | None) -> None:
    """Join the cluster of the current kube-context to the federation as NAME and install Isthmus in it."""
    setup_logging("warning")
    from ..agent import manifests as m
    from ..agent import JoinOptions, join_cluster as run
    from ..client import parse_addresses

    try:
        import trust

        trust.validate_cluster_name(name)
        federation = tuple(parse_addresses(federation_addr))
        if dry_run:
            click.echo(m.to_yaml(m.install(name, federation, None, image or m.IMAGE, gateway_service_type, gateway_address)), nl=False)
            return
        opts = JoinOptions(
            name=name, federation=federation, out_dir=out_dir or _default_out_dir(name), token=token, ca_pin=ca_pin,
            image=image or m.IMAGE, service_type=gateway_service_type, gateway_address=gateway_address,
            join_address=join_address, labels=_labels(label), validity=validity, wait_timeout=timeout,
        )
        report = run(_rest(kubeconfig, context), opts, _say)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    for obj, outcome in report.applied:
        click.echo(f"{obj} {outcome}")
    click.echo(f"cluster {name} {report.joined}; gateway registered at {report.gateway_address}")


@click.command("leave-cluster")
@click.argument("name")
@click.option("--trust-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The federation's trust folder: revoke NAME's CA there (the federation publishes the CRL).")
@click.option("--no-revoke", is_flag=True, help="Only uninstall; do not revoke (e.g. the CA is revoked elsewhere).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Join folder (default as join-cluster).")
@click.option("--keep-namespace", is_flag=True, help="Leave the isthmus-system namespace in place.")
@kube_options
def leave_cluster(name: str, trust_dir: Path | None, no_revoke: bool, out_dir: Path | None, keep_namespace: bool,
                  kubeconfig: str | None, context: str | None) -> None:
    """Remove Isthmus from the cluster of the current kube-context and revoke cluster NAME."""
    setup_logging("warning")
    from ..agent import leave_cluster as run

    if trust_dir is None and not no_revoke:
        raise click.UsageError(
            "leave-cluster revokes the cluster: pass --trust-dir DIR (the federation's trust folder), "
            "or --no-revoke and run `isthmus trust revoke-cluster NAME --dir DIR` where the trust folder lives"
        )
    try:
        report = run(_rest(kubeconfig, context), name, out_dir or _default_out_dir(name), None if no_revoke else trust_dir,
                     keep_namespace, _say)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    for d in report.deleted:
        click.echo(f"{d} deleted")
    click.echo(f"cluster {name} left the federation" + (f"; {len(report.revoked)} CA certificate(s) revoked" if report.revoked else ""))


@click.command("check")
@click.option("--pre", is_flag=True, help="Pre-install checks (can this cluster take Isthmus?).")
@click.option("--federation", "federation_addr", envvar="ISTHMUS_FEDERATION", default="", help="Federation address(es) to test.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@kube_options
def check(pre: bool, federation_addr: str, output: str, kubeconfig: str | None, context: str | None) -> None:
    """Check an Isthmus install (or, with --pre, that a cluster is ready for one); exit 1 on failure."""
    setup_logging("error")
    from ..agent import checks as c

    try:
        rest = _rest(kubeconfig, context)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    ctx = c.Context(rest, [a.strip() for a in federation_addr.split(",") if a.strip()])
    cats = c.run_checks(ctx, c.PRE if pre else c.POST)
    if output == "json":
        click.echo(json.dumps(c.as_json(cats), indent=2))
    else:
        click.echo(c.as_text(cats))
    if not c.success(cats):
        sys.exit(1)


@click.group("agent")
def agent() -> None:
    """The per-cluster Kubernetes agent (exports and mirrors)."""


@agent.command("run")
@click.option("--cluster", envvar="ISTHMUS_CLUSTER", required=True, help="This cluster's name. Env: ISTHMUS_CLUSTER.")
@click.option("--federation", "federation_addr", envvar="ISTHMUS_FEDERATION", required=True, type=AddressList(),
              help="HOST:PORT[,...]. Env: ISTHMUS_FEDERATION.")
@click.option("--cert-dir", envvar="ISTHMUS_CERT_DIR", required=True, type=click.Path(file_okay=False),
              help="The agent's cert.pem, key.pem, bundle.pem. Env: ISTHMUS_CERT_DIR.")
@click.option("--health-listen", default="127.0.0.1:15020", show_default=True, help="HOST:PORT for /healthz and /readyz; empty: off.")
@click.option("--lease-ttl", default=30, show_default=True, type=click.IntRange(3, 3600), help="Export lease TTL, seconds.")
@click.option("--resync", default=300.0, show_default=True, type=click.FloatRange(1.0), help="Full resync period, seconds.")
@click.option("--rotate-interval", default=600.0, show_default=True, type=click.FloatRange(0.0),
              help="Seconds between checks that renew the in-cluster gateway/agent certificates (Secrets in isthmus-system); 0: off.")
@click.option("--dns-suffix", default=names.DNS_SUFFIX, show_default=True, help="Suffix of the gateway's outbound names.")
@log_level_option
@kube_options
def agent_run(cluster: str, federation_addr: str, cert_dir: str, health_listen: str, lease_ttl: int, resync: float,
              rotate_interval: float, dns_suffix: str, log_level: str, kubeconfig: str | None, context: str | None) -> None:
    """Run the agent: export annotated Services, mirror what other clusters export here."""
    setup_logging(log_level)
    import trio

    import trust

    from ..agent import Agent, AgentConfig, Kube, load_api_client, serve_health
    from .._credentials import check_cert_dir
    from ..client import FederationClient

    try:
        trust.validate_cluster_name(cluster)
        check_cert_dir(cert_dir)  # expired or foreign credentials: say so before any call
        fed = FederationClient(federation_addr, cert_dir)
        kube = Kube(load_api_client(kubeconfig, context))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    ag = Agent(AgentConfig(cluster=cluster, lease_ttl=lease_ttl, resync_interval=resync, dns_suffix=dns_suffix,
                                 rotate_interval=rotate_interval), kube, fed)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if health_listen:
                host, _, port = health_listen.rpartition(":")
                await nursery.start(serve_health, host or "0.0.0.0", int(port), ag.synced.is_set)
            await nursery.start(ag.run)
            with trio.open_signal_receiver(2, 15) as signals:  # SIGINT, SIGTERM: stop cleanly
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        fed.close()
