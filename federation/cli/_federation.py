"""``isthmus federation``: serve the federation API, create join tokens, join a (non-Kubernetes) cluster."""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

import click

from ._common import (
    connection_options,
    AddressList,
    handle_errors,
    log_level_option,
    make_client,
    print_json,
    setup_logging,
)


@click.group("federation")
def federation() -> None:
    """The federation service: registry, trust distribution and config stream."""


@federation.command()
@click.option("--trust-dir", required=True, type=click.Path(file_okay=False), help="Federation root folder (isthmus trust init).")
@click.option("--listen", default="0.0.0.0:7443", show_default=True, type=AddressList(single=True),
              help="mTLS API address HOST:PORT.")
@click.option("--join-listen", default=None, type=AddressList(single=True),
              help="Join (server-auth TLS) address; default: the --listen port + 1.")
@click.option("--etcd", default="", help="etcd endpoints URL[,URL...]; none: start an embedded etcd.")
@click.option("--etcd-prefix", default="/isthmus/", show_default=True, help="Key prefix in etcd.")
@click.option("--etcd-ca", type=click.Path(dir_okay=False),
              help="CA certificate (PEM) that signed etcd's certificates: client TLS to https:// endpoints.")
@click.option("--etcd-cert", type=click.Path(dir_okay=False),
              help="Client certificate (PEM) for etcd's --client-cert-auth (with --etcd-key).")
@click.option("--etcd-key", type=click.Path(dir_okay=False), help="Client key (PEM, mode 0600) for --etcd-cert.")
@click.option("--etcd-server-name", default="",
              help="Name checked in every etcd member's certificate; default: the first endpoint's host.")
@click.option("--etcd-wait", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for etcd at start (it may still be starting) before exiting with the reason.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="State folder (embedded etcd, server TLS); default: one per federation root in the user data dir.")
@click.option("--advertise", multiple=True, help="Extra DNS name or IP for the server certificate (repeatable).")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="File with the root key passphrase.")
@click.option("--trust-sync-interval", default=5.0, show_default=True, help="Seconds between checks of the trust folder (bundle, CRL).")
@click.option("--liveness-interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between looks for clusters turned STALE (streamed to gateways, which leave them out of splits).")
@click.option("--metrics-listen", default="", help="Serve Prometheus metrics on HOST:PORT (/metrics); default: off.")
@click.option("--status-ttl", default=60, show_default=True, metavar="SECONDS",
              help="Lease of a gateway's status entry: a gateway that stops reporting shows STALE after 2/3 of it "
                   "and disappears after it (5-3600; gateways must report at least every third of it: "
                   "federation.report_interval).")
@click.option("--web-listen", default="auto", show_default=True, metavar="HOST:PORT|auto|off",
              help="The topology page (HTML, and its JSON at /api/v1/topology); auto: 127.0.0.1 at the --listen "
                   "port + 2. A non-loopback address needs --web-token-file.")
@click.option("--web-token-file", type=click.Path(dir_okay=False, exists=True),
              help="File with the page's login token (at least 16 characters).")
@click.option("--prometheus", default="", metavar="URL",
              help="The page reads the traffic graph from this Prometheus (the gateways' istio_* metrics) instead "
                   "of the gateways' pushed summaries.")
