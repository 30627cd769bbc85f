"""Request mirroring (Istio's ``mirror``): a copy of a request goes to another destination,
its answer is discarded, and it never delays or fails the primary (sans-IO).

The copy names the service with ``-shadow`` appended to the host of its ``:authority``
(Istio's and Envoy's convention: ``cart.shop.svc.cluster.local-shadow:8080``); the
exporting cluster's inbound gateway routes it as the service itself and passes the
shadow authority on, so the service can tell copies apart (:func:`unshadow`).

Bounded: at most :data:`MAX_MIRRORS` copies in flight per gateway, and a copy's body up
to :data:`MIRROR_BODY_LIMIT`; a copy that cannot keep up (its queue grows past the limit,
the body outgrows it, no slot is free) is dropped and counted, never waited for.  The
copy's data is written with no flow-control credit: the primary's window is not held
by the mirror.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from ._half import Half, Headers, link
from ._relay import new_upstream

if TYPE_CHECKING:
    from ._relay import H2Half
    from ._routes import PeerCluster

SHADOW = "-shadow"
MAX_MIRRORS = 256
MIRROR_BODY_LIMIT = 64 * 1024


def shadow_authority(authority: str) -> str:
    """``host[:port]`` with ``-shadow`` appended to the host."""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}{SHADOW}:{port}"
    return authority + SHADOW


def unshadow(authority: str) -> str:
    """The authority a shadow copy names the service by, without ``-shadow``."""
    host, sep, port = authority.rpartition(":")
    if not (sep and port.isdigit()):
        host, sep, port = authority, "", ""
    if host.endswith(SHADOW):
        return host[: -len(SHADOW)] + sep + port
    return authority


class Mirrors:
    """The gateway's mirror copies in flight; ``count(outcome)`` feeds the metric."""

    def __init__(self, open_peer: Callable[[PeerCluster, H2Half, int | None], None],
                 count: Callable[[str], None]) -> None:
        self.open_peer = open_peer
        self.count = count
        self.in_flight = 0

    def start(self, headers: Headers, peer: PeerCluster, authority: str, end: bool,
              cap: int | None = None) -> Copy | None:
        """Send a copy of the request head ``headers`` to ``peer`` as ``authority``, on
        the mirrored service's first ``cap`` connections to it (its TrafficPolicy's
        ``max_connections_per_peer``, as for its own requests)."""
        if self.in_flight >= MAX_MIRRORS:
            self.count("dropped")
            return None
        self.in_flight += 1
        shadow = shadow_authority(authority).encode()
        hs = [(k, shadow) if k == b":authority" else (k, v) for k, v in headers]
        up = new_upstream()
        c = Copy(self, up)
        link(c, up)
        up.write_headers(hs, end)
        self.count("sent")
        self.open_peer(peer, up, cap)
        return c


class Copy(Half):
    """One mirror copy: what the caller sends is copied in; what comes back is dropped."""

    __slots__ = ("mirrors", "up", "size", "done")

    def __init__(self, mirrors: Mirrors, up: H2Half) -> None:
        super().__init__()
        self.mirrors, self.up, self.size, self.done = mirrors, up, 0, False

    # -- the caller's request, copied --------------------------------------------------------
    def data(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > MIRROR_BODY_LIMIT or self.up.queued_bytes() > MIRROR_BODY_LIMIT:
            self.drop()
            return
        self.up.write_data(data, 0)

    def trailers(self, trailers: Headers) -> None:
        if not self.done:
            self.up.write_trailers(trailers)

    def end(self) -> None:
        if not self.done:
            self.up.write_end()

    def drop(self) -> None:
        """Give up on this copy (the caller went away, or it cannot keep up)."""
        if not self.done:
            self.mirrors.count("dropped")
            self._over()
            if not self.up.closed:
                self.up.reset(ErrorCodes.CANCEL)

    def _over(self) -> None:
        if not self.done:
            self.done = True
            self.mirrors.in_flight -= 1

    # -- the mirror's answer, discarded ---------------------------------------------------------
    def write_headers(self, headers: Headers, end: bool) -> None:
        if end:
            self._over()

    def write_data(self, data: bytes, credit: int) -> None:
        if credit and not self.up.closed:
            self.up.ack(credit)

    def write_trailers(self, trailers: Headers) -> None:
        self._over()

    def write_end(self) -> None:
        self._over()

    def ack(self, credit: int) -> None:
        pass  # the copy was written without credit

    def abort(self, code: int, flags: str = "UR", message: str = "") -> None:
        if not self.done:
            self.mirrors.count("failed")
        self._over()

    def reset(self, code: int) -> None:
        self._over()


__all__ = ["Copy", "MAX_MIRRORS", "MIRROR_BODY_LIMIT", "Mirrors", "shadow_authority", "unshadow"]
