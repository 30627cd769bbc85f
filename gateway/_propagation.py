"""Trace context across the hop: W3C ``traceparent`` and B3, read and written (sans-IO).

Every HTTP request a gateway forwards carries a trace context onward, sampled or not,
exported or not: the gateway is one hop of the trace (one span), so the context it
forwards names the trace, *its own* span as the parent, and the sampling decision.

Reading (:func:`incoming`), in the order Envoy and OpenTelemetry's composite propagator
prefer: a valid W3C ``traceparent`` (W3C Trace Context, level 1); else a single ``b3``
header (``{trace}-{span}[-{sampled}[-{parent}]]``, or just ``0``/``1``/``d``); else the
multi-header form (``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-sampled``, ``x-b3-flags``),
as in openzipkin/b3-propagation.  A malformed context counts as none (a new trace).

Writing (:meth:`Hop.headers`): always a ``traceparent``; and, when the request came in
with B3, B3 again in the form it came in (single or multi, 64- or 128-bit trace id kept),
so a Zipkin-instrumented service behind the gateway sees the context it expects, as an
Istio sidecar propagates it.  Whatever trace headers the request carried are replaced
(:data:`TRACE_HEADERS`); ``tracestate`` passes through untouched.

Sampling (:func:`begin`) is parent-based with a trace-id ratio for new traces, the rule
of OpenTelemetry's ``ParentBased(TraceIdRatioBased(ratio))``, computed here on integers
so that an unsampled request costs no span work at all: a parent's decision is followed
(``sampled`` flag, B3 ``1``/``d``/``0``), a B3 context that defers (no flag) and a new
trace are sampled when the trace id's low 64 bits fall under ``bound``
(:func:`gateway._tracing.ratio_bound`).  A gateway that exports no spans (``bound`` None)
keeps the parent's flag and marks new traces sampled, as before spans existed.
"""

from __future__ import annotations

import random

from hpack import NeverIndexedHeaderTuple

TRACEPARENT = b"traceparent"
B3 = b"b3"
B3_TRACE, B3_SPAN, B3_PARENT = b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid"
B3_SAMPLED, B3_FLAGS = b"x-b3-sampled", b"x-b3-flags"
B3_MULTI = frozenset((B3_TRACE, B3_SPAN, B3_PARENT, B3_SAMPLED, B3_FLAGS))
# Replaced on every forwarded request.
TRACE_HEADERS = frozenset((TRACEPARENT, B3)) | B3_MULTI

_HEX = frozenset(b"0123456789abcdef")
_ZERO32, _ZERO16 = b"0" * 32, b"0" * 16
W3C, B3_SINGLE, B3_MULTIPLE = 0, 1, 2  # the format a context came in

# Ids are kept as the lowercase hex text they travel as: a request that only passes its
# context on never converts them (the span, made only when sampled, does).


def _hex_id(v: bytes, *sizes: int) -> str:
    """The id ``v`` (lowercase hex of one of ``sizes``) as text, "" if malformed or zero."""
    if len(v) not in sizes or not _HEX.issuperset(v) or v == _ZERO32[:len(v)]:
        return ""
    return v.decode()


class Incoming:
    """The trace context a request arrived with."""

    __slots__ = ("trace", "span", "sampled", "flags", "fmt")

    def __init__(self, trace: str, span: str, sampled: bool | None, fmt: int, flags: str = "") -> None:
        self.trace = trace  # hex, 16 or 32 digits; "": no ids (a B3 "0"/"1" alone): a new trace
        self.span = span
        self.sampled = sampled  # None: the caller defers the decision (B3 without a flag)
        self.flags = flags  # W3C trace-flags as received (kept, unknown bits included)
        self.fmt = fmt


def parse_traceparent(v: bytes) -> Incoming | None:
    if len(v) == 55:  # version 00, the common case
        version, trace, span, flags = v[:2], v[3:35], v[36:52], v[53:55]
        if v[2] != 45 or v[35] != 45 or v[52] != 45 or version == b"ff":  # '-'
            return None
    elif len(v) > 55 and v[55] == 45:  # a future version may append fields (W3C §3.2.4)
        version, trace, span, flags = v[:2], v[3:35], v[36:52], v[53:55]
        if v[2] != 45 or v[35] != 45 or v[52] != 45 or version in (b"00", b"ff"):
            return None
    else:
        return None
    if (not _HEX.issuperset(version) or not _HEX.issuperset(flags) or trace == _ZERO32
            or span == _ZERO16 or not _HEX.issuperset(trace) or not _HEX.issuperset(span)):
        return None
    return Incoming(trace.decode(), span.decode(), flags[1] in b"13579bdf", W3C, flags.decode())


def _b3_sampled(v: bytes) -> bool | None | str:
    """B3's sampling state: True (``1``, ``d``, legacy ``true``), False; the string "bad"
    when it is neither."""
    if v in (b"1", b"d", b"true"):
        return True
    if v in (b"0", b"false"):
        return False
    return "bad"


def parse_b3(v: bytes) -> Incoming | None:
    parts = v.strip().split(b"-")
    if len(parts) == 1:  # only a sampling decision: a new trace
        s = _b3_sampled(parts[0])
        return None if s == "bad" else Incoming("", "", s, B3_SINGLE)  # type: ignore[arg-type]
    if len(parts) > 4:
        return None
    trace, span = _hex_id(parts[0], 16, 32), _hex_id(parts[1], 16)
    if not trace or not span:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        s = _b3_sampled(parts[2])
        if s == "bad":
            return None
        sampled = s  # type: ignore[assignment]
    if len(parts) == 4 and not _hex_id(parts[3], 16):
        return None
    return Incoming(trace, span, sampled, B3_SINGLE)


