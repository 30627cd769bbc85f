"""Our HTTP/2 connection settings (sans-IO): one factory for every h2 connection.

Limits come from :class:`gateway._config.Limits`.  Two process-wide tweaks keep h2 and
hpack from spending a hop's CPU on logging nobody reads.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.settings
import hpack
import hpack.hpack

from ._config import Limits


class _Quiet:
    """Stands in for hpack's module logger: its per-header debug calls cost ~3% of a hop."""

    @staticmethod
    def debug(*args: object, **kwargs: object) -> None:
        return None


hpack.hpack.log = _Quiet()  # type: ignore[assignment]
# h2 formats every received frame for a trace log nobody reads (hexlifying DATA bodies):
# shadow ``repr`` in that module only.
h2.connection.repr = lambda obj: ""  # type: ignore[attr-defined]


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: the peer's pure-Python Huffman decoder is one of the
    largest costs of a hop, and loopback/LAN links between gateways don't need the ~25%
    smaller headers."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


def h2_connection(client: bool, limits: Limits, trusted: bool) -> h2.connection.H2Connection:
    """An h2 connection with our settings.

    ``trusted`` (gateway-to-gateway, gateway-to-service): skip h2's per-header validation
    and normalisation, which costs a large share of a hop's CPU and buys nothing between
    peers that already authenticated each other and speak through the same code.
    """
    cfg = h2.config.H2Configuration(
        client_side=client, header_encoding=None,
        validate_inbound_headers=not trusted, normalize_inbound_headers=not trusted,
        validate_outbound_headers=False, normalize_outbound_headers=False,
        split_outbound_cookies=False)
    conn = h2.connection.H2Connection(config=cfg)
    conn.encoder = _PlainEncoder()
    frame = limits.peer_max_frame_size if trusted else limits.max_frame_size
    conn.local_settings = h2.settings.Settings(client=client, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_stream_window,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: frame,
        h2.settings.SettingCodes.ENABLE_PUSH: 0,
    })
    # h2 applies settings given as initial values at once but only copies these two into
    # its parser when the peer ACKs a *change*: set them ourselves.
    conn.max_inbound_frame_size = frame
    conn.decoder.max_header_list_size = limits.max_header_list_size
    # h2 starts its inbound window manager at 65535; tell it about our larger setting.
    conn.initiate_connection()
    delta = limits.initial_connection_window - 65535
    if delta > 0:
        conn.increment_flow_control_window(delta)
    conn._inbound_flow_control_window_manager.max_window_size = limits.initial_connection_window
    return conn


__all__ = ["h2_connection"]
