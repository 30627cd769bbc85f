"""`isthmus export`: the exports file is validated with clear errors, and a good one is
published, kept alive and withdrawn by editing the file (real etcd, real federation)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli._export import ExportsFileError, load_exports, run_exporter
from federation.cli import cli

from .fixtures import Pki, join_cluster


@pytest.mark.parametrize("text, needle", [
    ("services: 3\n", "expected a mapping with a 'services' list"),
    ("[1, 2]\n", "expected a mapping with a 'services' list"),
    ("services: [7]\n", "services[0]: expected a mapping"),
    ("services:\n- {namespace: Default, name: web}\n", "services[0].namespace"),
    ("services:\n- {namespace: default, name: web, ports: [{port: 0}]}\n", "services[0].ports[0].port"),
    ("services:\n- {namespace: default, name: web, colour: red}\n", "services[0].colour: unknown key"),
    ("services: [\n", "not YAML"),
])
def test_bad_exports_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text(text)
    with pytest.raises(ExportsFileError) as info:
        load_exports(f, "east")
    assert str(f) in str(info.value) and needle in str(info.value)


def test_cli_refuses_a_bad_file_before_connecting(tmp_path: Path) -> None:
    f = tmp_path / "exports.yaml"
    f.write_text("services: [7]\n")
    r = CliRunner().invoke(cli, ["export", "--cluster", "east", "-f", str(f), "--federation", "127.0.0.1:1",
                                 "--cert-dir", str(tmp_path)])
    assert r.exit_code == 2 and "services[0]: expected a mapping" in r.output
    r = CliRunner().invoke(cli, ["export", "--cluster", "east", "-f", str(tmp_path / "missing.yaml"),
                                 "--federation", "127.0.0.1:1", "--cert-dir", str(tmp_path)])
    assert r.exit_code == 2 and "cannot read it" in r.output


def test_exporter_publishes_keeps_alive_and_withdraws_on_edit(fed, pki: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    east = join_cluster(fed, pki, "east", tmp_path)
    f = tmp_path / "exports.yaml"
    f.write_text("services:\n- {namespace: default, name: web, ports: [{port: 80}]}\n"
                 "- {namespace: default, name: db, ports: [{port: 5432, protocol: TCP}]}\n")
    stop = threading.Event()
    with fed.client(east.agent_dir) as agent, fed.client(pki.admin_dir) as admin:
        t = threading.Thread(target=run_exporter, args=(agent, "east", f, stop, 2), kwargs={"poll": 0.1})
        t.start()
        try:
            def names() -> set[str]:
                return {s.name for s in admin.list_services("east")}

            deadline = time.monotonic() + 10
            while names() != {"web", "db"}:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(3)  # longer than the 2 s lease: heartbeats keep it
            assert names() == {"web", "db"}
            f.write_text("services:\n- {namespace: default, name: web, ports: [{port: 80}]}\n")
            while names() != {"web"}:
                assert time.monotonic() < deadline + 5
                time.sleep(0.1)
            f.write_text("services: [oops\n")  # a broken edit keeps the last good set
            time.sleep(0.5)
            assert names() == {"web"}
        finally:
            stop.set()
            t.join(10)
