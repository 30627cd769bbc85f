"""The multi-document policy loader: what it accepts and how it names what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.models import AuthorizationPolicy, RequestAuthentication
from federation.policy import PolicyFileError, load_policies

from ._helpers import ISSUER, jwks_of

GOOD = """
kind: AuthorizationPolicy
name: allow-east
selector: {namespace: shop, service: cart}
rules:
- from: [{principals: ["spiffe://east.isthmus.local/*"]}]
---
---
kind: RequestAuthentication
name: shop-jwt
jwt_rules: [{issuer: "https://idp", jwks_uri: "https://idp/jwks"}]
"""


def test_loads_multi_document_text_and_skips_empty_documents() -> None:
    pols = load_policies(GOOD)
    assert [type(p) for p in pols] == [AuthorizationPolicy, RequestAuthentication]
    assert pols[0].rules[0].from_[0].principals == ("spiffe://east.isthmus.local/*",)


def test_loads_from_path_and_file_name(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(GOOD)
    assert load_policies(f) == load_policies(str(f)) == load_policies(GOOD)


def err(text: str, **kw: object) -> PolicyFileError:
    with pytest.raises(PolicyFileError) as info:
        load_policies(text, **kw)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("doc,field,needle", [
    ("kind: AuthorizationPolicy\nname: a\nrules: [{from: [{principals: [1]}]}]",
     "rules[0].from[0].principals[0]", "valid string"),
    ("kind: AuthorizationPolicy\nname: a\nrules: [{from: [{principal: [x]}]}]",
     "rules[0].from[0].principal", "Extra inputs are not permitted"),
    ("kind: AuthorizationPolicy\nname: a\naction: ALOW", "action", "'ALLOW', 'DENY', 'AUDIT' or 'CUSTOM'"),
    ("kind: AuthorizationPolicy\nname: Bad_Name", "name", "lowercase RFC 1123 label"),
    ("kind: AuthorizationPolicy\nname: a\nrules: [{to: [{paths: ['/a*b']}]}]",
     "rules[0].to[0].paths[0]", "'*' may appear once"),
    ("kind: AuthorizationPolicy\nname: a\nrules: [{to: [{ports: [99999]}]}]",
     "rules[0].to[0].ports[0]", "not in 1-65535"),
    ("kind: AuthorizationPolicy\nname: a\nselector: {service: 'c*'}", "selector.service", "exact name"),
    ("kind: RequestAuthentication\nname: r\njwt_rules: [{issuer: x}]", "jwt_rules[0]",
     "exactly one of jwks"),
    ("kind: RequestAuthentication\nname: r\njwt_rules: [{issuer: x, jwks: '{\"keys\": []}'}]",
     "jwt_rules[0].jwks", "no usable public signing keys"),
    ("kind: RequestAuthentication\nname: r\njwt_rules: [{issuer: x, jwks_uri: 'ftp://x'}]",
     "jwt_rules[0].jwks_uri", "https://"),
    ("kind: Gateway\nname: x", "kind", "use AuthorizationPolicy or RequestAuthentication"),
])
def test_errors_name_document_and_field_path(doc: str, field: str, needle: str) -> None:
    e = err("kind: AuthorizationPolicy\nname: fine\n---\n" + doc, source="team.yaml")
    assert (e.source, e.document, e.field) == ("team.yaml", 1, field)
    assert str(e).startswith(f"invalid policy file: team.yaml document 1: {field}: ")
    assert needle in str(e)


def test_yaml_syntax_error_names_line() -> None:
    e = err("kind: AuthorizationPolicy\nname: [oops\n")
    assert e.document is None and "not valid YAML: line 3" in str(e)


def test_non_mapping_and_duplicate_documents() -> None:
    assert "got list" in str(err("- a\n- b\n"))
    e = err("kind: AuthorizationPolicy\nname: a\n---\nkind: AuthorizationPolicy\nname: a\n")
    assert e.document == 1 and "already defined in document 0" in str(e)


def test_missing_file_and_not_utf8(tmp_path: Path) -> None:
    assert "no such file" in str(err(str(tmp_path / "missing.yaml")))
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00kind")
    assert "not UTF-8" in str(err(bad))  # type: ignore[arg-type]


def test_inline_jwks_accepted(ec_key: object) -> None:
    doc = (f"kind: RequestAuthentication\nname: r\njwt_rules:\n- issuer: {ISSUER}\n"
           f"  jwks: '{jwks_of(ec_key)}'\n")
    (ra,) = load_policies(doc)
    assert isinstance(ra, RequestAuthentication) and ra.jwt_rules[0].issuer == ISSUER
