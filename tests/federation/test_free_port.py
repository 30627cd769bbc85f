"""free_port, which every test and benchmark that starts a listener uses: below the
kernel's ephemeral range (no outgoing connection takes it meanwhile), and never the same
port twice in a row of calls (a 50-gateway benchmark picks 150 before any binds: random
picks among ~22,000 gave one port to two gateways about every other run)."""

from __future__ import annotations

import socket

from federation.server._embedded import _ephemeral_range, free_port


def test_free_ports_are_distinct_below_the_ephemeral_range_and_bindable() -> None:
    lo, _ = _ephemeral_range()
    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)
    if lo > 11000:
        assert all(10000 <= p < lo for p in ports)
    with socket.socket() as s:  # free when handed out
        s.bind(("127.0.0.1", ports[-1]))
