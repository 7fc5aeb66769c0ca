"""The state database: schema, migrations, a batching background writer, and reads.

One SQLite file (``[daemon].state_db``) holds what an operator audits later:
the servers this daemon knows, latency samples, restarts and state-change events.
The contract (DESIGN.md, "State database") is that a person can run
``sqlite3 state.db`` while the daemon writes, without "database is locked", and
read timestamps that ``datetime()`` understands. That shapes everything here:

* WAL mode, so readers never wait for the writer and the writer never waits for
  readers.
* One writer: :class:`StoreWriter` owns the only write connection, on its own
  thread. The supervisor, prober and API hand it rows through in-memory queues
  and never wait on the disk; it commits them in batches, one short transaction
  each. Events, restarts and server rows go ahead of latency samples and are
  never dropped; samples are bounded and dropped (counted, logged) past it.
* :class:`Store` is the read side: small queries, each its own read transaction.
* Timestamps are UTC ISO-8601 text with milliseconds and a ``Z``
  (``2026-11-25T17:40:00.123Z``), written by :func:`iso_utc`. All rows use the
  same fixed-width format, so comparing the text compares the times, and the
  ``ts`` indexes serve ``since`` filters and retention deletes.
* The schema version is ``PRAGMA user_version`` = the number of entries of
  :data:`MIGRATIONS` applied. Migrations only ever run forward, each in its own
  transaction; a shipped migration is never edited, a new one is appended.
* A database that cannot be used (corrupt, written by a newer version, not
  writable) is refused with :class:`StoreError` and left byte-for-byte as it
  was: the history in it is the operator's, never silently reset.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from . import states
from .errors import ModelServerdError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SERVER_COLUMNS",
    "SOURCES",
    "Store",
    "StoreError",
    "StoreWriter",
    "iso_utc",
    "migrate",
    "migration",
    "parse_iso",
]

# Under the daemon's logger tree ("modelserverd"), so its lines get the journal
# priority prefix and `journalctl -p warning` shows a failing disk.
log = logging.getLogger("modelserverd.store")

# How long a connection waits for a lock held by another connection before it
# gives up with "database is locked". In WAL mode only writers ever wait, and
# the daemon has one writer, so this matters only when a person holds a write
# transaction open in `sqlite3`, or two daemons share one file by mistake.
BUSY_TIMEOUT_S = 5.0

SOURCES = ("probe", "client")


class StoreError(ModelServerdError):
    """The state database cannot be used: missing directory, corrupt file, written
    by a newer modelserverd, not writable, or a read that failed.

    Raised by :class:`Store` and :class:`StoreWriter` when they open the file (the
    daemon then refuses to start and the CLI prints the message), and by reads.
    The message names the file and says what to do.
    """


# --------------------------------------------------------------------------
# Timestamps


_MIN_SECOND = -62135596800  # 0001-01-01T00:00:00Z
_MAX_SECOND = 253402300799  # 9999-12-31T23:59:59Z
# The text of the last whole second formatted: nearly every call falls in the
# same second as the one before, and gmtime + formatting is most of the cost.
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def iso_utc(epoch_seconds: float | None = None) -> str:
    """Format a Unix time (default: now) as ``2026-11-25T17:40:00.123Z``.

    This is the only timestamp format written to the database: UTC, so rows
    from before and after a DST change or a host timezone change sort
    correctly; milliseconds, because probes and restarts happen within one
    second of each other; the ``Z``, which SQLite's ``datetime()`` accepts. The
    width is fixed (four-digit year, zero padding), so text order is time order.
    The value is rounded to the nearest millisecond; years 1 to 9999 only.
    """
    global _last_second
    if epoch_seconds is None:
        epoch_seconds = time.time()
    try:
        secs, ms = divmod(round(epoch_seconds * 1000), 1000)
    except (ValueError, OverflowError):
        raise ValueError(f"not a finite timestamp: {epoch_seconds!r}") from None
    cached = _last_second
    if cached[0] != secs:
        if not _MIN_SECOND <= secs <= _MAX_SECOND:
            raise ValueError(f"timestamp outside years 1 to 9999: {epoch_seconds!r}")
        t = time.gmtime(secs)
        cached = (
            secs,
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}",
        )
        _last_second = cached  # one tuple assignment: safe across threads
    return f"{cached[1]}.{ms:03d}Z"


def parse_iso(text: str) -> float:
    """Turn a timestamp read from the database back into a Unix time.

    Accepts what :func:`iso_utc` writes and, so that hand-written values from
    an operator work too, any ISO-8601 form that ``datetime.fromisoformat``
    reads, with ``Z`` or an offset; a value without an offset is taken as UTC
    (the database holds only UTC). Raises ``ValueError`` for anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# --------------------------------------------------------------------------
# Migrations

MIGRATIONS: list[Callable[[Database], None]] = []


def migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    """Register ``fn`` as the next migration. Its position is its version number:
    the database's ``user_version`` counts the migrations applied so far."""
    MIGRATIONS.append(fn)
    return fn


# The restart reasons as m001 shipped them. A literal, not states.RESTART_REASONS:
# a shipped migration must create the same schema forever. A new reason needs a
# new migration that rebuilds the CHECK (tests fail until there is one).
_M001_RESTART_REASONS = (
    "crash",
    "hang",
    "unhealthy",
    "startup_timeout",
    "manual",
    "config_change",
    "gpu_lost",
)


