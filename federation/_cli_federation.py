"""``isthmus federation``: serve the federation API, create join tokens, join a (non-Kubernetes) cluster."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from ._cli_common import (
    connection_options,
    AddressList,
    handle_errors,
    log_level_option,
    make_client,
    output_option,
    print_json,
    setup_logging,
)


@click.group("federation")
def federation() -> None:
    """The federation service: registry, trust distribution and config stream."""


@federation.command()
@click.option("--trust-dir", required=True, type=click.Path(file_okay=False), help="Federation root folder (isthmus trust init).")
@click.option("--listen", default="0.0.0.0:7443", show_default=True, help="mTLS API address HOST:PORT.")
@click.option("--join-listen", default="", help="Join (server-auth TLS) address; default: the --listen port + 1.")
@click.option("--etcd", default="", help="etcd endpoints URL[,URL...]; none: start an embedded etcd.")
@click.option("--etcd-prefix", default="/isthmus/", show_default=True, help="Key prefix in etcd.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="State folder (embedded etcd, server TLS); default: one per federation root in the user data dir.")
@click.option("--advertise", multiple=True, help="Extra DNS name or IP for the server certificate (repeatable).")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="File with the root key passphrase.")
@click.option("--trust-sync-interval", default=5.0, show_default=True, help="Seconds between checks of the trust folder (bundle, CRL).")
@log_level_option
def serve(
    trust_dir: str,
    listen: str,
    join_listen: str,
    etcd: str,
    etcd_prefix: str,
    data_dir: str | None,
    advertise: tuple[str, ...],
    passphrase_file: str | None,
    trust_sync_interval: float,
    log_level: str,
) -> None:
    """Serve the federation API (stops on SIGTERM/SIGINT)."""
    setup_logging(log_level)
    from trust._files import read_passphrase

    from ._datadir import DataDirLock, default_data_dir
    from ._serve import ServeConfig, serve as run

    def main() -> None:
        cfg = ServeConfig(
            trust_dir=Path(trust_dir),
            listen=listen,
            join_listen=join_listen,
            etcd=etcd,
            etcd_prefix=etcd_prefix,
            # Scoped to this federation's root, held by this server (federation/_datadir.py).
            data_dir=Path(data_dir) if data_dir else default_data_dir(trust_dir),
            advertise=advertise,
            passphrase=read_passphrase(passphrase_file),
            trust_sync_interval=trust_sync_interval,
        )
        lock = DataDirLock(cfg.data_dir).acquire()
        try:
            asyncio.run(run(cfg))
        finally:
            lock.release()

    handle_errors(main)()


@federation.group()
def token() -> None:
    """One-time join tokens."""


@token.command("create")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime, e.g. 10m, 1h, 2d.")
@click.option("--cluster", default="", help="Only this cluster name may join with it.")
@connection_options
@output_option
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
    click.echo(f"token:   {r.token}")
    click.echo(f"ca-pin:  {r.ca_pin}")
    click.echo(f"expires: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.expires_at))} (one use)")
    name = cluster or "NAME"
    click.echo(
        f"\njoin with:\n  isthmus federation join {name} --federation {client.addresses[0]} "
        f"--token {r.token} --ca-pin {r.ca_pin} --out-dir ./{name}"
    )


@federation.command("join")
@click.argument("name")
@click.option("--federation", "federation_addr", envvar="ISTHMUS_FEDERATION", required=True, type=AddressList(),
              help="Federation address(es) HOST:PORT[,...]. Env: ISTHMUS_FEDERATION.")
@click.option("--token", required=True, envvar="ISTHMUS_JOIN_TOKEN", help="One-time join token.")
@click.option("--ca-pin", required=True, help="sha256:<hex> pin of the federation root (printed with the token).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Where to write the cluster's CA and certificates.")
@click.option("--gateway-address", multiple=True, type=AddressList(single=True), help="HOST:PORT of this cluster's inbound gateway (repeatable).")
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
    label: tuple[str, ...],
    join_address: str | None,
    cert_dir: str | None,
    validity: str,
    output: str,
) -> None:
    """Join cluster NAME (VMs, the demo, tests) and write its CA and certificates into --out-dir."""
    setup_logging("warning")
    from ._join import join

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
    )
    if output == "json":
        print_json({"cluster": result.name, "trust_domain": result.trust_domain, "out_dir": str(result.out_dir), "revision": result.revision})
    else:
        click.echo(f"joined {result.name} ({result.trust_domain}); credentials in {result.out_dir}")
