"""The Isthmus Kubernetes agent (``isthmus agent run``, one per cluster), on trio.

It exports annotated Services (or ones with an MCS ``ServiceExport``) to the federation
and keeps mirror Services for what other clusters export here; ``isthmus join-cluster``
installs Isthmus into a cluster with it.

==============  ===================================================================
``_convert``    pure converters: Kubernetes objects in, exports and mirror plans out
``_agent``      the reconcile loop (typed events, one ``apply`` dispatcher)
``_kube``       the Kubernetes shell: watches in worker threads bridged into trio
``_rest``       plain reads and writes for ``join-cluster``, ``leave-cluster``, ``check``
``_install``    ``join-cluster`` and ``leave-cluster``
``_rotate``     renewing the in-cluster gateway and agent certificates
``_health``     ``/healthz`` and ``/readyz``
``_names``      the annotations and labels the agent reads and writes
``manifests``   the objects ``join-cluster`` applies (the same as ``deploy/``)
``checks``      ``isthmus check`` (pre- and post-install checks)
==============  ===================================================================

Names shared with the gateway (mirror names, ports, identities) are in
:mod:`federation.names`.  Public names are loaded lazily: importing this package does not
import kubernetes or trio.
"""

from __future__ import annotations

from .._lazy import lazy_getattr


_LAZY = {
    "ExportPlan": "_convert",
    "MirrorPlan": "_convert",
    "ObjectRef": "_convert",
    "desired_exports": "_convert",
    "export_status": "_convert",
    "gateway_endpoints": "_convert",
    "plan_mirrors": "_convert",
    "port_protocol": "_convert",
    "Agent": "_agent",
    "AgentConfig": "_agent",
    "Kube": "_kube",
    "load_api_client": "_kube",
    "Rest": "_rest",
    "JoinOptions": "_install",
    "join_cluster": "_install",
    "leave_cluster": "_install",
    "serve_health": "_health",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
