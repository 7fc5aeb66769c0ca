"""The README's audit queries work as written, with the ``sqlite3`` program, against a
database produced by a real daemon run with injected faults (a SIGKILL and a hang)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import free_port
from daemon_harness import sim_fault, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_queries() -> dict[str, str]:
    """Each ```sql block of the audit section, keyed by the heading line above it."""
    text = README.read_text()
    section = text.split("<!-- audit-queries -->")[1].split("<!-- /audit-queries -->")[0]
    found = re.findall(r"\*\*(.+?)\*\*[^\n]*\n+```sql\n(.*?)```", section, re.S)
    return {title: sql for title, sql in found}


def test_readme_has_the_four_audit_queries():
    titles = " ".join(readme_queries()).lower()
    for needed in ("restarts in the last 24 h", "state history", "p50/p95", "crash to ready"):
        assert needed in titles, f"README audit section lacks: {needed}"


@pytest.fixture(scope="module")
def faulty_run_db(tmp_path_factory):
    from daemon_harness import make_daemon

    d = make_daemon(
        tmp_path_factory.mktemp("audit"),
        [
            {"name": "sim-8b-a", "port": free_port(), "gpus": [0]},
            {"name": "sim-8b-b", "port": free_port(), "gpus": [1]},
        ],
    )
    d.start()
    try:
        d.wait_all_ready()
        pid = d.server("sim-8b-a")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: d.server("sim-8b-a")["pid"] not in (None, pid), 15, "relaunch")
        d.wait_state("sim-8b-a", "ready")
        port_b = d.server("sim-8b-b")["port"]
        sim_fault(port_b, "hang")
        pid_b = d.server("sim-8b-b")["pid"]
        wait_until(lambda: d.server("sim-8b-b")["pid"] not in (None, pid_b), 15, "hang relaunch")
        d.wait_state("sim-8b-b", "ready")
        wait_until(
            lambda: d.query("select count(*) from latency_samples")[0][0] >= 6,
            15,
            "latency samples",
        )
    finally:
        d.stop()
        for p in d.leftover_processes():
            p.kill()
    return d.db


def _sqlite3(db: str, sql: str) -> list[list[str]]:
    exe = shutil.which("sqlite3")
    assert exe, "the sqlite3 program is missing: run `make system-deps`"
    out = subprocess.run(
        [exe, "-bail", "-separator", "|", db, sql], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "database is locked" not in out.stderr
    return [line.split("|") for line in out.stdout.splitlines() if line]


def test_restarts_by_reason(faulty_run_db):
    sql = next(q for t, q in readme_queries().items() if "24 h" in t)
    rows = _sqlite3(faulty_run_db, sql)
    got = {(r[0], r[1]): int(r[2]) for r in rows}
    assert got == {("sim-8b-a", "crash"): 1, ("sim-8b-b", "hang"): 1}


def test_state_history(faulty_run_db):
    sql = next(q for t, q in readme_queries().items() if "state history" in t.lower())
    rows = _sqlite3(faulty_run_db, sql)
    states = [r[2] for r in rows]
    assert "starting" in states and "ready" in states and "backoff" in states


def test_latency_percentiles(faulty_run_db):
    sql = next(q for t, q in readme_queries().items() if "p50" in t)
    rows = _sqlite3(faulty_run_db, sql)
    assert {r[0] for r in rows} == {"sim-8b-a", "sim-8b-b"}
    for r in rows:
        assert int(r[1]) >= 1 and 0 < float(r[2]) <= float(r[3])


def test_crash_to_ready(faulty_run_db):
    sql = next(q for t, q in readme_queries().items() if "crash to ready" in t.lower())
    rows = _sqlite3(faulty_run_db, sql)
    assert len(rows) == 2
    for r in rows:
        assert 0 < float(r[3]) < 15, r
