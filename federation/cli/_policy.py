"""``isthmus policy``: federation-wide AuthorizationPolicy and RequestAuthentication.

``apply``, ``list`` and ``delete`` are here; ``check`` (a decision without traffic) is in
``_policy_check.py`` and registered on the group below.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..policy import PolicyFileError, load_policies
from ._common import connection_options, handle_errors, make_client, output_option, print_json, print_table, setup_logging
from ._policy_check import check


@click.group("policy")
def policy() -> None:
    """Federation-wide AuthorizationPolicy and RequestAuthentication (Istio-shaped)."""


def load_policy_documents(path: str) -> list[Any]:
    """Read a YAML (or JSON) file of one or more policy documents and validate every one
    as the gateways will (:func:`federation.policy.load_policies`).

    Errors name the file, the document index (0-based) and the field path:
    ``invalid policy file: p.yaml document 1: rules[0].from[0].principals[0]: ...``.
    """
    if path == "-":
        policies = load_policies(sys.stdin.read(), source="<stdin>")
    else:
        policies = load_policies(Path(path))
    if not policies:
        raise PolicyFileError("no policy documents found", source=path)
    return policies


@policy.command("apply")
@click.option("-f", "--filename", required=True, help="YAML file with one or more policies ('-' for stdin).")
@click.option("--dry-run", is_flag=True, help="Validate only.")
@connection_options
@handle_errors
def apply(filename: str, dry_run: bool, federation_addr: str | None, cert_dir: str | None) -> None:
    """Create or update policies (admin): every document of FILE, in one transaction, or none."""
    setup_logging("warning")
    policies = load_policy_documents(filename)
    if dry_run:
        for p in policies:
            click.echo(f"{p.kind}/{p.name} valid (dry run)")
        return
    with make_client(federation_addr, cert_dir) as client:
        # One transaction: every document is applied, or (any refused) none is.
        rev, changed = client.apply_policies(policies)
    for p, c in zip(policies, changed):
        click.echo(f"{p.kind}/{p.name} {'configured' if c else 'unchanged'} (revision {rev})")


@policy.command("list")
@connection_options
@output_option
@handle_errors
def list_(federation_addr: str | None, cert_dir: str | None, output: str) -> None:
    """List the federation's policies."""
    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        policies = client.list_policies()
    if output == "json":
        print_json([p.model_dump(by_alias=True, mode="json") for p in policies])
        return
    rows = []
    for p in policies:
        detail = f"{p.action}, {len(p.rules)} rule(s)" if p.kind == "AuthorizationPolicy" else f"{len(p.jwt_rules)} JWT rule(s)"
        rows.append((p.kind, p.name, f"{p.selector.namespace}/{p.selector.service}", detail))
    print_table("policies", ("KIND", "NAME", "SELECTOR", "DETAIL"), rows)


@policy.command("delete")
@click.argument("name")
@click.option("--kind", type=click.Choice(["AuthorizationPolicy", "RequestAuthentication"]), default=None)
@connection_options
@handle_errors
def delete(name: str, kind: str | None, federation_addr: str | None, cert_dir: str | None) -> None:
    """Delete policy NAME (admin)."""
    setup_logging("warning")
    with make_client(federation_addr, cert_dir) as client:
        n = client.delete_policy(name, kind or "")
    click.echo(f"deleted {n} polic{'y' if n == 1 else 'ies'} named {name}")


policy.add_command(check, "check")
