"""The committed gRPC stubs match federation.proto, and the API surface is what we mean."""

from __future__ import annotations

import subprocess
import sys

from .fixtures import REPO


def test_committed_stubs_are_not_stale() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "federation.proto.gen", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_stale_check_fails_when_proto_changes(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The check can fail: a proto edit without regeneration is caught."""
    from federation.proto import gen

    proto = tmp_path / "federation.proto"
    proto.write_text(gen.PROTO.read_text().replace("message HeartbeatRequest { string cluster = 1; }",
                                                   "message HeartbeatRequest { string cluster = 1; int32 extra = 2; }"))
    # Generation needs the proto under ROOT at federation/proto/; lay it out that way.
    layout = tmp_path / "root" / "federation" / "proto"
    layout.mkdir(parents=True)
    (layout / "federation.proto").write_text(proto.read_text())
    monkeypatch.setattr(gen, "PROTO", layout / "federation.proto")
    monkeypatch.setattr(gen, "ROOT", tmp_path / "root")
    assert gen.stale() == ["federation_pb2.py", "federation_pb2.pyi"]


def test_service_surface() -> None:
    from federation.proto import federation_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["Federation"]
    assert svc.full_name == "isthmus.federation.v1.Federation"
    assert set(svc.methods_by_name) == {
        "Join", "CreateToken", "PublishExports", "Heartbeat", "Withdraw", "Watch", "ReportApplied",
        "ReportTraffic", "GetTraffic",
        "ApplyPolicy", "ListPolicies", "DeletePolicy", "ListClusters", "ListServices", "GetStatus",
        "RevokeCluster", "ListDocuments", "SetRouteWeights",
    }  # fmt: skip
    assert svc.methods_by_name["Watch"].server_streaming
