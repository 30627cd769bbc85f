"""HTTP/2 core micro-benchmark: parse requests and answer them, h2 vs libnghttp2.

    python tests/bench/h2core.py            # 100 batches of 100 requests per core, 5 rounds
    python tests/bench/h2core.py --smoke    # a few batches: checks the code paths quickly
    python tests/bench/h2core.py --json

One server-side connection per core receives the same bytes: batches of 100 requests
(HEADERS with END_STREAM, the header set a gRPC-ish client sends), and answers each with
HEADERS + DATA (END_STREAM), acknowledging nothing it does not have to.  Timed per batch:
``receive_data`` of the batch, the answers, ``data_to_send``.  The request bytes are
built before timing by one client-side HPACK encoder, so both cores see the same
compressed blocks.  The h2 baseline is configured as the gateway configures it between
trusted peers (validation off, no Huffman on output).  Reported: CPU µs per request
(best batch and median), and nghttp2's cost as a ratio of h2's, measured in the same run
with the rounds of the two cores interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import hpack  # noqa: E402
import hyperframe.frame as hf  # noqa: E402
from h2.settings import SettingCodes  # noqa: E402

import gateway  # noqa: E402,F401  (applies the gateway's process-wide h2/hpack settings)
from gateway import Limits  # noqa: E402
from gateway.h2core import NgHttp2Connection, from_limits, select_core  # noqa: E402

BATCH = 100
SETTINGS = {SettingCodes.MAX_CONCURRENT_STREAMS: 1024,
            SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
            SettingCodes.MAX_HEADER_LIST_SIZE: 60 * 1024,
            SettingCodes.ENABLE_PUSH: 0}
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"2")]
BODY = b"ok"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _PlainEncoder(hpack.Encoder):
    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


def h2_server() -> h2.connection.H2Connection:
    cfg = h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False,
        normalize_inbound_headers=False, validate_outbound_headers=False,
        normalize_outbound_headers=False, split_outbound_cookies=False)
    conn = h2.connection.H2Connection(config=cfg)
    conn.encoder = _PlainEncoder()
    conn.local_settings = h2.settings.Settings(client=False, initial_values=SETTINGS)
    conn.initiate_connection()
    conn.increment_flow_control_window((16 << 20) - 65535)
    conn.data_to_send()
    return conn


def ng_server() -> NgHttp2Connection:
    """As the gateway builds its downstream connections (from_limits, untrusted)."""
    conn = from_limits(False, Limits(), trusted=False)
    conn.data_to_send()
    return conn


def ng_trusted() -> NgHttp2Connection:
    """As between gateways: large DATA frames (one more callback per DATA frame)."""
    conn = from_limits(False, Limits(), trusted=True)
    conn.data_to_send()
    return conn


def request_batches(n: int) -> list[bytes]:
    """n batches of BATCH requests; the first starts with the preface and SETTINGS ACK."""
    enc = hpack.Encoder()
    sid = 1
    out = []
    for b in range(n):
        parts = [PREFACE + hf.SettingsFrame(0).serialize()] if b == 0 else []
        if b == 0:
            ack = hf.SettingsFrame(0)
            ack.flags.add("ACK")
            parts.append(ack.serialize())
        for _ in range(BATCH):
            block = enc.encode([
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/bench.Echo/Call"),
                (b":authority", b"svc.ns.svc.cluster.local"), (b"content-type", b"text/plain"),
                (b"user-agent", b"bench/1.0"), (b"te", b"trailers"),
                (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                (b"isthmus-source-identity", b"spiffe://east.isthmus.local/ns/a/sa/b")])
            f = hf.HeadersFrame(sid, block)
            f.flags.add("END_HEADERS")
            f.flags.add("END_STREAM")
            parts.append(f.serialize())
            sid += 2
        out.append(b"".join(parts))
    return out


def run_batch(conn: Any, data: bytes) -> int:
    answered = 0
    for e in conn.receive_data(data):
        if type(e) is h2.events.RequestReceived:
            conn.send_headers(e.stream_id, RESPONSE)
            conn.send_data(e.stream_id, BODY, end_stream=True)
            answered += 1
    out = conn.data_to_send()
    assert out
    return answered


def measure(factory: Any, batches: list[bytes]) -> list[float]:
    """µs per request for each batch on one connection."""
    conn = factory()
    per: list[float] = []
    # CPU time of this process: on a shared machine, time spent descheduled is not ours.
    clock = time.process_time
    for data in batches:
        t0 = clock()
        n = run_batch(conn, data)
        per.append((clock() - t0) * 1e6 / BATCH)
        if n != BATCH:
            raise SystemExit(f"{factory.__name__}: answered {n} of {BATCH} requests")
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="3 batches, 1 round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.rounds = 3, 1
    info = select_core()
    if info.name != "nghttp2":
        raise SystemExit(f"nghttp2 core unavailable: {info.reason}")
    batches = request_batches(args.batches)
    cores = {"h2": h2_server, "nghttp2": ng_server, "nghttp2-trusted": ng_trusted}
    results: dict[str, list[float]] = {name: [] for name in cores}
    for _ in range(args.rounds):
        # Interleaved rounds: all cores see the same machine noise.
        for name, factory in cores.items():
            results[name].extend(measure(factory, batches))
    summary = {}
    for name, per in results.items():
        warm = per[1:] if len(per) > 1 else per
        summary[name] = {"best_us": round(min(warm), 2),
                         "median_us": round(statistics.median(warm), 2)}
    ratio = summary["nghttp2"]["median_us"] / summary["h2"]["median_us"]
    best = summary["nghttp2"]["best_us"] / summary["h2"]["best_us"]
    trusted = summary["nghttp2-trusted"]["median_us"] / summary["h2"]["median_us"]
    report = {"core": info.as_dict(), "batch": BATCH, "batches": args.batches,
              "rounds": args.rounds, "us_per_request": summary,
              "nghttp2/h2": round(ratio, 3), "nghttp2/h2_best": round(best, 3),
              "nghttp2-trusted/h2": round(trusted, 3), "speedup": round(1 / ratio, 1)}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{info.describe()}")
    print(f"{BATCH}-request batches x {args.batches}, {args.rounds} rounds; "
          "µs per request (parse + HEADERS + DATA):")
    for name, s in summary.items():
        print(f"  {name:16s} best {s['best_us']:8.2f}   median {s['median_us']:8.2f}")
    print(f"  nghttp2/h2 = {ratio:.3f} median, {best:.3f} best  ({1 / ratio:.1f}x faster); "
          f"nghttp2-trusted/h2 = {trusted:.3f}")


if __name__ == "__main__":
    main()
