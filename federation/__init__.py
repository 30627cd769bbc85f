"""Isthmus federation: the shared contract, the API client, the federation service, the
Kubernetes agent, the ``isthmus`` CLI and the demo.

==================  ====================================================================
``models``          the contract: the models every package shares, and their two parsers
                    (``parse_input`` strict for what users write, ``read_record`` lenient
                    for what etcd and the wire carry)
``names``           service and mirror names, the DNS suffix, ports, cluster identities
``client``          the synchronous API client (grpcio) for gateways, agents and the CLI
``_join``           joining a cluster, client side (:func:`federation.join`)
``documents``       what ``isthmus apply`` takes: every document kind by its ``kind``,
                    multi-document files, the checks across records, set-weights
``policy``, ``jwt`` the pure decision engines the gateway runs (authorization, JWT)
``traffic``         the pure TrafficRoute engine: where a request to a federated name goes
                    (the gateway per request, ``isthmus route explain``)
``_errors``         the error root (:class:`FederationError`) and its gRPC status codes
``server/``         the federation service, on asyncio: API, hub, store, etcd
``agent/``          the Kubernetes agent, on trio
``cli/``            the ``isthmus`` command (the gateway's verbs load lazily from there:
                    nothing else in this package imports ``gateway``)
``demo/``           ``isthmus demo`` and the end-to-end tests' building blocks
``proto/``          the ``isthmus.federation.v1`` API and its generated stubs
==================  ====================================================================

Public names are loaded lazily (``federation.FederationClient`` imports grpc only when
first used), because every ``isthmus`` command imports this package.
"""

from __future__ import annotations

from ._lazy import lazy_getattr


_LAZY = {
    "FederationClient": "federation.client",
    "SnapshotTracker": "federation.client",
    "WatchMessage": "federation.client",
    "Change": "federation.client",
    "Status": "federation.client",
    "GatewayStatus": "federation.client",
    "FederationError": "federation._errors",
    "RemoteError": "federation._errors",
    "StoreUnavailable": "federation._errors",
    "InvalidInput": "federation._errors",
    "InvalidRecord": "federation._errors",
    "PinMismatch": "federation._errors",
    "join": "federation._join",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
