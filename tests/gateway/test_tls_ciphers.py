"""Every TLS listener of the gateway offers TLS 1.2 with AEAD suites only (ECDHE with
AES-GCM or ChaCha20): a client limited to CBC suites is refused, an AEAD one is served."""

from __future__ import annotations

import ssl

import pytest
import trio

import trust

from .conftest import Mesh

# CBC with SHA-2 MACs: Python's default cipher string drops the SHA-1 ones but not these.
CBC = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA"
AEAD = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305"


def _ctx(mesh: Mesh, listener: str, ciphers: str) -> ssl.SSLContext:
    if listener == "inbound":
        f = mesh.pki.gw["east"]
    else:
        f = mesh.pki.issue("east", "default", "client", "wl-east-tls12")
    ctx = trust.client_context(f.bundle, f.cert, f.key)
    # A client of this suite's own choosing, not trust's defaults.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    return ctx


async def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="gateway")
    try:
        with trio.fail_after(5):
            await tls.do_handshake()
        cipher = tls.cipher()
        assert cipher is not None
        return cipher[0]
    finally:
        await trio.aclose_forcefully(tls)


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
async def test_tls12_cbc_suites_are_refused(mesh: Mesh, listener: str) -> None:
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await _handshake(mesh.west.ports[listener], _ctx(mesh, listener, CBC))


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
async def test_tls12_aead_suites_are_served(mesh: Mesh, listener: str) -> None:
    name = await _handshake(mesh.west.ports[listener], _ctx(mesh, listener, AEAD))
    assert "GCM" in name or "CHACHA20" in name


async def test_openssl_s_client_with_a_cbc_suite_is_refused(mesh: Mesh) -> None:
    """The same with a real client, OpenSSL's own: no cipher is agreed on."""
    f = mesh.pki.gw["east"]
    result = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{mesh.west.ports['inbound']}",
         "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256", "-cert", str(f.cert), "-key", str(f.key),
         "-CAfile", str(f.bundle)],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode != 0, out
    assert "Cipher is (NONE)" in out or "handshake failure" in out, out
