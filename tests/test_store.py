"""The state database: schema and migrations, refusing unusable files without
touching them, the batching writer, reads, and the operator's `sqlite3` promise."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from supervisord_ms import states
from supervisord_ms.errors import ModelServerdError
from supervisord_ms.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Store,
    StoreError,
    StoreWriter,
    iso_utc,
    migrate,
    parse_iso,
)

ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
NOW = 1_795_000_000.0  # a fixed "now" (2026-11-18) keeps expected values readable

EXPECTED_COLUMNS = {
    "servers": [
        ("name", "TEXT", 1),
        ("ip", "TEXT", 0),
        ("port", "INTEGER", 0),
        ("model_size", "TEXT", 0),
        ("model_path", "TEXT", 0),
        ("gpus", "TEXT", 0),
        ("local", "INTEGER", 0),
        ("state", "TEXT", 0),
        ("pid", "INTEGER", 0),
        ("pgid", "INTEGER", 0),
        ("started_at", "TEXT", 0),
        ("updated_at", "TEXT", 0),
        ("proc_create_time", "REAL", 0),
        ("cmdline", "TEXT", 0),
        ("descendants", "TEXT", 0),
        ("sglang_version", "TEXT", 0),
    ],
    "latency_samples": [
        ("id", "INTEGER", 1),
        ("ts", "TEXT", 0),
        ("server", "TEXT", 0),
        ("source", "TEXT", 0),
        ("ok", "INTEGER", 0),
        ("latency_s", "REAL", 0),
        ("ttft_s", "REAL", 0),
        ("prompt_tokens", "INTEGER", 0),
        ("completion_tokens", "INTEGER", 0),
        ("error", "TEXT", 0),
    ],
    "restarts": [
        ("id", "INTEGER", 1),
        ("ts", "TEXT", 0),
        ("server", "TEXT", 0),
        ("reason", "TEXT", 0),
        ("attempt", "INTEGER", 0),
        ("backoff_s", "REAL", 0),
        ("old_pid", "INTEGER", 0),
        ("new_pid", "INTEGER", 0),
        ("exit_code", "INTEGER", 0),
        ("signal", "INTEGER", 0),
        ("message", "TEXT", 0),
    ],
    "events": [
        ("id", "INTEGER", 1),
        ("ts", "TEXT", 0),
        ("server", "TEXT", 0),
        ("kind", "TEXT", 0),
        ("old_state", "TEXT", 0),
        ("new_state", "TEXT", 0),
        ("message", "TEXT", 0),
    ],
}
EXPECTED_INDEXES = {
    "latency_samples": {
        "latency_samples_server_ts": ["server", "ts"],
        "latency_samples_ts": ["ts"],
    },
    "restarts": {"restarts_server_ts": ["server", "ts"]},
    "events": {"events_server_ts": ["server", "ts"]},
    "servers": {},
}


# -- helpers ----------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; tests never sleep blindly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def sqlite3_program() -> str:
    path = shutil.which("sqlite3")
    if path is None:
        pytest.fail(
            "the sqlite3 command-line program is not installed; run `make system-deps` "
            "(apt-get install sqlite3): the operator's `sqlite3 state.db` is part of the contract"
        )
    return path


def schema(path: Path) -> dict[str, list[tuple[str, str, int]]]:
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        return {
            t: [(r[1], r[2], r[5]) for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables
        }
    finally:
        conn.close()


def indexes(path: Path) -> dict[str, dict[str, list[str]]]:
    conn = sqlite3.connect(path)
    try:
        out: dict[str, dict[str, list[str]]] = {}
        for table in EXPECTED_COLUMNS:
            out[table] = {}
            for row in conn.execute(f"PRAGMA index_list({table})"):
                name, origin = row[1], row[3]
                if origin == "c":  # created by CREATE INDEX, not by a PRIMARY KEY
                    cols = [r[2] for r in conn.execute(f"PRAGMA index_info({name})")]
                    out[table][name] = cols
        return out
    finally:
        conn.close()


def scalar(path: Path, sql: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` with its bytes: a refused open must change nothing."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def open_writer(db_path: Path) -> Iterator[Callable[..., StoreWriter]]:
    """Started writers on ``db_path`` (or another path); all closed after the test."""
    writers: list[StoreWriter] = []

    def make(path: Path | None = None, **kwargs: object) -> StoreWriter:
        writer = StoreWriter(path or db_path, **kwargs)  # type: ignore[arg-type]
        writers.append(writer)
        writer.start()
        return writer

    yield make
    for writer in writers:
        writer.close(timeout=5.0)


# -- timestamps -------------------------------------------------------------


def test_iso_utc_format() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1795628400.123) == "2026-11-25T17:40:00.123Z"
    assert iso_utc(1795628400.9996) == "2026-11-25T17:40:01.000Z"  # rounds, carries
    assert iso_utc(-0.001) == "1969-12-31T23:59:59.999Z"
    assert ISO_RE.match(iso_utc())
    assert abs(parse_iso(iso_utc()) - time.time()) < 5
    for bad in (float("nan"), float("inf"), 1e12, -1e12):
        with pytest.raises(ValueError):
            iso_utc(bad)


def test_parse_iso_accepts_other_spellings() -> None:
    expected = parse_iso("2026-11-25T17:40:00.123Z")
    assert parse_iso("2026-11-25T17:40:00.123+00:00") == expected
    assert parse_iso("2026-11-25T18:40:00.123+01:00") == expected
    assert parse_iso("2026-11-25T17:40:00.123") == expected  # no offset: UTC
    for bad in ("", "yesterday", "2026-13-01T00:00:00Z"):
        with pytest.raises(ValueError):
            parse_iso(bad)


EPOCHS = st.floats(min_value=-62135596800.0, max_value=253402300799.0, allow_nan=False)


@given(EPOCHS)
def test_iso_round_trip_within_half_a_millisecond(epoch: float) -> None:
    text = iso_utc(epoch)
    assert ISO_RE.match(text)
    assert abs(parse_iso(text) - epoch) <= 0.0005 + abs(epoch) * 1e-15
    assert iso_utc(parse_iso(text)) == text


@given(EPOCHS, EPOCHS)
def test_iso_text_order_is_time_order(a: float, b: float) -> None:
    if a <= b:
        assert iso_utc(a) <= iso_utc(b)
    else:
        assert iso_utc(a) >= iso_utc(b)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
def test_iso_matches_the_standard_library(moment: datetime) -> None:
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000, tzinfo=timezone.utc)
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert iso_utc(parse_iso(text)) == text


# -- schema and migrations --------------------------------------------------


def test_schema_from_blank(db_path: Path) -> None:
    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS) == 3
    assert schema(db_path) == EXPECTED_COLUMNS
    assert indexes(db_path) == EXPECTED_INDEXES
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION
    assert scalar(db_path, "PRAGMA journal_mode") == "wal"  # persistent in the file


def test_connections_wait_for_locks(db_path: Path) -> None:
    store = Store(db_path)
    try:
        assert store._db.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        store.close()


def build_version_1(path: Path) -> None:
    """A database as the first release left it: only m001, with some history."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(sqlite3.connect(path, isolation_level=None))
    assert migrate(db, target=1) == 1
    db.conn.execute(
        "INSERT INTO servers (name, ip, port, gpus, local, state, pid) "
        "VALUES ('a', '10.0.0.5', 30000, '[0]', 1, 'ready', 42)"
    )
    db.conn.execute(
        "INSERT INTO latency_samples (ts, server, source, ok, latency_s) "
        "VALUES ('2026-11-25T17:40:00.123Z', 'a', 'probe', 1, 0.25)"
    )
    db.conn.execute(
        "INSERT INTO restarts (ts, server, reason, attempt, backoff_s, old_pid) "
        "VALUES ('2026-11-25T17:41:00.000Z', 'a', 'crash', 1, 1.0, 41)"
    )
    db.conn.execute(
        "INSERT INTO events (ts, server, kind, old_state, new_state) "
        "VALUES ('2026-11-25T17:41:00.000Z', 'a', 'state', 'ready', 'backoff')"
    )
    db.close()


