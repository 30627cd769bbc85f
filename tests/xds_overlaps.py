"""The distributions whose files xds-protos overwrites, as NAME==VERSION (one a line).

xds-protos (Envoy's generated protos, for CUSTOM authorization's ext_authz stubs) carries
its own copies of modules that other distributions own: ``opentelemetry/proto/...``
(opentelemetry-proto), ``google/api/...`` (googleapis-common-protos), ``cel/__init__.py``
(common-expression-language).  pip writes them into one folder and whichever it wrote
last wins.  ``tests/run.sh`` reinstalls each one named here (``--no-deps``) so its own
files are back; ``--check`` then verifies that they are (exit 1, naming them, if not).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import sys
from pathlib import Path


def _owned(dist: md.Distribution) -> set[str]:
    return {str(f) for f in (dist.files or []) if str(f).endswith(".py") and not str(f).startswith("..")}


def overlaps() -> list[tuple[md.Distribution, list[str]]]:
    try:
        xds = md.distribution("xds-protos")
    except md.PackageNotFoundError:
        return []
    theirs = _owned(xds)
    out = []
    for d in md.distributions():
        if d.metadata["Name"] == "xds-protos":
            continue
        common = sorted(_owned(d) & theirs)
        if common:
            out.append((d, common))
    return out


def _intact(dist: md.Distribution, path: str) -> bool:
    """Whether ``path`` still holds the bytes ``dist``'s RECORD says it installed."""
    for f in dist.files or []:
        if str(f) == path and f.hash is not None:
            data = Path(str(f.locate())).read_bytes()
            digest = hashlib.new(f.hash.mode, data).digest()
            return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == f.hash.value
    return True


def main() -> int:
    found = overlaps()
    if "--check" in sys.argv[1:]:
        broken = [f"{d.metadata['Name']}: {p}" for d, paths in found for p in paths if not _intact(d, p)]
        if broken:
            print("files overwritten by xds-protos:\n  " + "\n  ".join(broken[:20]), file=sys.stderr)
            return 1
        return 0
    for d, _ in found:
        print(f"{d.metadata['Name']}=={d.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
