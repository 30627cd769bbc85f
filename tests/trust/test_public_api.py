import trust

EXPECTED = {
    "AGENT_SERVICE_ACCOUNT", "GATEWAY_SERVICE_ACCOUNT", "SYSTEM_NAMESPACE",
    "BadFile", "CertificateSource", "ClusterCA", "InvalidCSR", "InvalidName", "InvalidSpiffeId", "InvalidValidity",
    "IssuedFiles", "KEY_TYPES", "PeerPolicy", "PeerRejected", "Revocations", "SpiffeId", "TrustDir", "TrustError",
    "admin_id", "agent_id", "atomic_write", "build_crl", "build_intermediate", "build_leaf", "build_root", "ca_pin",
    "certs_to_pem", "check_credentials", "client_context", "cluster_trust_domain", "federation_server_id", "fingerprint", "gateway_id",
    "generate_key", "key_matches", "key_to_pem", "load_cert", "load_certs", "load_crl", "load_csr", "load_key",
    "make_csr", "parse_duration", "read_passphrase", "rotation_due", "server_context", "spiffe_bundle", "spiffe_bundle_json",
    "spiffe_ids_of", "time_left", "trust_domain_of", "validate_cluster_name", "validate_trust_domain", "verify_peer",
    "workload_id", "write_files",
}


def test_public_surface() -> None:
    assert set(trust.__all__) == EXPECTED


def test_trust_imports_nothing_upstream() -> None:
    import subprocess
    import sys

    code = "import sys, trust; bad=[m for m in sys.modules if m.split('.')[0] in ('federation','gateway')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
