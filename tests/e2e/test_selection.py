"""`-m netns` and `-m slow` select the end-to-end tests (a conftest ``pytestmark`` would not)."""

from __future__ import annotations

from pathlib import Path

import pytest

NETNS_FIXTURES = {"federation", "fresh_federation"}
HERE = Path(__file__).parent


def test_every_test_on_a_namespace_federation_is_marked_netns_and_slow(request: pytest.FixtureRequest) -> None:
    for item in request.session.items:
        if not isinstance(item, pytest.Function) or NETNS_FIXTURES.isdisjoint(item.fixturenames):
            continue
        marks = {m.name for m in item.iter_markers()}
        assert {"netns", "slow"} <= marks, f"{item.nodeid} uses a namespace federation but is marked {sorted(marks)}"


def test_marks_select_the_end_to_end_modules(pytester: pytest.Pytester) -> None:
    """Collect tests/e2e with -m netns and -m slow in a fresh pytest: each picks every
    module that needs namespaces, and -m 'not netns' leaves them all out."""
    def collected(*args: str) -> set[str]:
        r = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", str(HERE), *args)
        return {line.split("::")[0].rsplit("/", 1)[-1] for line in r.outlines if "::" in line}

    netns = collected("-m", "netns")
    assert {"test_e2e_lifecycle.py", "test_e2e_paths.py", "test_e2e_policy.py",
            "test_e2e_static_stability.py", "test_demo.py", "test_two_at_once.py"} <= netns, netns
    assert "test_selection.py" not in netns
    assert netns <= collected("-m", "slow")
    assert not (netns - {"test_demo.py"}) & collected("-m", "not netns")