def test_migration_from_version_1_keeps_rows(db_path: Path, tmp_path: Path) -> None:
    build_version_1(db_path)
    assert scalar(db_path, "PRAGMA user_version") == 1
    assert "proc_create_time" not in [c[0] for c in schema(db_path)["servers"]]

    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        (server,) = store.servers()
        assert server["name"] == "a" and server["gpus"] == [0] and server["local"] is True
        assert server["pid"] == 42
        assert server["proc_create_time"] is None and server["cmdline"] is None
        assert store.latency_samples()[0]["latency_s"] == 0.25
        assert store.restarts()[0]["old_pid"] == 41
        assert store.events()[0]["new_state"] == "backoff"

    # Migrated and blank databases have the same schema.
    blank = tmp_path / "blank.db"
    Store(blank).close()
    assert schema(db_path) == schema(blank) == EXPECTED_COLUMNS
    assert indexes(db_path) == indexes(blank)

    # Opening again changes nothing: migrations are idempotent.
    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert len(store.servers()) == 1


def build_version_2(path: Path) -> None:
    """A database as the release before issue 10 left it: m001 and m002, with a
    server row that a daemon wrote for adoption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(sqlite3.connect(path, isolation_level=None))
    assert migrate(db, target=2) == 2
    db.conn.execute(
        "INSERT INTO servers (name, ip, port, gpus, local, state, pid, proc_create_time, "
        "cmdline, descendants) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *("a", "10.0.0.5", 30000, "[0]", 1, "ready", 42, 1234.5),
            '["python3", "-m", "sglang.launch_server"]',
            "[[43, 1235.0]]",
        ),
    )
    db.conn.execute(
        "INSERT INTO events (ts, server, kind, old_state, new_state) "
        "VALUES ('2026-11-25T17:41:00.000Z', 'a', 'state', 'starting', 'ready')"
    )
    db.close()


def test_migration_from_version_2_adds_sglang_version(
    db_path: Path, tmp_path: Path, open_writer
) -> None:
    build_version_2(db_path)
    assert scalar(db_path, "PRAGMA user_version") == 2
    assert "sglang_version" not in [c[0] for c in schema(db_path)["servers"]]

    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        (server,) = store.servers()
        assert server["sglang_version"] is None
        assert server["pid"] == 42 and server["proc_create_time"] == 1234.5
        assert server["cmdline"] == ["python3", "-m", "sglang.launch_server"]
        assert server["descendants"] == [[43, 1235.0]]
        assert store.events()[0]["new_state"] == "ready"
    blank = tmp_path / "blank.db"
    Store(blank).close()
    assert schema(db_path) == schema(blank) == EXPECTED_COLUMNS
    assert indexes(db_path) == indexes(blank)

    # The new column takes writes like the others, without touching the rest of the row.
    writer = open_writer()
    writer.upsert_server({"name": "a", "sglang_version": "0.5.4"})
    assert writer.flush()
    with Store(db_path) as store:
        (server,) = store.servers()
    assert server["sglang_version"] == "0.5.4" and server["pid"] == 42


def test_migration_3_tolerates_a_column_added_by_hand(db_path: Path) -> None:
    build_version_2(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("ALTER TABLE servers ADD COLUMN sglang_version TEXT")
    conn.commit()
    conn.close()
    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
    assert schema(db_path) == EXPECTED_COLUMNS


def test_migrate_is_idempotent(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db = Database(sqlite3.connect(db_path, isolation_level=None))
    try:
        assert migrate(db) == SCHEMA_VERSION
        assert migrate(db) == SCHEMA_VERSION
        assert migrate(db, target=1) == SCHEMA_VERSION  # never backwards
        with pytest.raises(ValueError):
            migrate(db, target=SCHEMA_VERSION + 1)
    finally:
        db.close()


def test_concurrent_opens_migrate_once(db_path: Path) -> None:
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            Store(db_path).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION


def test_restart_reasons_match_the_check_constraint(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    try:
        for reason in states.RESTART_REASONS:
            conn.execute(
                "INSERT INTO restarts (ts, server, reason) VALUES (?, 'a', ?)", (iso_utc(), reason)
            )
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO restarts (ts, server, reason) VALUES ('x', 'a', 'bogus')")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO latency_samples (ts, server, source, ok) VALUES ('x', 'a', 'bogus', 1)"
            )
    finally:
        conn.close()


# -- unusable files are refused and left untouched --------------------------


def test_newer_version_refused_untouched(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = snapshot(db_path.parent)
    for opener in (Store, StoreWriter):
        with pytest.raises(StoreError, match="newer modelserverd; upgrade"):
            opener(db_path)
    assert snapshot(db_path.parent) == before


def test_garbage_file_refused_untouched(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    garbage = bytes((i * 7919 + 13) % 256 for i in range(8192))
    db_path.write_bytes(garbage)
    for opener in (Store, StoreWriter):
        with pytest.raises(StoreError, match="not a SQLite database") as info:
            opener(db_path)
        assert str(db_path) in str(info.value)
        assert "move" in str(info.value)
    assert snapshot(db_path.parent) == {"state.db": garbage}


def test_damaged_pages_refused_untouched(db_path: Path) -> None:
    with StoreWriter(db_path) as writer:
        for i in range(3000):
            writer.add_sample(server=f"s{i % 5}", source="probe", ok=True, latency_s=0.1)
    data = bytearray(db_path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[3 * page : 4 * page] = b"\xa5" * page  # a b-tree page of the samples table
    db_path.write_bytes(bytes(data))
    before = snapshot(db_path.parent)
    with pytest.raises(StoreError, match="corrupt") as info:
        Store(db_path)
    assert str(db_path) in str(info.value)
    assert snapshot(db_path.parent) == before


def test_database_of_another_program_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    before = snapshot(db_path.parent)
    with pytest.raises(StoreError, match="another program"):
        Store(db_path)
    assert snapshot(db_path.parent) == before


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where a directory should be\n")
    path = blocker / "sub" / "state.db"
    for opener in (Store, StoreWriter):
        with pytest.raises(StoreError, match="cannot create the directory") as info:
            opener(path)
        assert str(blocker / "sub") in str(info.value)
    assert blocker.read_text() == "a regular file where a directory should be\n"


def test_path_that_is_a_directory(db_path: Path) -> None:
    db_path.mkdir(parents=True)
    with pytest.raises(StoreError, match="is a directory"):
        Store(db_path)


def test_store_error_is_a_modelserverd_error() -> None:
    assert issubclass(StoreError, ModelServerdError)


def open_without_privileges(path: Path) -> tuple[int, str]:
    """Open ``path`` in a forked child that cannot override file permissions.

    Tests often run as root, and root writes through any mode bits; the child
    then becomes ``nobody`` first, so a read-only file is read-only to it. A
    fork, not a new interpreter: the interpreter may live where ``nobody``
    cannot reach it. Returns (exit status, what the child reported).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                Store(path).close()
                report, status = "opened", 0
            except StoreError as exc:
                report, status = str(exc), 3
            os.write(write_end, report.encode())
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), b"".join(chunks).decode()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder outside pytest's private (0700) tree, so ``nobody`` can reach it."""
    folder = Path(tempfile.mkdtemp(prefix="ms-store-test-"))
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def test_unwritable_file_refused_untouched(shared_dir: Path) -> None:
    path = shared_dir / "state.db"
    Store(path).close()
    shared_dir.chmod(0o777)  # the folder is writable: only the file is not
    path.chmod(0o444)
    before = snapshot(shared_dir)
    status, report = open_without_privileges(path)
    assert status == 3, report
    assert "not readable and writable" in report and str(path) in report
    assert snapshot(shared_dir) == before


