"""Isthmus east-west gateway: the data path on trio + h2 + h11.

Where things live (one home each):

* protocol core, no event loop (tested: ``tests/gateway/test_layout_gateway.py``):
  ``_half`` (the Half base of every stream half, credit and close logic), ``_relay``
  (HTTP/2 endpoints and stream halves), ``_h1`` (HTTP/1.1 halves), ``_h2`` (our h2
  settings), ``_frames`` (HTTP/2 abuse rules), ``_context`` (the request context:
  answer format, respond or reset, deadlines), ``_decision`` (the one Decision type),
  ``_flags`` (response flag -> HTTP status, gRPC status, text), ``_proxy`` (per-request
  routing and header decisions), ``_authz`` (AuthorizationPolicy and JWT), ``_routes``
  (the naming scheme, route tables), ``_state`` (ConfigState: everything derived from
  one snapshot), ``_handlers`` (per-request wiring), ``_telemetry`` (the request record, metrics,
  access log), ``_istio`` (Istio's standard metrics: labels, bounds, series), ``_deadlines``
  (request timers: the heap, cancelled when a request finishes);
* trio shell: ``_gateway`` (composition, lifecycle, config swaps), ``_listeners``
  (sockets, sniffing, admission), ``_tls`` (TLS contexts, identity checks), ``_dialer``
  and ``_pool`` (upstream connections), ``_io`` (byte pumps, TCP halves), ``_h1io``
  (HTTP/1.1 sockets), ``_abuse`` (per-IP caps, memory shedding), ``_admin``,
  ``_control`` (config sources), ``_cli``.

See :mod:`gateway._routes` for the naming scheme of imported and exported services.
"""

from ._config import (
    FederationSource as FederationSource,
    GatewayConfig as GatewayConfig,
    Limits as Limits,
    ListenerConfig as ListenerConfig,
    TcpPort as TcpPort,
    TlsConfig as TlsConfig,
    load_config as load_config,
    parse_config as parse_config,
)
from ._decision import (
    ALLOW as ALLOW,
    Authorizer as Authorizer,
    Decision as Decision,
    RequestAttrs as RequestAttrs,
    allow_all as allow_all,
)
from ._errors import (
    ConfigError as ConfigError,
    GatewayError as GatewayError,
    SnapshotRejected as SnapshotRejected,
    UpstreamError as UpstreamError,
)
from ._gateway import Gateway as Gateway
from ._listeners import ConnectionGuard as ConnectionGuard, ConnInfo as ConnInfo
from ._routes import (
    LocalTarget as LocalTarget,
    OutboundRoute as OutboundRoute,
    PeerCluster as PeerCluster,
    RouteTable as RouteTable,
    build_routes as build_routes,
    split_authority as split_authority,
)
from ._state import ConfigState as ConfigState

__all__ = [
    "ALLOW", "Authorizer", "ConfigError", "ConfigState", "ConnInfo", "ConnectionGuard",
    "Decision", "FederationSource", "Gateway", "GatewayConfig", "GatewayError", "Limits",
    "ListenerConfig", "LocalTarget", "OutboundRoute", "PeerCluster", "RequestAttrs",
    "RouteTable", "SnapshotRejected", "TcpPort", "TlsConfig", "UpstreamError", "allow_all",
    "build_routes", "load_config", "parse_config", "split_authority",
]
