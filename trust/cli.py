"""``isthmus trust ...``: the federation CA from the command line.

Errors (TrustError, OSError) reach the ``isthmus`` command's one error boundary
(``federation/_errorboundary.py``), which prints one line and exits 2 for bad input, 1
otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from . import _ca
from ._bundle import spiffe_bundle_json
from ._errors import TrustError
from ._files import load_certs, parse_duration, read_passphrase
from ._spiffe import SpiffeId, validate_cluster_name
from ._store import ClusterCA, TrustDir, fingerprint, trust_domain_of


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _warn_if_capped(cert: x509.Certificate, validity: float, now: dt.datetime) -> None:
    """A certificate never outlives its issuer: say so when the requested validity was cut."""
    wanted = now + dt.timedelta(seconds=validity)
    got = _ca.not_after(cert)
    if got < wanted - dt.timedelta(minutes=1):
        _warn(f"the requested validity would end {wanted:%Y-%m-%d %H:%M:%S}Z, but the certificate ends "
              f"{got:%Y-%m-%d %H:%M:%S}Z, when its issuer ({cert.issuer.rfc4514_string()}) expires: "
              "renew the issuer for longer-lived certificates")


def _warn_if_revoked(ca_dir: Path, ca: x509.Certificate) -> None:
    """Issuing from a revoked CA works, but every peer will refuse what it issues."""
    from ._store import load_crl

    for crl_path in (ca_dir.parent.parent / "crl.pem", ca_dir.parent / "crl.pem"):
        try:
            crl = load_crl(crl_path.read_bytes(), crl_path)
        except (OSError, TrustError):
            continue  # no CRL there (or not one we can read): nothing to warn about
        if crl.issuer == ca.issuer and crl.get_revoked_certificate_by_serial_number(ca.serial_number) is not None:
            _warn(f"the CA in {ca_dir} (serial {ca.serial_number:x}) is revoked by {crl_path}: "
                  "gateways will refuse the certificates it issues; re-join or re-issue the cluster CA")
            return


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except TrustError as exc:
        raise click.BadParameter(str(exc)) from None


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_cluster_name(value)
    except TrustError as exc:
        raise click.BadParameter(str(exc)) from None


_dir = click.option("--dir", "trust_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The federation trust folder.")
_passphrase = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="File holding the passphrase that encrypts (or decrypts) the CA key.",
)


@click.group()
def trust() -> None:
    """The federation CA: root, cluster CAs, SPIFFE certificates, bundle, CRL."""


@trust.command()
@_dir
@click.option("--trust-domain", help="Federation trust domain, e.g. isthmus.local (lowercase).")
@click.option("--key-type", type=click.Choice(_ca.KEY_TYPES), default="ec-p256", show_default=True)
@click.option("--validity", default="10y", show_default=True, callback=_duration, help="Root lifetime: 30d, 10y, ...")
@click.option("--force", is_flag=True, help="Replace an existing root (everything issued from it stops validating).")
@click.option("--from-cert", type=click.Path(dir_okay=False, path_type=Path), help="Import this CA certificate as the root.")
@click.option("--from-key", type=click.Path(dir_okay=False, path_type=Path), help="Its private key (with --from-cert).")
@click.option("--from-key-passphrase-file", type=click.Path(dir_okay=False, path_type=Path), help="Passphrase of --from-key, if encrypted.")
@_passphrase
def init(trust_dir: Path, trust_domain: str | None, key_type: str, validity: float, force: bool,
         from_cert: Path | None, from_key: Path | None, from_key_passphrase_file: Path | None,
         passphrase_file: Path | None) -> None:
    """Create (or import) the federation root: DIR/root.crt, DIR/root.key (0600)."""
    td = TrustDir(trust_dir, read_passphrase(passphrase_file))
    if (from_cert is None) != (from_key is None):
        raise click.UsageError("--from-cert and --from-key go together")
    if from_cert is not None and from_key is not None:
        cert = td.import_root(from_cert, from_key, trust_domain, read_passphrase(from_key_passphrase_file), force)
        verb = "imported"
    else:
        if not trust_domain:
            raise click.UsageError("--trust-domain is required (e.g. --trust-domain isthmus.local)")
        cert = td.init(trust_domain, key_type, validity, force)
        verb = "created"
    click.echo(f"{verb} federation root for trust domain {td.trust_domain}")
    click.echo(f"  certificate: {td.root_cert_path}")
    click.echo(f"  key:         {td.root_key_path} (mode 0600{', encrypted' if td.passphrase else ''})")
    click.echo(f"  valid until: {_ca.not_after(cert):%Y-%m-%d %H:%M:%S}Z")
    click.echo(f"  pin:         {_ca.ca_pin(cert)}")


@trust.command("issue-cluster")
@click.argument("name", callback=_name)
@_dir
@click.option("--validity", default="90d", show_default=True, callback=_duration)
@click.option("--key-type", type=click.Choice(_ca.KEY_TYPES), default="ec-p256", show_default=True)
@_passphrase
def issue_cluster(name: str, trust_dir: Path, validity: float, key_type: str, passphrase_file: Path | None) -> None:
    """Issue cluster NAME's intermediate CA into DIR/clusters/NAME/."""
    td = TrustDir(trust_dir, read_passphrase(passphrase_file))
    now = _ca.utcnow()
    ca = td.issue_cluster(name, validity, key_type, now=now)
    cert = ca.cert
    _warn_if_capped(cert, validity, now)
    click.echo(f"issued cluster CA for {name}: spiffe://{ca.trust_domain}")
    click.echo(f"  folder:      {ca.path} (ca.crt, ca.key, chain.pem, bundle.pem)")
    click.echo(f"  valid until: {_ca.not_after(cert):%Y-%m-%d %H:%M:%S}Z")