def test_unwritable_directory_refused(shared_dir: Path) -> None:
    path = shared_dir / "state.db"
    Store(path).close()
    path.chmod(0o666)  # the file is writable, but -wal and -shm could not be created
    shared_dir.chmod(0o555)
    before = snapshot(shared_dir)
    status, report = open_without_privileges(path)
    assert status == 3, report
    assert "is not writable" in report and "-wal" in report
    assert snapshot(shared_dir) == before


# -- the writer -------------------------------------------------------------


def test_close_loses_nothing(db_path: Path) -> None:
    writer = StoreWriter(db_path, flush_interval_s=0.2)
    writer.start()
    per_thread = 3000

    def produce(n: int) -> None:
        for i in range(per_thread):
            writer.add_sample(server=f"s{n}", source="client", ok=True, latency_s=i / 1000)
            if i % 100 == 0:
                writer.add_event(server=f"s{n}", kind="note", message=str(i))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert writer.pending == 0
    assert scalar(db_path, "SELECT count(*) FROM latency_samples") == 4 * per_thread
    assert scalar(db_path, "SELECT count(*) FROM events") == 4 * 30
    with pytest.raises(StoreError, match="closed"):
        writer.add_event(server=None, kind="late")
    writer.close()  # a second close is harmless


def test_rows_queued_before_start_are_written_by_close(db_path: Path) -> None:
    writer = StoreWriter(db_path)
    writer.add_event(server=None, kind="daemon", message="started")
    assert writer.flush(timeout=0.1) is False  # nothing writes until start()
    assert writer.pending == 1
    writer.close()
    assert scalar(db_path, "SELECT message FROM events") == "started"


