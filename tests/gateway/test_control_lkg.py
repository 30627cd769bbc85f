"""The last-known-good file says whose it is, and a gateway uses only its own (issue 11, §6).

Real certificates (a real root and cluster CAs from ``trust``), real files; the federation
is unreachable, as at a start during an outage, which is when the file matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import trust
from federation.models import ClusterRecord, Snapshot
from gateway import Gateway, GatewayConfig
from gateway._control import federation_pins, initial_config, lkg_path, save_lkg

from .conftest import Pki, gateway_config


def _snapshot(pki: Pki, clusters: tuple[str, ...], bundle_pem: str, revision: int = 7) -> Snapshot:
    return Snapshot(revision=revision, bundle_pem=bundle_pem, clusters=tuple(
        ClusterRecord(name=c, trust_domain=pki.td(c), gateway_addresses=("127.0.0.1:9",), ca_cert_pem=pki.ca_pem(c))
        for c in clusters))


def _start(pki: Pki, tmp_path: Path) -> Gateway:
    cfg = gateway_config(pki, "east", tmp_path, federation={"address": "127.0.0.1:9"})
    gw = Gateway(cfg)
    initial_config(gw)
    return gw


def test_a_last_known_good_file_of_another_cluster_or_federation_is_refused_at_start(
    pki: Pki, tmp_path: Path, logs: list[dict]
) -> None:
    ours = pki.root.bundle_pem().decode()
    other_root = trust.TrustDir(tmp_path / "other")
    other_root.init("isthmus.local")
    theirs = other_root.bundle_pem().decode()
    path = tmp_path / "east-lkg.json"
    probe = Gateway(gateway_config(pki, "east", tmp_path))
    pins = federation_pins(probe)
    assert pins == [trust.ca_pin(trust.load_cert(pki.gw["east"].bundle))]

    refused = {
        "west's file": lambda: save_lkg(path, _snapshot(pki, ("east", "west"), ours), "west", pins),
        "another federation's": lambda: save_lkg(path, _snapshot(pki, ("east", "west"), theirs), "east",
                                                 ["sha256:" + "0" * 64]),
        # Files written before they said whose they are: judged by what they hold.
        "an old file of west's": lambda: path.write_text(_snapshot(pki, ("west",), ours).model_dump_json()),
        "an old file of another federation's": lambda: path.write_text(
            _snapshot(pki, ("east", "west"), theirs).model_dump_json()),
    }
    for what, write in refused.items():
        write()
        logs.clear()
        gw = _start(pki, tmp_path)
        assert gw.snapshot is None and not gw.ready, what
        [event] = [e for e in logs if e["event"] == "config.lkg_refused"]
        assert str(path) in event["message"] and "give each gateway its own last_known_good path" in event["message"]
    assert "cluster 'west'" in _refusal(pki, tmp_path, path, logs, refused["west's file"])

    for write in (lambda: save_lkg(path, _snapshot(pki, ("east", "west"), ours), "east", pins),
                  lambda: path.write_text(_snapshot(pki, ("east", "west"), ours).model_dump_json())):
        write()
        gw = _start(pki, tmp_path)
        assert gw.snapshot is not None and gw.snapshot.revision == 7 and gw.state.source == "last-known-good"


def _refusal(pki: Pki, tmp_path: Path, path: Path, logs: list[dict], write) -> str:  # type: ignore[no-untyped-def]
    write()
    logs.clear()
    _start(pki, tmp_path)
    return next(e["problem"] for e in logs if e["event"] == "config.lkg_refused")


def test_the_file_records_its_cluster_and_federation(pki: Pki, tmp_path: Path) -> None:
    gw = Gateway(gateway_config(pki, "east", tmp_path))
    path = tmp_path / "east-lkg.json"
    save_lkg(path, _snapshot(pki, ("east",), pki.root.bundle_pem().decode()), gw.cluster, federation_pins(gw))
    doc = json.loads(path.read_text())
    assert doc["cluster"] == "east" and doc["federation"] == federation_pins(gw)
    assert Snapshot.model_validate(doc["snapshot"]).revision == 7
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_default_last_known_good_path_is_per_cluster(pki: Pki, tmp_path: Path) -> None:
    paths = {}
    for c in ("east", "west"):
        data = json.loads(gateway_config(pki, c, tmp_path).model_dump_json())
        del data["last_known_good"], data["static"]
        paths[c] = lkg_path(Gateway(GatewayConfig.model_validate(data)))
    assert paths == {c: Path(f"/var/lib/isthmus/gateway/{c}/last-known-good.json") for c in ("east", "west")}
    explicit = Gateway(gateway_config(pki, "east", tmp_path))
    assert lkg_path(explicit) == tmp_path / "east-lkg.json"


def test_a_record_the_gateway_cannot_route_in_an_old_file_is_skipped_at_start(pki: Pki, tmp_path: Path,
                                                                              logs: list[dict]) -> None:
    """A target without a port used to kill the exporting cluster's gateway at start."""
    snap = json.loads(_snapshot(pki, ("east", "west"), pki.root.bundle_pem().decode()).model_dump_json())
    port = {"port": 80, "protocol": "HTTP", "target": "localhost"}
    snap["services"] = [
        {"cluster": "east", "namespace": "default", "name": "nop", "ports": [port]},
        {"cluster": "east", "namespace": "default", "name": "web", "ports": [{**port, "target": "localhost:8080"}]},
    ]
    (tmp_path / "east-lkg.json").write_text(json.dumps(snap))
    gw = _start(pki, tmp_path)
    assert gw.snapshot is not None and [s.name for s in gw.snapshot.services] == ["web"]
    assert {(t.service, t.host, t.target_port) for t in gw.state.routes.inbound.values()} == {("web", "localhost", 8080)}
    [skipped] = [e for e in logs if e["event"] == "config.lkg_record_skipped"]
    assert "ports[0].target" in skipped["error"] and "HOST:PORT" in skipped["error"]


def test_a_burst_of_changes_is_saved_once_at_its_end(pki: Pki, tmp_path: Path) -> None:
    """A write costs the whole config, so after each one the writer rests (at least
    LKG_MIN_INTERVAL, and ten times the write's duration): the changes of that time are
    saved once, the newest.  Trio's mock clock; each write takes 0.3 s of it."""
    import trio
    import trio.testing

    from gateway._control import LKG_DUTY, LKG_MIN_INTERVAL, Control

    gw = Gateway(gateway_config(pki, "east", tmp_path, federation={"address": "127.0.0.1:9"}))
    control = Control(gw, None, save=True)  # type: ignore[arg-type] - the client is not used here
    written: list[tuple[float, int]] = []

    async def write(snap: Snapshot) -> None:
        await trio.sleep(0.3)
        written.append((round(trio.current_time(), 2), snap.revision))

    control.write_lkg = write  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control.run_lkg_writer)
            control.save_later(_snapshot(pki, ("east",), "", revision=1))
            await trio.sleep(0.5)
            for rev in (2, 3, 4):  # while it rests
                control.save_later(_snapshot(pki, ("east",), "", revision=rev))
                await trio.sleep(0.1)
            await trio.sleep(10)
            control.save_later(_snapshot(pki, ("east",), "", revision=5))  # after a quiet spell: at once
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    rest = max(LKG_MIN_INTERVAL, 0.3 / LKG_DUTY)
    assert written == [(0.3, 1), (round(0.3 + rest + 0.3, 2), 4), (11.1, 5)]
