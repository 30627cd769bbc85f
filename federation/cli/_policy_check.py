"""``isthmus policy check``: would this request be allowed, and by which policy?

Evaluates the same :class:`~federation.policy.PolicySet` the gateways run, against local
policy files (``-f``) or the federation's current policies, without sending traffic.
Exit status: 0 allowed, 1 denied, 2 bad input or policies unavailable.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from ._common import AddressList
from ..policy import PolicyError, PolicySet, RequestAttributes, load_policies

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ADDRESSES = AddressList()


class BadInput(click.ClickException):
    """Bad input: exit status 2, like click's own usage errors."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


def parse_service(value: str) -> tuple[str, str]:
    """``ns/name``, ``name.ns`` or ``name.ns.svc[.cluster.local]`` -> (namespace, name)."""
    text = value.strip()
    if "/" in text:
        ns, _, name = text.partition("/")
    else:
        parts = text.removesuffix(".cluster.local").removesuffix(".svc").split(".")
        if len(parts) != 2:
            raise click.BadParameter(
                f"{value!r}: write the service as NAMESPACE/NAME or NAME.NAMESPACE", param_hint="--to"
            )
        name, ns = parts
    for what, v in (("namespace", ns), ("service name", name)):
        if not _LABEL.match(v):
            raise click.BadParameter(
                f"{value!r}: {what} {v!r} must be a lowercase RFC 1123 label", param_hint="--to"
            )
    return ns, name


def _parse_from(value: str) -> str:
    from trust import InvalidSpiffeId, SpiffeId

    try:
        return str(SpiffeId.parse(value))
    except InvalidSpiffeId as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from None


def _policies_from_files(files: tuple[str, ...]) -> tuple[list[Any], str]:
    policies: list[Any] = []
    for f in files:
        try:
            policies.extend(load_policies(f if f != "-" else sys.stdin.read(),
                                          source=None if f != "-" else "<stdin>"))
        except PolicyError as exc:
            raise BadInput(str(exc)) from None
    return policies, ", ".join(files)


def _policies_from_federation(federation_addr: str | None, cert_dir: str | None) -> tuple[list[Any], str]:
    from ._common import make_client  # grpc only when we talk to the federation
    from .._errors import FederationError, RemoteError

    try:
        with make_client(federation_addr, cert_dir) as client:
            policies = client.list_policies()
            where = client.address
    except click.UsageError as exc:
        raise BadInput(f"{exc.format_message()}; or evaluate local files with -f POLICIES.yaml") from None
    except RemoteError as exc:
        raise BadInput(f"cannot list the federation's policies: {exc.code.name}: {exc.details}") from None
    except FederationError as exc:
        raise BadInput(f"cannot list the federation's policies: {exc}") from None
    return list(policies), f"the federation at {where}"


@click.command("check")
@click.option("--from", "source", required=True, metavar="SPIFFE_ID",
              help="Caller identity, e.g. spiffe://east.isthmus.local/ns/web/sa/frontend.")
@click.option("--to", "dest", required=True, metavar="SERVICE",
              help="Destination service: NAMESPACE/NAME or NAME.NAMESPACE.")
@click.option("--method", default=None, metavar="M", help="HTTP method (omit with --path for TCP).")
@click.option("--path", default=None, metavar="P", help="HTTP path (omit with --method for TCP).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Destination port.")
@click.option("--source-cluster", default=None, metavar="CLUSTER",
              help="Caller's cluster (default: first label of the caller's trust domain).")
@click.option("--jwt-claims", default=None, metavar="JSON",
              help='Claims of a validated JWT, e.g. \'{"iss":"https://idp","sub":"alice"}\'.')
@click.option("--request-principal", default=None, metavar="ISS/SUB",
              help="JWT request principal (default: iss/sub of --jwt-claims).")
@click.option("-f", "--filename", "files", multiple=True, metavar="POLICIES.yaml",
              help="Evaluate these policy files (repeatable; '-' for stdin) instead of the "
                   "federation's policies.")
@click.option("--federation", "federation_addr", envvar="ISTHMUS_FEDERATION", metavar="HOST:PORT",
              type=_ADDRESSES,
              help="Federation address(es) to fetch policies from when no -f is given. "
                   "Env: ISTHMUS_FEDERATION.")
