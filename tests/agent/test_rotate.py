"""The agent renews the in-cluster gateway and agent certificates before they expire."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client

import trust
from federation.agent import manifests as m
from federation.agent._kube import Kube
from federation.agent._rotate import renew, rotate_once

from .kube_emulator import KubeEmulator

def cluster_files(tmp_path: Path) -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
    """A cluster CA and its gateway and agent leaves (1 h), issued now: each test takes
    its clock after this, never at import (a long suite would age the leaves)."""
    root = trust.TrustDir(tmp_path / "root")
    root.init("isthmus.local")
    ca = root.issue_cluster("east")
    td = "east.isthmus.local"
    ca.issue(trust.gateway_id(td), tmp_path / "gw", dns_names=("gw.example",), validity=3600)
    ca.issue(trust.agent_id(td), tmp_path / "agent", validity=3600)
    ca_data = {k: (ca.path / k).read_bytes() for k in ("ca.crt", "ca.key", "chain.pem", "bundle.pem")}
    leaves = {
        m.SECRET_GATEWAY: {k: (tmp_path / "gw" / k).read_bytes() for k in ("cert.pem", "key.pem", "bundle.pem")},
        m.SECRET_AGENT: {k: (tmp_path / "agent" / k).read_bytes() for k in ("cert.pem", "key.pem", "bundle.pem")},
    }
    return ca_data, leaves


def test_nothing_renewed_before_half_life(tmp_path: Path) -> None:
    ca, leaves = cluster_files(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    assert renew(ca, leaves, now + dt.timedelta(minutes=10)) == {}


def test_due_leaves_renewed_same_identity_lifetime_and_names(tmp_path: Path) -> None:
    ca, leaves = cluster_files(tmp_path)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=40)
    out = renew(ca, leaves, later)
    assert set(out) == {m.SECRET_GATEWAY, m.SECRET_AGENT}
    for name in out:
        old = x509.load_pem_x509_certificate(leaves[name]["cert.pem"])
        new = x509.load_pem_x509_certificate(out[name]["cert.pem"])
        assert trust.spiffe_ids_of(new) == trust.spiffe_ids_of(old)
        assert new.serial_number != old.serial_number
        assert new.not_valid_after_utc - later.replace(microsecond=0) <= dt.timedelta(hours=1, seconds=1)
        new.verify_directly_issued_by(x509.load_pem_x509_certificate(ca["ca.crt"]))
        assert trust.key_matches(new, serialization.load_pem_private_key(out[name]["key.pem"], None))
    gw = x509.load_pem_x509_certificate(out[m.SECRET_GATEWAY]["cert.pem"])
    assert gw.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["gw.example"]


def test_rotate_once_rewrites_the_secrets(tmp_path: Path) -> None:
    ca, leaves = cluster_files(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    with_kube = KubeEmulator().start()
    try:
        api = with_kube.api_client()
        core = client.CoreV1Api(api)

        def put(name: str, data: dict[str, bytes]) -> None:
            core.create_namespaced_secret(m.NAMESPACE, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": m.NAMESPACE},
                                                        "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})

        put(m.SECRET_CA, ca)
        for name, data in leaves.items():
            put(name, data)
        kube = Kube(api)
        assert rotate_once(kube, now) == []
        assert rotate_once(kube, now + dt.timedelta(minutes=45)) == [m.SECRET_AGENT, m.SECRET_GATEWAY]
        stored = json.loads(core.read_namespaced_secret(m.SECRET_GATEWAY, m.NAMESPACE, _preload_content=False).data)["data"]
        assert base64.b64decode(stored["cert.pem"]) != leaves[m.SECRET_GATEWAY]["cert.pem"]
        ca_after = json.loads(core.read_namespaced_secret(m.SECRET_CA, m.NAMESPACE, _preload_content=False).data)["data"]
        assert base64.b64decode(ca_after["ca.key"]) == ca["ca.key"]  # the CA is only read
    finally:
        with_kube.stop()
