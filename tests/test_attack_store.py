"""Issue 12, item 4: a flood of latency samples must not fill the disk or the
daemon's memory, nor push the restart history out; a failing writer is visible.

The attacker is any user of the socket, who may POST samples with long error
texts as fast as the daemon takes them. A full disk is played two ways: a real
small tmpfs (when this machine lets the test mount one) and, everywhere, a
writer whose transactions fail with SQLite's own "database or disk is full"
once a batch is bigger than the room left.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisord_ms import store
from supervisord_ms.logsetup import setup_logging
from supervisord_ms.store import StoreWriter

DISK_FULL = "database or disk is full"  # SQLite's text for SQLITE_FULL


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def restart(writer: StoreWriter, attempt: int = 1) -> None:
    writer.add_restart(
        server="a", reason="crash", attempt=attempt, backoff_s=1.0, old_pid=100, exit_code=1
    )


class NearlyFullDisk(StoreWriter):
    """A disk with room for a transaction of at most ``room`` rows: a single
    event fits, a batch of two thousand samples does not. ``room = None``: the
    disk has room again."""

    room: int | None = 10

    def _write_batch(self, batch: list[tuple[str, Any]]) -> None:
        if self.room is not None and len(batch) > self.room:
            raise sqlite3.OperationalError(DISK_FULL)
        super()._write_batch(batch)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def writers() -> Iterator[list[StoreWriter]]:
    made: list[StoreWriter] = []
    yield made
    for writer in made:
        writer.close(timeout=1.0)


# -- the flood --------------------------------------------------------------


def test_a_flood_of_long_samples_is_cut_and_bounded_and_history_is_kept(db_path: Path) -> None:
    """150,000 samples with 100 kB of error text each, queued while nothing drains
    the queue (the disk is failing): the text is cut to 200 characters and the
    queue stops at its byte bound, dropping samples, never the restart behind them."""
    writer = StoreWriter(db_path)  # the daemon's defaults; not started: nothing drains
    text = "E" * 100_000
    flood = 150_000
    started = time.monotonic()
    for i in range(flood):
        writer.add_sample(server="a", source="client", ok=False, latency_s=None, error=text)
        if i == flood // 2:
            restart(writer)
    assert time.monotonic() - started < 20
    dropped = writer.dropped
    assert dropped > 0, "the sample queue took every sample of the flood"
    health = writer.health()
    assert health["dropped_samples"] == dropped
    queued = health["queued_samples"]
    # Each queued sample is counted at under 1 KiB once its text is cut.
    assert queued + dropped == flood
    assert queued * 1024 >= store.DEFAULT_MAX_SAMPLE_BYTES // 2
    assert queued * 200 <= store.DEFAULT_MAX_SAMPLE_BYTES
    assert health["queued_events"] == 1
    writer.close(timeout=30)
    ((count, longest),) = rows(db_path, "SELECT count(*), max(length(error)) FROM latency_samples")
    assert count == queued and longest <= store.ERROR_TEXT_MAX <= 200
    assert rows(db_path, "SELECT reason, old_pid FROM restarts") == [("crash", 100)]


def test_long_event_and_restart_messages_are_cut(db_path: Path) -> None:
    with StoreWriter(db_path) as writer:
        writer.add_event(server="a", kind="state", message="m" * 1_000_000)
        writer.add_restart(
            server="a", reason="crash", attempt=1, backoff_s=1.0, old_pid=1, message="r" * 10**6
        )
    assert rows(db_path, "SELECT length(message) FROM events") == [(store.MESSAGE_TEXT_MAX,)]
    assert rows(db_path, "SELECT length(message) FROM restarts") == [(store.MESSAGE_TEXT_MAX,)]


def test_a_lone_surrogate_in_an_error_text_is_stored_not_dropped(db_path: Path) -> None:
    with StoreWriter(db_path) as writer:
        writer.add_sample(server="a", source="client", ok=False, latency_s=None, error="x\udc80y")
        writer.add_event(server="a", kind="state", message="\ud800")
    assert writer.dropped == 0
    assert rows(db_path, "SELECT error FROM latency_samples") == [("x?y",)]
    assert rows(db_path, "SELECT message FROM events") == [("?",)]


# -- a nearly full disk (a writer double) ------------------------------------


def test_restart_is_written_ahead_of_a_sample_backlog_on_a_nearly_full_disk(
    db_path: Path, writers: list[StoreWriter]
) -> None:
    writer = NearlyFullDisk(db_path)
    writers.append(writer)
    for i in range(5000):
        writer.add_sample(server="a", source="client", ok=True, latency_s=i / 1000)
    writer.start()
    assert wait_until(lambda: writer.error is not None and DISK_FULL in writer.error)
    restart(writer)
    writer.add_event(server="a", kind="state", old_state="ready", new_state="backoff")
    assert wait_until(lambda: rows(db_path, "SELECT count(*) FROM restarts") == [(1,)], 5.0), (
        "the restart row stayed queued behind the samples"
    )
    assert wait_until(lambda: rows(db_path, "SELECT count(*) FROM events") == [(1,)], 5.0)
    health = writer.health()
    assert health["ok"] is False and DISK_FULL in health["last_error"]
    assert health["queued_samples"] == 5000 and health["queued_events"] == 0
    assert len(health["last_error"]) <= 200
    # The disk has room again: the backlog drains and the writer says it is well.
    writer.room = None
    assert writer.flush(timeout=10)
    health = writer.health()
    assert health["ok"] is True and health["queued_samples"] == 0
    assert DISK_FULL in health["last_error"]  # the most recent error stays readable
    assert rows(db_path, "SELECT count(*) FROM latency_samples") == [(5000,)]


def test_close_on_a_full_disk_keeps_the_restart_history(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while the disk is full: the samples cannot be written and are given
    up after close()'s timeout, but the restart rows that fit are on disk."""
    writer = NearlyFullDisk(db_path)
    writer.start()
    for i in range(3000):
        writer.add_sample(server="a", source="client", ok=True, latency_s=i / 1000)
    assert wait_until(lambda: writer.error is not None)
    for attempt in range(1, 4):
        restart(writer, attempt)
    with caplog.at_level(logging.ERROR, logger="modelserverd.store"):
        started = time.monotonic()
        writer.close(timeout=1.0)
    assert time.monotonic() - started < 8
    assert rows(db_path, "SELECT attempt FROM restarts ORDER BY id") == [(1,), (2,), (3,)]
    assert rows(db_path, "SELECT count(*) FROM latency_samples") == [(0,)]
    assert "0 events, restarts and server rows and 3000 latency samples" in caplog.text


