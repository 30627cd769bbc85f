"""Request-target normalization before authorization (sans-IO, pure functions).

An AuthorizationPolicy that says ALLOW ``/api/*`` or DENY ``/admin*`` is only as good
as the path it is matched against.  A backend that normalizes paths itself (nginx,
most frameworks) serves ``/admin`` for ``/api/../admin``, ``/%61dmin`` or ``/./admin``;
if the policy saw the raw bytes, each of those walks past it.  So the inbound gateway
normalizes the path *before* authorization and **forwards the normalized path**, so the
policy and the service see the same request.

What :func:`normalize_path` does (Istio's default, ``BASE``, which is Envoy's
``normalize_path``), in this order:

1. percent-encoded *unreserved* characters (RFC 3986 §2.3: ALPHA DIGIT ``-._~``) are
   decoded; other escapes are kept, their hex digits upper-cased (RFC 3986 §6.2.2.1);
   raw bytes that may not appear in a path (non-ASCII, ``"<>^`{|}``) are escaped, so
   the result has one spelling;
2. ``\\`` becomes ``/``;
3. dot segments are removed (RFC 3986 §5.2.4), ``..`` never climbing above ``/``;
4. optionally (``merge_slashes``, off by default as in Istio) runs of ``/`` become one.

Refused with 400 (:class:`BadRequest`): ``%00`` and malformed escapes; SP, CTL and DEL
anywhere in the target; a fragment (``#``); a path that does not start with ``/``
(asterisk-form only for OPTIONS); and, by
default, escaped slashes ``%2F`` and ``%5C``: a backend that decodes them (nginx
does) would see ``/api/..%2Fadmin`` as ``/admin`` while the policy saw a path under
``/api``.  ``escaped_slashes="keep"`` keeps them as they are (Envoy's
``KEEP_UNCHANGED``) for services that need them, ``"decode"`` decodes them to ``/``
before the dot segments are removed (with ``merge_slashes``: Istio's
``DECODE_AND_MERGE_SLASHES``).

Absolute-form (``GET http://x/admin``, RFC 9112 §3.2.2) is what HTTP/1.1 clients send
to a proxy: :func:`split_target` turns it into an authority and an origin-form path.
An HTTP/2 ``:path`` must not be absolute (RFC 9113 §8.3.1); it is refused.

The query string is not normalized (nor matched by policies); only checked for SP/CTL.
Methods that are not an upper-case token are refused by :func:`gateway._sanitize.check_request`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._sanitize import Refused

_HEX = b"0123456789ABCDEF"
_HEXVAL = {c: i for i, c in enumerate(b"0123456789abcdef")} | {c: i for i, c in enumerate(_HEX)}
UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What a path may carry unescaped (RFC 3986 pchar and "/"): unreserved, sub-delims, ":@".
_PATH_OK = UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
ESCAPED_SLASH_ACTIONS = ("reject", "keep", "decode")


class BadRequest(Refused):
    """The request target cannot be normalized safely: answer 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 400)


@dataclass(frozen=True, slots=True)
class PathOptions:
    """How paths are normalized (the gateway config's ``path_normalization``)."""

    merge_slashes: bool = False
    escaped_slashes: str = "reject"  # one of ESCAPED_SLASH_ACTIONS


DEFAULT = PathOptions()


_ctl = re.compile(rb"[\x00-\x20\x7f]").search


def _no_ctl(data: bytes, what: str) -> None:
    if _ctl(data):
        raise BadRequest(f"bad request: {what} contains a space or control character")


def split_target(target: bytes) -> tuple[bytes | None, bytes]:
    """(authority or None, origin-form target) of an HTTP/1.1 request-target.

    Absolute-form ``http://host[:port]/p?q`` gives its authority and ``/p?q``; anything
    else is returned as it is (origin-form, asterisk-form, authority-form for CONNECT).
    """
    lower = target[:8].lower()
    for scheme in (b"http://", b"https://"):
        if lower.startswith(scheme):
            rest = target[len(scheme):]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0),
                      default=len(rest))
            authority, tail = rest[:cut], rest[cut:]
            if b"@" in authority:
                raise BadRequest("bad request: userinfo in the request target is not allowed")
            if not authority:
                raise BadRequest("bad request: absolute-form request target without a host")
            if not tail.startswith(b"/"):
                tail = b"/" + tail
            return authority, tail
    return None, target


def normalize_target(target: bytes, method: bytes = b"GET",
                     options: PathOptions = DEFAULT) -> bytes:
    """The normalized origin-form ``:path`` (path normalized, query kept); see the module."""
    _no_ctl(target, "the request target")
    if b"#" in target:
        raise BadRequest("bad request: the request target carries a fragment")
    if target == b"*":
        if method == b"OPTIONS":
            return target
        raise BadRequest("bad request: asterisk-form is only allowed for OPTIONS")
    path, q, query = target.partition(b"?")
    if not path.startswith(b"/"):
        if b"://" in path:
            raise BadRequest("bad request: absolute-form :path is not allowed in HTTP/2")
        raise BadRequest("bad request: the path must start with '/'")
    return normalize_path(path, options) + q + query


# Nothing to do for most paths: only allowed bytes, no escapes or backslashes, no dot
# segment (every segment follows a "/", the path starting with one).
_plain = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*\Z").match
_dot_segment = re.compile(rb"/\.\.?(?:/|\Z)").search


def normalize_path(path: bytes, options: PathOptions = DEFAULT) -> bytes:
    """Steps 1-4 of the module docstring on a path (no query)."""
    if _plain(path) and not _dot_segment(path) and not (options.merge_slashes and b"//" in path):
        return path
    decoded = _decode(path, options.escaped_slashes)
    if options.merge_slashes:
        decoded = _merge(decoded)
    return remove_dot_segments(decoded)


def _decode(path: bytes, escaped_slashes: str) -> bytes:
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        b = path[i]
        if b == 0x25:  # '%'
            hi = _HEXVAL.get(path[i + 1]) if i + 1 < n else None
            lo = _HEXVAL.get(path[i + 2]) if i + 2 < n else None
            if hi is None or lo is None:
                raise BadRequest("bad request: malformed percent-encoding in the path")
            v = hi * 16 + lo
            i += 3
            if v == 0:
                raise BadRequest("bad request: %00 in the path")
            if v in UNRESERVED:
                out.append(v)
            elif v in (0x2F, 0x5C):  # '/' '\'
                if escaped_slashes == "decode":
                    out.append(0x2F)
                elif escaped_slashes == "keep":
                    out += b"%" + bytes((_HEX[hi], _HEX[lo]))
                else:
                    raise BadRequest("bad request: escaped slash (%2F or %5C) in the path")
            else:
                out += b"%" + bytes((_HEX[hi], _HEX[lo]))
            continue
        if b == 0x5C:  # '\'
            out.append(0x2F)
        elif b in _PATH_OK:
            out.append(b)
        else:
            out += b"%" + bytes((_HEX[b >> 4], _HEX[b & 15]))
        i += 1
    return bytes(out)


def _merge(path: bytes) -> bytes:
    while b"//" in path:
        path = path.replace(b"//", b"/")
    return path


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path: no ``.`` or ``..`` segment remains."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == b".":
            if last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


__all__ = ["BadRequest", "DEFAULT", "ESCAPED_SLASH_ACTIONS", "PathOptions", "UNRESERVED",
           "normalize_path", "normalize_target", "remove_dot_segments", "split_target"]