@click.option("--cert-dir", envvar="ISTHMUS_CERT_DIR", type=click.Path(file_okay=False),
              help="Admin credentials (cert.pem, key.pem, bundle.pem). Env: ISTHMUS_CERT_DIR.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def check(
    ctx: click.Context,
    source: str,
    dest: str,
    method: str | None,
    path: str | None,
    port: int | None,
    source_cluster: str | None,
    jwt_claims: str | None,
    request_principal: str | None,
    files: tuple[str, ...],
    federation_addr: str | None,
    cert_dir: str | None,
    output: str,
) -> None:
    """Would a request be allowed, and by which policy?  (No traffic is sent.)

    Without -f the policies come from the federation (--federation, --cert-dir).
    Exit status 0 when allowed, 1 when denied, 3 when allowed only if a CUSTOM
    policy's external authorizer allows (it cannot be asked offline), 2 on bad input (or
    when the federation's policies cannot be fetched).
    """
    principal = _parse_from(source)
    namespace, service = parse_service(dest)
    if path is not None and not path.startswith("/"):
        raise click.BadParameter(f"{path!r} must start with '/'", param_hint="--path")
    if (method is None) != (path is None):
        method = method or "GET"
        path = path or "/"
    claims = None
    if jwt_claims is not None:
        try:
            claims = json.loads(jwt_claims)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--jwt-claims") from None
        if not isinstance(claims, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--jwt-claims")
        if request_principal is None and isinstance(claims.get("iss"), str) \
                and isinstance(claims.get("sub"), str):
            request_principal = f"{claims['iss']}/{claims['sub']}"

    revision = 0  # list_policies() does not say at which revision; files have none
    if files:
        policies, origin = _policies_from_files(files)
    else:
        policies, origin = _policies_from_federation(federation_addr, cert_dir)
    try:
        policy_set = PolicySet(policies, revision=revision)
    except PolicyError as exc:
        raise BadInput(str(exc)) from None

    attrs = RequestAttributes.for_request(
        source_principal=principal,
        source_cluster=source_cluster,
        destination_namespace=namespace,
        destination_service=service,
        method=method,
        path=path,
        port=port,
        request_principal=request_principal,
        jwt_claims=claims,
    )
    decision = policy_set.evaluate(attrs)
    verdict = "ALLOWED" if decision.allowed else "DENIED"
    # CUSTOM: an external authorizer is asked first, and no one can know its answer
    # offline; a local deny stands whatever it says.
    providers = list(dict.fromkeys(p for _, p in decision.custom))
    depends = bool(providers) and decision.allowed
    if depends:
        verdict = "DEPENDS"
    if output == "json":
        click.echo(json.dumps({
            "allowed": decision.allowed,
            "decision": verdict,
            "policy": decision.policy,
            "action": decision.action,
            "reason": decision.reason,
            "audit": decision.audit,
            "audit_policy": decision.audit_policy,
            "custom": [{"policy": pol, "provider": prov} for pol, prov in decision.custom],
            "depends_on_custom": depends,
            "revision": revision,
            "policies_from": origin,
            "request": {
                "source_principal": attrs.source_principal,
                "source_cluster": attrs.source_cluster,
                "source_namespace": attrs.source_namespace,
                "destination": f"{namespace}/{service}",
                "method": method, "path": path, "port": port,
                "request_principal": request_principal,
            },
        }, indent=2))
    else:
        what = f"{method} {path}" if method else "TCP"
        click.echo(f"{verdict}: {principal} -> {namespace}/{service} {what}"
                   + (f" port {port}" if port else ""))
        click.echo(f"  policy:  {decision.policy or '(none)'} ({decision.action})")
        click.echo(f"  reason:  {decision.reason}")
        if decision.custom:
            names = ", ".join(f"{prov!r} (policy {pol})" for pol, prov in decision.custom)
            click.echo(f"  custom:  asked first: {names}; "
                       + ("allowed only if it allows (its answer cannot be known offline)" if depends
                          else "denied whatever it answers"))
        if decision.audit:
            click.echo(f"  audit:   yes ({decision.audit_policy})")
        n = len(policy_set)
        click.echo(f"  checked: {n} polic{'y' if n == 1 else 'ies'} from {origin}"
                   + (f" at revision {revision}" if revision else ""))
    ctx.exit(3 if depends else 0 if decision.allowed else 1)