def test_flush_makes_rows_visible_to_readers(db_path: Path, open_writer) -> None:
    writer = open_writer(flush_interval_s=60.0)  # only a flush writes early
    store = Store(db_path)
    try:
        writer.add_sample(server="a", source="probe", ok=False, latency_s=None, error="refused")
        assert writer.flush()
        assert writer.pending == 0
        (row,) = store.latency_samples()
        assert row["ok"] is False and row["error"] == "refused" and ISO_RE.match(row["ts"])
    finally:
        store.close()


def test_batches_are_written_without_flush(db_path: Path, open_writer) -> None:
    writer = open_writer(flush_interval_s=0.01)
    writer.add_event(server="a", kind="state", old_state="stopped", new_state="starting")
    assert wait_until(lambda: writer.pending == 0)
    assert scalar(db_path, "SELECT new_state FROM events") == "starting"


def test_validation_happens_in_the_caller(open_writer) -> None:
    writer = open_writer()
    with pytest.raises(ValueError, match="source"):
        writer.add_sample(server="a", source="bogus", ok=True, latency_s=1.0)
    with pytest.raises(ValueError, match="reason"):
        writer.add_restart(server="a", reason="bogus", attempt=1, backoff_s=1.0, old_pid=1)
    with pytest.raises(ValueError, match="unknown server columns"):
        writer.upsert_server({"name": "a", "colour": "red"})
    with pytest.raises(ValueError, match="name"):
        writer.upsert_server({"state": "ready"})
    assert writer.pending == 0


