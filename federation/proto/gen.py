"""Regenerate the committed stubs from ``federation.proto``.

    python -m federation.proto.gen          # rewrite the stubs
    python -m federation.proto.gen --check  # exit 1 if the committed stubs are stale

The stubs are committed so that installing Isthmus never needs grpcio-tools; the test
``tests/federation/test_proto_stubs.py`` runs ``--check`` so they cannot drift.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the repository root: stubs import as federation.proto.*
PROTO = HERE / "federation.proto"
OUTPUTS = ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # only needed here, not at runtime

    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PROTO.relative_to(ROOT)),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")


def stale() -> list[str]:
    """Names of committed stub files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "federation" / "proto"
        return [
            name
            for name in OUTPUTS
            if not (HERE / name).exists()
            or (HERE / name).read_bytes() != (fresh / name).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        if names:
            print(
                f"stale stubs: {', '.join(names)}; run: python -m federation.proto.gen",
                file=sys.stderr,
            )
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
