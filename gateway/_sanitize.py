"""What may cross the gateway: header checks and body framing (sans-IO, pure).

Every workload of a cluster shares the pooled gateway-to-gateway connections, so nothing
one workload sends may make the gateway emit what the peer treats as a *connection*
error (RFC 9113 §5.4.1).  The functions here decide, per request, before anything is
written to a shared connection; a refusal is a :class:`Refused` (400 or 431) answered
on that stream only.

* :func:`check_request` (both listeners): pseudo-headers well formed (a ``:method`` that
  is an upper-case token, a ``:path`` without SP or CTL), no upper-case or invalid
  header names (RFC 9113 §8.2.1), no CR/LF/NUL in values, no connection-specific headers
  (§8.2.2), ``te`` only as ``trailers``.  h2 checks much of this on workload
  connections, not on the trusted ones between gateways; this runs on every request
  whichever HTTP/2 implementation parsed it.
* :func:`outbound_request`: a workload's headers with every identity header removed, in
  any letter case (``isthmus-*``, ``x-forwarded-client-cert``), plus what HTTP/1.1 may
  carry but HTTP/2 may not (``connection`` and the headers it names, ``te`` other than
  ``trailers``, ``host``).
* :func:`source_identity` (inbound): the one ``isthmus-source-identity`` a peer asserts;
  two or more is a refusal, not a choice.
* :func:`request_trailers`: request trailers lose identity and connection headers.
* :func:`check_size`: the header list as the next hop will count it (RFC 9113 §6.5.2:
  name + value + 32 per field) including what the gateway adds, against the peer's
  ``SETTINGS_MAX_HEADER_LIST_SIZE``: over it is 431 here, not GOAWAY there.
* :class:`BodyFraming`: the body a half may write after its headers.  HEAD responses,
  204 and 304 carry none (extra bytes are dropped); with ``content-length`` the body
  must match it, else the stream is reset instead of sent malformed (an h2 receiver
  treats a length mismatch as a connection error).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ._errors import GatewayError
from ._resilience import DEADLINE_HEADER

Headers = list[tuple[bytes, bytes]]

SOURCE_IDENTITY = b"isthmus-source-identity"
XFCC = b"x-forwarded-client-cert"
# RFC 9113 §8.2.2 (plus proxy-connection, which HTTP/1.1 clients still send).
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
FIELD_OVERHEAD = 32  # RFC 9113 §6.5.2
NO_BODY_STATUS = frozenset({204, 304})


class Refused(GatewayError):
    """A request the gateway will not forward; ``status`` is 400, 403 (a peer asserting
    identities wrongly) or 431."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _is_identity(name: bytes) -> bool:
    n = name.lower()
    return n[:8] == b"isthmus-" or n == XFCC


_bad_name = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]").search
_bad_value = re.compile(rb"[\r\n\x00]").search
_ctl = re.compile(rb"[\x00-\x20\x7f]").search
_bad_method = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Z]").search
# Names already found valid (they repeat across requests): skips the regex. Bounded.
_good_names: set[bytes] = set()
_GOOD_NAMES_MAX = 4096


