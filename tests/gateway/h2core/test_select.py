"""Choosing the HTTP/2 core: nghttp2 where the library loads and passes its self-test,
h2 otherwise, always with the reason; the package's public surface."""

from __future__ import annotations

import json

import pytest

import gateway.h2core as h2core
from gateway import GatewayError
from gateway.h2core import _select, select_core


def test_the_installed_library_is_selected_with_its_version_and_protections() -> None:
    info = select_core(prefer="")
    assert info.name == "nghttp2", info.reason
    lib = h2core.load_library()
    assert info.version == lib.version and lib.version_tuple >= (1, 40, 0)
    # Debian 12's 1.52.0-1+deb12u1 and later carry the rapid-reset (CVE-2023-44487) and
    # CONTINUATION (CVE-2024-28182) fixes as option setters.
    assert set(info.protections) >= {"stream_reset_rate_limit", "max_continuations",
                                     "max_outbound_ack", "max_settings"}
    assert "nghttp2" in info.describe() and "stream_reset_rate_limit" in info.describe()
    assert json.loads(json.dumps(info.as_dict()))["core"] == "nghttp2"


def test_a_missing_library_falls_back_to_h2_and_says_why() -> None:
    info = select_core(prefer="", path="libnghttp2-absent.so.99")
    assert info.name == "h2"
    assert "libnghttp2-absent.so.99" in info.reason and "libnghttp2-14" in info.reason


def test_a_library_that_is_not_nghttp2_falls_back() -> None:
    info = select_core(prefer="", path="libz.so.1")
    assert info.name == "h2" and "not libnghttp2" in info.reason


def test_a_library_that_loads_but_fails_its_self_test_falls_back(monkeypatch) -> None:
    class Broken(h2core.NgHttp2Connection):
        def receive_data(self, data):  # type: ignore[override]
            return []

    monkeypatch.setattr(_select, "NgHttp2Connection", Broken)
    info = select_core(prefer="")
    assert info.name == "h2" and "self-test" in info.reason


def test_the_environment_can_force_either_core(monkeypatch) -> None:
    monkeypatch.setenv("ISTHMUS_HTTP2_CORE", "h2")
    assert select_core().name == "h2"
    monkeypatch.setenv("ISTHMUS_HTTP2_CORE", "nghttp2")
    assert select_core().name == "nghttp2"
    with pytest.raises(GatewayError, match="required"):
        select_core(path="libnghttp2-absent.so.99")
    monkeypatch.setenv("ISTHMUS_HTTP2_CORE", "quic")
    with pytest.raises(GatewayError, match="invalid ISTHMUS_HTTP2_CORE"):
        select_core()


def test_public_surface() -> None:
    assert sorted(h2core.__all__) == [
        "CORES", "CoreInfo", "CoreInternalError", "CoreLoadError", "Library",
        "NgHttp2Connection", "SessionFlooded", "SessionInitError", "SessionTerminated", "from_limits",
        "load_library", "select_core"]
    assert issubclass(h2core.SessionTerminated, GatewayError)
