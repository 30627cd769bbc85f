"""Joining a cluster to the federation, client side (kubeadm-style trust on first use).

1. Fetch the server's chain from the join port without trusting it, find the root whose
   public-key pin equals the one printed with the token, and check the server's leaf is
   signed by that root.  Nothing else is trusted before this succeeds.
2. Call Join over a gRPC channel that trusts only that root (so gRPC verifies the chain
   and host name on its own): token, name, a CSR for the cluster's intermediate CA,
   gateway addresses, labels.
3. Write the cluster's folder: its CA (key 0600, never leaves this machine), gateway and
   agent certificates issued from it, the bundle, the CRL and where the federation is.

Output folder layout (stable; the gateway and ``join-cluster`` read it)::

    DIR/ca/{ca.crt,ca.key,chain.pem,bundle.pem}   the cluster CA (a trust.ClusterCA folder)
    DIR/gateway/{cert.pem,key.pem,bundle.pem}      spiffe://<cluster-td>/ns/isthmus-system/sa/isthmus-gateway
    DIR/agent/{cert.pem,key.pem,bundle.pem}        .../sa/isthmus-agent
    DIR/bundle.pem, DIR/crl.pem
    DIR/federation.json                            {"addresses", "join_address", "cluster", ...}
"""

from __future__ import annotations

import _ssl
import json
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import trust

from ._errors import FederationError, PinMismatch, RemoteError
from .client import Credentials, channel_options, parse_addresses
from .proto import federation_pb2 as pb
from .proto import federation_pb2_grpc as pb_grpc

log = structlog.get_logger("federation.join")

DEFAULT_LEAF_VALIDITY = 24 * 3600.0


def join_address_for(address: str) -> str:
    """The join port by convention: the mTLS port + 1 (``serve --join-listen`` overrides)."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + 1}"


def fetch_pinned_root(address: str, ca_pin: str, timeout: float = 5.0) -> x509.Certificate:
    """Return the root certificate in the server's chain whose pin is ``ca_pin``."""
    if not ca_pin.startswith("sha256:") or len(ca_pin) != 7 + 64:
        raise FederationError(f"invalid CA pin {ca_pin!r}: expected sha256:<64 hex digits> as printed by `token create`")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Deliberately unverified: we verify by pin below, before trusting anything.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                # Python 3.13 has SSLSocket.get_unverified_chain(); 3.11/3.12 only the _ssl object.
                getter = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[union-attr]
                chain_der = [c.public_bytes(_ssl.ENCODING_DER) for c in getter()]
    except OSError as exc:
        raise FederationError(f"cannot reach the federation join port {address}: {exc}") from None
    chain = [x509.load_der_x509_certificate(d) for d in chain_der]
    roots = [c for c in chain if trust.ca_pin(c) == ca_pin]
    if not roots or not chain:
        raise PinMismatch(
            f"CA pin mismatch: no certificate served by {address} has pin {ca_pin}; "
            "this is not the federation the token was made for (or a man in the middle)"
        )
    root = roots[0]
    try:
        chain[0].verify_directly_issued_by(root)
    except Exception as exc:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError: all mean "not signed by it"
        raise PinMismatch(f"CA pin mismatch: the server certificate of {address} is not signed by the pinned root ({exc})") from None
    return root


@dataclass(frozen=True)
class JoinResult:
    name: str
    trust_domain: str
    out_dir: Path
    revision: int


def join(
    name: str,
    federation: str | Sequence[str],
    token: str,
    ca_pin: str,
    out_dir: str | Path,
    gateway_addresses: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    join_address: str | None = None,
    cert_dir: str | Path | None = None,
    validity: str = "",
    gateway_dns_names: Sequence[str] = (),
    timeout: float = 15.0,
) -> JoinResult:
    """Join (or, with ``cert_dir`` holding that cluster's or an admin's identity, re-join)."""
    trust.validate_cluster_name(name)
    addresses = parse_addresses(federation)
    out = Path(out_dir)
    # Any replica will do: try each until one answers (a pin mismatch is fatal, not retried).
    candidates = [join_address] if join_address else [join_address_for(a) for a in addresses]
    for i, target in enumerate(candidates):
        try:
            root = fetch_pinned_root(target, ca_pin)
            break
        except PinMismatch:
            raise
        except FederationError:
            if i == len(candidates) - 1:
                raise
    mtls_target = addresses[candidates.index(target)] if not join_address else addresses[0]
    fed_td = trust.trust_domain_of(root)
    if fed_td is None:
        raise FederationError("the pinned root carries no spiffe:// trust domain; is this an Isthmus federation?")
    cluster_td = trust.cluster_trust_domain(name, fed_td)
    root_pem = root.public_bytes(serialization.Encoding.PEM)

    key = trust.generate_key()
    csr = trust.make_csr(key, trust.SpiffeId(cluster_td))
    request = pb.JoinRequest(
        token=token,
        name=name,
        csr_pem=csr,
        gateway_addresses=list(gateway_addresses),
        labels=dict(labels or {}),
        validity=validity,
    )
    if cert_dir is not None:
        # Re-join with an identity: the mTLS port, trusting only the pinned root.
        creds = Credentials.from_dir(cert_dir)
        channel_creds = grpc.ssl_channel_credentials(root_pem, creds.key_file.read_bytes(), creds.cert_file.read_bytes())
        target = mtls_target
    else:
        channel_creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
    with grpc.secure_channel(target, channel_creds, options=channel_options()) as channel:
        try:
            resp = pb_grpc.FederationStub(channel).Join(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details()) from None  # type: ignore[attr-defined]

    ca_cert = x509.load_pem_x509_certificate(resp.ca_cert_pem)
    if not trust.key_matches(ca_cert, key):
        raise FederationError("join: the federation returned a CA certificate for a different key")
    ca_cert.verify_directly_issued_by(root)
    bundle = resp.bundle_pem or root_pem
    trust.write_files(
        {
            out / "ca" / "ca.crt": (resp.ca_cert_pem, 0o644),
            out / "ca" / "ca.key": (trust.key_to_pem(key), 0o600),
            out / "ca" / "chain.pem": (resp.ca_cert_pem + root_pem, 0o644),
            out / "ca" / "bundle.pem": (bundle, 0o644),
            out / "bundle.pem": (bundle, 0o644),
            out / "crl.pem": (resp.crl_pem, 0o644),
            out / "cluster.json": (resp.cluster_json.encode(), 0o644),
            out / "federation.json": (
                json.dumps(
                    {
                        "cluster": name,
                        "trust_domain": cluster_td,
                        "federation_trust_domain": resp.federation_trust_domain,
                        "addresses": addresses,
                        "join_address": join_address or join_address_for(addresses[0]),
                        "ca_pin": ca_pin,
                    },
                    indent=2,
                ).encode(),
                0o644,
            ),
        }
    )
    issue_identities(out, cluster_td, gateway_dns_names)
    log.info("cluster.joined", cluster=name, trust_domain=cluster_td, out_dir=str(out), revision=resp.revision)
    return JoinResult(name, cluster_td, out, resp.revision)


def issue_identities(out: Path, cluster_td: str, gateway_dns_names: Sequence[str] = (), validity: float = DEFAULT_LEAF_VALIDITY) -> None:
    """(Re-)issue the gateway and agent certificates from the cluster CA in ``out/ca``."""
    ca = trust.ClusterCA(out / "ca")
    ca.issue(trust.gateway_id(cluster_td), out / "gateway", dns_names=tuple(gateway_dns_names), validity=validity)
    ca.issue(trust.agent_id(cluster_td), out / "agent", validity=validity)