@migration
def m001_initial(db: Database) -> None:
    """The four tables of DESIGN.md. ``IF NOT EXISTS`` everywhere: harmless on a
    fresh file, and it keeps the step safe to re-run by hand."""
    reasons = ", ".join(f"'{r}'" for r in _M001_RESTART_REASONS)
    statements = [
        """
        CREATE TABLE IF NOT EXISTS servers (
            name TEXT PRIMARY KEY,
            ip TEXT,
            port INTEGER,
            model_size TEXT,
            model_path TEXT,
            gpus TEXT,              -- JSON list of GPU indexes
            local INTEGER,          -- 1: managed by this host's daemon
            state TEXT,
            pid INTEGER,
            pgid INTEGER,
            started_at TEXT,
            updated_at TEXT
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS latency_samples (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            server TEXT NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('probe', 'client')),
            ok INTEGER NOT NULL,
            latency_s REAL,
            ttft_s REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            error TEXT
        )
        """,
        "CREATE INDEX IF NOT EXISTS latency_samples_server_ts ON latency_samples (server, ts)",
        "CREATE INDEX IF NOT EXISTS latency_samples_ts ON latency_samples (ts)",
        f"""
        CREATE TABLE IF NOT EXISTS restarts (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            server TEXT NOT NULL,
            reason TEXT NOT NULL CHECK (reason IN ({reasons})),
            attempt INTEGER,
            backoff_s REAL,
            old_pid INTEGER,
            new_pid INTEGER,
            exit_code INTEGER,
            signal INTEGER,
            message TEXT
        )
        """,
        "CREATE INDEX IF NOT EXISTS restarts_server_ts ON restarts (server, ts)",
        """
        CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            server TEXT,            -- NULL: an event of the daemon itself
            kind TEXT NOT NULL,
            old_state TEXT,
            new_state TEXT,
            message TEXT
        )
        """,
        "CREATE INDEX IF NOT EXISTS events_server_ts ON events (server, ts)",
    ]
    for sql in statements:
        db.execute(sql)


@migration
def m002_server_adoption(db: Database) -> None:
    """Columns that let a restarted daemon adopt the servers it left running.

    SGLang servers run in their own sessions and outlive a daemon restart
    (upgrade, crash, ``systemctl restart``). On start the daemon must tell "my
    server, still running" from "a stranger that got the same pid": pids are
    reused, so a pid alone proves nothing, and the daemon must never signal a
    process it did not start. ``proc_create_time`` (psutil's ``create_time()``
    of the pid) and ``cmdline`` (JSON list) identify the process exactly.
    ``descendants`` (JSON list of the processes last seen in its tree; the
    supervisor stores ``[pid, create_time]`` pairs, so a reused pid is not
    taken for one of them) lets a stop also reach scheduler children that left
    the process group, which would otherwise hold GPU memory for good.

    Added one column at a time and only if missing, so a database where a
    column was added by hand still migrates.
    """
    existing = set(db["servers"].columns_dict)
    for column, sqltype in (
        ("proc_create_time", "REAL"),
        ("cmdline", "TEXT"),
        ("descendants", "TEXT"),
    ):
        if column not in existing:
            db.execute(f"ALTER TABLE servers ADD COLUMN {column} {sqltype}")


@migration
def m003_sglang_version(db: Database) -> None:
    """``servers.sglang_version``: the SGLang version a server reported (from its
    ``/get_server_info``), so an operator can tell which servers run which release
    when behaviour differs between versions. NULL until the server has answered.

    Added only if missing, like m002, so a hand-added column does not stop the step.
    """
    if "sglang_version" not in db["servers"].columns_dict:
        db.execute("ALTER TABLE servers ADD COLUMN sglang_version TEXT")


SCHEMA_VERSION = len(MIGRATIONS)

SERVER_COLUMNS = (
    "name",
    "ip",
    "port",
    "model_size",
    "model_path",
    "gpus",
    "local",
    "state",
    "pid",
    "pgid",
    "started_at",
    "updated_at",
    "proc_create_time",
    "cmdline",
    "descendants",
    "sglang_version",
)
_SERVER_JSON_COLUMNS = ("gpus", "cmdline", "descendants")
_SERVER_TIME_COLUMNS = ("started_at", "updated_at")


def _user_version(db: Database) -> int:
    return int(db.conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: Database, target: int | None = None) -> int:
    """Apply the migrations the database lacks, up to ``target`` (default: all).

    Runs on every open and is idempotent. Each step runs in its own
    ``BEGIN IMMEDIATE`` transaction together with its ``user_version`` bump, and
    re-reads the version inside it, so two processes opening the same file at
    once apply each step exactly once, and a failing step leaves the database
    at the previous version. ``db`` must be in autocommit mode
    (``isolation_level=None``). Returns the version reached.
    """
    if target is None:
        target = len(MIGRATIONS)
    if not 0 <= target <= len(MIGRATIONS):
        raise ValueError(f"no schema version {target}; known: 0..{len(MIGRATIONS)}")
    while _user_version(db) < target:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(db)
            if version < target:
                MIGRATIONS[version](db)
                db.conn.execute(f"PRAGMA user_version = {version + 1}")
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
    return _user_version(db)


# --------------------------------------------------------------------------
# Opening


def _untouched(path: Path) -> str:
    return (
        f"The file was left untouched: move {path} aside (modelserverd then creates a "
        f"fresh database) or restore it from a backup."
    )


def _check_location(path: Path) -> None:
    """Refuse, before SQLite sees it, a path the daemon could not write.

    SQLite would otherwise open such a file read-only without a word and fail
    only at the first write, long after start, on the writer thread.
    """
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory {parent} for the state database {path}: "
            f"{exc.strerror or exc}. Create it, writable by the daemon's user, or set "
            f"[daemon].state_db to another path."
        ) from exc
    if not parent.is_dir():
        raise StoreError(
            f"{parent} is not a directory, so the state database {path} cannot be "
            f"created there; set [daemon].state_db to another path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(
            f"the directory {parent} is not writable by uid {os.geteuid()}; SQLite keeps "
            f"{path.name}-wal and {path.name}-shm beside the state database {path}. Give the "
            f"daemon's user write access to it or set [daemon].state_db to another path."
        )
    if path.exists():
        if path.is_dir():
            raise StoreError(
                f"the state database {path} is a directory, not a file; set "
                f"[daemon].state_db to a file path."
            )
        if not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(
                f"the state database {path} is not readable and writable by uid "
                f"{os.geteuid()}; fix its owner or permissions (e.g. chown it to the daemon's "
                f"user) or set [daemon].state_db to another path."
            )


