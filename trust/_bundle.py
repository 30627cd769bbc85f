"""Trust bundles: several roots at once (rotation with overlap) and SPIFFE bundle export.

The SPIFFE bundle format (SPIFFE Trust Domain and Bundle spec) is a JWK Set whose
X.509 authorities are keys with ``use: x509-svid`` and the certificate in ``x5c``;
SPIRE reads it with ``spire-server bundle set -format spiffe``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey, OKPKey


def spiffe_bundle(roots: Sequence[x509.Certificate], sequence: int = 1, refresh_hint: int = 300) -> dict:
    keys = []
    for cert in roots:
        pub = cert.public_key()
        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            jwk = ECKey.import_key(pem).as_dict(private=False)
        except Exception:
            jwk = OKPKey.import_key(pem).as_dict(private=False)
        jwk.pop("kid", None)
        jwk["use"] = "x509-svid"
        jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        keys.append(jwk)
    return {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": refresh_hint}


def spiffe_bundle_json(roots: Sequence[x509.Certificate], sequence: int = 1) -> str:
    return json.dumps(spiffe_bundle(roots, sequence), indent=2)
