"""The agent's Kubernetes shell: raw-JSON lists, watches and the few writes it may make.

Everything here is blocking (the official ``kubernetes`` client); the reconcile loop calls
it from worker threads.  Objects stay the API server's JSON (dicts) so the pure
converters see exactly what ``kubectl get -o json`` shows.

Errors are converted at this boundary: :class:`RetryableError` for what may succeed
later (5xx, 429, 409 conflicts, timeouts, connection failures), :class:`KubeRefused`
for what will not (403, 404, 422: the request itself is wrong or forbidden).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
import urllib3
from kubernetes import client, config, watch

from federation._errors import FederationError

from . import _names as n

log = structlog.get_logger("federation.agent.kube")

MERGE_PATCH = "application/merge-patch+json"


class AgentError(FederationError):
    """Root of the agent's errors."""


class RetryableError(AgentError):
    """May succeed if tried again later (with backoff)."""


class KubeRefused(AgentError):
    """The API server refused the request for good (forbidden, invalid, gone)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class WatchExpired(AgentError):
    """410 Gone: the resourceVersion is too old; the caller re-lists."""


def convert_error(exc: BaseException, what: str) -> AgentError:
    if isinstance(exc, client.ApiException):
        status = exc.status or 0
        reason = _reason(exc)
        if status == 410:
            return WatchExpired(f"kubernetes: {what}: 410 Gone ({reason}); re-listing")
        if status >= 500 or status in (409, 429) or status == 0:
            return RetryableError(f"kubernetes: {what}: {status} {reason}")
        hint = " (check the agent's RBAC: deploy/base/agent/rbac.yaml)" if status == 403 else ""
        return KubeRefused(status, f"kubernetes: {what}: {status} {reason}{hint}")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, TimeoutError)):
        return RetryableError(f"kubernetes: {what}: {type(exc).__name__}: {exc}")
    return AgentError(f"kubernetes: {what}: {exc!r}")


def _reason(exc: client.ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or exc.reason or ""
    except (ValueError, AttributeError):
        return str(exc.reason or "")


@dataclass(frozen=True)
class Kind:
    """One watched resource type: how to list and watch it across all namespaces."""

    name: str  # "services", "endpointslices", "serviceexports"
    optional: bool = False  # a CRD that may not be installed (MCS ServiceExport)


SERVICES = Kind("services")
ENDPOINTSLICES = Kind("endpointslices")
SERVICEEXPORTS = Kind("serviceexports", optional=True)
KINDS = (SERVICES, ENDPOINTSLICES, SERVICEEXPORTS)


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (and context)."""
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError) as exc:
        raise AgentError(
            f"kubernetes: no usable kubeconfig ({exc}); pass --kubeconfig/--context or run in a pod"
        ) from None