def check_request(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Raise :class:`Refused` for a request HTTP/2 forbids (see the module docstring)."""
    method = path = length = None
    regular = False
    seen: set[bytes] = set()
    values: list[bytes] = []
    for k, v in headers:
        if k[:1] == b":":
            if regular:
                raise Refused("bad request: pseudo-header after a regular header")
            if k not in _REQUEST_PSEUDO:
                raise Refused(f"bad request: unknown pseudo-header {k.decode('latin-1')!r}")
            if k in seen:
                raise Refused(f"bad request: more than one {k.decode()}")
            seen.add(k)
            if k == b":method":
                method = v
            elif k == b":path":
                path = v
            continue
        regular = True
        values.append(v)
        if k not in _good_names:
            if not k or _bad_name(k):
                raise Refused(f"bad request: header name {k.decode('latin-1')!r} is not a "
                              "lower-case token")
            if k in CONNECTION_SPECIFIC:
                raise Refused(f"bad request: connection-specific header {k.decode()!r}")
            if k != b"te" and k != b"content-length" and len(_good_names) < _GOOD_NAMES_MAX:
                _good_names.add(k)
        if k == b"te":
            if v.strip().lower() != b"trailers":
                raise Refused("bad request: te other than 'trailers'")
        elif k == b"content-length":
            # h2 treats a bad or conflicting one as a connection error where it arrives.
            if not v.isdigit() or (length is not None and v != length):
                raise Refused("bad request: invalid or conflicting content-length")
            length = v
    if values and _bad_value(b"".join(values)):
        raise Refused("bad request: a header value carries CR, LF or NUL")
    if not method or _bad_method(method):
        raise Refused("bad request: :method must be an upper-case token")
    if method == b"CONNECT":
        return
    if not path:
        raise Refused("bad request: no :path")
    if _ctl(path):
        raise Refused("bad request: :path contains a space or control character")


# x-isthmus-deadline is the outbound gateway's to set (from the route's timeout, see
# gateway/_retry.py): a workload's would bound the work at the exporting cluster as it
# pleases, so it is never forwarded (nor trusted here: gateway/_context.py).
_DROP_OUTBOUND = CONNECTION_SPECIFIC | {b"host", XFCC, DEADLINE_HEADER}


def outbound_request(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A workload's request headers as the outbound may forward them (no identity)."""
    out: Headers = []
    named: set[bytes] = set()
    for k, v in headers:
        lk = k.lower()
        if lk in _DROP_OUTBOUND or lk[:8] == b"isthmus-":
            if lk == b"connection":
                named.update(t.strip().lower() for t in v.split(b","))
            continue
        if lk == b"te" and v.strip().lower() != b"trailers":
            continue
        out.append((k, v))
    if named:  # fields the connection header names are hop-by-hop too (RFC 9110 §7.6.1)
        out = [(k, v) for k, v in out if k.lower() not in named]
    return out


def source_identity(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The asserted caller identity, or None; two or more copies are refused."""
    found: bytes | None = None
    for k, v in headers:
        if k.lower() == SOURCE_IDENTITY:
            if found is not None:
                raise Refused("more than one isthmus-source-identity header", 403)
            found = v
    return found


def request_trailers(trailers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Request trailers without identity, pseudo- or connection-specific fields."""
    return [(k, v) for k, v in trailers
            if k[:1] != b":" and not _is_identity(k) and k.lower() not in CONNECTION_SPECIFIC]


def header_list_size(headers: Headers) -> int:
    n = 0
    for k, v in headers:
        n += len(k) + len(v)
    return n + FIELD_OVERHEAD * len(headers)


def check_size(headers: Headers, limit: int) -> None:
    """431 if the final header list (what the gateway added included) exceeds ``limit``."""
    size = header_list_size(headers)
    if size > limit:
        raise Refused(f"request header fields too large: {size} bytes with what the gateway "
                      f"adds, the limit is {limit}", 431)


class BodyFraming:
    """Counts what a half writes after its headers (see the module docstring)."""

    __slots__ = ("no_body", "remaining")

    def __init__(self, headers: Iterable[tuple[bytes, bytes]], request_method: str = "") -> None:
        self.no_body = False
        self.remaining: int | None = None
        status = 0
        for k, v in headers:
            if k == b":status":
                status = int(v) if v.isdigit() else 0
            elif k == b"content-length" and self.remaining is None:
                self.remaining = int(v) if v.isdigit() else None
        if status and (request_method == "HEAD" or status in NO_BODY_STATUS):
            self.no_body = True

    def data(self, n: int) -> bool | None:
        """True: write it; None: drop it (no body allowed); False: too long, reset."""
        if self.no_body:
            return None
        if self.remaining is not None:
            if n > self.remaining:
                return False
            self.remaining -= n
        return True

    def end_ok(self) -> bool:
        """False if ending now would leave the body shorter than its content-length."""
        return self.no_body or not self.remaining


__all__ = ["BodyFraming", "CONNECTION_SPECIFIC", "FIELD_OVERHEAD", "NO_BODY_STATUS", "Refused",
           "SOURCE_IDENTITY", "XFCC", "check_request", "check_size", "header_list_size",
           "outbound_request", "request_trailers", "source_identity"]