def test_upsert_server_updates_only_given_columns(db_path: Path, open_writer) -> None:
    writer = open_writer()
    writer.upsert_server(
        {
            "name": "a",
            "ip": "10.0.0.5",
            "port": 30000,
            "model_size": "8B",
            "gpus": [0, 1],
            "local": True,
            "state": "starting",
            "started_at": NOW,
            "cmdline": ["python3", "-m", "sglang.launch_server"],
            "descendants": [101, 102],
            "proc_create_time": 1234.5,
            "sglang_version": "0.5.4",
        }
    )
    writer.upsert_server({"name": "a", "state": "ready", "pid": 100})
    writer.upsert_server({"name": "b", "local": False, "state": "unreachable"})
    writer.upsert_server({"name": "gone", "state": "stopped"})
    writer.delete_server("gone")
    assert writer.flush()
    with Store(db_path) as store:
        a, b = store.servers()
    assert a["state"] == "ready" and a["pid"] == 100 and a["port"] == 30000
    assert a["gpus"] == [0, 1] and a["local"] is True
    assert a["cmdline"] == ["python3", "-m", "sglang.launch_server"]
    assert a["descendants"] == [101, 102] and a["proc_create_time"] == 1234.5
    assert a["sglang_version"] == "0.5.4" and b["sglang_version"] is None
    assert a["started_at"] == iso_utc(NOW) and ISO_RE.match(a["updated_at"])
    assert b["name"] == "b" and b["local"] is False and b["gpus"] is None


