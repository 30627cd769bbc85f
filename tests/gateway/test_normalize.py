"""The path normalizer (``gateway._normalize``), driven directly: examples and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._normalize import (
    UNRESERVED,
    BadRequest,
    PathOptions,
    normalize_path,
    normalize_target,
    split_target,
)


def reference_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 as written (the input-buffer algorithm, rules A-E)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = inp[3:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            cut = inp.find("/", start)
            cut = len(inp) if cut < 0 else cut
            out += inp[:cut]
            inp = inp[cut:]
    return out


def reference(path: bytes, options: PathOptions) -> bytes:
    """Decode unreserved escapes and backslashes with a regex, then RFC 3986 §5.2.4."""
    def dec(m: re.Match[str]) -> str:
        c = int(m.group(1), 16)
        if c in UNRESERVED:
            return chr(c)
        if c in (0x2F, 0x5C) and options.escaped_slashes == "decode":
            return "/"
        return "%" + m.group(1).upper()

    text = re.sub(r"%([0-9A-Fa-f]{2})", dec, path.decode("latin-1")).replace("\\", "/")
    text = "".join(c if c.isascii() and (c.isalnum() or c in "-._~!$&'()*+,;=:@/%")
                   else "".join(f"%{b:02X}" for b in c.encode("latin-1")) for c in text)
    if options.merge_slashes:
        text = re.sub("/+", "/", text)
    return reference_remove_dot_segments(text).encode("latin-1") or b"/"


@pytest.mark.parametrize("raw, want", [
    (b"/api/../admin", b"/admin"),
    (b"/api/%2e%2e/admin", b"/admin"),
    (b"/api/%2E%2e/admin", b"/admin"),
    (b"//admin", b"//admin"),
    (b"/%61dmin", b"/admin"),
    (b"/./admin", b"/admin"),
    (b"/api\\..\\admin", b"/admin"),
    (b"/a/b/..", b"/a/"),
    (b"/..", b"/"),
    (b"/../../x", b"/x"),
    (b"/%7euser/%c3%a9", b"/~user/%C3%A9"),
    (b"/caf\xc3\xa9", b"/caf%C3%A9"),
    (b"/a%3Bb", b"/a%3Bb"),
    (b"/q?x=/../y&z=%2e", b"/q?x=/../y&z=%2e"),  # the query is not a path
])
def test_examples(raw: bytes, want: bytes) -> None:
    assert normalize_target(raw) == want


@pytest.mark.parametrize("raw", [
    b"/a%00b", b"/a%0", b"/a%zz", b"/a b", b"/a\tb", b"/a\x7f", b"/a#frag", b"a/b", b"",
    b"/%2Fadmin", b"/api/..%2fadmin", b"/a%5Cb", b"http://x/admin", b"*",
])
def test_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        normalize_target(raw)


def test_escaped_slash_options() -> None:
    assert normalize_path(b"/api/..%2fadmin", PathOptions(escaped_slashes="keep")) == b"/api/..%2Fadmin"
    assert normalize_path(b"/api/..%2fadmin", PathOptions(escaped_slashes="decode")) == b"/admin"
    assert normalize_path(b"//a//b", PathOptions(merge_slashes=True)) == b"/a/b"
    assert normalize_target(b"*", b"OPTIONS") == b"*"


def test_absolute_form_split() -> None:
    assert split_target(b"http://x/admin?q") == (b"x", b"/admin?q")
    assert split_target(b"HTTPS://x:8443") == (b"x:8443", b"/")
    assert split_target(b"/plain") == (None, b"/plain")
    with pytest.raises(BadRequest):
        split_target(b"http://user@x/")


TOKENS = ["/", "/", ".", "..", "a", "admin", "%2e", "%2E", "%2f", "%5c", "\\", "%61", "%41",
          "%7e", "%25", "%c3%a9", "~", ";", "%3b", "é", "%", "%0", "%00", "%zz", "%2e%2e"]
paths = st.lists(st.sampled_from(TOKENS), max_size=16).map(
    lambda ts: ("/" + "".join(ts)).encode("utf-8"))
options = st.builds(PathOptions, st.booleans(), st.sampled_from(["reject", "keep", "decode"]))


@settings(max_examples=1500, deadline=None)
@given(paths, options)
def test_normalizer_properties(raw: bytes, opts: PathOptions) -> None:
    try:
        out = normalize_path(raw, opts)
    except BadRequest:
        return
    segments = out.split(b"/")[1:]
    assert out.startswith(b"/")
    assert b"." not in segments and b".." not in segments, out  # no dot segments
    assert b"\\" not in out
    assert not any(int(m, 16) in UNRESERVED for m in re.findall(rb"%([0-9A-F]{2})", out))
    assert normalize_path(out, opts) == out  # idempotent
    assert out == reference(raw, opts)  # agrees with RFC 3986 §5.2.4 as written


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), options)
def test_arbitrary_bytes_are_normalized_or_refused(raw: bytes, opts: PathOptions) -> None:
    try:
        out = normalize_target(raw, b"GET", opts)
    except BadRequest:
        return
    assert normalize_target(out, b"GET", opts) == out
