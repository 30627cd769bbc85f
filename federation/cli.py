"""The ``isthmus`` command line.

Verb groups live next to the code they drive (``trust/_cli.py``, ``federation/_cli_*.py``,
``gateway/_cli.py``) and are imported only when invoked, so ``isthmus trust ...`` never
pays for grpc or trio and library code never imports the gateway.
"""

from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute" of a click command or group; loaded on first use.
_LAZY_COMMANDS: dict[str, str] = {
    "trust": "trust._cli:trust",
    "federation": "federation._cli_federation:federation",
    "clusters": "federation._cli_ops:clusters",
    "services": "federation._cli_ops:services",
    "status": "federation._cli_ops:status",
    "revoke-cluster": "federation._cli_ops:revoke_cluster",
    "policy": "federation._cli_policy:policy",
    "export": "federation._cli_export:export",
    "gateway": "gateway._cli:gateway",
    "join-cluster": "federation._cli_k8s:join_cluster",
    "leave-cluster": "federation._cli_k8s:leave_cluster",
    "check": "federation._cli_k8s:check",
    "agent": "federation._cli_k8s:agent",
    "demo": "federation.demo._cli:demo",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context) -> object:
        # The one error boundary of every command (federation/_errorboundary.py).
        from ._errorboundary import boundary

        with boundary():
            return super().invoke(ctx)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="isthmus", prog_name="isthmus")
def cli() -> None:
    """Isthmus: join Kubernetes clusters into one federation.

    A shared trust root (isthmus trust), a federation service on etcd
    (isthmus federation) and an east-west mTLS gateway per cluster
    (isthmus gateway). New here? Run `isthmus demo`.
    """


def register(name: str, target: str) -> None:
    """Register a lazily imported top-level command (``module:attribute``)."""
    _LAZY_COMMANDS[name] = target


def main(argv: list[str] | None = None) -> None:
    from ._errorboundary import run

    run(cli, argv, "isthmus")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