def test_restart_new_pid_is_filled_in_later(db_path: Path, open_writer) -> None:
    writer = open_writer()
    writer.add_restart(server="a", reason="crash", attempt=1, backoff_s=1.0, old_pid=10, ts=NOW)
    writer.set_restart_new_pid(server="a", new_pid=11)
    writer.set_restart_new_pid(server="a", new_pid=99)  # already filled: no change
    writer.add_restart(
        server="a", reason="hang", attempt=2, backoff_s=2.0, old_pid=11, signal=9, ts=NOW + 1
    )
    writer.add_restart(server="b", reason="manual", attempt=1, backoff_s=None, old_pid=None)
    writer.set_restart_new_pid(server="a", new_pid=12)
    assert writer.flush()
    with Store(db_path) as store:
        newest, oldest = store.restarts(server="a")
    assert (oldest["reason"], oldest["old_pid"], oldest["new_pid"]) == ("crash", 10, 11)
    assert (newest["reason"], newest["old_pid"], newest["new_pid"], newest["signal"]) == (
        "hang",
        11,
        12,
        9,
    )


def test_delete_samples_older_than_removes_only_old_ones(db_path: Path, open_writer) -> None:
    writer = open_writer()
    day = 86400.0
    for i in range(37):
        writer.add_sample(server="a", source="probe", ok=True, latency_s=1.0, ts=NOW - 20 * day + i)
    for i in range(5):
        writer.add_sample(server="a", source="probe", ok=True, latency_s=2.0, ts=NOW - day + i)
    writer.add_sample(server="b", source="client", ok=True, latency_s=3.0, ts=NOW - 14 * day)
    writer.add_event(server="a", kind="state", ts=NOW - 30 * day)
    writer.add_restart(
        server="a", reason="crash", attempt=1, backoff_s=1.0, old_pid=1, ts=NOW - 30 * day
    )
    writer.delete_samples_older_than(NOW - 14 * day, batch=7)  # several small transactions
    assert writer.flush()
    with Store(db_path) as store:
        kept = store.latency_samples(limit=1000)
        assert sorted(r["latency_s"] for r in kept) == [2.0] * 5 + [3.0]  # cutoff itself stays
        assert len(store.events()) == 1 and len(store.restarts()) == 1


def test_retention_requests_merge_and_the_newest_cutoff_wins(db_path: Path) -> None:
    writer = StoreWriter(db_path)  # not started: the requests wait together
    day = 86400.0
    for age in (30, 20, 10, 1):
        writer.add_sample(
            server="a", source="probe", ok=True, latency_s=float(age), ts=NOW - age * day
        )
    writer.delete_samples_older_than(NOW - 25 * day)
    writer.delete_samples_older_than(NOW - 15 * day)
    writer.delete_samples_older_than(NOW - 5 * day)
    assert writer.pending == 4 + 3
    writer.close()
    assert writer.pending == 0
    with Store(db_path) as store:
        assert [r["latency_s"] for r in store.latency_samples()] == [1.0]


