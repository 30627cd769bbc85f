"""CUSTOM authorization: asking an external authorizer over Envoy's ext_authz API.

Theory of operation
-------------------
A CUSTOM AuthorizationPolicy names an ExtensionProvider (``federation.models``); when its
rules match a request at the inbound gateway, :meth:`federation.policy.PolicySet.evaluate`
lists it in ``Decision.custom`` and :class:`gateway._authz.PolicyState` answers a
:class:`~gateway._decision.Decision` whose ``check`` is :meth:`CustomCheck.__call__`.
The handler parks the request (its body waits, bounded by HTTP/2 flow control) and awaits
the check in the request's own task; other streams never wait for it.  Istio's order
holds: the authorizer is asked first, a deny ends the request with the authorizer's
status, headers and body (flag ``UAEX``), an allow hands over to the DENY/ALLOW decision
computed locally, with the authorizer's request-header changes (``ok_response``) applied
if that one allows too (and its response headers, carried on the request's context to
the caller's response; its query changes, applied to ``:path``'s query only).  Header
changes never touch the identity headers Isthmus owns (``isthmus-*``,
``x-forwarded-client-cert``), pseudo-headers, ``host`` or hop-by-hop headers: those are
dropped and logged.

The body (``include_request_body``): the parked request (:class:`gateway._authz.Parked`,
a :class:`BodySource`) collects up to the largest bound of the providers to ask,
acknowledging what it holds so the caller can send that much; the IO shell waits for
the end, the bound or the largest ``timeout``; :func:`body_for` then says what each
provider gets (all, a partial body, 413 before anyone is asked, or a ``timeout``).

Pure parts (unit-tested without sockets): :func:`grpc_check_request` builds the
``CheckRequest`` as Envoy fills it (source principal = the caller's SPIFFE ID, the
normalized path, headers, ``context_extensions`` naming the clusters);
:func:`grpc_verdict` and :func:`http_verdict` read the answers; :class:`HeaderMutation`
applies an allow's header changes.

IO (``gateway/_extauthz_io.py``: ``ExtAuthzClients``, one per gateway, shared by every
config revision; this module imports no event loop): each
provider has a concurrency bound (a ``trio.CapacityLimiter`` of ``max_concurrency``) and
each check a deadline (``timeout``, which covers the wait for a slot as well); past it
the check is a ``timeout``, a failed call an ``error``, and either one denies with
``status_on_error`` unless ``fail_open``.  Every check is counted in
``isthmus_ext_authz_total{provider,result}`` (allowed, denied, error, timeout).

Why grpcio's *synchronous* client: ``grpc.aio`` needs an asyncio loop and does not run
on trio; a grpc.aio loop in a second thread would need its own bridge and lifetime.
The synchronous channel's ``future()`` call does not block: grpc's C core runs the call
on its own threads and invokes the done-callback there, which hands the result to trio
with ``TrioToken.run_sync_soon`` (thread-safe, never blocks).  So no worker thread is held
per check, the call carries a real gRPC deadline the authorizer sees, and a trio
cancellation (the caller went away, the deadline passed) cancels the call with
``future.cancel()``.  The HTTP variant uses httpx's ``AsyncClient``, which runs on trio.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from federation.models import ExtAuthzHttp, ExtensionProvider, IncludeRequestBody

from ._decision import Decision, RequestAttrs
from ._flags import GrpcStatus

EXT_AUTHZ_FLAG = "UAEX"  # Envoy's flag for a request refused (or let through) by ext_authz
RESULTS = ("allowed", "denied", "error", "timeout")
MAX_BODY = 64 * 1024  # of a denied response, and of an HTTP authorizer's answer
MAX_MUTATIONS = 64  # header changes one answer may make
MAX_HEADER_VALUE = 8 * 1024
# Headers an authorizer may never set, append or remove on the request to the service.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"host", b"content-length"})
_OWNED = frozenset({b"x-forwarded-client-cert", b"traceparent"})
# What Envoy's HTTP ext_authz sends of the original request besides the configured ones.
_HTTP_DEFAULT_HEADERS = ("authorization",)


def protected(name: bytes) -> bool:
    """Whether an authorizer's header change to ``name`` (lowercase) is refused."""
    return name.startswith((b":", b"isthmus-")) or name in _HOP_BY_HOP or name in _OWNED


