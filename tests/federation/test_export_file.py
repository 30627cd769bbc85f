"""The exports file is read as strictly as a writer must: a typo or a target without a
port is refused before anything is sent, naming its path; ``--dry-run`` checks a file
offline.  Over the real ``isthmus export`` process and, where it matters, a real federation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clirun import expect, isthmus

from .fixtures import Pki, join_cluster

GOOD = """\
services:
  - namespace: default
    name: web
    export_to: [west]
    ports:
      - {port: 8080, protocol: HTTP, target: 10.0.0.5:8080}
      - {port: 9090, protocol: GRPC}
"""


@pytest.mark.parametrize("text, path", [
    ("service:\n  - {namespace: default, name: web}\n", "service: unknown key (did you mean 'services'?)"),
    ("services: []\nexport_to: [west]\n", "export_to: unknown key"),
    ("services:\n  - {namespace: default, name: web, exportTo: [west]}\n",
     "services[0].exportTo: unknown key (did you mean 'export_to'?)"),
    ("services:\n  - {namespace: default, name: web, ports: [{port: 80, colour: red}]}\n",
     "services[0].ports[0].colour: unknown key"),
    ("services:\n  - {namespace: default, name: web}\n  - {namespace: default, name: db, prots: []}\n",
     "services[1].prots: unknown key (did you mean 'ports'?)"),
])
def test_unknown_keys_are_refused_at_every_level_with_their_path(tmp_path: Path, text: str, path: str) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text(text)
    expect(isthmus("export", "--cluster", "east", "-f", str(f), "--dry-run"), 2, str(f), path)


@pytest.mark.parametrize("target, says", [
    ("localhost", "'localhost' has no port: write HOST:PORT"),
    ("localhost:0", "port 0 is outside 1-65535"),
    ("localhost:65536", "port 65536 is outside 1-65535"),
    ("localhost:http", "is not a number"),
    (":8080", "is not a host name or IP address"),
    ("::1:8080", "write an IPv6 address in brackets"),
])
def test_a_target_must_be_host_and_port(tmp_path: Path, target: str, says: str) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text(f"services:\n  - namespace: default\n    name: web\n    ports:\n"
                 f"      - {{port: 8080, target: '{target}'}}\n")
    expect(isthmus("export", "--cluster", "east", "-f", str(f), "--dry-run"), 2,
           f"services[0].ports[0].target: '{target}'", says)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text("services:\n  - namespace: default\n    name: web\n    ports:\n"
                 "      - {port: 8080, target: localhost}\n      - {port: 0}\n"
                 "  - {namespace: default, name: web}\n")
    expect(isthmus("export", "--cluster", "east", "-f", str(f), "--dry-run"), 2,
           "services[0].ports[0].target", "services[0].ports[1].port", "services[1]: default/web is listed already")


def test_dry_run_prints_what_would_be_published_without_a_federation(tmp_path: Path) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text(GOOD)
    out = expect(isthmus("export", "--cluster", "east", "-f", str(f), "--dry-run"), 0,
                 "would publish 1 service(s) for east (dry run: nothing sent)",
                 "default/web  8080/HTTP -> 10.0.0.5:8080, 9090/GRPC -> web.default.svc.cluster.local:9090  to: west")
    assert "UNAVAILABLE" not in out


def test_ipv6_and_names_are_good_targets(tmp_path: Path) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text("services:\n  - namespace: default\n    name: web\n    ports:\n"
                 "      - {port: 80, target: '[::1]:8080'}\n      - {port: 81, target: web.internal:81}\n")
    expect(isthmus("export", "--cluster", "east", "-f", str(f), "--dry-run"), 0, "[::1]:8080", "web.internal:81")


def test_a_typo_withdraws_nothing_from_a_real_federation(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    f = tmp_path / "exports.yaml"
    f.write_text(GOOD)
    conn = ("--federation", fed.address, "--cert-dir", str(east.agent_dir))
    expect(isthmus("export", "--cluster", "east", "-f", str(f), "--once", *conn), 0, "published 1 service(s)")
    for typo in ("service:\n  - {namespace: default, name: web}\n",
                 GOOD.replace("10.0.0.5:8080", "10.0.0.5")):
        f.write_text(typo)
        expect(isthmus("export", "--cluster", "east", "-f", str(f), "--once", *conn), 2, str(f))
        with fed.client(pki.admin_dir) as admin:
            [svc] = admin.list_services("east")
        assert svc.name == "web" and svc.ports[0].target == "10.0.0.5:8080"


def test_file_exports_do_not_claim_an_endpoint_count(tmp_path: Path) -> None:
    """Only the Kubernetes agent counts ready endpoints: a file export's 0 is "unknown",
    so traffic routing never takes it out of a split for it."""
    from federation.cli._export import load_exports

    f = tmp_path / "exports.yaml"
    f.write_text(GOOD)
    [svc] = load_exports(f, "east")
    assert svc.ready_endpoints == 0 and svc.endpoints_known is False