@log_level_option
def serve(
    trust_dir: str,
    listen: str,
    join_listen: str | None,
    etcd: str,
    etcd_prefix: str,
    etcd_ca: str | None,
    etcd_cert: str | None,
    etcd_key: str | None,
    etcd_server_name: str,
    etcd_wait: float,
    data_dir: str | None,
    advertise: tuple[str, ...],
    passphrase_file: str | None,
    trust_sync_interval: float,
    liveness_interval: float,
    metrics_listen: str,
    status_ttl: int,
    web_listen: str,
    web_token_file: str | None,
    prometheus: str,
    log_level: str,
) -> None:
    """Serve the federation API (stops on SIGTERM/SIGINT)."""
    setup_logging(log_level)
    from trust import read_passphrase

    from ..server import DataDirLock, EtcdTls, ServeConfig, default_data_dir, serve as run

    def main() -> None:
        tls = None
        if etcd_ca or etcd_cert or etcd_key or etcd_server_name:
            if not etcd_ca:
                raise click.UsageError("--etcd-cert, --etcd-key and --etcd-server-name need --etcd-ca "
                                       "(the CA that signed etcd's certificates)")
            tls = EtcdTls(Path(etcd_ca), Path(etcd_cert) if etcd_cert else None,
                          Path(etcd_key) if etcd_key else None, etcd_server_name)
        cfg = ServeConfig(
            trust_dir=Path(trust_dir),
            listen=listen,
            join_listen=join_listen or "",
            etcd=etcd,
            etcd_prefix=etcd_prefix,
            etcd_tls=tls,
            etcd_wait=etcd_wait,
            # Scoped to this federation's root, held by this server (federation/server/_datadir.py).
            data_dir=Path(data_dir) if data_dir else default_data_dir(trust_dir),
            advertise=advertise,
            passphrase=read_passphrase(passphrase_file),
            trust_sync_interval=trust_sync_interval,
            liveness_interval=liveness_interval,
            metrics_listen=metrics_listen,
            status_ttl=status_ttl,
            web_listen=web_listen,
            web_token_file=Path(web_token_file) if web_token_file else None,
            prometheus=prometheus,
        )
        lock = DataDirLock(cfg.data_dir).acquire()
        try:
            asyncio.run(run(cfg))
        finally:
            lock.release()

    handle_errors(main)()


@federation.command("wait")
@click.option("--timeout", default="30s", show_default=True, help="How long to wait, e.g. 30s, 2m.")
@connection_options
@handle_errors
def wait(timeout: str, federation_addr: str | None, cert_dir: str | None) -> None:
    """Wait until the federation answers its health check (for scripts, after `serve &`).

    Exit 0 once it is SERVING; 1 at the timeout, saying why it could not be reached.
    """
    import trust

    from .._errors import FederationError

    deadline = time.monotonic() + trust.parse_duration(timeout)
    with make_client(federation_addr, cert_dir) as client:
        while not client.health(timeout=1.0):
            if time.monotonic() >= deadline:
                from .._credentials import diagnose

                why = diagnose(client.addresses, client.creds)
                raise FederationError(f"the federation at {','.join(client.addresses)} did not answer within "
                                      f"{timeout}" + (f":\n  {why}" if why else ""))
            time.sleep(0.5)
    click.echo(f"the federation at {client.address} is serving")


@federation.group()
def token() -> None:
    """One-time join tokens."""


@token.command("create")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime, e.g. 10m, 1h, 2d.")
@click.option("--cluster", default="", help="Only this cluster name may join with it.")
@connection_options
@click.option("-o", "--output", type=click.Choice(["table", "json", "env"]), default="table", show_default=True,
              help="Output format; env: `export ISTHMUS_JOIN_TOKEN=... ISTHMUS_CA_PIN=...` lines for a shell's eval, "
                   "which `isthmus federation join` reads.")
