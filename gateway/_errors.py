"""Error root of the gateway package.

Messages start with a fixed prefix naming what was wrong and, where it helps, what to do.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error raised by :mod:`gateway`."""


class ConfigError(GatewayError, ValueError):
    """The gateway configuration is invalid; the message names the field."""


class SnapshotRejected(GatewayError):
    """A config snapshot the gateway cannot build; the config in force stays."""


class UpstreamError(GatewayError):
    """An upstream (peer gateway or local service) could not be reached or failed.

    ``flags`` carries the Envoy/Istio response flag (``UF`` connect failure, ``UR`` reset,
    ``UH`` no healthy upstream, ``UO`` overflow) used in metrics and the access log.
    """

    def __init__(self, message: str, flags: str = "UF") -> None:
        super().__init__(message)
        self.flags = flags
