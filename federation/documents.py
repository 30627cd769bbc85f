"""The documents ``isthmus apply -f`` takes: every kind of :data:`models.DOCUMENT_KINDS`.

One home for what a batch of documents must satisfy, used by the CLI (offline, before
any call) and by the federation service (before it writes):

* :func:`parse_document`: one document, strictly (:func:`models.parse_input` on the
  model its ``kind`` names; a policy is also checked as the gateways will enforce it,
  :func:`federation.policy.validate_policy`).
* :func:`load_documents`: a multi-document YAML (or JSON) text; errors name the source,
  the document index (0-based) and the field path.
* :func:`check_batch`: the checks across records, a pure function of the batch and of
  what the federation holds (joined clusters, exports, stored routes).  A destination
  cluster that is not joined, or two routes for one host, refuse the batch as a whole;
  a destination service that is not exported (yet) is a warning.
* :func:`with_weights`: a route with one rule's weights changed (``isthmus route
  set-weights``), refused with the field path.
* :func:`resolve_kind`: ``trafficroute``, ``routes``, ... -> ``TrafficRoute`` (for ``get``
  and ``delete``).

Where each kind lives in etcd is the store's business (``federation/server/_store.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from pydantic import BaseModel

from ._errors import InvalidInput, InvalidRequest
from .models import (
    DOCUMENT_KINDS,
    POLICY_KINDS,
    AuthorizationPolicy,
    ClusterRecord,
    ExtensionProvider,
    ExportedService,
    Telemetry,
    TrafficPolicy,
    TrafficRoute,
    parse_input,
)
from .policy import PolicyError, validate_policy

__all__ = [
    "BatchRefused",
    "DocumentFileError",
    "MAX_DOCUMENT_FILE_BYTES",
    "check_batch",
    "dump_document",
    "load_documents",
    "parse_document",
    "resolve_kind",
    "with_weights",
]

MAX_DOCUMENT_FILE_BYTES = 4 * 1024 * 1024
_KINDS_TEXT = ", ".join(DOCUMENT_KINDS)


class DocumentFileError(InvalidRequest):
    """A file of documents could not be read, parsed or validated.

    ``source`` is the file name (``<stdin>`` for ``-f -``), ``document`` the 0-based
    YAML document index (None for errors about the whole file), ``field`` the field path.
    """

    def __init__(self, message: str, *, source: str, document: int | None = None, field: str = "") -> None:
        self.source = source
        self.document = document
        self.field = field
        where = source if document is None else f"{source} document {document}"
        super().__init__(f"invalid file: {where}: {message}")


class BatchRefused(InvalidRequest):
    """A batch that is valid document by document but not as a whole (a cluster that is
    not joined, two routes for one host): ``document`` is the index in the batch and
    ``field`` the field path in that document."""

    def __init__(self, document: int, field: str, message: str) -> None:
        self.document = document
        self.field = field
        super().__init__(f"document {document}: {field}: {message}")


def parse_document(data: Any) -> Any:
    """One document (JSON text or Python data) as the model its ``kind`` names.

    Raises :class:`InvalidInput` naming the kind and the field path (a policy the gateways
    could not enforce too: its problem comes from :func:`validate_policy`).
    """
    if isinstance(data, (str, bytes, bytearray)):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise InvalidInput("document", [("", f"not JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise InvalidInput("document", [("", f"expected a mapping with kind (one of {_KINDS_TEXT}), name, ...")])
    kind = data.get("kind")
    if kind is None:
        raise InvalidInput("document", [("kind", f"missing; set kind: one of {_KINDS_TEXT}")])
    if not isinstance(kind, str) or kind not in DOCUMENT_KINDS:
        raise InvalidInput("document", [("kind", f"{kind!r} is not a kind Isthmus applies; use one of {_KINDS_TEXT}")])
    doc = parse_input(DOCUMENT_KINDS[kind], data, what=kind)
    if kind in POLICY_KINDS:
        try:
            validate_policy(doc)
        except PolicyError as exc:
            text = str(exc).removeprefix(f"policy {doc.name!r}: ")
            field, sep, msg = text.partition(": ")
            raise InvalidInput(kind, [(field, msg) if sep else ("", text)]) from None
    return doc


def dump_document(doc: BaseModel) -> dict[str, Any]:
    """A document as its JSON data, ``kind`` first; what :func:`parse_document` reads back."""
    body = doc.model_dump(by_alias=True, mode="json", exclude_none=True)
    return {"kind": body.pop("kind"), **body}


def load_documents(text: str, *, source: str = "<text>") -> list[Any]:
    """Every document of a multi-document YAML (or JSON) text, validated one by one.

    Empty documents are skipped and not counted: document N is the N-th (0-based)
    non-empty one, the same number the federation's batch checks use.  A kind and name
    may appear once.  Raises :class:`DocumentFileError` naming ``source``, the document
    and the field path.
    """
    if len(text) > MAX_DOCUMENT_FILE_BYTES:
        raise DocumentFileError(f"more than {MAX_DOCUMENT_FILE_BYTES} bytes; split it", source=source)
    try:
        raw = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DocumentFileError(f"not valid YAML: {where}{problem}", source=source) from None
    except (ValueError, TypeError, RecursionError) as exc:  # odd scalars, deep nesting
        raise DocumentFileError(f"not valid YAML: {exc}", source=source) from None
    out: list[Any] = []
    seen: dict[tuple[str, str], int] = {}
    for index, data in enumerate(d for d in raw if d is not None):
        try:
            doc = parse_document(data)
        except InvalidInput as exc:
            raise DocumentFileError(exc.describe(), source=source, document=index, field=exc.field) from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise DocumentFileError(str(exc), source=source, document=index) from None
        key = (doc.kind, doc.name)
        if key in seen:
            raise DocumentFileError(f"{doc.kind} {doc.name!r} is already defined in document {seen[key]}",
                                    source=source, document=index, field="name")
        seen[key] = index
        out.append(doc)
    return out


def resolve_kind(name: str) -> str:
    """The kind a user means: case-insensitive, singular or plural (``routes`` and
    ``route`` for TrafficRoute).  InvalidRequest naming the kinds for anything else."""
    wanted = name.strip().lower()
    for kind in DOCUMENT_KINDS:
        k = kind.lower()
        forms = {k, k + "s", k[:-1] + "ies" if k.endswith("y") else k + "s"}
        if kind == "TrafficRoute":
            forms |= {"route", "routes"}
        if kind == "ExtensionProvider":
            forms |= {"provider", "providers"}
        if wanted in forms:
            return kind
    raise InvalidRequest(f"unknown kind {name!r}: use one of {_KINDS_TEXT}")


# ---------------------------------------------------------------- checks across records


def export_lookups(batch: Sequence[Any]) -> set[tuple[str, str]]:
    """The ``(namespace, service)`` pairs :func:`check_batch` asks who exports: a
    TrafficPolicy's host, a TrafficRoute's destination and failover services.  Only
    their export records need reading to check the batch (none for a batch of
    AuthorizationPolicies), whatever the number of services the federation holds."""
    out: set[tuple[str, str]] = set()
    for doc in batch:
        if isinstance(doc, TrafficPolicy):
            out.add((doc.host.namespace, doc.host.service))
        elif isinstance(doc, TrafficRoute):
            for rule in doc.rules:
                out.update((doc.host.namespace, doc.destination_service(d.service))
                           for d in (*rule.destinations, *rule.failover))
    return out


def _exporters(services: Iterable[ExportedService]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for s in services:
        out.setdefault((s.namespace, s.name), set()).add(s.cluster)
    return out


# Settings the models already parse (issue 14: resilience) that this version's gateways do
# not enforce yet: refused, so that no one believes they protect them.
_RULE_SETTINGS_NOT_ENFORCED: tuple[str, ...] = ()


def _not_enforced_yet(i: int, doc: Any) -> None:
    if isinstance(doc, TrafficRoute):
        for r, rule in enumerate(doc.rules):
            for name in _RULE_SETTINGS_NOT_ENFORCED:
                if getattr(rule, name) is not None:
                    raise BatchRefused(i, f"rules[{r}].{name}", f"{name} is not enforced by this version's "
                                                                 "gateways yet; leave it out of the rule")


def check_batch(
    batch: Sequence[Any],
    *,
    clusters: Iterable[ClusterRecord],
    services: Iterable[ExportedService],
    stored_routes: Iterable[TrafficRoute],
    stored_providers: Iterable[str] = (),
) -> list[str]:
    """Check a batch against itself and what the federation holds; return the warnings.

    Raises :class:`BatchRefused` (naming the document and the field path) for a
    destination or failover cluster that is not joined, or revoked (``"*"`` is any
    cluster), and for two routes governing one host, in the batch or against a stored
    route of another name (both named).  A destination the named cluster does not export
    is a warning: it may be exported later.  A CUSTOM AuthorizationPolicy naming an
    ExtensionProvider that is neither stored nor in the batch is refused.
    """
    joined = {c.name for c in clusters if not c.revoked}
    revoked = {c.name for c in clusters if c.revoked}
    exporters = _exporters(services)
    names = {(d.kind, d.name) for d in batch}
    hosts: dict[tuple[str, str], str] = {
        (r.host.namespace, r.host.service): f"TrafficRoute {r.name!r}"
        for r in stored_routes
        if ("TrafficRoute", r.name) not in names  # replaced by this batch
    }
    batch_hosts: dict[tuple[str, str], tuple[int, str]] = {}
    policy_hosts: dict[tuple[str, str], tuple[int, str]] = {}
    warnings: list[str] = []

    def cluster_ok(i: int, field: str, cluster: str) -> None:
        if cluster in revoked:
            raise BatchRefused(i, field, f"cluster {cluster!r} is revoked; route to a joined cluster")
        if cluster not in joined:
            hint = f" (joined: {', '.join(sorted(joined))})" if joined else " (no cluster has joined yet)"
            raise BatchRefused(i, field, f"cluster {cluster!r} is not joined{hint}")

    def exported(i: int, field: str, cluster: str, ns: str, service: str) -> None:
        by = exporters.get((ns, service), set())
        if cluster == "*" and by:
            return
        if cluster in by:
            return
        if by:
            warnings.append(f"document {i}: {field}: cluster {cluster!r} does not export {ns}/{service} "
                            f"(exported by {', '.join(sorted(by))}); this destination is unavailable until it does")
        else:
            warnings.append(f"document {i}: {field}: no cluster exports {ns}/{service} yet; this destination is "
                            "unavailable until one does")

    providers = set(stored_providers) | {d.name for d in batch if isinstance(d, ExtensionProvider)}
    for i, doc in enumerate(batch):
        _not_enforced_yet(i, doc)
        if isinstance(doc, AuthorizationPolicy) and doc.action == "CUSTOM" and doc.provider not in providers:
            known = f" (known: {', '.join(sorted(providers))})" if providers else " (none is defined yet)"
            raise BatchRefused(i, "provider", f"no ExtensionProvider named {doc.provider!r}{known}; apply it "
                                              "first, or in the same file")
        if isinstance(doc, TrafficPolicy):
            host = (doc.host.namespace, doc.host.service)
            if host in policy_hosts:
                j, other = policy_hosts[host]
                raise BatchRefused(i, "host", f"TrafficPolicy {doc.name!r} and TrafficPolicy {other!r} (document {j}) "
                                              f"both govern {host[0]}/{host[1]}; one policy per service: merge them")
            policy_hosts[host] = (i, doc.name)
            if not exporters.get(host):
                warnings.append(f"document {i}: host: no cluster exports {host[0]}/{host[1]} yet; the policy "
                                "applies once one does")
            continue
        if isinstance(doc, Telemetry):
            for c, cluster in enumerate(doc.clusters):
                if cluster not in joined:
                    warnings.append(f"document {i}: clusters[{c}]: cluster {cluster!r} is not joined; this "
                                    "Telemetry applies to its gateways once it joins")
        if not isinstance(doc, TrafficRoute):
            continue
        host = (doc.host.namespace, doc.host.service)
        host_text = f"{host[0]}/{host[1]}"
        if host in batch_hosts:
            j, other = batch_hosts[host]
            raise BatchRefused(i, "host", f"TrafficRoute {doc.name!r} and TrafficRoute {other!r} (document {j}) "
                                          f"both route {host_text}; one route per host: merge their rules")
        if host in hosts:
            raise BatchRefused(i, "host", f"TrafficRoute {doc.name!r} and the stored {hosts[host]} both route "
                                          f"{host_text}; one route per host: change that one, or delete it first")
        batch_hosts[host] = (i, doc.name)
        for r, rule in enumerate(doc.rules):
            for d, dest in enumerate(rule.destinations):
                where = f"rules[{r}].destinations[{d}]"
                cluster_ok(i, f"{where}.cluster", dest.cluster)
                exported(i, where, dest.cluster, host[0], doc.destination_service(dest.service))
            for f, step in enumerate(rule.failover):
                where = f"rules[{r}].failover[{f}]"
                if step.cluster != "*":
                    cluster_ok(i, f"{where}.cluster", step.cluster)
                exported(i, where, step.cluster, host[0], doc.destination_service(step.service))
    return warnings


# ---------------------------------------------------------------- set-weights


def _pick_rule(route: TrafficRoute, rule: int | None, clusters: set[str]) -> int:
    n = len(route.rules)
    if rule is not None:
        if not 0 <= rule < n:
            raise InvalidRequest(f"invalid set-weights: TrafficRoute {route.name!r} has {n} rule(s), "
                                 f"numbered 0 to {n - 1}; there is no rule {rule}")
        return rule
    if n == 1:
        return 0
    fits = [i for i, r in enumerate(route.rules) if clusters <= {d.cluster for d in r.destinations}]
    if len(fits) == 1:
        return fits[0]
    named = ", ".join(sorted(clusters))
    which = f"rules {', '.join(map(str, fits))} all send to {named}" if fits else f"no rule sends to all of {named}"
    raise InvalidRequest(f"invalid set-weights: TrafficRoute {route.name!r} has {n} rules and {which}: "
                         "choose one with --rule N")


def with_weights(
    route: TrafficRoute, weights: Sequence[tuple[str, str, int]], rule: int | None = None
) -> tuple[TrafficRoute, int]:
    """``route`` with new weights for destinations of one rule, and that rule's index.

    ``weights`` holds ``(cluster, service, weight)``; ``service`` empty means the rule's
    only destination in that cluster.  Destinations not named keep their weight.  ``rule``
    None: the route's only rule, or its one rule with a destination in every cluster named.
    Raises :class:`InvalidRequest` (an unknown cluster or service in that rule, a weight
    that is negative, every weight 0, no such rule), naming the field path.
    """
    if not weights:
        raise InvalidRequest("invalid set-weights: name at least one destination, as CLUSTER=WEIGHT")
    r = _pick_rule(route, rule, {c for c, _, _ in weights})
    dests = route.rules[r].destinations
    here = ", ".join(f"{d.cluster}/{route.destination_service(d.service)}" for d in dests)
    new = {d: dest.weight for d, dest in enumerate(dests)}
    named: dict[int, str] = {}
    for cluster, service, weight in weights:
        label = f"{cluster}/{service}" if service else cluster
        found = [d for d, dest in enumerate(dests)
                 if dest.cluster == cluster and (not service or route.destination_service(dest.service) == service)]
        if not found:
            raise InvalidRequest(f"invalid set-weights: rules[{r}].destinations: no destination {label!r} in this "
                                 f"rule (it sends to {here})")
        if len(found) > 1:
            services = ", ".join(route.destination_service(dests[d].service) for d in found)
            raise InvalidRequest(f"invalid set-weights: rules[{r}].destinations: cluster {cluster!r} has "
                                 f"{len(found)} destinations in this rule ({services}): name one as {cluster}/SERVICE=W")
        d = found[0]
        if d in named:
            raise InvalidRequest(f"invalid set-weights: rules[{r}].destinations[{d}]: {label!r} is given twice "
                                 f"(also as {named[d]!r})")
        named[d] = label
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise InvalidRequest(f"invalid set-weights: rules[{r}].destinations[{d}].weight: {weight!r} for {label!r}: "
                                 "a weight is a non-negative integer")
        new[d] = weight
    data = route.model_dump(by_alias=True, mode="json")
    for d, w in new.items():
        data["rules"][r]["destinations"][d]["weight"] = w
    try:
        return parse_input(TrafficRoute, data), r
    except InvalidInput as exc:
        raise InvalidInput("set-weights", exc.problems) from None
