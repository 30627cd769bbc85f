"""Isthmus trust: the federation CA.

A shared root, name-constrained per-cluster intermediate CAs, SPIFFE X.509-SVID leaves,
the trust bundle (several roots during a rotation), the CRL, mTLS contexts and the
post-handshake SPIFFE check, and rotation.  Pure library: it imports nothing else of
Isthmus.

=============  ==========================================================================
``_ca``        building and signing certificates, CSRs and CRLs (build, sign, re-verify)
``_spiffe``    SPIFFE IDs and trust domains; the namespace and service accounts of a
               cluster's gateway and agent
``_store``     the trust folder (root, cluster CAs, CRL) and issuing into folders
``_tls``       mTLS contexts, the post-handshake SPIFFE check, revocations
``_bundle``    the SPIFFE trust bundle (JWKS form)
``_rotation``  rotation decisions (pure functions of ``now``) and certificate sources
``_files``     PEM and key files, durations, passphrases
``_errors``    the error root (:class:`TrustError`)
``cli``        the ``isthmus trust`` verbs
=============  ==========================================================================
"""

from ._bundle import spiffe_bundle as spiffe_bundle
from ._bundle import spiffe_bundle_json as spiffe_bundle_json
from ._ca import KEY_TYPES as KEY_TYPES
from ._ca import build_crl as build_crl
from ._ca import build_intermediate as build_intermediate
from ._ca import build_leaf as build_leaf
from ._ca import build_root as build_root
from ._ca import ca_pin as ca_pin
from ._ca import generate_key as generate_key
from ._ca import key_matches as key_matches
from ._ca import load_csr as load_csr
from ._ca import make_csr as make_csr
from ._ca import spiffe_ids_of as spiffe_ids_of
from ._credentials import check_credentials as check_credentials
from ._errors import BadFile as BadFile
from ._errors import InvalidCSR as InvalidCSR
from ._errors import InvalidName as InvalidName
from ._errors import InvalidSpiffeId as InvalidSpiffeId
from ._errors import InvalidValidity as InvalidValidity
from ._errors import PeerRejected as PeerRejected
from ._errors import TrustError as TrustError
from ._files import atomic_write as atomic_write
from ._files import certs_to_pem as certs_to_pem
from ._files import key_to_pem as key_to_pem
from ._files import load_cert as load_cert
from ._files import load_certs as load_certs
from ._files import load_key as load_key
from ._files import parse_duration as parse_duration
from ._files import read_passphrase as read_passphrase
from ._files import write_files as write_files
from ._rotation import CertificateSource as CertificateSource
from ._rotation import rotation_due as rotation_due
from ._rotation import time_left as time_left
from ._spiffe import AGENT_SERVICE_ACCOUNT as AGENT_SERVICE_ACCOUNT
from ._spiffe import GATEWAY_SERVICE_ACCOUNT as GATEWAY_SERVICE_ACCOUNT
from ._spiffe import SYSTEM_NAMESPACE as SYSTEM_NAMESPACE
from ._spiffe import SpiffeId as SpiffeId
from ._spiffe import admin_id as admin_id
from ._spiffe import agent_id as agent_id
from ._spiffe import cluster_trust_domain as cluster_trust_domain
from ._spiffe import federation_server_id as federation_server_id
from ._spiffe import gateway_id as gateway_id
from ._spiffe import validate_cluster_name as validate_cluster_name
from ._spiffe import validate_trust_domain as validate_trust_domain
from ._spiffe import workload_id as workload_id
from ._store import ClusterCA as ClusterCA
from ._store import IssuedFiles as IssuedFiles
from ._store import TrustDir as TrustDir
from ._store import fingerprint as fingerprint
from ._store import load_crl as load_crl
from ._store import trust_domain_of as trust_domain_of
from ._tls import PeerPolicy as PeerPolicy
from ._tls import Revocations as Revocations
from ._tls import client_context as client_context
from ._tls import server_context as server_context
from ._tls import verify_peer as verify_peer

__all__ = [n for n in dir() if not n.startswith("_")]
