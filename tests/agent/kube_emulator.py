"""The kmock Kubernetes API emulator, run in a thread with its own asyncio loop.

kmock is an asyncio (aiohttp) server and its pytest fixture is pytest-asyncio, while our
tests run on trio (``trio_mode``).  Running it in a thread gives every test a real HTTP
Kubernetes API to point the official ``kubernetes`` client at — the agent and
join-cluster talk to it exactly as they would to an API server.  It is an emulator, not a
cluster: no controllers run (no clusterIP or nodePort allocation, no load balancer, no
pods), so tests that need a controller's effect (a LoadBalancer address) play that part
themselves and say so.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kmock
from kmock._internal import apps, parsing
from kubernetes import client

_parse_path = parsing.parse_path


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads ``/api/v1/namespaces[/NAME]`` as a namespace prefix with no resource,
    so Namespace objects cannot be created or read.  Route those paths to the cluster-scoped
    ``namespaces`` resource; everything under ``/namespaces/NAME/<plural>`` is unchanged."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or parts[4] in ("status", "finalize")):
        return parsing.ParsedPath(
            group="", version="v1", plural="namespaces", namespace=None,
            name=parts[3] if len(parts) > 3 else None, subresource=parts[4] if len(parts) > 4 else None,
        )
    return _parse_path(path)


parsing.parse_path = _parse_path_with_namespaces

RESOURCES = (
    "v1/namespaces",
    "v1/services",
    "v1/events",
    "v1/secrets",
    "v1/configmaps",
    "v1/serviceaccounts",
    "v1/nodes",
    "discovery.k8s.io/v1/endpointslices",
    "apps/v1/deployments",
    "rbac.authorization.k8s.io/v1/clusterroles",
    "rbac.authorization.k8s.io/v1/clusterrolebindings",
    "rbac.authorization.k8s.io/v1/roles",
    "rbac.authorization.k8s.io/v1/rolebindings",
    "policy/v1/poddisruptionbudgets",
    "admissionregistration.k8s.io/v1/validatingadmissionpolicies",
    "admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
)


class KubeEmulator:
    def __init__(self, serviceexports: bool = True) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.serviceexports = serviceexports
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True, name="kmock")

    async def _main(self) -> None:
        async with kmock.KubernetesEmulator() as k, apps.Server(k) as srv:
            for r in RESOURCES:
                k.resources[r] = {}
            if self.serviceexports:
                k.resources["multicluster.x-k8s.io/v1alpha1/serviceexports"] = {}
            self.url = str(srv.url).rstrip("/")
            self._loop = asyncio.get_running_loop()
            self._main_task = asyncio.current_task()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def start(self) -> KubeEmulator:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(5)

    def _shutdown(self) -> None:
        # Open watch streams would hold aiohttp's graceful shutdown for its full timeout:
        # end them first (a real API server also just drops watches when it stops).
        assert self._stop is not None
        me = self._main_task
        for task in asyncio.all_tasks():
            if task is not me:
                task.cancel()
        self._stop.set()

    def api_client(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def kubeconfig(self, path: Any, context: str = "kmock") -> Any:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": "kmock"}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        }))
        return path


@contextmanager
def running_emulator(**kw: Any) -> Iterator[KubeEmulator]:
    k = KubeEmulator(**kw).start()
    try:
        yield k
    finally:
        k.stop()