def _header_ok(name: bytes, value: bytes) -> bool:
    return (0 < len(name) <= 256 and name == name.lower() and not any(c in name for c in b" \t\r\n\x00:")
            and len(value) <= MAX_HEADER_VALUE and not any(c in value for c in b"\r\n\x00"))


class MalformedAnswer(Exception):
    """The authorizer's answer cannot be used (counted as an ``error``)."""


# ---------------------------------------------------------------- verdicts (pure)


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    """An allow's changes to the request headers (Envoy ``OkHttpResponse``), the protected
    names already dropped, and to the query of ``:path`` (``query_parameters_to_set`` /
    ``_to_remove``: only the query changes, so the path the policies matched stays)."""

    set: tuple[tuple[bytes, bytes], ...] = ()  # overwrite or add
    append: tuple[tuple[bytes, bytes], ...] = ()
    add_if_absent: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()
    query_set: tuple[tuple[str, str], ...] = ()  # overwrite or add a query parameter
    query_remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.append or self.add_if_absent or self.remove or self.query_set
                    or self.query_remove)

    def __call__(self, headers: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        drop = set(self.remove) | {k for k, _ in self.set}
        out = [(k, v) for k, v in headers if (k if isinstance(k, bytes) else k.encode()).lower() not in drop]
        present = {(k if isinstance(k, bytes) else k.encode()).lower() for k, _ in out}
        out.extend(self.set)
        out.extend(self.append)
        out.extend((k, v) for k, v in self.add_if_absent if k not in present)
        if self.query_set or self.query_remove:
            out = [(k, rewrite_query(v, self.query_set, self.query_remove)) if k == b":path" else (k, v)
                   for k, v in out]
        return out

    def then(self, other: HeaderMutation) -> HeaderMutation:
        return HeaderMutation(self.set + other.set, self.append + other.append,
                              self.add_if_absent + other.add_if_absent, self.remove + other.remove,
                              self.query_set + other.query_set, self.query_remove + other.query_remove)


# What stays as written in a query parameter the authorizer sets; the rest (``&``, ``=``,
# ``#``, space, controls, non-ASCII) is percent-encoded so it cannot change the structure.
_QUERY_SAFE = "!$'()*+,;:@/?-._~%"


def rewrite_query(path: bytes, set_: Sequence[tuple[str, str]], remove: Sequence[str]) -> bytes:
    """``path`` with its query changed as Envoy's ext_authz does (``QueryParamsMulti``:
    overwrite each set key in place or add it at the end, then drop every removed key);
    parameters are compared raw, not decoded."""
    base, sep, query = path.partition(b"?")
    params = [p.partition(b"=") for p in query.split(b"&") if p] if sep else []
    for key, value in set_:
        k, v = quote(key, safe=_QUERY_SAFE).encode(), quote(value, safe=_QUERY_SAFE).encode()
        hit = [i for i, (pk, _, _) in enumerate(params) if pk == k]
        if hit:
            params[hit[0]] = (k, b"=", v)
            params = [p for i, p in enumerate(params) if i not in hit[1:]]
        else:
            params.append((k, b"=", v))
    gone = {quote(k, safe=_QUERY_SAFE).encode() for k in remove}
    params = [p for p in params if p[0] not in gone]
    if not params:
        return base
    return base + b"?" + b"&".join(k + e + v for k, e, v in params)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One authorizer's answer: ``result`` is one of :data:`RESULTS`."""

    result: str
    status: int = 403
    headers: tuple[tuple[bytes, bytes], ...] = ()  # to the caller, on deny
    body: bytes = b""
    mutation: HeaderMutation = HeaderMutation()
    response: HeaderMutation = HeaderMutation()  # to the caller's response, on allow
    reason: str = ""
    ignored: tuple[bytes, ...] = ()  # protected header names the authorizer tried to change


def _split(pairs: Iterable[tuple[bytes, bytes]], what: str) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    ok: list[tuple[bytes, bytes]] = []
    ignored: list[bytes] = []
    for name, value in pairs:
        if protected(name):
            ignored.append(name)
        elif _header_ok(name, value):
            ok.append((name, value))
        else:
            raise MalformedAnswer(f"{what}: invalid header {name[:64]!r}")
    if len(ok) + len(ignored) > MAX_MUTATIONS:
        raise MalformedAnswer(f"{what}: more than {MAX_MUTATIONS} headers")
    return ok, ignored


def _hv(h: Any) -> tuple[bytes, bytes]:
    value = h.raw_value if h.raw_value else h.value.encode("utf-8")
    return h.key.lower().encode("latin-1"), value


def _options(options: Iterable[Any], what: str, ignored: list[bytes]) -> HeaderMutation:
    """HeaderValueOptions as set/append/add-if-absent changes (protected names into ``ignored``)."""
    from envoy.config.core.v3 import base_pb2

    sets, appends, absent = [], [], []
    for opt in options:
        pair = _hv(opt.header)
        if opt.HasField("append") and opt.append.value:
            appends.append(pair)
        elif opt.append_action == base_pb2.HeaderValueOption.ADD_IF_ABSENT:
            absent.append(pair)
        else:  # ext_authz: an unset append overwrites
            sets.append(pair)
    kept: list[tuple[tuple[bytes, bytes], ...]] = []
    for group in (sets, appends, absent):
        good, bad = _split(group, what)
        kept.append(tuple(good))
        ignored += bad
    return HeaderMutation(kept[0], kept[1], kept[2])


def _query_name(key: str, what: str) -> str:
    if not key or len(key) > 256:
        raise MalformedAnswer(f"ok_response.{what}: a key must have 1 to 256 characters")
    return key


def grpc_verdict(resp: Any) -> Verdict:
    """A ``CheckResponse`` as a :class:`Verdict`; :class:`MalformedAnswer` if unusable."""
    try:
        if resp.status.code == 0:
            ok = resp.ok_response
            ignored: list[bytes] = []
            request = _options(ok.headers, "ok_response.headers", ignored)
            removes, bad = _split(((n.lower().encode("latin-1"), b"") for n in ok.headers_to_remove),
                                  "ok_response.headers_to_remove")
            ignored += bad
            # Envoy: in response_headers_to_add an unset append overwrites too.
            response = _options(ok.response_headers_to_add, "ok_response.response_headers_to_add", ignored)
            qset = tuple((_query_name(q.key, "query_parameters_to_set"), q.value) for q in ok.query_parameters_to_set)
            qremove = tuple(_query_name(k, "query_parameters_to_remove") for k in ok.query_parameters_to_remove)
            if len(qset) + len(qremove) > MAX_MUTATIONS:
                raise MalformedAnswer(f"ok_response: more than {MAX_MUTATIONS} query parameter changes")
            if any(len(v) > MAX_HEADER_VALUE for _, v in qset):
                raise MalformedAnswer("ok_response.query_parameters_to_set: value too long")
            return Verdict("allowed", mutation=dataclasses.replace(request, remove=tuple(n for n, _ in removes),
                                                                   query_set=qset, query_remove=qremove),
                           response=response, ignored=tuple(ignored))
        denied = resp.denied_response
        status = denied.status.code or 403
        if not 200 <= status <= 599:
            raise MalformedAnswer(f"denied_response.status {status} is not an HTTP status")
        headers, _ = _split((_hv(o.header) for o in denied.headers), "denied_response.headers")
        body = denied.body.encode("utf-8")[:MAX_BODY]
        return Verdict("denied", status=status, headers=tuple(headers), body=body,
                       reason=resp.status.message or "denied by the authorizer")
    except (UnicodeError, ValueError) as exc:
        raise MalformedAnswer(f"unreadable CheckResponse: {exc}") from None


def http_verdict(cfg: ExtAuthzHttp, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> Verdict:
    """An HTTP authorizer's answer (Envoy's HTTP ext_authz service semantics): 200 allows,
    5xx is an error, anything else denies with that status, the body and
    ``headers_to_downstream_on_deny`` (every header when it names none, as Istio does)."""
    lower = [(k.lower(), v) for k, v in headers]
    if status == 200:
        wanted = {h.encode() for h in cfg.headers_to_upstream_on_allow}
        sets, ignored = _split([(k, v) for k, v in lower if k in wanted], "allow headers")
        back = {h.encode() for h in cfg.headers_to_downstream_on_allow}
        down, bad = _split([(k, v) for k, v in lower if k in back], "allow headers to the caller")
        return Verdict("allowed", mutation=HeaderMutation(tuple(sets)), response=HeaderMutation(tuple(down)),
                       ignored=tuple(ignored + bad))
    if status >= 500:
        raise MalformedAnswer(f"the authorizer answered {status}")
    wanted = {h.encode() for h in cfg.headers_to_downstream_on_deny}
    down = [(k, v) for k, v in lower if (k in wanted if wanted else not protected(k))]
    good, _ = _split(down, "deny headers")
    return Verdict("denied", status=status, headers=tuple(good), body=body[:MAX_BODY],
                   reason=f"the authorizer answered {status}")


# ---------------------------------------------------------------- the request body (pure)

PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"  # Envoy's: whether the body sent is cut short


@dataclass(frozen=True, slots=True)
class RequestBody:
    """What one provider is sent of the request body."""

    data: bytes
    partial: bool  # cut at max_request_bytes, or the rest did not arrive in time
    size: int  # content-length, else the length of a whole body, else -1 (Envoy's http.size)
    pack_as_bytes: bool = False


TOO_LARGE, INCOMPLETE = "too_large", "incomplete"


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == b"content-length":
            return int(v) if v.isdigit() else None
    return None


def body_for(inc: IncludeRequestBody, data: bytes, complete: bool, length: int | None) -> RequestBody | str:
    """The body a provider with ``inc`` is sent, given what arrived (``complete``: the
    whole body), or :data:`TOO_LARGE` (413, as Envoy answers without asking) or
    :data:`INCOMPLETE` (the body did not arrive within the wait) when it may not be partial."""
    limit = inc.max_request_bytes
    size = length if length is not None else (len(data) if complete else -1)
    if len(data) > limit or (length is not None and length > limit):
        if not inc.allow_partial_message:
            return TOO_LARGE
        return RequestBody(data[:limit], True, size, inc.pack_as_bytes)
    if not complete:
        return RequestBody(data, True, size, inc.pack_as_bytes) if inc.allow_partial_message else INCOMPLETE
    return RequestBody(data, False, size, inc.pack_as_bytes)


def too_large(policy: str, name: str, limit: int) -> Decision:
    """Envoy's answer to a body past ``max_request_bytes`` with partial messages refused
    (whatever ``fail_open`` says: the authorizer is never asked)."""
    return Decision(False, f"CUSTOM policy {policy!r}: the request body is larger than {name!r}'s "
                    f"max_request_bytes ({limit})", status=413, flags=EXT_AUTHZ_FLAG,
                    grpc_status=GrpcStatus.RESOURCE_EXHAUSTED, message="Payload Too Large", policy=policy,
                    details="ext_authz_request_payload_too_large")


# ---------------------------------------------------------------- requests (pure)


def _request_headers(a: RequestAttrs) -> tuple[str, str, dict[str, str]]:
    host, scheme, out = "", "https", {}
    for k, v in a.headers:
        name, value = k.decode("latin-1"), v.decode("latin-1")
        if name == ":authority":
            host = value
        elif name == ":scheme":
            scheme = value
        if name.startswith(":") and name not in (":authority", ":method", ":path"):
            continue
        out[name] = f"{out[name]},{value}" if name in out else value
    return host, scheme, out


def _socket_address(peer: Any, address: tuple[str, int]) -> None:
    host, port = address
    if host:
        peer.address.socket_address.address = host
        peer.address.socket_address.port_value = port


def grpc_check_request(a: RequestAttrs, *, cluster: str, identity: str = "", body: RequestBody | None = None) -> Any:
    """The ``CheckRequest`` for one request, as Envoy fills ``attributes`` (the body in
    ``http.body``, or ``http.raw_body`` with ``pack_as_bytes``, when ``body`` is given)."""
    from envoy.service.auth.v3 import external_auth_pb2

    req = external_auth_pb2.CheckRequest()
    at = req.attributes
    if a.source_principal:
        at.source.principal = a.source_principal
    at.source.service = a.peer_principal
    _socket_address(at.source, a.source_address)
    if identity:
        at.destination.principal = identity
    at.destination.service = f"{a.service}.{a.namespace}"
    _socket_address(at.destination, a.destination_address)
    host, scheme, headers = _request_headers(a)
    http = at.request.http
    http.id = uuid.uuid4().hex
    http.method = a.method
    http.host = host
    if a.method != "CONNECT":
        path, _, query = a.path.partition("?")
        http.path = a.path
        http.query = query
        http.scheme = scheme
        http.protocol = "HTTP/2"
    for k, v in headers.items():
        http.headers[k] = v
    if body is not None:
        http.headers[PARTIAL_BODY_HEADER] = "true" if body.partial else "false"
        http.size = body.size
        if body.pack_as_bytes:
            http.raw_body = body.data
        else:  # a string field: bytes that are not UTF-8 need pack_as_bytes
            http.body = body.data.decode("utf-8", "replace")
    at.request.time.GetCurrentTime()
    at.context_extensions.update({"source_cluster": a.peer_cluster, "destination_cluster": cluster,
                                  "destination_namespace": a.namespace, "destination_service": a.service})
    return req


def http_check_request(cfg: ExtAuthzHttp, address: str, a: RequestAttrs, *, identity: str = "",
                       body: RequestBody | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """(method, URL, headers) of the HTTP authorization request (Envoy: the original method,
    ``path_prefix`` + the normalized path, the original host, the allowed headers; the
    body, if sent, is the request's body).  The caller's SPIFFE ID rides
    ``x-forwarded-client-cert``, as the service itself sees it."""
    host, _, headers = _request_headers(a)
    wanted = set(cfg.include_request_headers) | set(_HTTP_DEFAULT_HEADERS)
    out = [("host", host)] + [(k, v) for k, v in headers.items() if k in wanted and not k.startswith(":")]
    if a.source_principal:
        out.append(("x-forwarded-client-cert", f"By={identity};URI={a.source_principal}"))
    if body is not None:
        out.append((PARTIAL_BODY_HEADER, "true" if body.partial else "false"))
    return a.method, f"http://{address}{cfg.path_prefix}{a.path}", out


# ---------------------------------------------------------------- who asks


class BodySource(Protocol):
    """Where a parked request's body is held (:class:`gateway._authz.Parked`)."""

    def collect(self, limit: int, wake: Callable[[], None]) -> None: ...
    def body(self) -> tuple[bytes, bool]: ...


class Asker(Protocol):
    """Asks one provider about one request (``gateway._extauthz_io.ExtAuthzClients``)."""

    async def check(self, name: str, provider: ExtensionProvider | None, a: RequestAttrs,
                    body: RequestBody | str | None = None) -> Verdict:
        """``body``: what to send of the request body (None: nothing), or
        :data:`INCOMPLETE` (it did not arrive in time: a ``timeout``)."""

    async def read_body(self, source: BodySource, limit: int, timeout: float) -> tuple[bytes, bool]: ...
    def keep(self, providers: Iterable[ExtensionProvider]) -> None: ...


class NoClients:
    """The asker of an :class:`~gateway._authz.Authz` built without a gateway: every check
    is an ``error`` (so fail_open or fail closed decides)."""

    async def check(self, name: str, provider: ExtensionProvider | None, a: RequestAttrs,
                    body: RequestBody | str | None = None) -> Verdict:
        return Verdict("error", reason="no ext_authz client in this process")

    async def read_body(self, source: BodySource, limit: int, timeout: float) -> tuple[bytes, bool]:
        return source.body()

    def keep(self, providers: Iterable[ExtensionProvider]) -> None:
        return None


# ---------------------------------------------------------------- the decision


def decision_for(policy: str, name: str, provider: ExtensionProvider | None, verdict: Verdict) -> Decision:
    """What a :class:`Verdict` means for the request (fail_open and status_on_error)."""
    if verdict.result == "allowed":
        return Decision(True, f"CUSTOM policy {policy!r}: allowed by {name!r}", policy=policy)
    if verdict.result == "denied":
        return Decision(False, f"CUSTOM policy {policy!r}: {name!r} denied: {verdict.reason}",
                        status=verdict.status, flags=EXT_AUTHZ_FLAG, policy=policy,
                        message=verdict.body.decode("utf-8", "replace") or "unauthorized",
                        headers=verdict.headers, body=verdict.body, details="ext_authz_denied")
    cfg = provider.ext_authz if provider is not None else None
    if cfg is not None and cfg.fail_open:
        return Decision(True, f"CUSTOM policy {policy!r}: {name!r} {verdict.result} ({verdict.reason}); fail_open",
                        policy=policy, log_flags=EXT_AUTHZ_FLAG)
    return Decision(False, f"CUSTOM policy {policy!r}: {name!r} {verdict.result}: {verdict.reason}",
                    status=cfg.status_on_error if cfg is not None else 403, flags=EXT_AUTHZ_FLAG, policy=policy,
                    message="external authorization failed", details="ext_authz_error")


class CustomCheck:
    """The CUSTOM step of one config revision: its providers, over the shared clients."""

    def __init__(self, providers: Iterable[ExtensionProvider], clients: Asker) -> None:
        self.providers = {p.name: p for p in providers}
        self.clients = clients

    async def __call__(self, custom: Sequence[tuple[str, str]], a: RequestAttrs, local: Decision,
                       source: BodySource | None = None) -> Decision:
        """Ask each provider of ``custom`` ((policy, provider) pairs) once, in order; the
        first refusal decides; if all allow, ``local`` (DENY/ALLOW) does, with their header
        changes.  ``source`` holds the request body (None: the request has none)."""
        asks: list[tuple[str, str, ExtensionProvider | None]] = []
        for policy, name in custom:
            if name not in {n for _, n, _ in asks}:
                asks.append((policy, name, self.providers.get(name)))
        bodies = await self._bodies(asks, a, source)
        for policy, name, provider in asks:  # refused before anyone is asked, as Envoy does
            if bodies.get(name) == TOO_LARGE:
                return too_large(policy, name, provider.ext_authz.include_request_body.max_request_bytes)  # type: ignore[union-attr]
        mutation = response = HeaderMutation()
        flags = ""
        for policy, name, provider in asks:
            verdict = await self.clients.check(name, provider, a, bodies.get(name))
            d = decision_for(policy, name, provider, verdict)
            if not d.allow:
                return d
            mutation = mutation.then(verdict.mutation)
            response = response.then(verdict.response)
            flags = flags or d.log_flags
        if not local.allow:
            return local
        if not mutation and not response and not flags:
            return local
        return dataclasses.replace(local, mutate=mutation if mutation else None,
                                   respond_mutate=response if response else None,
                                   log_flags=local.log_flags or flags)

    async def _bodies(self, asks: Sequence[tuple[str, str, ExtensionProvider | None]], a: RequestAttrs,
                      source: BodySource | None) -> dict[str, RequestBody | str]:
        """What each provider that includes the body gets of it (read once, up to the
        largest ``max_request_bytes``, waiting at most the longest ``timeout``)."""
        wants = {name: p.ext_authz for _, name, p in asks
                 if p is not None and p.ext_authz.include_request_body is not None}
        if not wants or a.method == "CONNECT":
            return {}
        length = content_length(a.headers)
        incs = {name: cfg.include_request_body for name, cfg in wants.items()}
        if length is not None and any(length > i.max_request_bytes and not i.allow_partial_message  # type: ignore[union-attr]
                                      for i in incs.values()):
            data, complete = b"", False  # refused by its length alone: nothing is read
        elif source is None:
            data, complete = b"", True
        else:
            data, complete = await self.clients.read_body(
                source, max(i.max_request_bytes for i in incs.values()),  # type: ignore[union-attr]
                max(cfg.timeout for cfg in wants.values()))
        return {name: body_for(inc, data, complete, length) for name, inc in incs.items()}  # type: ignore[arg-type]


__all__ = ["Asker", "BodySource", "CustomCheck", "INCOMPLETE", "EXT_AUTHZ_FLAG", "HeaderMutation", "MalformedAnswer", "NoClients", "PARTIAL_BODY_HEADER", "RESULTS", "RequestBody",
           "Verdict", "body_for", "content_length", "decision_for", "grpc_check_request", "grpc_verdict", "http_check_request",
           "http_verdict", "protected", "rewrite_query", "too_large"]