def test_retention_runs_while_samples_cannot_be_written(db_path: Path) -> None:
    """A failing sample queue does not hold up the deletion of old samples (which
    may be what frees the room)."""

    class SamplesFail(StoreWriter):
        def _write_batch(self, batch):
            if any("latency_samples" in sql for sql, _ in batch):
                raise sqlite3.OperationalError("database or disk is full")
            super()._write_batch(batch)

    with StoreWriter(db_path) as seed:
        seed.add_sample(server="a", source="probe", ok=True, latency_s=1.0, ts=NOW - 30 * 86400)
    writer = SamplesFail(db_path)
    writer.start()
    try:
        writer.add_sample(server="a", source="probe", ok=True, latency_s=2.0)
        writer.delete_samples_older_than(NOW)
        assert wait_until(lambda: scalar(db_path, "SELECT count(*) FROM latency_samples") == 0)
        assert writer.health()["queued_samples"] == 1 and not writer.health()["ok"]
    finally:
        writer.close(timeout=0.5)


def test_reads_newest_first_with_filters(db_path: Path, open_writer) -> None:
    writer = open_writer()
    for i in range(10):
        server = "a" if i % 2 == 0 else "b"
        writer.add_sample(server=server, source="probe", ok=True, latency_s=float(i), ts=NOW + i)
        writer.add_event(server=server, kind="state", message=str(i), ts=NOW + i)
        writer.add_restart(
            server=server, reason="crash", attempt=i, backoff_s=1.0, old_pid=i, ts=NOW + i
        )
    writer.add_event(server=None, kind="reload", ts=NOW + 100)
    assert writer.flush()
    with Store(db_path) as store:
        assert [r["latency_s"] for r in store.latency_samples()] == [
            float(i) for i in range(9, -1, -1)
        ]
        assert [r["latency_s"] for r in store.latency_samples(server="a", limit=3)] == [
            8.0,
            6.0,
            4.0,
        ]
        assert [r["latency_s"] for r in store.latency_samples(since=NOW + 7)] == [9.0, 8.0, 7.0]
        assert [r["latency_s"] for r in store.latency_samples(server="b", since=NOW + 6)] == [
            9.0,
            7.0,
        ]
        assert store.latency_samples(limit=0) == []
        assert [r["message"] for r in store.events(limit=2)] == [None, "9"]
        assert [r["message"] for r in store.events(server="a", limit=2)] == ["8", "6"]
        assert [r["attempt"] for r in store.restarts(server="b")] == [9, 7, 5, 3, 1]
        assert [r["attempt"] for r in store.restarts(since=NOW + 8)] == [9, 8]
        assert store.count_restarts_since(NOW + 5) == {"a": 2, "b": 3}
        assert store.count_restarts_since(NOW + 1000) == {}
        with pytest.raises(ValueError):
            store.latency_samples(limit=-1)
    with pytest.raises(StoreError, match="closed"):
        store.servers()


SAMPLES = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(min_value=0, max_value=50)),
    max_size=40,
)


