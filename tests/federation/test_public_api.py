"""The federation package's public surface, and that importing it stays cheap."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from .fixtures import REPO

SURFACES = {
    "federation": ["Change", "FederationClient", "FederationError", "GatewayStatus", "InvalidInput", "InvalidRecord",
                   "PinMismatch", "RemoteError", "SnapshotTracker", "Status", "StoreUnavailable", "WatchMessage",
                   "join"],
    "federation.names": ["AGENT_PATH", "AGENT_SERVICE_ACCOUNT", "CLUSTER_IDENTITY_PATHS", "DNS_SUFFIX",
                         "FEDERATED_SUFFIX", "GATEWAY_ADMIN_PORT", "GATEWAY_INBOUND_PORT", "GATEWAY_OUTBOUND_PORT",
                         "GATEWAY_PATH", "GATEWAY_SERVICE_ACCOUNT", "LOCAL_SUFFIX", "SYSTEM_NAMESPACE", "gateway_instance",
                         "gateway_name", "local_host", "mirror_hosts", "mirror_name", "outbound_host",
                         "parse_gateway_name", "service_hosts", "split_authority"],
    "federation.server": ["DataDirInUse", "DataDirLock", "EmbeddedEtcd", "Etcd", "EtcdCluster", "EtcdTls", "FederationService", "Hub", "Keys", "ServeConfig", "Store",
                          "default_data_dir", "etcd_binary", "etcd_binary_version", "etcdctl_binary", "free_port", "serve"],
    "federation.agent": ["Agent", "AgentConfig", "ExportPlan", "JoinOptions", "Kube", "MirrorPlan", "ObjectRef", "Rest",
                         "desired_exports", "export_status", "gateway_endpoints", "join_cluster", "leave_cluster",
                         "load_api_client", "plan_mirrors", "port_protocol", "serve_health"],
    "federation.documents": ["BatchRefused", "DocumentFileError", "MAX_DOCUMENT_FILE_BYTES", "check_batch",
                             "dump_document", "load_documents", "parse_document", "resolve_kind", "with_weights"],
    "federation.traffic": ["CALLER", "EJECTED", "EXPIRED", "Health", "NOT_EXPORTED", "NOT_EXPORTED_TO_CALLER",
                           "NOT_JOINED", "NO_ENDPOINTS", "NO_GATEWAY", "NO_PORT", "Out", "PREFER_SAME_REGION", "REASONS", "REGION_LABEL",
                           "REVOKED", "Request", "RouteConflict", "RouteSet", "SOFT", "STALE", "Selection", "Target",
                           "UNREACHABLE", "all_healthy", "compile_routes", "default_port"],
    "federation.policy": ["Decision", "PolicyError", "PolicyFileError", "PolicySet", "RequestAttributes",
                          "StringMatcher", "load_policies", "validate_policy"],
}


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_public_names(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(SURFACES[package])
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_errors_share_the_root() -> None:
    import federation

    for name in ("RemoteError", "InvalidInput", "InvalidRecord", "StoreUnavailable", "PinMismatch"):
        assert issubclass(getattr(federation, name), federation.FederationError)


def test_the_contract_parsers() -> None:
    from federation import models

    for name in ("parse_input", "read_record", "field_path", "Policy", "POLICY_KINDS", "Snapshot"):
        assert hasattr(models, name), name


def test_importing_the_cli_does_not_import_grpc() -> None:
    """`isthmus trust ...` must not pay for grpc: the CLI root imports this package."""
    code = "import sys, federation, federation.cli; print('grpc' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "False", r.stderr


def test_lazy_packages_import_nothing_heavy_until_used() -> None:
    code = ("import sys, federation.server, federation.agent, federation.names; "
            "print(sorted(m for m in ('grpc', 'aetcd', 'trio', 'kubernetes') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "[]", r.stderr