@trust.command("issue")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="A cluster CA folder (DIR/clusters/NAME).")
@click.option("--spiffe-id", required=True, help="spiffe://NAME.<td>/ns/N/sa/S")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dns", multiple=True, help="Extra DNS SAN (repeatable).")
@click.option("--validity", default="24h", show_default=True, callback=_duration)
@_passphrase
def issue(ca_dir: Path, spiffe_id: str, out_dir: Path, dns: tuple[str, ...], validity: float, passphrase_file: Path | None) -> None:
    """Issue a workload X509-SVID: OUT/cert.pem, OUT/key.pem (0600), OUT/bundle.pem."""
    ca = ClusterCA(ca_dir, read_passphrase(passphrase_file))
    _warn_if_revoked(ca_dir, ca.cert)
    now = _ca.utcnow()
    files = ca.issue(SpiffeId.parse(spiffe_id), out_dir, dns, validity, now=now)
    _warn_if_capped(load_certs(files.cert)[0], validity, now)
    click.echo(f"issued {spiffe_id}")
    click.echo(f"  {files.cert}\n  {files.key} (0600)\n  {files.bundle}")


@trust.command("issue-admin")
@click.argument("name", callback=_name)
@_dir
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--validity", default="24h", show_default=True, callback=_duration)
@_passphrase
def issue_admin(name: str, trust_dir: Path, out_dir: Path, validity: float, passphrase_file: Path | None) -> None:
    """Issue an operator certificate spiffe://<td>/admin/NAME for the federation API."""
    td = TrustDir(trust_dir, read_passphrase(passphrase_file))
    now = _ca.utcnow()
    files = td.issue_admin(name, out_dir, validity, now=now)
    _warn_if_capped(load_certs(files.cert)[0], validity, now)
    click.echo(f"issued spiffe://{td.trust_domain}/admin/{name}")
    click.echo(f"  {files.cert}\n  {files.key} (0600)\n  {files.bundle}")
    click.echo(f"  use it with: export ISTHMUS_CERT_DIR={out_dir}")


@trust.command("revoke-cluster")
@click.argument("name", callback=_name)
@_dir
@_passphrase
def revoke_cluster(name: str, trust_dir: Path, passphrase_file: Path | None) -> None:
    """Revoke every CA issued to cluster NAME (DIR/crl.pem lists them)."""
    td = TrustDir(trust_dir, read_passphrase(passphrase_file))
    serials = td.revoke_cluster(name)
    click.echo(f"revoked cluster {name}: {len(serials)} CA certificate(s) now listed in {td.crl_path}")


@trust.command("rotate-root")
@_dir
@click.option("--key-type", type=click.Choice(_ca.KEY_TYPES), default="ec-p256", show_default=True)
@click.option("--validity", default="10y", show_default=True, callback=_duration)
@_passphrase
def rotate_root(trust_dir: Path, key_type: str, validity: float, passphrase_file: Path | None) -> None:
    """Make a new root current, keeping the old ones trusted (bundle A → A+B).

    Then re-issue cluster CAs and leaves from the new root, and finish with
    `isthmus trust bundle prune` (bundle → B only).
    """
    td = TrustDir(trust_dir, read_passphrase(passphrase_file))
    cert = td.rotate_root(key_type, validity)
    click.echo(f"new root {fingerprint(cert)[:16]}… is current; the bundle holds {len(td.bundle())} roots")


