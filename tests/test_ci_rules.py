"""The suite's own rules: under CI=true a skipped test fails the run, and says why."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def skipping(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_x="""
        import pytest
        def test_runs(): pass
        def test_skips(): pytest.skip("needs a tool that is not installed")
    """)
    return pytester


def test_a_skip_fails_the_run_under_ci_and_is_listed(skipping: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    r = skipping.runpytest_subprocess("-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*skip summary: 1 skipped*",
                            "SKIPPED test_x.py::test_skips: Skipped: needs a tool that is not installed",
                            "*CI=true: a test skipped*"])
    r.assert_outcomes(passed=1, skipped=1)


def test_outside_ci_a_skip_is_listed_but_does_not_fail(skipping: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    r = skipping.runpytest_subprocess("-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.OK
    r.stdout.fnmatch_lines(["*skip summary: 1 skipped*"])


def test_a_failure_under_ci_keeps_its_exit_status(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_y="def test_fails(): assert False")
    assert pytester.runpytest_subprocess("-p", "no:cacheprovider").ret == pytest.ExitCode.TESTS_FAILED


def test_the_allow_list_is_empty() -> None:
    """CI installs every tool the suite needs; a test allowed to skip there needs a reason
    in ALLOWED_CI_SKIPS and a review, so today there is none."""
    from tests.conftest import ALLOWED_CI_SKIPS

    assert ALLOWED_CI_SKIPS == {}
