"""The federation service: one asyncio process (``grpc.aio``) over etcd.

Everything in this package runs on asyncio, because ``grpc.aio`` is asyncio and thousands
of long-lived watch streams must not each hold a thread.  Nothing here is imported by the
gateway or the agent (they talk to it through :mod:`federation.client`).

=================  ==============================================================
``_serve``         ``isthmus federation serve``: TLS material, listeners, start-up
``_server``        the gRPC service ``isthmus.federation.v1.Federation`` (the API)
``_hub``           one etcd watch per replica fanned out to every watcher
``_store``         the etcd key layout and the writes and reads behind the API
``_etcd``          the asyncio etcd client (aetcd's stubs on ``grpc.aio``)
``_embedded``      the embedded etcd member (and which etcd binary runs)
``_cluster``       a multi-member etcd on loopback (tests, ``demo --etcd-members``)
``_datadir``       the default data dir (one per federation root) and its lock
``_summaries``     the gateways' traffic summaries in etcd (ReportTraffic, GetTraffic)
``_web``           the topology page (aiohttp): access, HTML and SVG; ``static/``
``_webdata``       the page's JSON document (``/api/v1/topology``, stable)
``_promtraffic``   the page's traffic from Prometheus (``--prometheus``)
=================  ==============================================================

Public names are loaded lazily: the demo starts an embedded etcd without importing grpc.
"""

from __future__ import annotations

from .._lazy import lazy_getattr


_LAZY = {
    "serve": "_serve",
    "ServeConfig": "_serve",
    "default_data_dir": "_datadir",
    "DataDirLock": "_datadir",
    "DataDirInUse": "_datadir",
    "FederationService": "_server",
    "Hub": "_hub",
    "Keys": "_store",
    "Store": "_store",
    "Etcd": "_etcd",
    "EtcdTls": "_etcd",
    "EmbeddedEtcd": "_embedded",
    "EtcdCluster": "_cluster",
    "etcd_binary": "_embedded",
    "etcd_binary_version": "_embedded",
    "etcdctl_binary": "_embedded",
    "free_port": "_embedded",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
