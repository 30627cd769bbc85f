"""The join port, reachable without credentials, cannot exhaust the federation (issue 11, §7).

A real federation process, real TLS, and a raw HTTP/2 client (h2) that streams a gRPC Join
message announcing 200 MiB without holding it in memory; the federation's RSS is read
from /proc.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from federation.server._serve import JOIN_CONNECTIONS_PER_IP

from .fixtures import FederationProcess, Pki, join_cluster

MiB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tls_connect(fed: FederationProcess, pki: Pki) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cadata=pki.td.bundle_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    host, port = fed.join_address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def huge_join(fed: FederationProcess, pki: Pki, size: int, give_up: float = 60.0) -> tuple[str, int]:
    """Send a Join whose csr_pem is ``size`` bytes; return (outcome, bytes the server took)."""
    tls = tls_connect(fed, pki)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":authority", fed.join_address),
                            (":path", "/isthmus.federation.v1.Federation/Join"),
                            ("content-type", "application/grpc"), ("te", "trailers")])
    field = b"\x1a" + _varint(size)  # JoinRequest.csr_pem (field 3, bytes)
    pending = b"\x00" + struct.pack(">I", len(field) + size) + field
    left = size
    sent = 0
    outcome = "all sent"
    chunk = b"\x00" * (256 * 1024)
    deadline = time.monotonic() + give_up
    try:
        while time.monotonic() < deadline:
            tls.sendall(conn.data_to_send())
            readable, _, _ = select.select([tls], [], [], 0 if (pending or left) and conn.local_flow_control_window(sid) else 0.5)
            if readable or tls.pending():
                data = tls.recv(65536)
                if not data:
                    outcome = "closed"
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.StreamReset):
                        outcome = f"reset {ev.error_code!r}"
                    elif isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        status = dict(ev.headers).get(b"grpc-status")
                        if status is not None:
                            outcome = f"grpc-status {status.decode()}"
                if outcome != "all sent":
                    break
            try:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                break
            if window <= 0:
                continue
            if not pending and left:
                pending, left = chunk[: min(len(chunk), left)], left - min(len(chunk), left)
            if pending:
                piece, pending = pending[:window], pending[window:]
                conn.send_data(sid, piece, end_stream=not pending and not left)
                sent += len(piece)
        else:
            outcome = "timed out"
    finally:
        tls.close()
    return outcome, sent


def test_a_200_mib_join_is_refused_without_the_federation_growing(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pid = fed.proc.pid
    join_cluster(fed, pki, "warmup", tmp_path)  # let the first join's allocations happen first
    before = rss(pid)
    peak = [before]
    results: list[tuple[str, int]] = []

    def one() -> None:
        results.append(huge_join(fed, pki, 200 * MiB))

    def watch_rss() -> None:
        while len(results) < 4:
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.05)

    threads = [threading.Thread(target=one) for _ in range(4)] + [threading.Thread(target=watch_rss)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4
    for outcome, sent in results:
        assert outcome == "grpc-status 8" or outcome.startswith("reset"), results  # 8: RESOURCE_EXHAUSTED
        assert sent < 32 * MiB, results  # refused at the length prefix (what it took: flow-control windows)
    growth = max(peak[0], rss(pid)) - before
    assert growth < 16 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"
    join_cluster(fed, pki, "east", tmp_path)  # and a real join still works


def test_join_port_caps_connections_per_source_ip(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    held = [tls_connect(fed, pki) for _ in range(JOIN_CONNECTIONS_PER_IP)]
    try:
        extra = None
        try:
            extra = tls_connect(fed, pki)
            extra.settimeout(5)
            got = extra.recv(1)  # the relay closed it: EOF (or a reset) instead of server frames
        except (ssl.SSLError, ConnectionError, OSError):
            got = b""
        finally:
            if extra is not None:
                extra.close()
        assert got == b""
        assert '"join.connection_refused"' in fed.log_text()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    join_cluster(fed, pki, "east", tmp_path)  # below the cap again: joins work
