"""ConfigState: built off the event loop, swapped whole; a snapshot that cannot be built
is rejected (never fatal) and the config in force keeps serving; the certificate-expiry
metric follows rotation."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

import trust
from federation.models import ExportedService, ServicePort, Snapshot
from gateway import ConfigState, Gateway
from gateway._control import initial_config

from .conftest import Mesh, Pki, gateway_config

WEB = "web.default.west.isthmus.local:8080"


def _broken_export(revision: int, mesh: Mesh) -> Snapshot:
    """West exports a service whose target has no port (``target: localhost``).

    Built without validation: a lenient federation (or an older one) may hand it out."""
    port = ServicePort.model_construct(port=80, target="localhost")
    broken = ExportedService(cluster="west", namespace="default", name="broken", ports=(port,))
    return mesh.snapshot(revision=revision, extra_services=(broken,))


async def _admin(gw: Gateway, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as c:
        return await c.get(f"http://127.0.0.1:{gw.ports['admin']}{path}")


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no metric {name}")


async def _call_west(mesh: Mesh) -> httpx.Response:
    async with httpx.AsyncClient(http2=True, http1=False) as c:
        return await c.get(f"http://127.0.0.1:{mesh.east_out}/echo", headers={"host": WEB})


async def test_a_live_snapshot_that_cannot_be_built_is_rejected_and_the_last_good_one_serves(
        mesh: Mesh, logs: list) -> None:
    rejected: list[tuple[int, str]] = []
    mesh.west.on_rejected = lambda revision, reason: rejected.append((revision, reason))
    kept = mesh.west.state
    assert (await _call_west(mesh)).status_code == 200

    assert not await mesh.west.update(_broken_export(2, mesh), source="federation")

    assert mesh.west.state is kept and mesh.west.state.revision == 1
    assert (await _call_west(mesh)).status_code == 200  # still serving revision 1
    assert len(rejected) == 1 and rejected[0][0] == 2
    assert "'localhost' is not HOST:PORT" in rejected[0][1]
    doc = (await _admin(mesh.west, "/config")).json()
    assert doc["revision"] == 1
    assert doc["last_rejected"] == {"revision": 2, "reason": rejected[0][1], "source": "federation"}
    metrics = (await _admin(mesh.west, "/metrics")).text
    assert _metric(metrics, "isthmus_config_rejected_total") == 1
    assert _metric(metrics, "isthmus_config_revision") == 1
    assert [e["revision"] for e in logs if e["event"] == "config.rejected"] == [2]
    # The importing side builds it (the broken target is west's own business) ...
    assert await mesh.east.update(_broken_export(2, mesh))
    # ... and once west's export is fixed, west applies the next revision.
    assert await mesh.west.update(mesh.snapshot(revision=3))
    assert mesh.west.state.revision == 3
    assert (await _call_west(mesh)).status_code == 200


async def test_a_rejecting_hook_that_fails_does_not_take_the_gateway_down(mesh: Mesh) -> None:
    def hook(revision: int, reason: str) -> None:
        raise RuntimeError("federation unreachable")

    mesh.west.on_rejected = hook
    assert not mesh.west.apply_snapshot(_broken_export(2, mesh))
    assert mesh.west.state.revision == 1
    assert (await _call_west(mesh)).status_code == 200


async def test_a_last_known_good_file_with_an_unbuildable_record_starts_without_it(
        mesh: Mesh, pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> None:
    """The file is read leniently (gateway/_control.py): the record that could not be
    built is skipped, the rest serves, and nothing crashes."""
    lkg = tmp_path / "west-broken-lkg.json"
    lkg.write_text(_broken_export(7, mesh).model_dump_json())
    cfg = gateway_config(pki, "west", tmp_path, last_known_good=str(lkg),
                         federation={"address": "127.0.0.1:1"})
    gw = Gateway(cfg)
    initial_config(gw)  # what `isthmus gateway run` does before serving
    assert gw.ready and gw.snapshot is not None and gw.snapshot.revision == 7
    assert "broken" not in {t.service for t in gw.state.routes.inbound.values()}
    await nursery.start(gw.run)
    assert (await _admin(gw, "/readyz")).status_code == 200
    assert await gw.update(mesh.snapshot(revision=8))  # the federation's next snapshot applies
    assert (await _admin(gw, "/config")).json()["revision"] == 8
    gw.stop()


async def test_update_builds_in_a_worker_thread_and_swaps_one_state(mesh: Mesh) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    build = mesh.east._build

    def recording_build(snap: Snapshot, source: str) -> ConfigState:
        threads.append(threading.get_ident())
        return build(snap, source)

    mesh.east._build = recording_build  # type: ignore[method-assign]
    before = mesh.east.state
    assert await mesh.east.update(mesh.snapshot(revision=5))
    after = mesh.east.state
    assert threads and loop_thread not in threads
    assert after is not before and after.revision == 5
    # Routes, policies and revocations of one state come from the same snapshot.
    assert after.routes.revision == after.policy.revision == after.snapshot.revision == 5
    assert (await _call_west(mesh)).status_code == 200


async def test_certificate_expiry_metric_follows_rotation(pki: Pki, tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    files = pki.cas["east"].issue(trust.gateway_id(pki.td("east")), tmp_path / "gw",
                                  validity=3600)
    cfg = gateway_config(pki, "east", tmp_path)
    cfg = cfg.model_copy(update={"tls": cfg.tls.model_copy(update={
        "cert_file": files.cert, "key_file": files.key, "bundle_file": files.bundle})})
    gw = Gateway(cfg)
    await nursery.start(gw.run)
    first = _metric((await _admin(gw, "/metrics")).text,
                    "isthmus_certificate_expiry_timestamp_seconds")
    assert abs(first - trust.load_cert(files.cert).not_valid_after_utc.timestamp()) < 1
    # Renewed in place, as the agent does: a longer-lived certificate.
    pki.cas["east"].issue(trust.gateway_id(pki.td("east")), tmp_path / "gw", validity=7200)
    renewed = trust.load_cert(files.cert).not_valid_after_utc.timestamp()
    assert renewed > first + 3000
    with trio.fail_after(10):
        while True:
            value = _metric((await _admin(gw, "/metrics")).text,
                            "isthmus_certificate_expiry_timestamp_seconds")
            if value != first:
                break
            await trio.sleep(0.2)
    assert abs(value - renewed) < 1
    gw.stop()



def test_a_retired_state_is_taken_apart_only_when_nobody_holds_its_tables(
        pki: Pki, tmp_path: Path) -> None:
    """retire() frees a replaced state's route tables entry by entry (so freeing 50,000
    routes is no single GIL-holding call); a table still held elsewhere is left whole."""
    from gateway._state import retire

    svc = ExportedService(cluster="west", namespace="default", name="web",
                          ports=(ServicePort(port=8080),))
    snap = Snapshot(revision=3, services=(svc,))

    west = Gateway(gateway_config(pki, "west", tmp_path))
    assert west.apply_snapshot(snap)
    held = west.state.routes.inbound  # a reader still holds this table
    retire([west.state])
    assert len(held) == 2 and held is west.state.routes.inbound

    # A changed service: a new table (an unchanged one is shared with the state before).
    moved = svc.model_copy(update={"ports": (ServicePort(port=8081),)})
    assert west.apply_snapshot(snap.model_copy(update={"revision": 4, "services": (moved,)}))
    tables = west.state.routes
    assert len(tables.inbound) == 2 and tables.inbound is not held
    retire([west.state])
    assert tables.inbound == {} and tables.outbound == {}
    assert len(held) == 2  # what it shared with the held table is still there
