"""Issue 12, item 10: signals reach only processes the daemon started.

The findings:

- the adopted process group came from the database unchecked: an edited ``pgid``
  made ``stop`` SIGKILL another user's process group (and an edited
  ``descendants`` list, or ``pid``, named other users' processes just as well);
- ``killpg`` could hit a reused group id once the server's group was empty;
- the identity check compared a start time psutil derives from the boot time on the
  wall clock, so a clock step made every server look dead.

The victims here run as uid 65534 (``setpriv``), in a session of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from daemon_harness import DaemonUnderTest, wait_until
from other_uid import programs_as_nobody

from supervisord_ms import launcher
from supervisord_ms.launcher import (
    LaunchSpec,
    OwnedProcess,
    descendants,
    kill_leftovers,
    spawn,
    stop_tree,
)

PY = sys.executable
SLEEPER = "import time; print('ready', flush=True); time.sleep(120)"
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def victims() -> Iterator:
    """Start sleepers as uid 65534, each leading a session and group of its own."""
    starts = programs_as_nobody(b"ready\n")
    start = next(starts)

    def victim() -> subprocess.Popen:
        proc = start(SLEEPER)
        assert os.getpgid(proc.pid) == proc.pid
        return proc

    yield victim
    next(starts, None)


def _edit_row(d: DaemonUnderTest, **values: object) -> None:
    conn = sqlite3.connect(d.db, timeout=10)
    try:
        sets = ", ".join(f"{k} = ?" for k in values)
        conn.execute(f"update servers set {sets} where name = 'a'", tuple(values.values()))
        conn.commit()
    finally:
        conn.close()


def _legacy_start(pid: int) -> float:
    """A start time in the form an older daemon recorded (psutil's create_time())."""
    return psutil.Process(pid).create_time()


# --- the database is not trusted ----------------------------------------------------------


def test_an_edited_pgid_and_descendants_do_not_make_stop_kill_another_user(daemon_factory, victims):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    pid = d.wait_state("a", "ready")["pid"]
    d.kill()  # the server keeps running, to be adopted
    victim = victims()
    _edit_row(
        d,
        pgid=victim.pid,
        descendants=json.dumps([[victim.pid, _legacy_start(victim.pid)]]),
    )
    d.start()
    assert d.wait_state("a", "ready")["pid"] == pid  # adopted
    d.api("POST", "/v1/servers/a/stop")
    d.wait_state("a", "stopped")
    assert not _alive(pid)
    assert victim.poll() is None, "stop killed another user's process"
    notes = [m for (m,) in d.query("select message from events where kind = 'record_mismatch'")]
    assert any(f"pgid {victim.pid}" in m for m in notes), notes
    assert any(str(victim.pid) in m and "left alone" in m for m in notes), notes


def test_an_edited_pid_naming_another_users_process_is_not_signalled(daemon_factory, victims):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    d.wait_state("a", "ready")
    assert d.stop() == 0
    victim = victims()
    _edit_row(
        d,
        pid=victim.pid,
        pgid=victim.pid,
        proc_create_time=_legacy_start(victim.pid),
        cmdline=json.dumps(psutil.Process(victim.pid).cmdline()),
    )
    d.start()
    d.wait_state("a", "ready")
    assert d.server("a")["pid"] != victim.pid
    assert victim.poll() is None, "adoption stopped another user's process"


# --- process groups ---------------------------------------------------------------------


def test_a_group_with_nothing_of_ours_in_it_is_never_signalled(tmp_path: Path, victims):
    # The server's main process is gone (reaped) and nothing of it is recorded: its
    # group id names someone else's group now (here: handed another user's group).
    main = spawn(LaunchSpec(argv=(PY, "-c", "pass"), env={}), tmp_path / "s.log")
    main.popen.wait(10)
    victim = victims()
    assert asyncio.run(kill_leftovers(victim.pid, [])) == []
    assert asyncio.run(stop_tree(main.owned, victim.pid, [], timeout_s=0.2)) == []
    assert not launcher.signal_group(victim.pid, signal.SIGKILL, [main.owned])
    time.sleep(0.1)
    assert victim.poll() is None


def _victim_with_pid(victims, pid: int) -> subprocess.Popen | None:
    """Another user's group leader that got ``pid``: the next pid is chosen through
    ns_last_pid (other processes may take it first: tried a few times)."""
    for _ in range(50):
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError:
            return None
        victim = victims()
        if victim.pid == pid:
            return victim
        victim.kill()
        victim.wait(10)
    return None


def test_killpg_never_hits_a_reused_group_id(tmp_path: Path, victims):
    main = spawn(
        LaunchSpec(argv=(PY, "-c", "import time; time.sleep(30)"), env={}), tmp_path / "s.log"
    )
    pgid = main.pid
    # A pid taken again within the same clock tick could not be told from the first
    # by any start time; a real reuse needs the whole pid space to wrap first.
    time.sleep(3 / launcher.CLK_TCK)
    os.kill(main.pid, signal.SIGKILL)
    main.popen.wait(10)  # reaped: the pid, and so the group id, are free for anyone
    victim = _victim_with_pid(victims, pgid)
    if victim is None:
        pytest.skip("cannot choose the next pid here (ns_last_pid)")
    assert os.getpgid(victim.pid) == pgid  # another user's group, with the old id
    assert asyncio.run(kill_leftovers(pgid, [])) == []
    assert asyncio.run(stop_tree(main.owned, pgid, [], timeout_s=0.2)) == []
    time.sleep(0.1)
    assert victim.poll() is None, "the reused group id was signalled"


# --- identity does not depend on the wall clock -------------------------------------------


def test_a_wall_clock_step_does_not_make_servers_look_dead(monkeypatch: pytest.MonkeyPatch):
    # A server with a child, as SGLang's main process and its scheduler.
    popen = subprocess.Popen(
        [PY, "-c", "import os, time\nos.fork()\ntime.sleep(30)"], start_new_session=True
    )
    try:
        wait_until(lambda: descendants(popen.pid), 10, "the child")
        owned = OwnedProcess.of(popen.pid)
        children = descendants(popen.pid)
        assert owned is not None and children
        # The wall clock is stepped an hour ahead (NTP, an operator): the boot time
        # on the wall clock moves with it, as /proc/stat's btime does.
        real_boot_time = psutil._pslinux.boot_time
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_boot_time() + 3600.0)
        assert owned.alive()
        assert all(child.alive() for child in children)
        assert OwnedProcess.of(popen.pid) == owned
        assert owned.signal(0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(10)