def _check_contents(conn: sqlite3.Connection, path: Path) -> int:
    """Read-only checks of an existing file; returns its schema version.

    Nothing here writes, so a refused file stays byte-for-byte as it was. One
    read transaction, so another process migrating the file at this moment is
    seen either before or after, never halfway (version 0 but tables present).
    """
    try:
        conn.execute("BEGIN")
        try:
            return _check_snapshot(conn, path)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{path} is not a SQLite database or is corrupt ({exc}). " + _untouched(path)
        ) from exc


def _check_snapshot(conn: sqlite3.Connection, path: Path) -> int:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the state database {path} has schema version {version}, but this "
            f"modelserverd knows versions up to {len(MIGRATIONS)}: it was written by a "
            f"newer modelserverd; upgrade modelserverd. The file was left untouched."
        )
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
    if problems != ["ok"]:
        detail = "; ".join(problems).replace("\n", "; ")
        raise StoreError(
            f"the state database {path} is corrupt (PRAGMA quick_check: {detail}). "
            + _untouched(path)
        )
    if version == 0:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        if tables:
            raise StoreError(
                f"{path} is a SQLite database of another program (schema version 0, "
                f"tables: {', '.join(tables)}), not a modelserverd state database. "
                + _untouched(path)
            )
    return version


def _open(path: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Database:
    """Open, check and migrate the database; return it in autocommit mode.

    ``isolation_level=None``: transactions are explicit (``BEGIN IMMEDIATE`` ...
    ``COMMIT``), never opened behind our back by the driver, so no read stays
    open longer than one query and WAL checkpoints are not held up.
    ``check_same_thread=False``: the writer opens its connection here, on the
    caller's thread, so errors surface at construction, then uses it only on
    its own thread; the reader guards its connection with a lock.
    """
    p = Path(path)
    _check_location(p)
    try:
        conn = sqlite3.connect(
            str(p), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreError(
            f"cannot open the state database {p}: {exc}. Check the path and its "
            f"permissions, or set [daemon].state_db to another path."
        ) from exc
    try:
        version = _check_contents(conn, p)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot switch the state database {p} to WAL mode: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(
                f"the state database {p} could not be switched to WAL mode (it stays in "
                f"{mode!r} mode); WAL is needed so `sqlite3` can read it while the daemon "
                f"writes. Put it on a local filesystem."
            )
        # In WAL mode NORMAL never corrupts the file; a power cut may lose the last
        # few batches, which for latency samples and history is the right trade
        # for not waiting on fsync at every commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        # After a checkpoint, cut a WAL that grew while a reader held an old
        # snapshot back to this size, so it does not keep the disk space.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        db = Database(conn, recursive_triggers=False, execute_plugins=False)
        if version < len(MIGRATIONS):
            try:
                migrate(db)
            except sqlite3.Error as exc:
                raise StoreError(
                    f"migrating the state database {p} from schema version {version} to "
                    f"{len(MIGRATIONS)} failed: {exc}. Each step runs in one transaction, so "
                    f"the file stays at the last good version; free disk space or fix "
                    f"permissions and start again."
                ) from exc
        return db
    except BaseException:
        conn.close()
        raise


# --------------------------------------------------------------------------
# Reads


def _decode_server(row: dict[str, Any]) -> dict[str, Any]:
    for column in _SERVER_JSON_COLUMNS:
        value = row.get(column)
        if isinstance(value, str):
            try:
                row[column] = json.loads(value)
            except ValueError:
                pass  # hand-edited text: show it as it is rather than fail the read
    if row.get("local") is not None:
        row["local"] = bool(row["local"])
    return row


def _decode_sample(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("ok") is not None:
        row["ok"] = bool(row["ok"])
    return row


class Store:
    """Read side of the state database, for the API, the CLI and the tests.

    Opening it checks the file, creates its directory and migrates it (so the
    CLI on a fresh host sees the same schema as the daemon). Every read is one
    query, fully fetched, hence one short read transaction that never holds up
    the writer or a WAL checkpoint. Safe to call from any thread: the single
    connection is guarded by a lock (reads are small; a pool would buy nothing).
    Rows come back as dicts; ``ts`` stays ISO text (see :func:`parse_iso`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = _open(path)
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The ``user_version`` of the file (= :data:`SCHEMA_VERSION` once opened)."""
        return int(self._query("PRAGMA user_version")[0]["user_version"])

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            if self._closed:
                raise StoreError(f"the state database {self.path} was closed")
            try:
                cursor = self._db.conn.execute(sql, tuple(params))
                names = [d[0] for d in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            except sqlite3.Error as exc:
                raise StoreError(f"reading the state database {self.path} failed: {exc}") from exc

    def _recent(
        self, table: str, server: str | None, limit: int, since: float | None
    ) -> list[dict[str, Any]]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        clause, params = _recent_clause(server, since, limit)
        return self._query(f"SELECT * FROM {table}{clause}", params)

    def servers(self) -> list[dict[str, Any]]:
        """All server rows by name; JSON columns decoded to lists, ``local`` a bool."""
        return [_decode_server(r) for r in self._query("SELECT * FROM servers ORDER BY name")]

    def latency_samples(
        self, server: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Samples newest first, optionally of one server and at or after ``since``
        (Unix time); ``ok`` is a bool."""
        return [_decode_sample(r) for r in self._recent("latency_samples", server, limit, since)]

    def restarts(
        self, server: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Restart history newest first (``modelserverd history``, ``/v1/restarts``)."""
        return self._recent("restarts", server, limit, since)

    def events(
        self, server: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[dict[str, Any]]:
        """State changes and daemon events newest first."""
        return self._recent("events", server, limit, since)

    def count_restarts_since(self, since: float) -> dict[str, int]:
        """Restarts per server at or after ``since`` (Unix time): the ``restarts``
        field of a server object and the restart metrics come from this."""
        rows = self._query(
            "SELECT server, count(*) AS n FROM restarts WHERE ts >= ? GROUP BY server",
            [iso_utc(since)],
        )
        return {r["server"]: int(r["n"]) for r in rows}

    def close(self) -> None:
        """Close the connection; later reads raise :class:`StoreError`."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()


# --------------------------------------------------------------------------
# The writer

_INSERT_SAMPLE = (
    "INSERT INTO latency_samples (ts, server, source, ok, latency_s, ttft_s, prompt_tokens, "
    "completion_tokens, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EVENT = (
    "INSERT INTO events (ts, server, kind, old_state, new_state, message) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_RESTART = (
    "INSERT INTO restarts (ts, server, reason, attempt, backoff_s, old_pid, new_pid, "
    "exit_code, signal, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The newest restart row of the server, and only while its new pid is unknown:
# a launch that follows no restart (first start) must not claim an old row.
_SET_RESTART_NEW_PID = (
    "UPDATE restarts SET new_pid = ? WHERE id = "
    "(SELECT max(id) FROM restarts WHERE server = ?) AND new_pid IS NULL"
)
_DELETE_SERVER = "DELETE FROM servers WHERE name = ?"
_DELETE_OLD_SAMPLES = (
    "DELETE FROM latency_samples WHERE id IN "
    "(SELECT id FROM latency_samples WHERE ts < ? ORDER BY ts LIMIT ?)"
)

# Errors that no retry can fix: the row itself is bad (a CHECK failed, a value
# SQLite cannot store). Everything else from SQLite (disk full, locked, I/O
# error) is treated as passing and retried.
_BAD_ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    TypeError,
    ValueError,
    OverflowError,
)

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 2.0
_ERROR_LOG_EVERY_S = 60.0

# A sample's error text comes from any user of the socket (POST /v1/samples) or
# from a server's answer: it is kept to this many characters, so a flood of long
# texts neither fills the disk nor the queue. Enough for "ConnectionRefusedError:
# [Errno 111] Connect call failed ('10.0.0.5', 30000)" and the like.
ERROR_TEXT_MAX = 200
# Messages of events and restarts come from the daemon itself (exit codes, health
# answers, reload summaries); longer ones are cut too, at a size that keeps them whole.
MESSAGE_TEXT_MAX = 2000
# The latency samples waiting for the disk are bounded by their size in memory:
# past this, new samples are dropped (and counted) until the queue drains. A
# queued sample takes about 400 bytes, 650 with an error text cut to
# ERROR_TEXT_MAX, so this holds 100,000 to 160,000: a burst of client reports
# while a batch is being committed, or hours of probes while the disk is failing.
DEFAULT_MAX_SAMPLE_BYTES = 64 * 1024 * 1024
# What one queued sample costs besides its texts: the tuple, its timestamp text,
# floats and ints (measured with tracemalloc: about 370 bytes).
_SAMPLE_ROW_BYTES = 400
# health()["last_error"] is cut to this many characters.
HEALTH_ERROR_MAX = 200


def clip_text(text: Any, limit: int) -> Any:
    """``text`` cut to at most ``limit`` characters (the last one an ellipsis when
    cut), with any lone surrogate replaced: such a string cannot be stored as UTF-8
    and would make SQLite refuse the row. Anything but a string is returned as it
    is (a bad value is still refused, and counted, by the writer)."""
    if not isinstance(text, str):
        return text
    if len(text) > limit:
        text = text[: max(0, limit - 1)] + "\u2026"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _ts(ts: float | None) -> str:
    return iso_utc(time.time() if ts is None else ts)


def _server_value(column: str, value: Any) -> Any:
    if column in _SERVER_JSON_COLUMNS and isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if column in _SERVER_TIME_COLUMNS and isinstance(value, (int, float)):
        return iso_utc(float(value))
    if column == "local" and isinstance(value, bool):
        return int(value)
    return value


class _Lane:
    """One queue of the writer, with its own counters and its own failure state,
    so that a failing lane (a big batch of samples on a nearly full disk) never
    holds up another (the restart row behind it)."""

    def __init__(self, name: str, what: str) -> None:
        self.name = name
        self.what = what  # for log lines: "latency samples"
        self.rows: deque[tuple[str, Any, int]] = deque()  # (sql, params, bytes)
        self.bytes = 0
        self.accepted = 0  # rows queued so far
        self.written = 0  # rows handled so far (written, or dropped as bad)
        self.failure: str | None = None  # the current error, while writes fail
        self.failures = 0  # failed attempts in a row
        self.delay = _RETRY_FIRST_S
        self.retry_at = 0.0  # monotonic time of the next attempt after a failure
        self.logged: tuple[str, float] = ("", 0.0)  # last message logged, and when
        self.reported = False  # a failure was logged and its recovery not yet
        # Most rows per transaction; None: the writer's max_batch. The history
        # lane halves it after each failure (down to one row) and doubles it after
        # each success, so on a nearly full disk its rows go in as transactions
        # small enough to fit. Samples keep whole batches: they wait for real room
        # instead of taking the last of it from the history.
        self.limit: int | None = None

    @property
    def pending(self) -> int:
        return self.accepted - self.written


class _Retention:
    """A queued retention delete. Requests made while one waits are merged into it
    (the newest cutoff wins): housekeeping asks every hour, and on a failing disk
    those requests must not pile up."""

    def __init__(self, cutoff_iso: str, batch: int, after: int) -> None:
        self.cutoff_iso = cutoff_iso
        self.batch = batch
        # Samples queued before the request are written first, so that an old
        # sample still in the queue is deleted too (unless samples are failing).
        self.after = after
        self.requests = 0
        self.deleted = 0


class StoreWriter:
    """One background thread owns the write connection; callers never wait on disk.

    ``add_*``, ``upsert_server`` and the rest only append to an in-memory queue
    (a lock held for microseconds) and return; the thread commits queued rows in
    batches of up to ``max_batch``, one transaction each, with prepared
    ``executemany`` inserts. A batch is written once ``max_batch`` rows are
    waiting, ``flush_interval_s`` after the first of them, or at once when
    someone waits in :meth:`flush` or :meth:`close`.

    There are three queues, served in this order:

    1. history: events, restarts and server rows, in the order they were queued.
       They are never dropped: a restart row queued behind a flood of samples is
       still the next thing written, and a write that fails is retried for as long
       as the writer runs.
    2. the retention delete (:meth:`delete_samples_older_than`), once the samples
       queued before it are written.
    3. latency samples, in the order they were queued. Bounded: past
       ``max_sample_bytes`` (an estimate of their memory) or ``max_pending`` rows
       waiting, new samples are dropped and counted in :attr:`dropped` and
       :meth:`health`. A sample's error text is cut to :data:`ERROR_TEXT_MAX`
       characters when it is queued.

    When a write fails for a reason that may pass (disk full, database locked
    for longer than ``busy_timeout_s``, I/O error) the rows are kept and that
    queue is retried with a growing pause (up to 2 s), while the other queues go
    on: on a nearly full disk a single event still fits where a batch of two
    thousand samples does not. :attr:`error` and :meth:`health` report the
    failure and it is logged (warning, at most once a minute per message), until
    a write succeeds again. A row SQLite rejects for itself (a value it cannot
    store) is dropped alone, logged, counted in :attr:`dropped` and reported in
    :attr:`error`; the rest of its batch is kept.

    Restarts: the supervisor queues one row per relaunch when it makes the launch
    (its ``ts`` is the time of the failure or request it answers, with the reason,
    attempt, backoff and the old process' exit). A launch that could not start a
    process is a row too, with ``new_pid`` NULL and the launch's error in
    ``message`` (issue 13, item 3), so a crash loop of failing launches counts in
    "restarts in the last 24 h". A writer that learns the new pid later can fill it
    in with :meth:`set_restart_new_pid`; both go through the history queue, so the
    update lands after the insert.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        flush_interval_s: float = 0.05,
        max_batch: int = 2000,
        max_pending: int = 1_000_000,
        max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.path = str(path)
        self._db = _open(path, busy_timeout_s)
        self._conn = self._db.conn
        self._flush_interval_s = max(0.0, float(flush_interval_s))
        self._max_batch = int(max_batch)
        self._max_pending = int(max_pending)
        self._max_sample_bytes = int(max_sample_bytes)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits here
        self._done = threading.Condition(self._lock)  # flush() waits here
        self._history = _Lane("history", "events, restarts and server rows")
        self._retention = _Lane("retention", "the deletion of old latency samples")
        self._samples = _Lane("samples", "latency samples")
        self._lanes = (self._history, self._retention, self._samples)  # in serving order
        self._retention_job: _Retention | None = None
        self._flushers = 0
        self._closing = False
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._bad_row_error: str | None = None
        self._last_error: str | None = None
        self._crashed: str | None = None
        self._dropped_samples = 0  # refused by the queue bound, or by SQLite
        self._dropped_rows = 0  # other rows SQLite refused
        self._overflow_logged_at = 0.0

    # -- queueing --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise StoreError(f"the state database writer for {self.path} is closed")

    def _put(self, lane: _Lane, sql: str, params: Any, size: int = 0) -> None:
        with self._lock:
            self._check_open()
            if lane is self._samples and (
                len(lane.rows) >= self._max_pending or lane.bytes + size > self._max_sample_bytes
            ):
                self._drop_sample_locked()
                return
            lane.rows.append((sql, params, size))
            lane.bytes += size
            lane.accepted += 1
            n = len(lane.rows)
            # Wake the writer on the first row (it starts its batching clock, or
            # this lane is served while another one waits to retry) and when a
            # full batch is waiting; in between it is busy or on its clock.
            if n == 1 or n == self._max_batch:
                self._wake.notify()

    def _drop_sample_locked(self) -> None:
        self._dropped_samples += 1
        now = time.monotonic()
        if now - self._overflow_logged_at > _ERROR_LOG_EVERY_S:
            self._overflow_logged_at = now
            lane = self._samples
            log.error(
                "state database %s: %d latency samples (%d KiB) wait for the disk (last "
                "error: %s); dropping new samples until they are written (%d dropped so "
                "far); events and restarts are kept",
                self.path,
                len(lane.rows),
                lane.bytes // 1024,
                lane.failure or self._last_error,
                self._dropped_samples,
            )

    def add_sample(
        self,
        *,
        server: str,
        source: str,
        ok: bool,
        latency_s: float | None,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Queue one latency sample; ``source`` is ``"probe"`` or ``"client"``.

        ``error`` is cut to :data:`ERROR_TEXT_MAX` characters. Dropped (and
        counted) instead when the sample queue is full.
        """
        if source not in SOURCES:
            raise ValueError(f"sample source must be one of {SOURCES}, not {source!r}")
        error = clip_text(error, ERROR_TEXT_MAX)
        size = _SAMPLE_ROW_BYTES + (len(server) if isinstance(server, str) else 0)
        size += 50 + len(error) if isinstance(error, str) else 0
        self._put(
            self._samples,
            _INSERT_SAMPLE,
            (
                _ts(ts),
                server,
                source,
                1 if ok else 0,
                latency_s,
                ttft_s,
                prompt_tokens,
                completion_tokens,
                error,
            ),
            size,
        )

    def add_event(
        self,
        *,
        server: str | None,
        kind: str,
        old_state: str | None = None,
        new_state: str | None = None,
        message: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Queue one event (a state change, or with ``server=None`` a daemon event).
        ``message`` is cut to :data:`MESSAGE_TEXT_MAX` characters."""
        self._put(
            self._history,
            _INSERT_EVENT,
            (_ts(ts), server, kind, old_state, new_state, clip_text(message, MESSAGE_TEXT_MAX)),
        )

    def add_restart(
        self,
        *,
        server: str,
        reason: str,
        attempt: int,
        backoff_s: float | None,
        old_pid: int | None,
        new_pid: int | None = None,
        exit_code: int | None = None,
        signal: int | None = None,
        message: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Queue one restart row; ``reason`` is one of ``states.RESTART_REASONS``.

        Returns nothing: the row is written later, so its id is not known here.
        Pass ``new_pid`` if the new process already exists, else fill it in with
        :meth:`set_restart_new_pid` once it does. ``message`` is cut to
        :data:`MESSAGE_TEXT_MAX` characters.
        """
        if reason not in states.RESTART_REASONS:
            raise ValueError(
                f"restart reason must be one of {states.RESTART_REASONS}, not {reason!r}"
            )
        self._put(
            self._history,
            _INSERT_RESTART,
            (
                _ts(ts),
                server,
                reason,
                attempt,
                backoff_s,
                old_pid,
                new_pid,
                exit_code,
                signal,
                clip_text(message, MESSAGE_TEXT_MAX),
            ),
        )

    def set_restart_new_pid(self, *, server: str, new_pid: int) -> None:
        """Record the pid of the process launched for ``server``'s newest restart.

        Changes nothing if that restart row already has a new pid (so calling it
        for every launch, first starts included, is harmless).
        """
        self._put(self._history, _SET_RESTART_NEW_PID, (new_pid, server))

    def upsert_server(self, row: dict[str, Any]) -> None:
        """Insert or update the row of server ``row["name"]``.

        Only the columns given are changed, so the supervisor can update ``state``
        and ``pid`` (or ``sglang_version``, once the server reports it) without
        restating the config. Lists (``gpus``, ``cmdline``, ``descendants``) are
        stored as JSON, Unix times in ``started_at`` / ``updated_at`` as ISO text;
        ``updated_at`` defaults to now. Unknown columns raise ``ValueError`` at
        once, in the caller.
        """
        if not row.get("name"):
            raise ValueError("a server row needs a name")
        unknown = sorted(set(row) - set(SERVER_COLUMNS))
        if unknown:
            raise ValueError(f"unknown server columns: {', '.join(unknown)}")
        values = {c: _server_value(c, v) for c, v in row.items()}
        values.setdefault("updated_at", iso_utc())
        columns = [c for c in SERVER_COLUMNS if c in values]
        updates = [c for c in columns if c != "name"]
        sql = (
            f"INSERT INTO servers ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT(name) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in updates)
        )
        self._put(self._history, sql, tuple(values[c] for c in columns))

    def delete_server(self, name: str) -> None:
        """Forget a server (removed from the config); its history rows stay."""
        self._put(self._history, _DELETE_SERVER, (name,))

    def delete_samples_older_than(self, cutoff: float, batch: int = 500) -> None:
        """Queue the retention delete of samples with ``ts`` before ``cutoff``.

        It runs as many transactions of at most ``batch`` rows each, so the write
        lock is never held long (another writer, such as an operator's
        ``sqlite3`` session, gets its turn in between) and the WAL stays small.
        Restarts and events are kept for good. A request made while an earlier
        one still waits is merged into it.
        """
        if batch < 1:
            raise ValueError("batch must be >= 1")
        cutoff_iso = iso_utc(cutoff)
        with self._lock:
            self._check_open()
            job = self._retention_job
            if job is None:
                job = self._retention_job = _Retention(cutoff_iso, int(batch), 0)
                self._wake.notify()
            job.cutoff_iso = max(job.cutoff_iso, cutoff_iso)
            job.batch = int(batch)
            job.after = self._samples.accepted
            job.requests += 1
            self._retention.accepted += 1

    # -- waiting and state -----------------------------------------------

    @property
    def pending(self) -> int:
        """Rows accepted but not yet on disk (a queued retention delete counts as one)."""
        with self._lock:
            return sum(lane.pending for lane in self._lanes)

    @property
    def error(self) -> str | None:
        """The current write error while it lasts (cleared when writes succeed
        again), or the last row dropped as bad; ``None`` when all is well."""
        with self._lock:
            return self._current_error_locked() or self._bad_row_error

    def _current_error_locked(self) -> str | None:
        if self._crashed:
            return self._crashed
        return next((lane.failure for lane in self._lanes if lane.failure), None)

    @property
    def dropped(self) -> int:
        """Rows not written: samples refused while their queue was full, and rows
        SQLite rejected. Each drop is logged."""
        with self._lock:
            return self._dropped_samples + self._dropped_rows

    def health(self) -> dict[str, Any]:
        """What ``/v1/status`` shows under ``"writer"``:

        * ``ok``: writes succeed (no queue is failing, the thread runs);
        * ``last_error``: the current failure while not ok, else the most recent
          one (``None`` if there never was one), cut to about 200 characters;
        * ``queued_samples``: latency samples waiting for the disk;
        * ``queued_events``: events, restarts and server rows waiting for the disk;
        * ``dropped_samples``: samples never written (the queue was full, or SQLite
          refused them) since the daemon started.
        """
        with self._lock:
            current = self._current_error_locked()
            thread = self._thread
            died = (
                thread is not None
                and not thread.is_alive()
                and not self._closing
                and current is None
            )
            if died:
                current = "the state database writer thread has stopped"
            return {
                "ok": current is None,
                "last_error": clip_text(current or self._last_error, HEALTH_ERROR_MAX),
                "queued_samples": len(self._samples.rows),
                "queued_events": len(self._history.rows),
                "dropped_samples": self._dropped_samples,
            }

    def start(self) -> None:
        """Start the writer thread (rows queued before this are kept)."""
        with self._lock:
            self._check_open()
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    def _targets_locked(self) -> list[tuple[_Lane, int]]:
        return [(lane, lane.accepted) for lane in self._lanes]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row queued before this call is on disk.

        Returns ``False`` if that did not happen within ``timeout`` seconds (the
        disk is failing: see :attr:`error`) or the writer is not running.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            targets = self._targets_locked()

            def reached() -> bool:
                return all(lane.written >= target for lane, target in targets)

            if reached():
                return True
            thread = self._thread
            if thread is None or not thread.is_alive():
                return False
            self._flushers += 1
            self._wake.notify()
            try:
                while not reached():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not thread.is_alive():
                        return False
                    self._done.wait(remaining)
                return True
            finally:
                self._flushers -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, history first, stop the thread, close the file.

        New rows are refused from the moment this is called. If the writes still
        fail after ``timeout`` seconds (disk full), the rows left are given up
        with an error in the log saying how many of which; otherwise nothing is
        lost.
        """
        with self._lock:
            if self._closing and self._thread is None:
                return
            self._closing = True
            thread = self._thread
            self._wake.notify()
        if thread is None and self.pending:
            # Never started: write what was queued, then stop.
            thread = threading.Thread(target=self._run, name="store-writer")
            thread.start()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._abandon.set()
                with self._lock:
                    self._wake.notify()
                thread.join(5.0)
            with self._lock:
                history, samples = self._history.pending, self._samples.pending
                error = self._current_error_locked() or self._last_error
            if history or samples:
                log.error(
                    "state database %s: %d events, restarts and server rows and %d latency "
                    "samples could not be written before closing (%s)",
                    self.path,
                    history,
                    samples,
                    error,
                )
        with self._lock:
            self._thread = None
        if thread is None or not thread.is_alive():
            try:
                # Fold the WAL back into the file so it is complete on its own;
                # PASSIVE never waits for a reader (an operator's `sqlite3`).
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
            self._db.close()

    def __enter__(self) -> StoreWriter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the thread ------------------------------------------------------

    def _ready_lane_locked(self, now: float) -> _Lane | None:
        """The first lane, in serving order, with work that may be tried now."""
        for lane in self._lanes:
            if now < lane.retry_at:
                continue
            if lane is self._retention:
                job = self._retention_job
                samples = self._samples
                if job is not None and (
                    samples.written >= job.after or samples.failure is not None
                ):
                    return lane
            elif lane.rows:
                return lane
        return None

    def _has_work_locked(self) -> bool:
        return bool(self._history.rows or self._samples.rows or self._retention_job)

    def _next_step(self) -> tuple[_Lane, Any] | None:
        """Wait for work that may be tried and return it; ``None`` means stop."""
        with self._lock:
            deadline: float | None = None
            while True:
                if self._abandon.is_set():
                    return None
                if not self._has_work_locked():
                    if self._closing:
                        return None
                    deadline = None
                    self._wake.wait()
                    continue
                now = time.monotonic()
                lane = self._ready_lane_locked(now)
                if lane is None:
                    # Every lane with work waits to retry after a failure.
                    waiting = [ln.retry_at for ln in self._lanes if ln.retry_at > now]
                    self._wake.wait(max(0.001, min(waiting, default=now + 0.05) - now))
                    continue
                if lane is self._retention:
                    job = self._retention_job
                    assert job is not None
                    return lane, (job.cutoff_iso, job.batch, job.requests)
                # Batching: wait for more rows, unless a batch is full or someone waits.
                if not (self._flushers or self._closing) and all(
                    len(ln.rows) < self._max_batch for ln in (self._history, self._samples)
                ):
                    if deadline is None:
                        deadline = now + self._flush_interval_s
                    if now < deadline:
                        self._wake.wait(deadline - now)
                        continue
                size = min(lane.limit or self._max_batch, self._max_batch)
                batch = [(sql, params) for sql, params, _ in itertools.islice(lane.rows, size)]
                return lane, batch

    def _run(self) -> None:
        try:
            while True:
                step = self._next_step()
                if step is None:
                    return
                lane, work = step
                try:
                    if lane is self._retention:
                        count = self._delete_old_batch(work[0], work[1])
                    else:
                        self._write_batch(work)
                except Exception as exc:  # the writer must outlive any error
                    self._failed(lane, exc)
                    continue
                if lane is self._retention:
                    self._retention_done(work, count)
                else:
                    self._written(lane, len(work))
        except BaseException as exc:  # pragma: no cover - a bug; health() reports it
            message = f"the state database writer thread failed: {type(exc).__name__}: {exc}"
            with self._lock:
                self._crashed = self._last_error = message
                self._done.notify_all()
            log.exception("state database %s: %s", self.path, message)

    def _failed(self, lane: _Lane, exc: Exception) -> None:
        message = f"writing to {self.path} failed: {type(exc).__name__}: {exc}"
        now = time.monotonic()
        with self._lock:
            lane.failures += 1
            lane.failure = self._last_error = message
            size = min(lane.limit or self._max_batch, self._max_batch, len(lane.rows))
            if lane is self._history and size > 1:
                # Try a transaction half the size at once; the pause comes when
                # a single row does not go in either.
                lane.limit = size // 2
                lane.retry_at = now
            else:
                lane.retry_at = now + lane.delay
                lane.delay = min(lane.delay * 2, _RETRY_MAX_S)
            last_message, logged_at = lane.logged
            say = message != last_message or now - logged_at > _ERROR_LOG_EVERY_S
            if say:
                lane.logged = (message, now)
                lane.reported = True
            # A flush that waits on this lane goes on waiting; one that waits on
            # another lane must see that lane's progress.
            self._done.notify_all()
        if say:
            log.warning("%s; retrying (%s are kept)", message, lane.what)

    def _recovered_locked(self, lane: _Lane) -> int:
        """Reset ``lane`` after a success; the failures to report, 0 if none were
        logged (so a lane that fails now and then says so once a minute at most)."""
        if lane.limit is not None:
            lane.limit *= 2
            if lane.limit >= self._max_batch:
                lane.limit = None
        failures = lane.failures if lane.reported else 0
        lane.reported = False
        lane.failures = 0
        lane.failure = None
        lane.delay = _RETRY_FIRST_S
        lane.retry_at = 0.0
        return failures

    def _written(self, lane: _Lane, count: int) -> None:
        with self._lock:
            for _ in range(count):
                _, _, size = lane.rows.popleft()
                lane.bytes -= size
            lane.written += count
            failures = self._recovered_locked(lane)
            self._done.notify_all()
        if failures:
            log.warning(
                "state database %s: %s are written again after %d failed attempts",
                self.path,
                lane.what,
                failures,
            )

    def _retention_done(self, work: tuple[str, int, int], count: int) -> None:
        cutoff_iso, batch, requests = work
        finished = None
        with self._lock:
            lane = self._retention
            job = self._retention_job
            failures = self._recovered_locked(lane)
            assert job is not None
            job.deleted += count
            if count < batch:
                # Requests merged in since this pass began may want a later cutoff
                # or newer samples deleted: answer the ones it served, keep the job
                # (it runs again at once) for the rest.
                lane.written += requests
                job.requests -= requests
                if job.requests == 0:
                    self._retention_job = None
                    finished = job.deleted
                self._done.notify_all()
        if failures:
            log.warning(
                "state database %s: %s succeeds again after %d failed attempts",
                self.path,
                lane.what,
                failures,
            )
        if finished:
            log.info(
                "state database %s: deleted %d latency samples older than %s",
                self.path,
                finished,
                cutoff_iso,
            )

    def _write_batch(self, batch: list[tuple[str, Any]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                for sql, group in itertools.groupby(batch, key=lambda item: item[0]):
                    conn.executemany(sql, [params for _, params in group])
            except _BAD_ROW_ERRORS:
                # Some row is bad; find it without giving up the others.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                self._write_rows_one_by_one(batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_rows_one_by_one(self, batch: list[tuple[str, Any]]) -> None:
        conn = self._conn
        for sql, params in batch:
            conn.execute("SAVEPOINT row")
            try:
                conn.execute(sql, params)
            except _BAD_ROW_ERRORS as exc:
                conn.execute("ROLLBACK TO row")
                message = f"dropped a row SQLite refused ({type(exc).__name__}: {exc})"
                with self._lock:
                    if sql == _INSERT_SAMPLE:
                        self._dropped_samples += 1
                    else:
                        self._dropped_rows += 1
                    self._bad_row_error = self._last_error = message
                log.error(
                    "state database %s: dropped a row SQLite refused: %s: %s; row: %.300r",
                    self.path,
                    type(exc).__name__,
                    exc,
                    params,
                )
            conn.execute("RELEASE row")

    def _delete_old_batch(self, cutoff_iso: str, batch: int) -> int:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = conn.execute(_DELETE_OLD_SAMPLES, (cutoff_iso, batch)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return count


def _recent_clause(server: str | None, since: float | None, limit: int) -> tuple[str, list[Any]]:
    """``WHERE ... ORDER BY ... LIMIT ?`` for the newest rows of a history table (one
    server's, since a time), and its parameters."""
    where: list[str] = []
    params: list[Any] = []
    if server is not None:
        where.append("server = ?")
        params.append(server)
    if since is not None:
        where.append("ts >= ?")
        params.append(iso_utc(since))
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    return f"{clause} ORDER BY ts DESC, id DESC LIMIT ?", [*params, int(limit)]


# --------------------------------------------------------------------------
# Reading without write access (`modelserverd history` run by any user)


def read_history(
    path: str | Path, *, server: str | None = None, since: float | None = None, limit: int = 100
) -> dict[str, Any]:
    """Restarts and events newest first, and every server name the file knows, read
    through a read-only connection that creates and changes nothing.

    :class:`Store` needs write access (it checks, creates and migrates); an operator
    who may read state.db but not write its directory must still see the history.
    While a writer has the file open its ``-wal`` and ``-shm`` files exist and a
    read-only connection shares them. Without them a read-only connection would
    have to create them (and, run as root, would leave root-owned files the
    daemon's user cannot open), so the file is read as immutable: no writer is
    there to change it. Returns ``{"restarts", "events", "servers"}``; raises
    :class:`StoreError` with what to do.
    """
    p = Path(path).absolute()
    if not os.access(p, os.R_OK):
        raise StoreError(f"the state database {p} is not readable by uid {os.geteuid()}")
    mode = "mode=ro" if Path(f"{p}-wal").exists() else "mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(f"{p.as_uri()}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the state database {p} to read: {exc}") from exc
    recent, params = _recent_clause(server, since, limit)

    def rows(sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cursor = conn.execute(sql, tuple(args))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    try:
        conn.execute("BEGIN")  # one snapshot for the three reads
        result: dict[str, Any] = {
            "restarts": rows(f"SELECT * FROM restarts{recent}", params),
            "events": rows(f"SELECT * FROM events{recent}", params),
            "servers": sorted(
                r["name"]
                for r in rows(
                    "SELECT name FROM servers UNION SELECT server FROM restarts "
                    "UNION SELECT server FROM events WHERE server IS NOT NULL"
                )
            ),
        }
    except sqlite3.Error as exc:
        raise StoreError(f"reading the state database {p} failed: {exc}") from exc
    finally:
        conn.close()
    return result
