"""HTTP/2 connections for the relay: one factory, on the core chosen at start (sans-IO).

Theory of operation
-------------------
:func:`gateway.h2core.select_core` says at start which core this process runs
(libnghttp2 through cffi where it loads and passes its self-test, else h2) and why.  A
:class:`ConnectionFactory` built from that :class:`~gateway.h2core.CoreInfo` makes every
HTTP/2 connection of the gateway — listeners' server sides and pools' client sides —
with the gateway's limits, so the relay (:mod:`gateway._relay`) never knows which core
it runs on.  Both cores offer the surface of :class:`H2Conn`, ``bytes_to_send`` included.

A session nghttp2 refuses to create (:class:`~gateway.h2core.SessionInitError`, a library
that loads but misbehaves) refuses that one connection: the factory raises it, and the
listener or the pool treats it like any failed connection.  After ``fallback_after``
consecutive refusals the factory switches to h2 for every new connection, logs
``http2.core_fallback`` once and says so in :attr:`ConnectionFactory.info` (the admin
``/config`` and the ``isthmus_http2_core`` gauge read it).

On h2, the connection is :class:`H2Core`: h2 configured as the gateway wants it.  Two
process-wide tweaks keep h2 and hpack from spending a hop's CPU on logging nobody reads;
they are applied when the first h2 connection is made, so a gateway on nghttp2 leaves
h2 untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.settings
import structlog

from . import h2core
from ._config import Limits

log = structlog.get_logger("isthmus.gateway")

# Consecutive nghttp2 session refusals after which new connections use h2.
FALLBACK_AFTER = 3


class H2Conn(Protocol):
    """What the relay, the pump and the frame guard use of a connection (either core)."""

    client_side: bool
    remote_settings: Any
    local_settings: Any

    def initiate_connection(self) -> None: ...
    def receive_data(self, data: bytes) -> list[Any]: ...
    def data_to_send(self, amount: int | None = None) -> bytes: ...
    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]],
                     end_stream: bool = False) -> None: ...
    def send_data(self, stream_id: int, data: Any, end_stream: bool = False) -> None: ...
    def end_stream(self, stream_id: int) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int = 0) -> None: ...
    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None: ...
    def get_next_available_stream_id(self) -> int: ...
    def local_flow_control_window(self, stream_id: int) -> int: ...
    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None: ...

    @property
    def max_outbound_frame_size(self) -> int: ...
    @property
    def open_inbound_streams(self) -> int: ...
    @property
    def bytes_to_send(self) -> int: ...


# ------------------------------------------------------------------------------- h2 core

class _Quiet:
    """Stands in for hpack's module logger: its per-header debug calls cost ~3% of a hop."""

    @staticmethod
    def debug(*args: object, **kwargs: object) -> None:
        return None


_h2_tuned = False


def _tune_h2() -> None:
    """The process-wide h2/hpack tweaks, once, when the first h2 connection is made."""
    global _h2_tuned
    if _h2_tuned:
        return
    _h2_tuned = True
    import hpack.hpack

    hpack.hpack.log = _Quiet()  # type: ignore[assignment]
    # h2 formats every received frame for a trace log nobody reads (hexlifying DATA
    # bodies): shadow ``repr`` in that module only.
    h2.connection.repr = lambda obj: ""  # type: ignore[attr-defined]


def _plain_encoder() -> Any:
    import hpack

    class PlainEncoder(hpack.Encoder):  # type: ignore[misc]
        """HPACK without Huffman coding: the peer's pure-Python Huffman decoder is one of
        the largest costs of a hop, and loopback/LAN links between gateways don't need the
        ~25% smaller headers."""

        def encode(self, headers: Any, huffman: bool = True) -> bytes:
            return super().encode(headers, huffman=False)  # type: ignore[no-any-return]

    return PlainEncoder()


class H2Core(h2.connection.H2Connection):  # type: ignore[misc]
    """h2's connection with the accessor both cores provide.

    ``bytes_to_send`` reads h2's private output buffer: the one place outside
    :mod:`gateway._frames` that touches h2's internals (pinned in pyproject.toml, checked
    by ``tests/gateway/test_h2_internals.py``).
    """

    @property
    def bytes_to_send(self) -> int:
        return len(self._data_to_send)


def h2_connection(client: bool, limits: Limits, trusted: bool) -> H2Core:
    """An h2 connection with our settings.

    ``trusted`` (gateway-to-gateway, gateway-to-service): skip h2's per-header validation
    and normalisation, which costs a large share of a hop's CPU and buys nothing between
    peers that already authenticated each other and speak through the same code.
    """
    _tune_h2()
    cfg = h2.config.H2Configuration(
        client_side=client, header_encoding=None,
        validate_inbound_headers=not trusted, normalize_inbound_headers=not trusted,
        validate_outbound_headers=False, normalize_outbound_headers=False,
        split_outbound_cookies=False)
    conn = H2Core(config=cfg)
    conn.encoder = _plain_encoder()
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


# ------------------------------------------------------------------------------- factory

class ConnectionFactory:
    """Makes every HTTP/2 connection of one gateway on the core chosen at start.

    ``info`` is what :func:`gateway.h2core.select_core` chose; it changes once, to h2,
    if nghttp2 refuses ``fallback_after`` sessions in a row (``on_change(info)`` hears it).
    """

    def __init__(self, info: h2core.CoreInfo, limits: Limits, *,
                 fallback_after: int = FALLBACK_AFTER,
                 on_change: Callable[[h2core.CoreInfo], None] | None = None) -> None:
        self.info = info
        self.limits = limits
        self.fallback_after = fallback_after
        self.on_change = on_change
        self.failures = 0  # consecutive nghttp2 session refusals
        self.refused = 0  # all of them

    @property
    def core(self) -> str:
        return self.info.name

    def __call__(self, client: bool, trusted: bool) -> H2Conn:
        """A new connection (its SETTINGS queued); raises SessionInitError when nghttp2
        refuses the session: refuse that connection."""
        if self.info.name == "h2":
            return h2_connection(client, self.limits, trusted)
        try:
            conn = h2core.from_limits(client, self.limits, trusted)
        except h2core.SessionInitError as exc:
            self._refused(exc)
            raise
        self.failures = 0
        return conn

    def _refused(self, exc: h2core.SessionInitError) -> None:
        self.failures += 1
        self.refused += 1
        log.error("http2.session_refused", core=self.info.name, error=str(exc),
                  consecutive=self.failures)
        if self.failures >= self.fallback_after:
            old = self.info
            self.info = h2core.CoreInfo(
                name="h2", version=h2.__version__,
                reason=f"fallback: nghttp2 {old.version} refused {self.failures} sessions "
                       f"in a row (last: {exc})")
            log.warning("http2.core_fallback", core="h2", previous=old.name,
                        reason=self.info.reason)
            if self.on_change is not None:
                self.on_change(self.info)


def start_core(limits: Limits, prefer: str | None = None,
               on_change: Callable[[h2core.CoreInfo], None] | None = None) -> ConnectionFactory:
    """Select the core (``prefer`` or ``$ISTHMUS_HTTP2_CORE``), log it once, and return the
    factory for it.  Raises GatewayError when nghttp2 was required and cannot run."""
    info = h2core.select_core(prefer)
    log.info("http2.core", core=info.name, version=info.version, reason=info.reason)
    return ConnectionFactory(info, limits, on_change=on_change)


__all__ = ["FALLBACK_AFTER", "ConnectionFactory", "H2Conn", "H2Core", "h2_connection",
           "start_core"]
