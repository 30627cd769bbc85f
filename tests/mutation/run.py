"""Mutation run over the security-critical code (outside CI: it takes tens of minutes).

    bash tests/mutation.sh                      # every target
    bash tests/mutation.sh trust-tls policy     # some of them
    bash tests/mutation.sh --list

Each target names a module, the functions in it to mutate (found by name with ``ast``, so
line numbers never go stale) and the tests that should notice a change there. cosmic-ray
mutates one operator site at a time and runs the target's tests; a mutant whose tests
still pass *survived*. The run happens in a scratch copy of the checkout (cosmic-ray
edits files in place), with that copy first on PYTHONPATH so subprocesses the tests
start (``python -m federation.cli ...``) run the mutant too.

Results: one line per target with the score (killed / all), and every survivor's diff,
in ``<scratch>/report-<target>.txt``. A survivor in identity, authorization, revocation
or token code needs a test that kills it, or a written reason (equivalent or
unreachable) in tests/mutation/SURVIVORS.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTEST = "python -m pytest -x -q -p no:cacheprovider --no-header -o addopts="
# Synchronous tests need none of the async or property-test plugins, whose imports cost
# seconds per mutant.
NO_ASYNC = "-p no:trio -p no:hypothesispytest -p no:kmock -p no:anyio -p no:benchmark -p no:asyncio"


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    functions: tuple[str, ...]  # "func" or "Class.method"; () = the whole module
    tests: str
    timeout: float = 120.0
    sync: bool = False  # the tests are synchronous: run pytest without the async plugins


TARGETS = (
    Target("trust-tls", "trust/_tls.py",
           ("_ski", "_aki", "Revocations.from_crl", "Revocations.is_revoked", "verify_peer"),
           "tests/trust/test_tls.py tests/trust/test_ca.py", sync=True),
    Target("federation-authz", "federation/server/_server.py",
           ("Caller.may_write_cluster", "FederationService._caller", "FederationService._admin",
            "FederationService._cluster_writer"),
           "tests/federation/test_authorization.py -k 'admin_path or workload'", 180.0),
    Target("federation-token", "federation/server/_store.py", ("token_hash", "Store.consume_token"),
           "tests/federation/test_authorization.py tests/federation/test_join.py -k 'token'"),
    Target("policy-engine", "federation/policy.py",
           ("StringMatcher.__call__", "_all", "_CompiledRule.matches", "_CompiledPolicy.matching_rule",
            "PolicySet._selected", "PolicySet.evaluate"),
           "tests/policy/test_policy_decision.py", sync=True),
    Target("gateway-identity", "gateway/_proxy.py", ("inbound", "outbound"),
           "tests/gateway/test_proxy_decisions.py tests/gateway/test_security.py tests/gateway/test_promises.py "
           "tests/gateway/test_identity.py tests/gateway/test_relay.py"),
    Target("gateway-visibility", "gateway/_routes.py",
           ("LocalTarget.visible_to", "RouteTable.outbound_route", "RouteTable.inbound_target", "build_routes",
            "_full_routes", "_group_entries", "_add", "_update_routes"),
           "tests/gateway/test_config.py tests/gateway/test_config_deltas.py tests/gateway/test_security.py"),
    Target("gateway-policy", "gateway/_authz.py", ("PolicyState.decide",),
           "tests/gateway/test_authz.py tests/gateway/test_authz_jwt.py"),
)


def line_ranges(path: Path, functions: tuple[str, ...]) -> list[str]:
    """``start-end`` of each named function (the whole file if none is named)."""
    src = path.read_text()
    if not functions:
        return [f"1-{len(src.splitlines())}"]
    tree = ast.parse(src)
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{sub.name}"] = sub
    missing = [f for f in functions if f not in found]
    if missing:
        raise SystemExit(f"{path}: no function {', '.join(missing)} (renamed? update tests/mutation/run.py)")
    return [f"{found[f].lineno}-{found[f].end_lineno}" for f in functions]  # type: ignore[attr-defined]


def toml_config(t: Target, scratch: Path) -> str:
    lines = line_ranges(scratch / t.module, t.functions)
    return "\n".join([
        "[cosmic-ray]",
        f'module-path = "{t.module}"',
        f"timeout = {t.timeout}",
        "excluded-modules = []",
        f"test-command = {json.dumps(' '.join([PYTEST, NO_ASYNC if t.sync else '', t.tests]))}",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "[cosmic-ray.filters.line-filter]",
        f'lines = {{ "{t.module}" = {json.dumps(lines)} }}',
        "",
    ])


def _annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where annotations are: under ``from __future__ import annotations`` they are never
    evaluated, so a mutant there (``int | None`` -> ``int * None``) is equivalent."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        anns: list[ast.expr | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            anns = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
            anns.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            anns = [node.annotation]
        for ann in anns:
            if ann is not None:
                spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return spans  # type: ignore[return-value]


def skip_annotations(session: Path, module: Path) -> int:
    """Mark the session's pending mutants inside annotations as skipped; return how many."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    if "from __future__ import annotations" not in module.read_text():
        return 0
    spans = _annotation_spans(module)
    with use_db(str(session), WorkDB.Mode.open) as db:
        jobs = [item.job_id for item in db.pending_work_items
                if any(a <= tuple(m.start_pos) < b for m in item.mutations for a, b in spans)]
        if jobs:
            db.set_multiple_results(jobs, WorkResult(output="equivalent: inside an annotation",
                                                     worker_outcome=WorkerOutcome.SKIPPED))
    return len(jobs)


