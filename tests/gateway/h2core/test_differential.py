"""Differential tests: the same client bytes into the h2 core (the oracle) and the nghttp2
core give equivalent events and equivalent frames out.

Recordings come from real clients (httpx, curl, h2load, grpcio) talking to a capture
server; each is replayed as it was read from the socket and re-cut at other boundaries.
"""

from __future__ import annotations

import pytest

from .capture import CLIENTS, available, capture
from .replay import Replay, rechunk, replay

STREAM_WINDOW = 1 << 20


@pytest.fixture(scope="module")
def recordings() -> dict[str, list[list[bytes]]]:
    return {name: capture(client) for name, client in CLIENTS.items() if available(name)}


def assert_equivalent(a: Replay, b: Replay) -> None:
    assert a.error == b.error
    assert a.events == b.events
    assert a.control == b.control
    assert a.streams == b.streams
    for r in (a, b):
        for sid, got in r.received.items():
            # Never more window than data received, never so little that the peer stalls.
            back = r.credit.get(sid, 0)
            assert 0 <= got - back <= STREAM_WINDOW, (sid, got, back)
        total = sum(r.received.values())
        assert 0 <= total - r.credit.get(0, 0) <= STREAM_WINDOW


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("cut", [0, 13, 1000])
def test_real_client_bytes_give_the_same_events_and_frames_on_both_cores(
        recordings: dict[str, list[list[bytes]]], client: str, cut: int) -> None:
    if client not in recordings:
        pytest.skip(f"{client} is not installed")
    conns = recordings[client]
    assert conns, f"{client} made no connection"
    for reads in conns:
        if cut:
            reads = rechunk(reads, cut)
        oracle, core = replay("h2", reads), replay("nghttp2", reads)
        assert oracle.events, "the recording holds no request"
        assert_equivalent(oracle, core)