class Kube:
    """The calls the agent makes, on one :class:`kubernetes.client.ApiClient`."""

    def __init__(self, api: client.ApiClient, watch_timeout: int = 300) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.watch_timeout = watch_timeout

    # ------------------------------------------------------------------ reads
    def _lister(self, kind: Kind) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if kind is SERVICES:
            return self.core.list_service_for_all_namespaces, ()
        if kind is ENDPOINTSLICES:
            return self.discovery.list_endpoint_slice_for_all_namespaces, ()
        return self.custom.list_cluster_custom_object, (n.MCS_GROUP, n.MCS_VERSION, n.MCS_PLURAL)

    def list(self, kind: Kind) -> tuple[list[dict[str, Any]], str]:
        """All objects of ``kind`` and the list's resourceVersion."""
        fn, args = self._lister(kind)
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=30)
            body = json.loads(resp.data)
        except client.ApiException as exc:
            if kind.optional and exc.status == 404:
                return [], ""  # CRD not installed: nothing to honour (re-checked on resync)
            raise convert_error(exc, f"list {kind.name}") from None
        except Exception as exc:
            raise convert_error(exc, f"list {kind.name}") from None
        return list(body.get("items") or ()), str((body.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, kind: Kind, resource_version: str, stop: threading.Event) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (type, object) until the server ends the watch (then return) or ``stop``.

        Raises :class:`WatchExpired` on 410 Gone and :class:`RetryableError` on transport
        trouble; a read timeout on an idle stream is a normal end.
        """
        fn, args = self._lister(kind)
        w = watch.Watch()
        kwargs: dict[str, Any] = {
            "timeout_seconds": self.watch_timeout,
            # Client-side read timeout a little past the server's, so a dead connection
            # (or a server that ignores timeoutSeconds) cannot hang the thread forever.
            "_request_timeout": (10, self.watch_timeout + 5),
            "deserialize": False,
            "allow_watch_bookmarks": True,
        }
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            for event in w.stream(fn, *args, **kwargs):
                if stop.is_set():
                    w.stop()
                    return
                etype, obj = event.get("type"), event.get("raw_object") or event.get("object")
                if etype == "ERROR":
                    code = (obj or {}).get("code")
                    if code == 410:
                        raise WatchExpired(f"kubernetes: watch {kind.name}: 410 Gone; re-listing")
                    raise RetryableError(f"kubernetes: watch {kind.name}: {(obj or {}).get('message')}")
                yield etype, obj
        except urllib3.exceptions.ReadTimeoutError:
            return
        except AgentError:
            raise
        except client.ApiException as exc:
            if kind.optional and exc.status == 404:
                stop.wait(self.watch_timeout)  # CRD absent: nothing to watch; look again later
                return
            raise convert_error(exc, f"watch {kind.name}") from None
        except Exception as exc:
            raise convert_error(exc, f"watch {kind.name}") from None

    # ------------------------------------------------------------------ writes
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, _request_timeout=30, **kw)
        except Exception as exc:
            raise convert_error(exc, what) from None

    def upsert(self, obj: dict[str, Any]) -> None:
        """Create a mirror object, or merge-patch it if it exists (one of ours: checked by the planner)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind == "Service":
            create, patch = self.core.create_namespaced_service, self.core.patch_namespaced_service
        else:
            create, patch = self.discovery.create_namespaced_endpoint_slice, self.discovery.patch_namespaced_endpoint_slice
        try:
            create(ns, obj, _request_timeout=30, _preload_content=False)
            return
        except client.ApiException as exc:
            if exc.status != 409:
                raise convert_error(exc, f"create {kind} {ns}/{name}") from None
        except Exception as exc:
            raise convert_error(exc, f"create {kind} {ns}/{name}") from None
        # Merge patch: lists (ports, endpoints) are replaced whole, clusterIP is kept.
        self._call(f"update {kind} {ns}/{name}", patch, name, ns, obj, _content_type=MERGE_PATCH, _preload_content=False)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        fn = self.core.delete_namespaced_service if kind == "Service" else self.discovery.delete_namespaced_endpoint_slice
        try:
            fn(name, namespace, _request_timeout=30, _preload_content=False)
        except client.ApiException as exc:
            if exc.status == 404:
                return  # already gone: that is what we wanted
            raise convert_error(exc, f"delete {kind} {namespace}/{name}") from None
        except Exception as exc:
            raise convert_error(exc, f"delete {kind} {namespace}/{name}") from None

    def set_export_status(self, namespace: str, name: str, status: str | None) -> None:
        """Write (or with None remove) only our status annotation on a user's Service."""
        body = {"metadata": {"annotations": {n.EXPORT_STATUS: status}}}
        try:
            self.core.patch_namespaced_service(
                name, namespace, body, _content_type=MERGE_PATCH, _request_timeout=30, _preload_content=False
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return  # the Service is gone; nothing to annotate
            raise convert_error(exc, f"annotate Service {namespace}/{name}") from None
        except Exception as exc:
            raise convert_error(exc, f"annotate Service {namespace}/{name}") from None

    def record_event(self, namespace: str, service: dict[str, Any] | None, name: str, reason: str, message: str, warning: bool = False) -> None:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        uid = ((service or {}).get("metadata") or {}).get("uid")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": namespace, "name": name, **({"uid": uid} if uid else {})},
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": n.AGENT},
            "reportingComponent": n.AGENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._call(f"record Event on {namespace}/{name}", self.core.create_namespaced_event, namespace, body, _preload_content=False)