def scores(session: Path) -> tuple[int, int, int, list[str]]:
    """(killed, survived, not run: timed out or incompetent, survivor job ids); mutants
    outside the target's functions (skipped by the line filter) are not counted."""
    db = sqlite3.connect(session)
    rows = db.execute("SELECT job_id, upper(worker_outcome), upper(coalesce(test_outcome, '')) "
                      "FROM work_results").fetchall()
    rows = [r for r in rows if r[1] != "SKIPPED"]
    killed = sum(1 for _, w, t in rows if w == "NORMAL" and t == "KILLED")
    survived = [j for j, w, t in rows if w == "NORMAL" and t == "SURVIVED"]
    return killed, len(survived), len(rows) - killed - len(survived), survived


def run(t: Target, scratch: Path, env: dict[str, str]) -> str:
    cfg = scratch / f"cr-{t.name}.toml"
    cfg.write_text(toml_config(t, scratch))
    session = scratch / f"cr-{t.name}.sqlite"
    session.unlink(missing_ok=True)

    def cr(*argv: str) -> None:
        subprocess.run(list(argv), cwd=scratch, env=env, check=True)

    cr("cosmic-ray", "init", str(cfg), str(session))
    cr("cr-filter-lines", "--config", str(cfg), str(session))
    print(f"   {skip_annotations(session, scratch / t.module)} mutants inside annotations skipped (equivalent)",
          flush=True)
    cr("cosmic-ray", "baseline", str(cfg))
    cr("cosmic-ray", "exec", str(cfg), str(session))
    killed, survived, other, _ = scores(session)
    report = subprocess.run(["cr-report", "--show-diff", "--surviving-only", str(session)], cwd=scratch, env=env,
                            capture_output=True, text=True).stdout
    (scratch / f"report-{t.name}.txt").write_text(report)
    done = killed + survived
    pct = 100.0 * killed / done if done else 0.0
    return (f"{t.name:<20} {t.module:<24} killed {killed:>4} / {done:<4} ({pct:5.1f}%)  survived {survived}"
            f"  not run (timeout/incompetent) {other}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="target names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--scratch", type=Path, help="where to copy the checkout (default: a new temp dir, kept)")
    a = ap.parse_args()
    if a.list:
        for t in TARGETS:
            print(f"{t.name:<20} {t.module:<24} {', '.join(t.functions) or '(whole module)'}\n{'':<21}tests: {t.tests}")
        return
    chosen = [t for t in TARGETS if not a.targets or t.name in a.targets]
    if a.targets and len(chosen) != len(a.targets):
        raise SystemExit(f"unknown target among {a.targets}; see --list")
    scratch = a.scratch or Path(tempfile.mkdtemp(prefix="isthmus-mutation-"))
    for d in ("trust", "federation", "gateway", "tests", "deploy"):
        shutil.copytree(REPO / d, scratch / d, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", scratch / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    lines = []
    for t in chosen:
        print(f"== {t.name}: {t.module} ({', '.join(t.functions) or 'whole module'})", flush=True)
        lines.append(run(t, scratch, env))
        print(lines[-1], flush=True)
    print(f"\nmutation scores (reports with each survivor's diff in {scratch}):")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
