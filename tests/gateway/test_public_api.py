"""The gateway's public surface is what we mean it to be."""

from __future__ import annotations

import inspect
import subprocess
import sys

import gateway

EXPECTED = {
    "ALLOW", "Authorizer", "ConfigError", "ConfigState", "ConnInfo", "ConnectionGuard",
    "Decision", "FederationSource", "Gateway", "GatewayConfig", "GatewayError", "Limits",
    "ListenerConfig", "LocalTarget", "OutboundRoute", "PeerCluster", "RequestAttrs",
    "RouteTable", "SnapshotRejected", "TcpPort", "TlsConfig", "UpstreamError", "allow_all",
    "build_routes", "load_config", "parse_config", "split_authority",
}


def test_public_surface() -> None:
    assert set(gateway.__all__) == EXPECTED
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None


def test_every_error_is_a_gateway_error() -> None:
    for name in ("ConfigError", "SnapshotRejected", "UpstreamError"):
        assert issubclass(getattr(gateway, name), gateway.GatewayError)


def test_gateway_constructor_takes_its_hooks_by_keyword() -> None:
    params = inspect.signature(gateway.Gateway).parameters
    assert list(params)[0] == "cfg"
    for hook in ("authorize", "jwks_store", "guard", "reuse_port", "on_rejected"):
        assert params[hook].kind is inspect.Parameter.KEYWORD_ONLY


def test_an_authorizer_hook_sees_request_attrs_and_answers_a_decision() -> None:
    attrs = gateway.RequestAttrs("east", "spiffe://east.isthmus.local/ns/isthmus-system/sa/"
                                 "isthmus-gateway", "", "default", "web", 8080, "GET", "/")
    assert gateway.allow_all(attrs) is gateway.ALLOW and gateway.ALLOW.allow
    denied = gateway.Decision(False, "no")
    assert not denied.allow and denied.flags == "RBAC"


def test_importing_gateway_does_not_load_the_etcd_client() -> None:
    code = "import sys, gateway; print(sorted(m for m in sys.modules if m.split('.')[0] == 'aetcd'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_readme_flag_table_is_the_code_s() -> None:
    import re
    from pathlib import Path

    from gateway._flags import FLAGS

    readme = (Path(gateway.__file__).parent / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| (\w+) \((\d+)\) \| (.+?) \|$", readme, re.M)
    assert {r[0]: (int(r[1]), r[2], int(r[3]), r[4]) for r in rows} == {
        k: (f.http, f.grpc.name, int(f.grpc), f.text) for k, f in FLAGS.items()}