@trust.group()
def bundle() -> None:
    """The trust bundle: the roots every peer trusts."""


@bundle.command("show")
@_dir
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def bundle_show(trust_dir: Path, output: str) -> None:
    """List the roots in the bundle."""
    td = TrustDir(trust_dir)
    roots = [_describe(c) for c in td.bundle()]
    if output == "json":
        click.echo(json.dumps(roots, indent=2))
        return
    for r in roots:
        click.echo(f"{r['spiffe_id'] or r['subject']}  sha256:{r['fingerprint'][:16]}…  until {r['not_after']}")


@bundle.command("add")
@click.argument("cert_file", type=click.Path(dir_okay=False, path_type=Path))
@_dir
def bundle_add(cert_file: Path, trust_dir: Path) -> None:
    """Trust another root (e.g. during a migration)."""
    roots = TrustDir(trust_dir).add_to_bundle(cert_file)
    click.echo(f"the bundle holds {len(roots)} roots")


@bundle.command("prune")
@_dir
@_passphrase
def bundle_prune(trust_dir: Path, passphrase_file: Path | None) -> None:
    """Keep only the current root (the last step of a rotation)."""
    TrustDir(trust_dir, read_passphrase(passphrase_file)).prune_bundle()
    click.echo("the bundle holds the current root only")


@bundle.command("export")
@_dir
@click.option("--format", "fmt", type=click.Choice(["pem", "spiffe"]), default="pem", show_default=True,
              help="pem, or a SPIFFE bundle (JWKS, use x509-svid) for SPIRE.")
def bundle_export(trust_dir: Path, fmt: str) -> None:
    """Print the bundle (PEM, or SPIFFE JWKS)."""
    td = TrustDir(trust_dir)
    if fmt == "spiffe":
        click.echo(spiffe_bundle_json(td.bundle()))
    else:
        click.echo(td.bundle_pem().decode(), nl=False)


def _describe(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or _ca.utcnow()
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca, pathlen = bc.ca, bc.path_length
    except x509.ExtensionNotFound:
        is_ca, pathlen = False, None
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        permitted = [n.value for n in (nc.permitted_subtrees or [])]
    except x509.ExtensionNotFound:
        permitted = []
    ids = _ca.spiffe_ids_of(cert)
    left = _ca.not_after(cert) - now
    return {
        "spiffe_id": ids[0] if len(ids) == 1 else (ids or None),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "is_ca": is_ca,
        "path_length": pathlen,
        "name_constraints": permitted,
        "not_before": f"{_ca.not_before(cert):%Y-%m-%dT%H:%M:%SZ}",
        "not_after": f"{_ca.not_after(cert):%Y-%m-%dT%H:%M:%SZ}",
        "seconds_left": int(left.total_seconds()),
        "expired": left.total_seconds() <= 0,
        "fingerprint": fingerprint(cert),
        "trust_domain": trust_domain_of(cert),
    }


def _human(seconds: int) -> str:
    if seconds <= 0:
        return f"EXPIRED {_human(-seconds)} ago" if seconds < 0 else "EXPIRED"
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m = rem // 60
    return " ".join(p for p in (f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m and not d else "") if p) or f"{seconds}s"


@trust.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def show(file: Path, output: str) -> None:
    """Show a certificate (or chain): SPIFFE ID, issuer chain, validity, time left."""
    certs = [_describe(c) for c in load_certs(file)]
    if output == "json":
        click.echo(json.dumps(certs if len(certs) > 1 else certs[0], indent=2))
        return
    for i, c in enumerate(certs):
        head = "certificate" if i == 0 else f"issuer [{i}]"
        click.echo(f"{head}: {c['spiffe_id'] or '(no SPIFFE ID)'}")
        click.echo(f"  subject:     {c['subject']}")
        click.echo(f"  issuer:      {c['issuer']}")
        kind = f"CA (path length {c['path_length']})" if c["is_ca"] else "leaf"
        click.echo(f"  kind:        {kind}")
        if c["name_constraints"]:
            click.echo(f"  permits:     URIs in {', '.join(c['name_constraints'])}")
        click.echo(f"  valid:       {c['not_before']} → {c['not_after']}")
        click.echo(f"  time left:   {_human(c['seconds_left'])}")
        click.echo(f"  serial:      {c['serial']}")
