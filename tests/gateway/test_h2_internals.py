"""The h2 internals the h2 core still touches, pinned: if an h2 release renames one of
them this fails loudly here (pyproject.toml bounds h2 to the releases checked), instead
of the abuse rules or the output ceiling silently stopping to work.

Touched by gateway/_h2.py (``H2Core.bytes_to_send``, the inbound window manager) and by
gateway/_frames.py's h2 install (``_receive_frame``, ``local_settings._settings``,
``incoming_buffer._headers_buffer`` and ``_data``, ``_terminate_connection``).  The
nghttp2 core touches none of them."""

from __future__ import annotations

import collections

import h2
import h2.connection
from h2.errors import ErrorCodes

from gateway._config import Limits
from gateway._frames import FrameGuard
from gateway._h2 import h2_connection


def test_the_h2_internals_we_use_exist_with_the_types_we_expect() -> None:
    conn = h2_connection(False, Limits(), trusted=False)
    assert isinstance(conn._data_to_send, (bytes, bytearray))
    assert conn.bytes_to_send == len(conn._data_to_send) > 0
    assert callable(conn._receive_frame) and callable(conn._terminate_connection)
    settings = conn.local_settings._settings
    assert isinstance(settings, dict)
    assert all(isinstance(v, collections.deque) for v in settings.values())
    buf = conn.incoming_buffer
    assert isinstance(buf._headers_buffer, list) and isinstance(buf._data, (bytes, bytearray))
    manager = conn._inbound_flow_control_window_manager
    assert manager.max_window_size == Limits().initial_connection_window


def test_the_frame_guard_still_reaches_into_h2() -> None:
    conn = h2_connection(False, Limits(max_concurrent_streams=3), trusted=False)
    guard = FrameGuard(Limits(max_concurrent_streams=3), lambda: 0.0)
    guard.install(conn)
    # h2 itself must never refuse a stream: the guard does, one at a time.
    assert conn.local_settings.max_concurrent_streams == 2**31 - 1
    assert conn._receive_frame.__name__ == "receive_frame"  # our wrapper
    conn._terminate_connection(ErrorCodes.ENHANCE_YOUR_CALM)
    assert conn.bytes_to_send > 0


def test_h2_is_a_release_the_pins_allow() -> None:
    major, minor = (int(x) for x in h2.__version__.split(".")[:2])
    assert (4, 1) <= (major, minor) < (4, 5), h2.__version__