@settings(max_examples=20, deadline=None)
@given(
    SAMPLES,
    st.sampled_from([None, "a", "b"]),
    st.one_of(st.none(), st.integers(0, 50)),
    st.integers(0, 50),
)
def test_sample_reads_match_a_model(
    samples: list[tuple[str, int]], server: str | None, since: int | None, limit: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.db"
        with StoreWriter(path) as writer:
            for n, (name, second) in enumerate(samples):
                writer.add_sample(
                    server=name, source="probe", ok=True, latency_s=float(n), ts=NOW + second
                )
        model = [
            (second, n)
            for n, (name, second) in enumerate(samples)
            if (server is None or name == server) and (since is None or second >= since)
        ]
        expected = [float(n) for _, n in sorted(model, reverse=True)[:limit]]
        with Store(path) as store:
            rows = store.latency_samples(
                server=server, limit=limit, since=None if since is None else NOW + since
            )
        assert [r["latency_s"] for r in rows] == expected


def test_writer_keeps_rows_while_the_database_is_locked(db_path: Path, open_writer) -> None:
    writer = open_writer(busy_timeout_s=0.02, flush_interval_s=0.001)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # an operator left a write transaction open
        for i in range(50):
            writer.add_sample(server="a", source="probe", ok=True, latency_s=float(i))
        assert wait_until(lambda: writer.error is not None and "locked" in writer.error)
        assert writer.pending == 50
        assert writer.flush(timeout=0.05) is False
        blocker.execute("ROLLBACK")
        assert writer.flush(timeout=10.0)
        assert writer.error is None and writer.pending == 0 and writer.dropped == 0
    finally:
        blocker.close()
    assert scalar(db_path, "SELECT count(*) FROM latency_samples") == 50


def test_a_row_sqlite_refuses_is_dropped_alone(db_path: Path, open_writer) -> None:
    writer = open_writer()
    writer.add_event(server="a", kind="before")
    writer.add_event(server="a", kind="bad", message=object())  # type: ignore[arg-type]
    writer.add_event(server="a", kind="after")
    assert writer.flush()
    assert writer.dropped == 1 and writer.error is not None and "dropped" in writer.error
    conn = sqlite3.connect(db_path)
    try:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")]
    finally:
        conn.close()
    assert kinds == ["before", "after"]


def test_queue_limit_drops_samples_but_keeps_history(db_path: Path) -> None:
    writer = StoreWriter(db_path, max_pending=10)  # not started: nothing drains the queue
    for i in range(15):
        writer.add_sample(server="a", source="probe", ok=True, latency_s=float(i))
    writer.add_event(server="a", kind="state")
    writer.add_restart(server="a", reason="crash", attempt=1, backoff_s=1.0, old_pid=1)
    assert writer.dropped == 5 and writer.pending == 12
    writer.close()
    assert scalar(db_path, "SELECT count(*) FROM latency_samples") == 10
    assert scalar(db_path, "SELECT count(*) FROM restarts") == 1


# -- the operator's sqlite3 -------------------------------------------------


def test_sqlite3_program_reads_while_the_writer_inserts(db_path: Path, open_writer) -> None:
    program = sqlite3_program()
    writer = open_writer(flush_interval_s=0.002, max_batch=500)
    reads_during_writes = 0
    produced = 0
    done = threading.Event()

    def produce() -> None:
        nonlocal produced
        try:
            # Keep writing until there are tens of thousands of rows and the
            # reader has run many times while rows were being written.
            while produced < 20000 or reads_during_writes < 25:
                for _ in range(250):
                    writer.add_sample(
                        server=f"s{produced % 7}", source="probe", ok=True, latency_s=0.1
                    )
                    produced += 1
                writer.flush()
                if produced >= 200_000:
                    break
        finally:
            done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    counts: list[int] = []
    try:
        while not done.is_set():
            result = subprocess.run(
                [program, str(db_path), "select count(*) from latency_samples"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert "locked" not in result.stderr, result.stderr
            assert result.returncode == 0, result.stderr
            counts.append(int(result.stdout))
            if not done.is_set():
                reads_during_writes += 1
    finally:
        done.wait(60)
        producer.join()
    assert writer.flush()
    assert reads_during_writes >= 25
    assert counts == sorted(counts)  # each read saw a consistent, growing table
    assert len(set(counts)) > 1
    final = subprocess.run(
        [program, str(db_path), "select count(*) from latency_samples"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert int(final.stdout) == produced >= 20000


def test_sqlite3_program_understands_the_timestamps(db_path: Path, open_writer) -> None:
    program = sqlite3_program()
    writer = open_writer()
    moment = datetime(2026, 11, 25, 17, 40, 0, 123000, tzinfo=timezone.utc)
    writer.add_event(server="a", kind="state", ts=moment.timestamp())
    writer.add_event(server="a", kind="state", ts=(moment - timedelta(days=2)).timestamp())
    assert writer.flush()
    result = subprocess.run(
        [
            program,
            str(db_path),
            "select ts, datetime(ts), strftime('%Y-%m-%d %H:%M:%f', ts) from events order by ts; "
            "select count(*) from events where datetime(ts) >= datetime('2026-11-25');",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "2026-11-23T17:40:00.123Z|2026-11-23 17:40:00|2026-11-23 17:40:00.123",
        "2026-11-25T17:40:00.123Z|2026-11-25 17:40:00|2026-11-25 17:40:00.123",
        "1",
    ]
