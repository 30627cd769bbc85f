"""The layout rules the code keeps (README, "Layout"): imports point one way (trust <-
federation <- gateway), no module imports another module's private name, and each
concept has one home."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("trust", "federation", "gateway")  # our import packages, lowest first
# The packages whose modules these rules check.
PACKAGES = ("trust", "federation")
GENERATED = ("federation/proto/",)  # protoc output: not held to the line-count rule


def module_files(packages: Iterable[str] = PACKAGES) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every module of ``packages``."""
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    if not level:
        return target or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([target] if target else []))


def _private_uses(importer: str, dotted: str) -> Iterator[str]:
    """Why ``importer`` may not use ``dotted`` (a module path, maybe ending in a name).

    A private module (``pkg._mod``) is for the modules of its own package (and its
    subpackages); a private name (``mod._name``) is for its own module only.
    """
    parts = dotted.split(".")
    if parts[0] not in OURS:
        return
    for i in range(1, len(parts)):
        if not _is_private(parts[i]):
            continue
        owner, thing = ".".join(parts[:i]), ".".join(parts[: i + 1])
        if _is_module(thing):
            if importer != owner and not importer.startswith(owner + "."):
                yield f"private module {thing} (only {owner} may use it)"
        elif importer != owner:
            yield f"private name {thing}"


def private_imports(packages: Iterable[str] = PACKAGES) -> list[str]:
    """Every use of another module's private name in ``packages``, as ``file:line: what``."""
    problems: list[str] = []
    for module, path in module_files(packages):
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> module of ours it is bound to
        uses: list[tuple[int, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    uses.append((node.lineno, a.name))
                    if a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    uses.append((node.lineno, full))
                    if _is_module(full):
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if _is_private(node.attr):
                    uses.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
        for line, dotted in uses:
            problems += [f"{path.relative_to(REPO)}:{line}: {why}" for why in _private_uses(module, dotted)]
    return sorted(set(problems))


def imports_of(packages: Iterable[str]) -> Iterator[tuple[str, int, str]]:
    """(file, line, absolute module imported) for every import in ``packages``."""
    for module, path in module_files(packages):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield str(path.relative_to(REPO)), node.lineno, a.name
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, path.name == "__init__.py", node.level, node.module)
                yield str(path.relative_to(REPO)), node.lineno, target


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# ---------------------------------------------------------------- the rules


def test_no_module_imports_another_modules_private_name() -> None:
    assert private_imports() == []


def test_the_checker_finds_private_imports(tmp_path: Path) -> None:
    """The rule above can fail: each kind of violation is found, and what is allowed is not."""
    assert list(_private_uses("federation.server._store", "federation.server._etcd._convert")) == [
        "private name federation.server._etcd._convert"]
    assert list(_private_uses("gateway._routes", "federation.agent._names")) == [
        "private module federation.agent._names (only federation.agent may use it)"]
    assert list(_private_uses("federation.cli._federation", "trust._files.read_passphrase")) != []
    assert list(_private_uses("federation.agent._agent", "federation._errors.RemoteError")) == []
    assert list(_private_uses("federation.server._hub", "federation.server._etcd.Etcd")) == []
    assert list(_private_uses("federation.cli._k8s", "federation.agent.Agent")) == []
    assert list(_private_uses("trust", "trust._ca.build_root")) == []  # a package re-exporting its own


def test_trust_imports_nothing_of_ours() -> None:
    assert [i for i in imports_of(["trust"]) if i[2].split(".")[0] in ("federation", "gateway")] == []
    loaded = _run(
        "import importlib, sys, pathlib\n"
        "for p in sorted(pathlib.Path('trust').rglob('*.py')):\n"
        "    importlib.import_module('.'.join(p.with_suffix('').parts).removesuffix('.__init__'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('federation', 'gateway')))"
    )
    assert loaded == "[]"


def test_federation_reaches_the_gateway_only_through_the_cli_table() -> None:
    """No import of gateway anywhere in federation; the one string naming a gateway module
    is the lazily loaded ``isthmus gateway`` entry of the CLI's command table."""
    assert [i for i in imports_of(["federation"]) if i[2].split(".")[0] == "gateway"] == []
    mentions = []
    for module, path in module_files(["federation"]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.match(r"gateway\.[A-Za-z_][\w.]*(:\w+)?$", node.value) \
                    and _is_module(node.value.partition(":")[0]):
                mentions.append((module, node.value))
    from federation.cli import COMMANDS

    assert mentions == [("federation.cli", COMMANDS["gateway"])]
    loaded = _run(
        "import importlib, sys, pathlib\n"
        "for p in sorted(pathlib.Path('federation').rglob('*.py')):\n"
        "    name = '.'.join(p.with_suffix('').parts).removesuffix('.__init__')\n"
        "    if not name.endswith('__main__'):\n"
        "        importlib.import_module(name)\n"
        "from federation.cli import COMMANDS, load_command\n"
        "for c in COMMANDS:\n"
        "    if c != 'gateway':\n"
        "        load_command(c)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gateway'))"
    )
    assert loaded == "[]"


def test_every_cli_command_is_registered_and_resolves() -> None:
    import click

    from federation.cli import COMMANDS, cli, load_command

    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        assert isinstance(load_command(name), click.Command), name
    policy = load_command("policy")
    assert isinstance(policy, click.Group) and set(policy.commands) == {"apply", "check", "delete", "list"}


def test_the_gateway_and_the_client_do_not_load_the_etcd_client() -> None:
    """aetcd (and the federation server) are not in the gateway's import graph."""
    loaded = _run(
        "import importlib, sys, pathlib\n"
        "for p in sorted(pathlib.Path('gateway').rglob('*.py')):\n"
        "    importlib.import_module('.'.join(p.with_suffix('').parts).removesuffix('.__init__'))\n"
        "import federation.client, federation.agent, federation.policy, federation.jwt\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aetcd' or m.startswith('federation.server')))"
    )
    assert loaded == "[]"


def test_gateway_ports_are_defined_once() -> None:
    """15001, 15443 and 15000 are written in federation/names.py and nowhere else."""
    found = []
    for module, path in module_files(PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in (15000, 15001, 15443):
                found.append(module)
    assert found == ["federation.names"] * 3


@pytest.mark.parametrize(("module", "path"), list(module_files(PACKAGES)), ids=lambda x: str(x))
def test_long_modules_open_with_a_theory_of_operation(module: str, path: Path) -> None:
    rel = str(path.relative_to(REPO))
    if rel.startswith(GENERATED) or len(path.read_text().splitlines()) <= 600:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "theory of operation" in doc.lower(), f"{rel} is over 600 lines: open it with a theory of operation"
