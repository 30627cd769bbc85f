"""Isthmus east-west gateway: the data path on trio + h2.

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
from ._errors import ConfigError as ConfigError, GatewayError as GatewayError, UpstreamError as UpstreamError
from ._gateway import Gateway as Gateway
from ._listeners import ConnectionGuard as ConnectionGuard, ConnInfo as ConnInfo
from ._decision import (
    ALLOW as ALLOW,
    Authorizer as Authorizer,
    Decision as Decision,
    RequestAttrs as RequestAttrs,
    allow_all as allow_all,
)
from ._routes import (
    LocalTarget as LocalTarget,
    OutboundRoute as OutboundRoute,
    PeerCluster as PeerCluster,
    RouteTable as RouteTable,
    build_routes as build_routes,
    split_authority as split_authority,
)

__all__ = [
    "ALLOW", "Authorizer", "ConfigError", "ConnInfo", "ConnectionGuard", "Decision",
    "FederationSource", "Gateway", "GatewayConfig", "GatewayError", "Limits", "ListenerConfig",
    "LocalTarget", "OutboundRoute", "PeerCluster", "RequestAttrs", "RouteTable", "TcpPort",
    "TlsConfig", "UpstreamError", "allow_all", "build_routes", "load_config", "parse_config",
    "split_authority",
]
