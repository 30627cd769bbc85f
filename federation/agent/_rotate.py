"""Rotation of the in-cluster gateway and agent certificates, by the agent.

join-cluster issues short-lived leaves (hours); something in the cluster must renew them
before they expire, and the agent is the one component with API access.  It reads the
cluster CA from the Secret ``isthmus-cluster-ca`` and rewrites ``isthmus-gateway-tls``
and ``isthmus-agent-tls`` when a leaf has used half its lifetime (trust.rotation_due).
Kubelet then refreshes the mounted files; the gateway's CertificateSource and the
federation client pick them up on their next handshake, so no connection is dropped.

Its RBAC is a Role in ``isthmus-system`` limited by resourceNames to these three Secrets
(read the CA; read and update the two leaf Secrets) — nothing outside the namespace.

:func:`renew` is the decision and issuance (no I/O but the temp folder the CA library
writes to); :func:`rotate_once` is the thin Kubernetes shell around it.
"""

from __future__ import annotations

import base64
import datetime as dt
import tempfile
from pathlib import Path

import structlog
from cryptography import x509

import trust

from . import manifests as m
from ._kube import Kube, convert_error

log = structlog.get_logger("federation.agent.rotate")

LEAF_SECRETS = (m.SECRET_GATEWAY, m.SECRET_AGENT)
CA_KEYS = ("ca.crt", "ca.key", "chain.pem", "bundle.pem")
LEAF_KEYS = ("cert.pem", "key.pem", "bundle.pem")

Data = dict[str, bytes]


def renew(ca: Data, leaves: dict[str, Data], now: dt.datetime) -> dict[str, Data]:
    """New Secret data for every leaf Secret whose certificate is due; same identity and lifetime."""
    out: dict[str, Data] = {}
    with tempfile.TemporaryDirectory(prefix="isthmus-rotate-") as tmp:
        ca_dir = Path(tmp) / "ca"
        trust.write_files({ca_dir / k: (ca[k], 0o600 if k.endswith(".key") else 0o644) for k in CA_KEYS})
        cluster_ca = trust.ClusterCA(ca_dir)
        for name, data in leaves.items():
            leaf = x509.load_pem_x509_certificate(data["cert.pem"])
            if not trust.rotation_due(leaf, now):
                continue
            (spiffe_id,) = trust.spiffe_ids_of(leaf)
            try:
                dns = tuple(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                dns = ()
            # The same lifetime as before, in whole hours (NotBefore is back-dated a few minutes).
            seconds = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
            lifetime = max(3600.0, round(seconds / 3600) * 3600.0)
            issued = Path(tmp) / name
            cluster_ca.issue(spiffe_id, issued, dns_names=dns, validity=lifetime, now=now)
            out[name] = {k: (issued / k).read_bytes() for k in LEAF_KEYS}
            log.info("certificate.renewed", secret=name, spiffe_id=spiffe_id, lifetime=lifetime)
    return out


def _read(kube: Kube, name: str) -> Data:
    import json

    try:
        resp = kube.core.read_namespaced_secret(name, m.NAMESPACE, _preload_content=False, _request_timeout=30)
    except Exception as exc:
        raise convert_error(exc, f"read Secret {m.NAMESPACE}/{name}") from None
    return {k: base64.b64decode(v) for k, v in (json.loads(resp.data).get("data") or {}).items()}


def rotate_once(kube: Kube, now: dt.datetime | None = None) -> list[str]:
    """Renew what is due; returns the names of the Secrets rewritten."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ca = _read(kube, m.SECRET_CA)
    leaves = {name: _read(kube, name) for name in LEAF_SECRETS}
    renewed = renew(ca, leaves, now)
    for name, data in renewed.items():
        body = {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        try:
            kube.core.patch_namespaced_secret(name, m.NAMESPACE, body, _content_type="application/merge-patch+json",
                                              _preload_content=False, _request_timeout=30)
        except Exception as exc:
            raise convert_error(exc, f"update Secret {m.NAMESPACE}/{name}") from None
    return sorted(renewed)
