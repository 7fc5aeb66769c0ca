"""What the operator's tables show, and how they fit a terminal.

Shared by ``modelserverd`` and ``ms-client`` so the two tools print one figure
one way: latencies in seconds with three decimals under headers that name the
unit, restarts counted over the same 24 hours, errors with their age, and every
cut marked with an ellipsis. Everything here but :func:`output_width` is a pure
function of its inputs (the time and the width are passed in), so tables of
cases test it.
"""

from __future__ import annotations

import ast
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from . import states

ELLIPSIS = "\u2026"
GAP = 2  # spaces between columns
RESTART_WINDOW_S = 86400.0  # RESTARTS_24H in `modelserverd status` and `ms-client servers`
# A latency is the server's current speed only while it runs and is probed; a
# stopped or fatal server's estimate is from its last run and would mislead.
LATENCY_STATES = (states.READY, states.UNHEALTHY)


def parse_ts(text: Any) -> float:
    """A row's ``ts`` (``2026-11-25T17:40:00.123Z``) as Unix time. Here rather than
    :func:`supervisord_ms.store.parse_iso` so that ``ms-client`` does not import the
    database layer; raises ``ValueError`` for anything else."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"not a timestamp: {text!r}")
    value = text[:-1] + "+00:00" if text[-1] in "Zz" else text
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# --- cells ------------------------------------------------------------------------------


def one_line(value: Any) -> str:
    """A cell's text: ``-`` for nothing, runs of whitespace (newlines of a
    multi-line error) as one space, so a row stays one line."""
    if value is None or value == "":
        return "-"
    return " ".join(str(value).split())


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, the last one ``…`` when cut."""
    if len(text) <= width:
        return text
    return text[: width - 1] + ELLIPSIS if width > 0 else ""


