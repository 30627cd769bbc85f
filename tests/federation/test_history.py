"""The history checker (tests/federation/history.py) finds what it claims to find.

Each case is a watcher's record against a known etcd history: a faithful one passes,
and each kind of violation is reported, naming the message at fault.
"""

from __future__ import annotations

import pytest

from .history import Applied, EtcdHistory, Recording, check

WEB = ("service", "east/default/web")
POL = ("policy", "AuthorizationPolicy/p")
EAST = ("cluster", "east")

# rev 14 touched no config (a lease or status key): no event for it.
REF_EVENTS = [(11, WEB, {"v": 1}), (12, WEB, {"v": 2}), (13, POL, {"kind": "AuthorizationPolicy", "name": "p"}),
              (15, WEB, None)]
INITIAL = {EAST: {"name": "east"}}
FINAL = (15, {EAST: {"name": "east"}, POL: {"kind": "AuthorizationPolicy", "name": "p"}})


def ref() -> EtcdHistory:
    return EtcdHistory.recorded(10, INITIAL, REF_EVENTS)


def snap(rev: int, state: dict, stream: int = 1, first: bool = True) -> Applied:
    return Applied(rev, "snapshot", tuple(state.items()), stream, first, 0.0)


def delta(rev: int, *changes: tuple, stream: int = 1, first: bool = False) -> Applied:
    return Applied(rev, "delta", tuple(changes), stream, first, 0.0)


def progress(rev: int, stream: int = 1) -> Applied:
    return Applied(rev, "progress", (), stream, False, 0.0)


FAITHFUL = [snap(10, INITIAL), delta(11, (WEB, {"v": 1})), delta(12, (WEB, {"v": 2})),
            delta(13, (POL, {"kind": "AuthorizationPolicy", "name": "p"})), progress(14), delta(15, (WEB, None)),
            progress(15)]
RESUMED = [snap(10, INITIAL), delta(11, (WEB, {"v": 1})),
           # stream 2 resumes from 11: one delta brings it to 13 (by design)
           delta(13, (WEB, {"v": 2}), (POL, {"kind": "AuthorizationPolicy", "name": "p"}), stream=2, first=True),
           delta(15, (WEB, None), stream=2)]
RESYNCED = [snap(10, INITIAL), delta(11, (WEB, {"v": 1})),
            snap(14, {EAST: {"name": "east"}, WEB: {"v": 2}, POL: {"kind": "AuthorizationPolicy", "name": "p"}},
                 stream=2), delta(15, (WEB, None), stream=2)]


@pytest.mark.parametrize("applied", [FAITHFUL, RESUMED, RESYNCED], ids=["live", "resumed", "resynced"])
def test_a_faithful_history_passes(applied: list[Applied]) -> None:
    report = check([Recording("w", applied, streams=2)], ref(), FINAL)
    assert report.ok, report.describe()
    assert report.messages == len(applied)


CASES = {
    "seen twice": ([*FAITHFUL[:3], delta(12, (WEB, {"v": 2})), *FAITHFUL[3:]], "message 3 (delta rev 12, stream 1): revision 12 not newer than 12"),
    "out of order": ([FAITHFUL[0], FAITHFUL[2], FAITHFUL[1], *FAITHFUL[3:]], "message 2 (delta rev 11, stream 1): revision 11 not newer than 12"),
    "missed mid-stream": ([*FAITHFUL[:2], delta(13, (WEB, {"v": 2}), (POL, {"kind": "AuthorizationPolicy", "name": "p"})),
                           *FAITHFUL[4:]], "mid-stream delta should carry exactly the next change after 11; etcd changed config at [12, 13]"),
    "hidden by progress": ([*FAITHFUL[:2], progress(13), *FAITHFUL[4:]], "progress claims rev 13 but changes at [12, 13] never arrived"),
    "stale value": ([FAITHFUL[0], delta(11, (WEB, {"v": 99})), *FAITHFUL[2:]], "message 1 (delta rev 11, stream 1): state differs from etcd's at that revision: stale service/east/default/web"),
    "stopped early": (FAITHFUL[:4], "w: ended at revision 13, before etcd's last change 15"),
    "snapshot back": ([snap(12, {EAST: {"name": "east"}, WEB: {"v": 2}}), snap(11, {EAST: {"name": "east"}, WEB: {"v": 1}}, stream=2),
                       *FAITHFUL[2:]], "snapshot older than revision 12"),
    "delta first": (FAITHFUL[1:], "a delta before any snapshot"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_violation_is_reported_with_the_message_at_fault(case: str) -> None:
    applied, expected = CASES[case]
    report = check([Recording("w", applied, streams=2)], ref(), FINAL)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.describe()


def test_a_reference_with_a_compaction_gap_makes_the_check_fail_as_unverifiable() -> None:
    r = ref()
    r.gaps.append((12, 14))
    report = check([Recording("w", FAITHFUL)], r, FINAL)
    assert not report.ok and "unverifiable" in report.problems[0]


def test_a_final_state_that_differs_from_etcds_is_reported() -> None:
    rev, state = FINAL
    report = check([Recording("w", FAITHFUL)], ref(), (rev, {**state, WEB: {"v": 3}}))
    assert any("final state differs from etcd's" in p for p in report.problems), report.describe()