def test_events_and_restarts_keep_their_order(db_path: Path, writers: list[StoreWriter]) -> None:
    writer = NearlyFullDisk(db_path, flush_interval_s=0.001)
    writers.append(writer)
    writer.start()
    for i in range(50):
        writer.add_sample(server="a", source="probe", ok=True, latency_s=1.0)
        writer.add_event(server="a", kind="state", message=str(i))
        restart(writer, attempt=i)
        writer.set_restart_new_pid(server="a", new_pid=1000 + i)
    assert wait_until(lambda: rows(db_path, "SELECT count(*) FROM restarts") == [(50,)], 10)
    assert [r[0] for r in rows(db_path, "SELECT message FROM events ORDER BY id")] == [
        str(i) for i in range(50)
    ]
    assert rows(db_path, "SELECT attempt, new_pid FROM restarts ORDER BY id") == [
        (i, 1000 + i) for i in range(50)
    ]


# -- writer health in the log: one logger tree --------------------------------


@pytest.fixture
def journal() -> Iterator[io.StringIO]:
    """The daemon's logging as under systemd, into a buffer; put back afterwards."""
    saved = [
        (logger, logger.handlers[:], logger.level, logger.propagate)
        for logger in map(logging.getLogger, ("modelserverd", "supervisord_ms"))
    ]
    stream = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JOURNAL_STREAM", "8:1234")
        setup_logging(logging.INFO, stream)
    try:
        yield stream
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def test_a_failing_disk_is_a_warning_in_the_journal(
    db_path: Path, writers: list[StoreWriter], journal: io.StringIO
) -> None:
    """`journalctl -p warning` shows the writer's failure: the line carries the
    priority prefix, because the store logs under the daemon's logger tree."""
    writer = NearlyFullDisk(db_path)
    writers.append(writer)
    writer.start()
    for i in range(100):
        writer.add_sample(server="a", source="probe", ok=True, latency_s=float(i))
    assert wait_until(lambda: DISK_FULL in journal.getvalue())
    (line,) = [x for x in journal.getvalue().splitlines() if DISK_FULL in x]
    assert line.startswith("<4>") and str(db_path) in line and "retrying" in line
    writer.room = None
    assert writer.flush(timeout=10)
    assert wait_until(lambda: "written again" in journal.getvalue())


# -- a real full disk: a small tmpfs ------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs; skipped where this test may not mount one (not root, or a
    container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no room left."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)


def test_on_a_real_full_disk_the_restart_goes_first_once_there_is_room(
    small_disk: Path,
) -> None:
    db = small_disk / "state.db"
    writer = StoreWriter(db)  # the daemon's defaults
    writer.start()
    try:
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * 512 * 1024)
        fill(small_disk / "filler")
        for i in range(5000):  # about 2 MB of rows: far more than the room made below
            writer.add_sample(
                server="a", source="client", ok=False, latency_s=None, error=f"{i} " + "x" * 400
            )
        assert wait_until(lambda: writer.error is not None and DISK_FULL in writer.error, 10)
        restart(writer)
        ballast.unlink()  # 512 KiB of room: a restart row fits, 2000 samples do not
        assert wait_until(lambda: rows(db, "SELECT count(*) FROM restarts") == [(1,)], 10), (
            f"no restart row; writer error: {writer.error}"
        )
        health = writer.health()
        assert health["ok"] is False and DISK_FULL in health["last_error"]
        assert health["queued_events"] == 0 and health["queued_samples"] > 0
    finally:
        writer.close(timeout=1.0)
