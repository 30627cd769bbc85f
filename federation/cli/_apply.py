"""``isthmus apply -f FILE``, ``isthmus get KIND [NAME]``, ``isthmus delete KIND NAME``:
every document kind (policies, traffic routes), as ``kubectl`` handles resources.

``apply`` validates the whole file offline first (:func:`federation.documents.load_documents`:
errors name the file, the document and the field path), then sends it as one request:
the federation checks it against what it holds and writes every document in one etcd
transaction, or none.  ``isthmus policy apply`` is the policy-only form of the same call.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ._common import connection_options, handle_errors, make_client, print_json, print_table, setup_logging


def read_file_text(path: str) -> tuple[str, str]:
    """(text, source name) of ``path`` (``-``: stdin); a clear error for what cannot be read."""
    from ..documents import MAX_DOCUMENT_FILE_BYTES, DocumentFileError

    if path == "-":
        return sys.stdin.read(), "<stdin>"
    p = Path(path)
    try:
        if p.stat().st_size > MAX_DOCUMENT_FILE_BYTES:
            raise DocumentFileError(f"more than {MAX_DOCUMENT_FILE_BYTES} bytes; split it", source=path)
        return p.read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise DocumentFileError("no such file", source=path) from None
    except IsADirectoryError:
        raise DocumentFileError("is a directory; give a file", source=path) from None
    except UnicodeDecodeError:
        raise DocumentFileError("not UTF-8 text", source=path) from None
    except OSError as exc:
        raise DocumentFileError(f"cannot read: {exc.strerror or exc}", source=path) from None


@click.command("apply")
@click.option("-f", "--filename", required=True, help="YAML or JSON file of one or more documents ('-' for stdin).")
@click.option("--dry-run", is_flag=True, help="Validate the file only (offline: no cross-record checks).")
@connection_options
@handle_errors
def apply(filename: str, dry_run: bool, federation_addr: str | None, cert_dir: str | None) -> None:
    """Create or update every document of FILE, in one transaction, or none (admin).

    Kinds: AuthorizationPolicy, RequestAuthentication, TrafficRoute, TrafficPolicy, Telemetry, ExtensionProvider. Prints per document
    created, configured or unchanged, and the federation's warnings (stderr).
    """
    from ..documents import load_documents

    setup_logging("warning")
    text, source = read_file_text(filename)
    docs = load_documents(text, source=source)
    if not docs:
        raise click.UsageError(f"{source}: no documents found (each needs kind: and name:)")
    if dry_run:
        for d in docs:
            click.echo(f"{d.kind}/{d.name} valid (dry run)")
        return
    with make_client(federation_addr, cert_dir) as client:
        rev, outcomes, warnings = client.apply_documents(docs)
    for d, outcome in zip(docs, outcomes):
        click.echo(f"{d.kind}/{d.name} {outcome} (revision {rev})")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def _detail(doc: Any) -> tuple[str, str]:
    if doc.kind == "ExtensionProvider":
        a = doc.ext_authz
        where = ", ".join([a.address] * bool(a.address) + [f"{c}={v}" for c, v in sorted(a.addresses.items())])
        kind = "ext_authz_grpc" if doc.ext_authz_grpc is not None else "ext_authz_http"
        return where, f"{kind}, timeout {a.timeout * 1000:g}ms, fail_open {str(a.fail_open).lower()}"
    if doc.kind == "TrafficRoute":
        parts = []
        for rule in doc.rules:
            split = " ".join(f"{d.cluster}/{doc.destination_service(d.service)}={d.weight}" for d in rule.destinations)
            fo = (" failover " + ",".join(f.cluster for f in rule.failover)) if rule.failover else ""
            parts.append(("match " if rule.match else "") + split + fo)
        return f"{doc.host.namespace}/{doc.host.service}", "; ".join(parts)
    if doc.kind == "Telemetry":
        t = doc.tracing
        parts = [f"collector {t.collector or 'none'}" if t.collector is not None else "",
                 f"protocol {t.protocol}" if t.protocol else "",
                 f"sampling {t.random_sampling_percentage:g}%" if t.random_sampling_percentage is not None else "",
                 "span reporting disabled" if t.disable_span_reporting else ""]
        return ",".join(doc.clusters) or "*", ", ".join(p for p in parts if p) or "-"
    target = f"{doc.selector.namespace}/{doc.selector.service}"
    if doc.kind == "AuthorizationPolicy":
        via = f" via {doc.provider}" if doc.provider else ""
        return target, f"{doc.action}{via}, {len(doc.rules)} rule(s)"
    return target, f"{len(doc.jwt_rules)} JWT rule(s)"


@click.command("get")
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "yaml", "json"]), default="table", show_default=True,
              help="Output format (yaml and json are what apply -f takes).")
@click.option("--show-defaults", is_flag=True,
              help="With -o yaml/json: every setting in force, defaults included (null: no limit).")
@connection_options
@handle_errors
def get(kind: str, name: str | None, output: str, show_defaults: bool, federation_addr: str | None,
        cert_dir: str | None) -> None:
    """Show the documents of KIND (or the one named NAME).

    KIND: AuthorizationPolicy, RequestAuthentication, TrafficRoute, TrafficPolicy, Telemetry or
    ExtensionProvider (any case, plural too; `routes` for TrafficRoute, `providers` for
    ExtensionProvider).
    """
    import yaml

    from .._errors import NotFound
    from ..documents import dump_document, resolve_kind
    from ..models import with_defaults

    setup_logging("warning")
    kind = resolve_kind(kind)
    with make_client(federation_addr, cert_dir) as client:
        docs = client.list_documents(kind)
    if name is not None:
        docs = [d for d in docs if d.name == name]
        if not docs:
            raise NotFound(f"no {kind} named {name!r}")
    if show_defaults:
        def dump(d: Any) -> dict[str, Any]:
            body = with_defaults(d).model_dump(by_alias=True, mode="json")
            return {"kind": body.pop("kind"), **body}
    else:
        dump = dump_document
    if output == "json":
        data = [dump(d) for d in docs]
        print_json(data[0] if name is not None else data)
    elif output == "yaml":
        click.echo(yaml.safe_dump_all([dump(d) for d in docs], sort_keys=False, explicit_start=True), nl=False)
    elif kind == "TrafficPolicy":
        print_table("traffic policies", ("NAME", "HOST", "LIMITS", "OUTLIER DETECTION"),
                    [(d.name, f"{d.host.namespace}/{d.host.service}",
                      " ".join(f"{k}={v}" for k, v in d.connection_pool.model_dump(exclude_none=True).items()) or "-",
                      "on" if d.outlier_detection is not None else "off") for d in docs])
    elif kind == "TrafficRoute":
        print_table("traffic routes", ("NAME", "HOST", "RULES"), [(d.name, *_detail(d)) for d in docs])
    elif kind == "Telemetry":
        print_table("telemetry", ("NAME", "CLUSTERS", "TRACING"), [(d.name, *_detail(d)) for d in docs])
    elif kind == "ExtensionProvider":
        print_table("extension providers", ("NAME", "ADDRESS", "DETAIL"), [(d.name, *_detail(d)) for d in docs])
    else:
        print_table("policies", ("KIND", "NAME", "SELECTOR", "DETAIL"), [(d.kind, d.name, *_detail(d)) for d in docs])


@click.command("delete")
@click.argument("kind")
@click.argument("name")
@connection_options
@handle_errors
def delete(kind: str, name: str, federation_addr: str | None, cert_dir: str | None) -> None:
    """Delete the document KIND NAME (admin)."""
    from ..documents import resolve_kind

    setup_logging("warning")
    kind = resolve_kind(kind)
    with make_client(federation_addr, cert_dir) as client:
        client.delete_document(kind, name)
    click.echo(f"{kind}/{name} deleted")
