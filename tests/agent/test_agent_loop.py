"""The reconcile loop's control flow with in-memory fakes (no server): 410 Gone re-lists,
only retryable errors are retried (with backoff, up to a limit), the health endpoint.

The fakes stand in for the Kubernetes shell and the federation client with the same
methods; the real ones are exercised in test_agent.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import trio
from kubernetes import client

from federation._errors import RemoteError
from federation.agent import _names as n
from federation.agent._agent import Agent, AgentConfig, ResyncDue, _retryable
from federation.agent._health import respond, serve_health
from federation.agent._kube import KINDS, Kind, KubeRefused, RetryableError, WatchExpired, convert_error
from federation.client import WatchMessage
from federation.models import ClusterRecord, ExportedService, ServicePort, Snapshot


def svc(name: str, ns: str = "shop", export: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "annotations": {n.EXPORT: "true"} if export else {}},
            "spec": {"ports": [{"name": "http", "port": 80}]}}


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = {k.name: [] for k in KINDS}
        self.lists: dict[str, int] = {k.name: 0 for k in KINDS}
        self.expire = threading.Event()  # set: the services watch ends with 410 Gone
        self.upsert_failures: list[Exception] = []
        self.upserts: list[str] = []
        self.statuses: list[tuple[str, str | None]] = []
        self.events: list[str] = []

    def list(self, kind: Kind) -> tuple[list[dict[str, Any]], str]:
        self.lists[kind.name] += 1
        return list(self.objects[kind.name]), str(self.lists[kind.name])

    def watch(self, kind: Kind, rv: str, stop: threading.Event) -> Iterator[tuple[str, dict[str, Any]]]:
        if kind.name == "services" and self.expire.wait(0.2):
            self.expire.clear()
            raise WatchExpired("410 Gone")
        stop.wait(0.05)  # an idle watch that ends normally
        return iter(())

    def upsert(self, obj: dict[str, Any]) -> None:
        if self.upsert_failures:
            raise self.upsert_failures.pop(0)
        self.upserts.append(f"{obj['kind']}/{obj['metadata']['name']}")

    def delete(self, kind: str, ns: str, name: str) -> None:
        pass

    def set_export_status(self, ns: str, name: str, status: str | None) -> None:
        self.statuses.append((f"{ns}/{name}", status))

    def record_event(self, ns: str, svc: Any, name: str, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(reason)


class FakeFederation:
    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.published: list[list[str]] = []
        self.snapshot = snapshot
        self.publish_failures: list[Exception] = []
        self.watch_failures: list[Exception] = []
        self.watches = 0

    def publish(self, cluster: str, services: Any, ttl: int = 30) -> Any:
        if self.publish_failures:
            raise self.publish_failures.pop(0)
        self.published.append([s.name for s in services])
        return type("R", (), {"revision": 10 + len(self.published), "changed": 1})()

    def heartbeat(self, cluster: str) -> int:
        return 30

    def watch(self, from_revision: int = 0, stop: threading.Event | None = None) -> Iterator[WatchMessage]:
        self.watches += 1
        if self.watch_failures:
            raise self.watch_failures.pop(0)
        if self.snapshot is not None:
            yield WatchMessage(self.snapshot.revision, snapshot=self.snapshot)
        assert stop is not None
        stop.wait()


def cfg(**kw: Any) -> AgentConfig:
    return AgentConfig(cluster="east", lease_ttl=30, resync_interval=60, backoff_initial=0.01, backoff_max=0.05, **kw)


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_410_gone_relists_and_the_list_replaces_the_cache() -> None:
    kube, fed = FakeKube(), FakeFederation(Snapshot(revision=1))
    kube.objects["services"] = [svc("web"), svc("gone")]
    agent = Agent(cfg(), kube, fed)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for(lambda: kube.lists["services"] >= 1 and fed.published)
        assert kube.lists["services"] == 1
        kube.objects["services"] = [svc("web")]  # "gone" is deleted and its DELETED event is lost...
        kube.expire.set()  # ...because the watch expired
        await wait_for(lambda: kube.lists["services"] == 2)
        await wait_for(lambda: fed.published[-1] == ["web"])
        assert "shop/gone" not in agent.state.caches["services"]
        nursery.cancel_scope.cancel()


async def test_retryable_errors_are_retried_with_backoff() -> None:
    snap = Snapshot(revision=3, clusters=(ClusterRecord(name="west", trust_domain="west.isthmus.local"),),
                    services=(ExportedService(cluster="west", namespace="shop", name="api", ports=(ServicePort(port=80),)),))
    kube, fed = FakeKube(), FakeFederation(snap)
    kube.upsert_failures = [RetryableError("503"), RetryableError("503")]
    fed.publish_failures = [RemoteError(grpc.StatusCode.UNAVAILABLE, "etcd down")]
    agent = Agent(cfg(), kube, fed)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for(agent.synced.is_set)
        assert len(kube.upserts) == 4  # both mirrors (Service + EndpointSlice each), after two failures
        assert fed.published  # after one UNAVAILABLE
        nursery.cancel_scope.cancel()


async def test_the_federation_watch_outlives_any_failure_of_one_attempt() -> None:
    """Whatever one watch attempt raises (a refusal, or something unexpected), the agent
    logs it, backs off and watches again; it goes on to receive the snapshot."""
    snap = Snapshot(revision=3, clusters=(ClusterRecord(name="west", trust_domain="west.isthmus.local"),),
                    services=(ExportedService(cluster="west", namespace="shop", name="api", ports=(ServicePort(port=80),)),))
    kube, fed = FakeKube(), FakeFederation(snap)
    fed.watch_failures = [RemoteError(grpc.StatusCode.PERMISSION_DENIED, "refused"),
                          ValueError("a message the client could not cope with"), KeyError("x")]
    agent = Agent(cfg(), kube, fed)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for(agent.synced.is_set)
        assert fed.watches == 4 and kube.upserts  # the mirrors, from the snapshot it got
        nursery.cancel_scope.cancel()


async def test_refusals_are_not_retried() -> None:
    snap = Snapshot(revision=3, clusters=(ClusterRecord(name="west", trust_domain="west.isthmus.local"),),
                    services=(ExportedService(cluster="west", namespace="shop", name="api", ports=(ServicePort(port=80),)),))
    kube, fed = FakeKube(), FakeFederation(snap)
    kube.upsert_failures = [KubeRefused(403, "forbidden")]
    agent = Agent(cfg(), kube, fed)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for(agent.synced.is_set)
        # The refused object is skipped (logged), the others are written, nothing is retried.
        assert len(kube.upserts) == 3 and kube.upsert_failures == []
        assert agent.sides["imports"].attempts == 0
        # Later passes do not hammer the API server with the refused object; a resync retries it.
        await agent.reconcile_imports()
        assert len(kube.upserts) == 3 and len(agent.state.refused) == 1
        agent.apply(ResyncDue())
        await agent.reconcile_imports()
        assert len(kube.upserts) == 4 and agent.state.refused == {}
        nursery.cancel_scope.cancel()


async def test_retries_stop_at_the_limit() -> None:
    kube, fed = FakeKube(), FakeFederation(Snapshot(revision=1))
    kube.objects["services"] = [svc("web")]
    fed.publish_failures = [RemoteError(grpc.StatusCode.UNAVAILABLE, "down")] * 50
    agent = Agent(cfg(max_retries=3), kube, fed)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for(lambda: len(fed.publish_failures) == 50 - 4 and not agent.sides["exports"].dirty)
        await trio.sleep(0.2)
        assert len(fed.publish_failures) == 46  # 1 try + 3 retries, then it waits for the resync
        nursery.cancel_scope.cancel()


async def test_without_a_snapshot_mirrors_are_left_alone() -> None:
    """Federation unreachable at start: existing mirrors are kept (static stability)."""
    kube, fed = FakeKube(), FakeFederation(None)
    mirror = {"metadata": {"name": "api--west", "namespace": "shop", "labels": {n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT}}}
    kube.objects["services"] = [mirror]
    deleted: list[str] = []
    kube.delete = lambda kind, ns, name: deleted.append(name)  # type: ignore[method-assign]
    agent = Agent(cfg(), kube, fed)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for(lambda: fed.published == [[]])
        await trio.sleep(0.1)
        assert deleted == [] and not agent.synced.is_set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("status", "expected"),
    [(500, RetryableError), (503, RetryableError), (429, RetryableError), (409, RetryableError), (410, WatchExpired),
     (403, KubeRefused), (404, KubeRefused), (422, KubeRefused)],
)
def test_kubernetes_errors_are_classified(status: int, expected: type) -> None:
    err = convert_error(client.ApiException(status=status, reason="x"), "patch Service shop/web")
    assert type(err) is expected
    assert str(err).startswith(f"kubernetes: patch Service shop/web: {status}")
    if status == 403:
        assert "RBAC" in str(err)


def test_only_transient_federation_errors_are_retryable() -> None:
    assert _retryable(RemoteError(grpc.StatusCode.UNAVAILABLE, ""))
    assert _retryable(RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, ""))
    assert not _retryable(RemoteError(grpc.StatusCode.PERMISSION_DENIED, ""))
    assert not _retryable(RemoteError(grpc.StatusCode.INVALID_ARGUMENT, ""))


def test_health_responses() -> None:
    assert respond(b"GET /healthz HTTP/1.1", lambda: False).startswith(b"HTTP/1.1 200")
    assert respond(b"GET /readyz HTTP/1.1", lambda: False).startswith(b"HTTP/1.1 503")
    assert respond(b"GET /readyz HTTP/1.1", lambda: True).startswith(b"HTTP/1.1 200")
    assert respond(b"GET /nope HTTP/1.1", lambda: True).startswith(b"HTTP/1.1 404")
    assert respond(b"POST /readyz HTTP/1.1", lambda: True).startswith(b"HTTP/1.1 405")


async def test_health_endpoint_over_a_socket() -> None:
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_health, "127.0.0.1", 0, ready.is_set)

        async def get(path: str) -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
                return data

        assert (await get("/readyz")).startswith(b"HTTP/1.1 503")
        ready.set()
        assert (await get("/readyz")).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
