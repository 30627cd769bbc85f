"""The ``isthmus`` command line: the root group, and where every verb lives.

=====================================  ===============================================
``isthmus trust ...``                  :mod:`trust.cli` (the CA's own verbs)
``isthmus federation ...``             ``_federation``: serve, token create, join
``isthmus clusters|services|status``   ``_ops``: what is joined, exported, applied,
``isthmus revoke-cluster``             and revoking a cluster through the federation
``isthmus policy ...``                 ``_policy`` (apply, list, delete) and
                                       ``_policy_check`` (``policy check``)
``isthmus route ...``                  ``_route``: set-weights, explain
``isthmus apply|get|delete``           ``_apply``: every document kind (policies, routes)
``isthmus export``                     ``_export``: the agent for clusters without Kubernetes
``isthmus join-cluster|leave-cluster`` ``_k8s``: a thin layer over :mod:`federation.agent`
``isthmus check``, ``isthmus agent``
``isthmus demo``                       :mod:`federation.demo.cli`
``isthmus gateway ...``                ``gateway._cli``
=====================================  ===============================================

What the verbs share (logging, ``--federation``/``--cert-dir``, output, errors) is in
``_common``.  Every top-level command is registered in :data:`COMMANDS`, by name, and
its module is imported when the command is invoked (or listed by ``--help``): so
``isthmus trust ...`` pays for neither pydantic, structlog, grpc nor trio, and library
code in ``trust`` and ``federation`` never imports ``gateway`` (imports point one way:
trust <- federation <- gateway; the ``gateway`` entry below is the only place federation
names it).  ``tests/test_layout.py`` checks that every entry resolves.
"""

from __future__ import annotations

import importlib
import sys

import click

from .._errorboundary import register_error_root

# Every top-level command: name -> "module:attribute" of its click command or group.
COMMANDS: dict[str, str] = {
    "trust": "trust.cli:trust",
    "federation": "federation.cli._federation:federation",
    "clusters": "federation.cli._ops:clusters",
    "services": "federation.cli._ops:services",
    "status": "federation.cli._ops:status",
    "top": "federation.cli._top:top",
    "revoke-cluster": "federation.cli._ops:revoke_cluster",
    "policy": "federation.cli._policy:policy",
    "route": "federation.cli._route:route",
    "apply": "federation.cli._apply:apply",
    "get": "federation.cli._apply:get",
    "delete": "federation.cli._apply:delete",
    "export": "federation.cli._export:export",
    "join-cluster": "federation.cli._k8s:join_cluster",
    "leave-cluster": "federation.cli._k8s:leave_cluster",
    "check": "federation.cli._k8s:check",
    "agent": "federation.cli._k8s:agent",
    "demo": "federation.demo.cli:demo",
    "gateway": "gateway._cli:gateway",
}


__all__ = ["COMMANDS", "cli", "load_command", "main", "register_error_root"]


def load_command(name: str) -> click.Command:
    """Import and return the command registered as ``name`` (KeyError if there is none)."""
    module, _, attr = COMMANDS[name].partition(":")
    command = getattr(importlib.import_module(module), attr)
    if not isinstance(command, click.Command):
        raise TypeError(f"{COMMANDS[name]} is not a click command")
    return command


class _Root(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def invoke(self, ctx: click.Context) -> object:
        # The one error boundary of every command (federation/_errorboundary.py).
        from .._errorboundary import boundary

        with boundary():
            return super().invoke(ctx)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="isthmus", prog_name="isthmus")
def cli() -> None:
    """Isthmus: join Kubernetes clusters into one federation.

    A shared trust root (isthmus trust), a federation service on etcd
    (isthmus federation) and an east-west mTLS gateway per cluster
    (isthmus gateway). New here? Run `isthmus demo`.
    """


def main(argv: list[str] | None = None) -> None:
    """The ``isthmus`` entry point (``federation.cli:main`` in pyproject.toml)."""
    from .._errorboundary import run

    run(cli, argv, "isthmus")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