@handle_errors
def token_create(ttl: str, cluster: str, federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """Create a join token (admin); print it with the root's pin, as kubeadm does."""
    setup_logging("warning")
    import trust

    seconds = int(trust.parse_duration(ttl))
    with make_client(federation_addr, cert_dir) as client:
        r = client.create_token(seconds, cluster)
    if output == "json":
        print_json({"token": r.token, "ca_pin": r.ca_pin, "expires_at": r.expires_at, "cluster": cluster})
        return
    if output == "env":
        click.echo(f"export ISTHMUS_JOIN_TOKEN={shlex.quote(r.token)}\nexport ISTHMUS_CA_PIN={shlex.quote(r.ca_pin)}")
        return
    click.echo(f"token:   {r.token}")
    click.echo(f"ca-pin:  {r.ca_pin}")
    click.echo(f"expires: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.expires_at))} (one use)")
    name = cluster or "NAME"
    click.echo(
        f"\njoin with:\n  isthmus federation join {name} --federation {client.addresses[0]} "
        f"--token {r.token} --ca-pin {r.ca_pin} --out-dir ./{name} --gateway-address HOST:PORT"
        "\n(HOST:PORT: where the other clusters reach this cluster's gateway inbound listener)"
    )


@federation.command("join")
@click.argument("name")
@click.option("--federation", "federation_addr", envvar="ISTHMUS_FEDERATION", required=True, type=AddressList(),
              help="Federation address(es) HOST:PORT[,...]. Env: ISTHMUS_FEDERATION.")
@click.option("--token", required=True, envvar="ISTHMUS_JOIN_TOKEN", help="One-time join token. Env: ISTHMUS_JOIN_TOKEN.")
@click.option("--ca-pin", required=True, envvar="ISTHMUS_CA_PIN",
              help="sha256:<hex> pin of the federation root (printed with the token). Env: ISTHMUS_CA_PIN.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Where to write the cluster's CA and certificates.")
@click.option("--gateway-address", multiple=True, type=AddressList(single=True), help="HOST:PORT of this cluster's inbound gateway (repeatable).")
@click.option("--gateway-dns", multiple=True, metavar="NAME",
              help="DNS name for the gateway's certificate, the name workloads verify when they connect to its "
                   "outbound listener with TLS, e.g. localhost (repeatable).")
@click.option("--label", multiple=True, help="KEY=VALUE label, e.g. region=eu-west-1 (repeatable).")
@click.option("--join-address", default=None, type=AddressList(single=True),
              help="Join port address; default: the federation port + 1.")
@click.option("--cert-dir", type=click.Path(file_okay=False), default=None, help="Re-join with this identity (the cluster's own, or an admin's).")
@click.option("--validity", default="", help="Requested cluster CA validity, e.g. 90d.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@handle_errors
def join_cmd(
    name: str,
    federation_addr: str,
    token: str,
    ca_pin: str,
    out_dir: str,
    gateway_address: tuple[str, ...],
    gateway_dns: tuple[str, ...],
    label: tuple[str, ...],
    join_address: str | None,
    cert_dir: str | None,
    validity: str,
    output: str,
) -> None:
    """Join cluster NAME (VMs, the demo, tests) and write its CA and certificates into --out-dir."""
    setup_logging("warning")
    from .._join import join

    started = time.time()
    if cert_dir:
        from .._credentials import check_cert_dir

        check_cert_dir(cert_dir)
    labels = {}
    for item in label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"label {item!r} must be KEY=VALUE", param_hint="--label")
        labels[k] = v
    result = join(
        name,
        federation_addr,
        token,
        ca_pin,
        out_dir,
        gateway_addresses=gateway_address,
        labels=labels,
        join_address=join_address,
        cert_dir=cert_dir,
        validity=validity,
        gateway_dns_names=gateway_dns,
    )
    if not gateway_address:
        click.echo(f"warning: {name} joined without --gateway-address: no other cluster can reach its gateway; "
                   f"join again with --cert-dir {result.out_dir}/agent --gateway-address HOST:PORT", err=True)
    if validity:
        _warn_if_capped(Path(result.out_dir) / "ca" / "ca.crt", validity, started)
    if output == "json":
        print_json({"cluster": result.name, "trust_domain": result.trust_domain, "out_dir": str(result.out_dir), "revision": result.revision})
    else:
        click.echo(f"joined {result.name} ({result.trust_domain}); credentials in {result.out_dir}")


def _warn_if_capped(ca_file: Path, validity: str, started: float) -> None:
    """The federation caps a cluster CA at the root's expiry: say so, with both dates."""
    import trust

    wanted = started + trust.parse_duration(validity)
    got = trust.load_cert(ca_file).not_valid_after_utc.timestamp()
    if got < wanted - 60:
        fmt = "%Y-%m-%d %H:%M:%SZ"
        click.echo(f"warning: the requested CA validity {validity} would end {time.strftime(fmt, time.gmtime(wanted))}, "
                   f"but the cluster CA ends {time.strftime(fmt, time.gmtime(got))}, when the federation root expires",
                   err=True)