def cut_words(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut after its last whole word that
    fits and marked ``…``; only a first word longer than the room is cut inside."""
    if len(text) <= width:
        return text
    if width <= 1:
        return cut(text, width)
    head = text[: width - 1]
    if text[width - 1] != " ":  # the room ends inside a word: back up to its start
        space = head.rfind(" ")
        if space > 0:
            head = head[:space]
    return head.rstrip(" ,;:") + ELLIPSIS


def seconds(value: float | None) -> str:
    """A latency or delay in seconds, three decimals (a millisecond), for columns
    named ``..._S``; ``-`` when unknown."""
    return "-" if value is None else f"{value:.3f}"


def latency_cell(server: Mapping[str, Any]) -> str:
    """LATENCY_S of a server object: its estimate while it is ready or unhealthy,
    ``-`` in every other state (the estimate of a stopped server is history)."""
    if server.get("state") not in LATENCY_STATES:
        return "-"
    return seconds(server.get("latency_s"))


def age(delta_s: float) -> str:
    """``45s``, ``12m``, ``3h``, ``2d``: how long ago, in its largest whole unit."""
    delta = max(0, round(delta_s))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta // size}{unit}"
    return f"{delta}s"


def restarts_since(rows: Iterable[Mapping[str, Any]], since: float) -> dict[str, int]:
    """Restart rows (``/v1/restarts``) per server at or after ``since`` (Unix time)."""
    counts: dict[str, int] = {}
    for row in rows:
        try:
            at = parse_ts(row.get("ts"))
        except ValueError:
            continue
        if at >= since:
            counts[row["server"]] = counts.get(row["server"], 0) + 1
    return counts


def error_time(name: str, error: str | None, rows: Iterable[Mapping[str, Any]]) -> float | None:
    """When ``error`` happened, from the newest restart row of ``name`` that carries
    it (a relaunch records the failure that caused it); ``None`` when none does."""
    if not error:
        return None
    for row in rows:  # newest first, as the API answers
        message = row.get("message")
        if row.get("server") == name and message and error.startswith(message):
            try:
                return parse_ts(row.get("ts"))
            except ValueError:
                return None
    return None


def error_cell(server: Mapping[str, Any], at: float | None, now: float) -> str:
    """LAST_ERROR of a server object.

    With its age when known (``12m ago: pid 4242 exited with code 1``). A ready
    server's error is from before it became ready: shown only when dated, since an
    undated one reads as a present fault (``history`` keeps every error). In every
    other state the error is why the server is not ready, so it is always shown.
    """
    error = server.get("last_error")
    if not error:
        return "-"
    if at is None:
        return "-" if server.get("state") == states.READY else one_line(error)
    return f"{age(now - at)} ago: {one_line(error)}"


# --- events -------------------------------------------------------------------------------

_RELOAD_PARTS = (
    ("added", "added"),
    ("removed", "removed"),
    ("restarted", "restarted"),
    ("changed_stopped", "changed while stopped (not started)"),
    ("unchanged", "unchanged"),
)


def reload_summary(result: Mapping[str, Any]) -> str:
    """A reload's result as one readable line: ``added c; restarted a; unchanged b``
    (the ``reload`` event's message, and how ``history`` shows older ones)."""
    parts = [
        f"{label} {', '.join(map(str, result[key]))}"
        for key, label in _RELOAD_PARTS
        if result.get(key)
    ]
    if result.get("needs_daemon_restart"):
        parts.append(
            "needs a daemon restart to apply " + ", ".join(map(str, result["needs_daemon_restart"]))
        )
    return "; ".join(parts) or "no servers"


def event_text(kind: str | None, message: str | None) -> str:
    """An event's message for people. Reload events written before messages were
    text hold a Python dict's repr: read it as data (never run it) and summarise."""
    text = message or ""
    if kind == "reload" and text.startswith("{"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return one_line(text)
        if isinstance(value, dict):
            return reload_summary(value)
    return one_line(text)


# --- fitting a table to the terminal ------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a table: ``drop`` > 0 lets it go when the rows are too wide
    (highest first); ``flex`` marks free text, cut at a word (with ``…``) down to
    ``min_width`` before any column is dropped."""

    header: str
    drop: int = 0
    flex: bool = False
    min_width: int = 20


@dataclass(frozen=True)
class Layout:
    """Which columns are shown (indexes into the table's columns) and how wide."""

    shown: tuple[int, ...]
    widths: tuple[int, ...]
    dropped: tuple[str, ...]
    width: int | None

    def cells(self, columns: Sequence[Column], row: Sequence[str]) -> list[str]:
        """The shown cells of ``row``, cut to their column and padded (the last
        one is not padded)."""
        out = []
        for n, (i, w) in enumerate(zip(self.shown, self.widths, strict=True)):
            text = row[i]
            if len(text) > w:
                text = cut_words(text, w) if columns[i].flex else cut(text, w)
            out.append(text if n == len(self.shown) - 1 else text.ljust(w))
        return out

    def line(self, cells: Sequence[str]) -> str:
        """Cells joined; a line still too wide for the terminal (the columns that
        are never dropped do not fit) is cut with ``…``."""
        text = (" " * GAP).join(cells).rstrip()
        return cut(text, self.width) if self.width else text


def fit(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> Layout:
    """Shrink the free text, then drop the least important columns, until rows of
    ``rows`` fit in ``width`` characters; ``None`` is no limit."""
    natural = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    shown = list(range(len(columns)))
    if width is None:
        return Layout(tuple(shown), tuple(natural), (), None)

    def least(i: int) -> int:
        c = columns[i]
        return min(natural[i], max(len(c.header), c.min_width)) if c.flex else natural[i]

    def needed(indexes: Sequence[int]) -> int:
        return sum(least(i) for i in indexes) + GAP * (len(indexes) - 1)

    dropped = []
    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop):
        if needed(shown) <= width:
            break
        shown.remove(i)
        dropped.append(columns[i].header)
    widths = {i: least(i) for i in shown}
    spare = width - needed(shown)
    for i in shown:  # free text takes what is left, left to right
        if columns[i].flex and spare > 0:
            extra = min(spare, natural[i] - widths[i])
            widths[i] += extra
            spare -= extra
    return Layout(tuple(shown), tuple(widths[i] for i in shown), tuple(dropped), width)


def table_lines(
    columns: Sequence[Column], rows: Sequence[Sequence[Any]], width: int | None
) -> list[str]:
    """Header and rows as fitted lines, plain text (no colour)."""
    cells = [[one_line(v) for v in row] for row in rows]
    layout = fit(columns, cells, width)
    lines = [layout.line(layout.cells(columns, [c.header for c in columns]))]
    lines += [layout.line(layout.cells(columns, row)) for row in cells]
    note = dropped_note(layout)
    return lines + (note.splitlines() if note else [])


def dropped_note(layout: Layout) -> str | None:
    """The lines under a table that lost columns to the terminal's width, wrapped
    (not cut) to it."""
    if not layout.dropped:
        return None
    text = (
        f"({', '.join(layout.dropped)} left out to fit {layout.width} columns; "
        "--json or a wider terminal shows them)"
    )
    return textwrap.fill(text, width=max(layout.width or 0, 20), break_on_hyphens=False)


def output_width(stream: IO[str], environ: Mapping[str, str] = os.environ) -> int | None:
    """How wide a table may be: ``$COLUMNS`` when set (``watch`` sets it), else the
    terminal's width when ``stream`` is one; ``None`` (no limit) for a pipe or a
    file, so ``grep`` and scripts get whole rows."""
    env = environ.get("COLUMNS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or None
    except (OSError, ValueError, AttributeError):
        pass
    return None