def parse_b3_multi(h: dict[bytes, bytes]) -> Incoming | None:
    sampled: bool | None = None
    if h.get(B3_FLAGS) == b"1":  # debug implies sampled
        sampled = True
    elif B3_SAMPLED in h:
        s = _b3_sampled(h[B3_SAMPLED])
        if s == "bad":
            return None
        sampled = s  # type: ignore[assignment]
    t, s_ = h.get(B3_TRACE), h.get(B3_SPAN)
    if t is None and s_ is None:
        return None if sampled is None else Incoming("", "", sampled, B3_MULTIPLE)
    trace = _hex_id(t or b"", 16, 32)
    span = _hex_id(s_ or b"", 16)
    if not trace or not span:
        return None
    return Incoming(trace, span, sampled, B3_MULTIPLE)


def incoming(traceparent: bytes | None, b3: bytes | None,
             b3_multi: dict[bytes, bytes] | None) -> tuple[Incoming | None, int]:
    """The context a request carries (None: none valid) and the B3 format to write back
    (-1: none; the request carried no B3)."""
    if b3 is None and not b3_multi:
        return (parse_traceparent(traceparent) if traceparent is not None else None), -1
    fmt = B3_SINGLE if b3 is not None else B3_MULTIPLE
    ctx = parse_traceparent(traceparent) if traceparent is not None else None
    if ctx is None and b3 is not None:
        ctx = parse_b3(b3)
    if ctx is None and b3_multi:
        ctx = parse_b3_multi(b3_multi)
    return ctx, fmt


class Hop:
    """This gateway's span of a request: its ids (hex), its parent, the sampling decision."""

    __slots__ = ("trace_hex", "span_hex", "parent_hex", "sampled", "flags", "b3", "b3_trace")

    def __init__(self, trace_hex: str, span_hex: str, parent_hex: str, sampled: bool, flags: str,
                 b3: int = -1, b3_trace: str = "") -> None:
        self.trace_hex = trace_hex  # 32 digits
        self.span_hex = span_hex
        self.parent_hex = parent_hex  # "": the trace starts here
        self.sampled = sampled
        self.flags = flags  # W3C trace-flags to send (two hex digits; bit 0: sampled)
        self.b3 = b3  # B3 form to write as well (-1: none)
        self.b3_trace = b3_trace or trace_hex  # B3's trace id as it came (64-bit ones stay 64-bit)

    @property
    def trace_id(self) -> int:
        return int(self.trace_hex, 16)

    @property
    def span_id(self) -> int:
        return int(self.span_hex, 16)

    @property
    def parent_id(self) -> int:
        return int(self.parent_hex, 16) if self.parent_hex else 0

    def traceparent(self) -> bytes:
        return f"00-{self.trace_hex}-{self.span_hex}-{self.flags}".encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The trace headers for the next hop (unique per request: never HPACK-indexed)."""
        tp = NeverIndexedHeaderTuple(TRACEPARENT, f"00-{self.trace_hex}-{self.span_hex}-{self.flags}".encode())
        if self.b3 < 0:
            return [tp]
        out = [tp]
        flag = "1" if self.sampled else "0"
        if self.b3 == B3_SINGLE:
            value = f"{self.b3_trace}-{self.span_hex}-{flag}"
            if self.parent_hex:
                value += f"-{self.parent_hex}"
            out.append(NeverIndexedHeaderTuple(B3, value.encode()))
        else:
            out.append(NeverIndexedHeaderTuple(B3_TRACE, self.b3_trace.encode()))
            out.append(NeverIndexedHeaderTuple(B3_SPAN, self.span_hex.encode()))
            if self.parent_hex:
                out.append(NeverIndexedHeaderTuple(B3_PARENT, self.parent_hex.encode()))
            out.append(NeverIndexedHeaderTuple(B3_SAMPLED, flag.encode()))
        return out


def begin(ctx: Incoming | None, b3: int = -1, bound: int | None = None) -> Hop:
    """This gateway's hop of a request arriving with ``ctx``: a new span id, the trace
    continued (or begun), sampled by the rule in the module docstring."""
    # Trace and span ids need uniqueness, not secrecy: no syscall per request.
    span = f"{random.getrandbits(64) or 1:016x}"
    if ctx is None:
        trace = f"{random.getrandbits(128) or 1:032x}"
        sampled = True if bound is None else int(trace[16:], 16) < bound
        return Hop(trace, span, "", sampled, "01" if sampled else "00", b3)
    b3_trace = ctx.trace
    if ctx.trace:
        trace, parent = (ctx.trace if len(ctx.trace) == 32 else "0" * 16 + ctx.trace), ctx.span
    else:
        trace, parent = f"{random.getrandbits(128) or 1:032x}", ""
        b3_trace = ""
    sampled = ctx.sampled
    if sampled is None:
        sampled = True if bound is None else int(trace[16:], 16) < bound
    flags = ctx.flags
    if not flags or (flags[1] in "13579bdf") != sampled:
        f = int(flags, 16) if flags else 0
        flags = f"{(f | 1) if sampled else (f & 0xFE):02x}"
    return Hop(trace, span, parent, sampled, flags, b3, b3_trace)


__all__ = ["B3", "B3_MULTI", "Hop", "Incoming", "TRACEPARENT", "TRACE_HEADERS", "begin",
           "incoming", "parse_b3", "parse_b3_multi", "parse_traceparent"]
