"""Response flags: the one table from an Envoy/Istio response flag to what the caller sees.

Every locally generated answer (no route, denied, upstream failed, deadline passed,
overload) carries a flag.  The flags go to the ``response_flags`` metric label and
access-log field; :data:`FLAGS` maps each to the HTTP status of a plain answer, the gRPC
status of a trailers-only gRPC answer, and a default text.  Flag names and their
meaning follow Envoy's access-log documentation (``%RESPONSE_FLAGS%``).

A request may earn several (an injected delay, then a timeout): every one is kept, each
once, comma-joined in the order they were set (:func:`add_flag`), as Envoy's
``StreamInfoImpl::setResponseFlag`` and ``ResponseFlagUtils::toShortString`` do: ``DI,UT``.
Envoy sets no flag for panic routing (every host ejected, all used: its
``lb_healthy_panic`` counter is the signal), so neither does Isthmus; see
``isthmus_outlier_panic_total`` and ``response_code_details: outlier_panic``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GrpcStatus(enum.IntEnum):
    """gRPC status codes the gateway sends itself (grpc/doc/statuscodes.md)."""

    OK = 0
    DEADLINE_EXCEEDED = 4
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class Flag:
    """What a response flag means to the caller."""

    http: int
    grpc: GrpcStatus
    text: str


# Stable API: the flags are metric label values (Kiali and dashboards filter on them).
FLAGS: dict[str, Flag] = {
    # Envoy maps a protocol error's 400/431/502 to gRPC INTERNAL.
    "DPE": Flag(400, GrpcStatus.INTERNAL, "downstream protocol error"),
    "UPE": Flag(502, GrpcStatus.INTERNAL, "upstream protocol error"),
    "NR": Flag(404, GrpcStatus.UNIMPLEMENTED, "no route"),
    "RBAC": Flag(403, GrpcStatus.PERMISSION_DENIED, "RBAC: access denied"),
    "UAEX": Flag(403, GrpcStatus.PERMISSION_DENIED, "unauthorized"),
    "UF": Flag(503, GrpcStatus.UNAVAILABLE, "upstream connect failed"),
    "UC": Flag(503, GrpcStatus.UNAVAILABLE, "upstream connection failed"),
    "UR": Flag(503, GrpcStatus.UNAVAILABLE, "upstream reset"),
    "UH": Flag(503, GrpcStatus.UNAVAILABLE, "no healthy upstream"),
    "UO": Flag(503, GrpcStatus.UNAVAILABLE, "upstream overflow"),
    "OM": Flag(503, GrpcStatus.UNAVAILABLE, "gateway overloaded"),  # overload manager
    "DC": Flag(503, GrpcStatus.UNAVAILABLE, "downstream connection terminated"),
    "UT": Flag(504, GrpcStatus.DEADLINE_EXCEEDED, "upstream request timeout"),
    "DT": Flag(504, GrpcStatus.DEADLINE_EXCEEDED, "deadline exceeded"),
    "RL": Flag(429, GrpcStatus.RESOURCE_EXHAUSTED, "rate limited"),
    # Resilience (gateway/_resilience.py).  A fault abort answers with its configured
    # status; this is the default.  A delay (DI) is not an answer of its own, so not here.
    "FI": Flag(503, GrpcStatus.UNAVAILABLE, "fault filter abort"),
    "URX": Flag(503, GrpcStatus.UNAVAILABLE, "upstream retry limit exceeded"),
}
# An unknown flag (a hook's own) is answered like a failed upstream.
DEFAULT_FLAG = Flag(503, GrpcStatus.UNAVAILABLE, "unavailable")


# Flags that note something on the way and end nothing: a later cause still counts.
NOTES = frozenset({"DI"})


def flag(name: str) -> Flag:
    return FLAGS.get(name, DEFAULT_FLAG)


def add_flag(flags: str, new: str) -> str:
    """``flags`` (comma-joined) with ``new`` appended unless it is there already."""
    if not flags:
        return new
    if not new or new == flags:
        return flags
    have = flags.split(",")
    for f in new.split(","):
        if f and f not in have:
            have.append(f)
    return ",".join(have)


def has_flag(flags: str, name: str) -> bool:
    return name == flags or name in flags.split(",")


def ended(flags: str) -> bool:
    """Whether ``flags`` names a cause the exchange ended for (not only notes)."""
    if not flags:
        return False
    return any(f not in NOTES for f in flags.split(","))


__all__ = ["DEFAULT_FLAG", "FLAGS", "Flag", "GrpcStatus", "NOTES", "add_flag", "ended", "flag", "has_flag"]
