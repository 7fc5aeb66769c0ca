"""What the operator reads (issue 13, items 10 to 13): tables that fit the terminal
and mark every cut, one latency unit and one restart window in both tools, errors
with their age, history that says when it is empty, help whose examples keep their
lines, and config messages that name the caller's own way to pass a file.

No daemon here: the commands get the daemon's answers from stand-ins, and the
history from a state database written for the test."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from ms_client import ConfigProblem, ModelServer
from ms_client import cli as client_cli
from test_client_fakes import write_config

from supervisord_ms import cli as cli_module
from supervisord_ms import display
from supervisord_ms.display import ELLIPSIS, Column
from supervisord_ms.store import StoreWriter, iso_utc

pytest_plugins = ["test_client_fakes"]  # the daemon (FakeDaemon) and short_dir fixtures


def runner(columns: str | None = None) -> CliRunner:
    """A runner whose output is a pipe ``columns`` wide; None: no $COLUMNS, whole rows
    (whatever the environment the tests run in says)."""
    return CliRunner(env={"COLUMNS": columns})


NOW = time.time()
LONG_ERROR = (
    "pid 4242 exited with code 1 after loading the weights of Meta-Llama-3.1-70B-Instruct "
    "from /models/llama70b while capturing CUDA graphs for batch sizes 1 to 160"
)


# --- cells ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [
        ("short", 10, "short"),
        ("exactly ten", 11, "exactly ten"),
        ("/health answered 200 (pid 14369)", 24, "/health answered 200…"),
        ("/health answered 200 (pid 14369)", 26, "/health answered 200 (pid…"),
        ("cut here please", 9, "cut here…"),
        ("one two", 5, "one…"),
        ("Supercalifragilistic", 8, "Superca…"),  # one word longer than the room
        ("a, b; c", 5, "a…"),
        ("a, b; c", 6, "a, b…"),
    ],
)
def test_cut_words_cuts_after_a_whole_word(text: str, width: int, expected: str) -> None:
    got = display.cut_words(text, width)
    assert got == expected and len(got) <= width
    assert got.endswith(ELLIPSIS) == (text != got)


def test_cells_are_one_line_and_dash_for_nothing() -> None:
    assert display.one_line("refused:\n  servers[0].port: bad\n") == "refused: servers[0].port: bad"
    assert display.one_line(None) == display.one_line("") == "-"


@pytest.mark.parametrize(
    ("state", "latency", "cell"),
    [
        ("ready", 0.25, "0.250"),
        ("unhealthy", 1.5, "1.500"),
        ("ready", None, "-"),
        ("stopped", 0.25, "-"),
        ("fatal", 0.25, "-"),
        ("backoff", 0.25, "-"),
        ("unreachable", 0.25, "-"),
    ],
)
def test_latency_is_seconds_with_three_decimals_and_only_while_serving(
    state: str, latency: float | None, cell: str
) -> None:
    assert display.latency_cell({"state": state, "latency_s": latency}) == cell


def _restart(
    server: str, ago_s: float, message: str | None = None, now: float = NOW
) -> dict[str, Any]:
    return {"server": server, "ts": iso_utc(now - ago_s), "message": message, "reason": "crash"}


def test_errors_carry_their_age_and_a_ready_server_drops_an_undated_one() -> None:
    rows = [_restart("b", 60), _restart("a", 720, "pid 7 exited with code 1")]
    ready = {"name": "a", "state": "ready", "last_error": "pid 7 exited with code 1"}
    at = display.error_time("a", ready["last_error"], rows)
    assert at == pytest.approx(NOW - 720, abs=0.01)
    assert display.error_cell(ready, at, NOW) == "12m ago: pid 7 exited with code 1"
    assert display.error_cell(ready, None, NOW) == "-"
    backoff = {**ready, "state": "backoff"}  # why it is not ready: always shown
    assert display.error_cell(backoff, None, NOW) == "pid 7 exited with code 1"
    assert display.error_cell({"state": "ready", "last_error": None}, None, NOW) == "-"


def test_restarts_are_counted_over_24_hours() -> None:
    rows = [_restart("a", 60), _restart("a", 3600 * 23), _restart("a", 3600 * 25), _restart("b", 5)]
    assert display.restarts_since(rows, NOW - display.RESTART_WINDOW_S) == {"a": 2, "b": 1}


def test_reload_events_read_as_text_old_and_new() -> None:
    old = str({"added": ["c"], "removed": [], "restarted": ["a"], "unchanged": ["b"]})
    assert display.event_text("reload", old) == "added c; restarted a; unchanged b"
    assert display.event_text("reload", "{'added': __import__('os')}").startswith("{'added'")
    assert display.event_text("state", "ready\nnow") == "ready now"
    needs = {"unchanged": ["a"], "needs_daemon_restart": ["socket"]}
    assert display.reload_summary(needs) == "unchanged a; needs a daemon restart to apply socket"


# --- fitting ---------------------------------------------------------------------------------

COLUMNS = [
    Column("NAME"),
    Column("VERSION", drop=2),
    Column("PID", drop=1),
    Column("STATE"),
    Column("LAST_ERROR", flex=True, min_width=12),
]
ROW = ["llama8b-a", "0.5.4", "123456", "ready", "the quick brown fox jumps over the lazy dog"]


def test_fit_keeps_whole_rows_without_a_width() -> None:
    lines = display.table_lines(COLUMNS, [ROW], None)
    assert lines[1].split("  ")[-1] == ROW[-1] and len(lines) == 2


def test_fit_cuts_free_text_first_then_drops_the_least_important() -> None:
    layout = display.fit(COLUMNS, [ROW], 60)
    assert layout.dropped == ()
    line = layout.line(layout.cells(COLUMNS, ROW))
    assert len(line) <= 60 and line.endswith(ELLIPSIS) and "lazy dog" not in line
    narrow = display.table_lines(COLUMNS, [ROW], 40)
    assert narrow[0].split() == ["NAME", "PID", "STATE", "LAST_ERROR"]  # VERSION went first
    assert all(len(line) <= 40 for line in narrow)
    assert "VERSION left out to fit 40 columns" in " ".join(narrow[2:])


def test_a_line_that_cannot_fit_is_cut_with_an_ellipsis() -> None:
    lines = display.table_lines(COLUMNS, [ROW], 20)
    assert all(len(line) <= 20 for line in lines)
    assert lines[1].endswith(ELLIPSIS)


def test_output_width_is_columns_or_the_terminal_or_none_for_a_pipe(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as pipe_like:
        assert display.output_width(pipe_like, {"COLUMNS": "72"}) == 72
        assert display.output_width(pipe_like, {}) is None
        assert display.output_width(pipe_like, {"COLUMNS": "wide"}) is None


# --- modelserverd status and ms-client servers ------------------------------------------------

SERVERS = [
    {
        "name": "llama8b-a",
        "ip": "10.0.0.5",
        "port": 30000,
        "model_size": "8B",
        "gpus": [0],
        "local": True,
        "state": "ready",
        "pid": 4321,
        "uptime_s": 600,
        "latency_s": 0.25,
        "last_error": "pid 4242 exited with code 1",
        "sglang_version": "0.5.4",
        "restarts": 9,
    },
    {
        "name": "llama8b-b",
        "ip": "10.0.0.5",
        "port": 30001,
        "model_size": "8B",
        "gpus": [1],
        "local": True,
        "state": "fatal",
        "pid": None,
        "uptime_s": None,
        "latency_s": 0.31,
        "last_error": LONG_ERROR,
        "sglang_version": None,
        "restarts": 9,
    },
    {
        "name": "llama8b-c",
        "ip": "10.0.0.5",
        "port": 30002,
        "model_size": "8B",
        "gpus": [2],
        "local": True,
        "state": "stopped",
        "pid": None,
        "uptime_s": None,
        "latency_s": 0.4,
        "last_error": "an error from last week",
        "sglang_version": None,
        "restarts": 0,
    },
]
# a: crashed 12 minutes ago (dated), and once 30 h ago (outside the window); b: twice.
RESTARTS = [
    ("llama8b-a", 720, "pid 4242 exited with code 1"),
    ("llama8b-b", 800, "pid 11 exited with code 3"),
    ("llama8b-b", 900, "pid 10 exited with code 3"),
    ("llama8b-a", 30 * 3600, "pid 1 exited with code 1"),
]


def _status_api(config: Any, method: str, path: str, body: Any = None) -> Any:
    if path == "/v1/status":
        return {"version": "test", "pid": 1, "uptime_s": 5, "config_path": config.path}
    if path == "/v1/servers":
        return {"servers": [dict(s) for s in SERVERS]}
    assert path.startswith("/v1/restarts"), path
    # dated when asked, as the daemon's rows would be: the command ages them by the clock
    now = time.time()
    return {"restarts": [_restart(*r, now=now) for r in RESTARTS]}


@pytest.fixture
def status_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(cli_module, "_api", _status_api)
    path = tmp_path / "config.toml"
    path.write_text(
        '[[servers]]\nname = "llama8b-a"\nip = "10.0.0.5"\nport = 30000\n'
        'model_size = "8B"\nmodel_path = "/m"\n'
    )
    return str(path)


def _rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """Cells by header of an aligned table (the header starts with NAME)."""
    header_at = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    header = lines[header_at]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = {}
    for line in lines[header_at + 1 :]:
        if not line or line.startswith("("):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


def test_status_fits_80_columns_and_marks_every_cut(status_config: str) -> None:
    result = runner("80").invoke(cli_module.cli, ["status", "--config", status_config])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table = lines[1:]
    assert all(len(line) <= 80 for line in table), table
    rows = _rows(lines)
    fatal_error = rows["llama8b-b"]["LAST_ERROR"]
    assert fatal_error.endswith(ELLIPSIS) and LONG_ERROR.startswith(fatal_error[:-1])
    assert re.search(r"\bleft out to fit 80 columns\b", result.stdout)
    assert {"NAME", "STATE", "LATENCY_S", "LAST_ERROR"} <= set(rows["llama8b-a"])


def test_status_latency_errors_and_restarts_say_what_is_current(status_config: str) -> None:
    result = runner().invoke(cli_module.cli, ["status", "--config", status_config])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout.splitlines())
    a, b, c = rows["llama8b-a"], rows["llama8b-b"], rows["llama8b-c"]
    assert (a["LATENCY_S"], b["LATENCY_S"], c["LATENCY_S"]) == ("0.250", "-", "-")
    assert a["LAST_ERROR"] == "12m ago: pid 4242 exited with code 1"
    assert b["LAST_ERROR"] == display.one_line(LONG_ERROR)  # a pipe gets it whole
    assert c["LAST_ERROR"] == "an error from last week"  # stopped: shown, undated
    assert (a["RESTARTS_24H"], b["RESTARTS_24H"], c["RESTARTS_24H"]) == ("1", "2", "0")
    help_text = runner().invoke(cli_module.cli, ["status", "--help"]).stdout
    assert "LATENCY_S" in help_text and "12m ago:" in help_text


def test_ms_client_servers_shows_the_same_units_window_and_labels(
    status_config: str, daemon: Any, tmp_path: Path
) -> None:
    fake = daemon([dict(s) for s in SERVERS])
    fake.override = lambda method, path, query, body: (
        (200, {"restarts": [_restart(*r, now=time.time()) for r in RESTARTS]})
        if path == "/v1/restarts"
        else None
    )
    (tmp_path / "client").mkdir()
    config = str(write_config(tmp_path / "client", [], socket_path=fake.socket_path))
    client = runner().invoke(client_cli.cli, ["servers", "--config", config])
    assert client.exit_code == 0, client.output
    status = runner().invoke(cli_module.cli, ["status", "--config", status_config])
    theirs, ours = _rows(client.stdout.splitlines()), _rows(status.stdout.splitlines())
    for name in ours:
        for column in ("STATE", "LATENCY_S", "RESTARTS_24H", "LAST_ERROR"):
            assert theirs[name][column] == ours[name][column], (name, column)
    data = json.loads(
        runner().invoke(client_cli.cli, ["servers", "--json", "--config", config]).stdout
    )
    assert [s["restarts_24h"] for s in data["servers"]] == [1, 2, 0]


def test_ms_client_tables_name_the_unit() -> None:
    for command in ("best", "latency"):
        text = runner().invoke(client_cli.cli, [command, "--help"]).stdout
        assert "Example:" in text
    assert display.seconds(0.0123) == "0.012" and display.seconds(None) == "-"


# --- help and check-config -----------------------------------------------------------------


def _example_lines(command: click.Command) -> list[str]:
    doc = command.help or ""
    after = doc.split("Example:", 1)[1] if "Example:" in doc else ""
    return [
        line.strip()
        for line in after.splitlines()
        if line.strip() and line.strip() != "\b" and line.startswith(" ")
    ]


def _commands(group: click.Group) -> list[tuple[list[str], click.Command]]:
    return [([], group)] + [([name], cmd) for name, cmd in sorted(group.commands.items())]


@pytest.mark.parametrize(
    "group", [cli_module.cli, client_cli.cli], ids=["modelserverd", "ms-client"]
)
def test_every_help_keeps_its_example_lines(group: click.Group) -> None:
    for args, command in _commands(group):
        examples = _example_lines(command)
        assert examples, f"{args}: no example"
        result = runner("80").invoke(group, [*args, "--help"])
        assert result.exit_code == 0, result.output
        lines = [line.strip() for line in result.stdout.splitlines()]
        for example in examples:
            assert example in lines, f"{args}: {example!r} folded in:\n{result.stdout}"


def test_check_config_prints_no_blank_lines(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[sglang]\npython = "{__import__("sys").executable}"\nmodule = "supervisord_ms.sim"\n\n'
        + "".join(
            f'[[servers]]\nname = "{name}"\nip = "{ip}"\nport = {port}\nmodel_size = "8B"\n'
            f'model_path = "{model}"\ngpus = [{gpu}]\n\n'
            for name, ip, port, gpu in (
                ("a", "127.0.0.1", 30000, 0),
                ("b", "127.0.0.1", 30001, 1),
                ("r", "10.9.9.9", 30000, 0),
            )
        )
    )
    result = runner().invoke(cli_module.cli, ["check-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "" not in lines, result.stdout
    assert lines[0].endswith("OK, 3 servers (2 launched by this host)")
    assert [line.split()[0] for line in lines if not line.startswith(" ")][1:4] == ["a", "b", "r"]


# --- config messages: config= in Python, --config on the command line ---------------------


def test_the_library_names_the_config_parameter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MODELSERVERD_CONFIG", raising=False)
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigProblem) as info:
        ModelServer("8B", config=missing)
    assert "config=" in str(info.value) and "--config" not in str(info.value)
    result = runner().invoke(client_cli.cli, ["best", "--config", missing])
    assert result.exit_code == 4
    assert "pass --config" in result.stderr and "config=" not in result.stderr


# --- history from a state database ---------------------------------------------------------


@pytest.fixture
def history_config(tmp_path: Path) -> tuple[str, Path]:
    db = tmp_path / "state" / "state.db"
    path = tmp_path / "config.toml"
    path.write_text(
        f'[daemon]\nstate_db = "{db}"\nsocket = "{tmp_path / "no.sock"}"\n\n'
        '[[servers]]\nname = "a"\nip = "10.0.0.5"\nport = 30000\n'
        'model_size = "8B"\nmodel_path = "/m"\n'
    )
    return str(path), db


def _history(config: str, *args: str, columns: str | None = None) -> Any:
    return runner(columns).invoke(cli_module.cli, ["history", "--config", config, *args])


def test_history_says_when_it_is_empty_and_names_known_servers(history_config) -> None:
    config, db = history_config
    with StoreWriter(db) as writer:
        writer.add_event(server="gone", kind="state", old_state="ready", new_state="stopped")
    result = _history(config, "--since", "1h")
    assert result.exit_code == 0, result.output
    assert re.search(
        r"^No restarts since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(1h ago\)\.$", result.stdout, re.M
    )
    result = _history(config, "--server", "a")
    assert result.exit_code == 0, result.output
    assert "No restarts since" in result.stdout and "No events since" in result.stdout
    assert _history(config, "--server", "gone").exit_code == 0  # removed, still in history
    unknown = _history(config, "--server", "nope")
    assert unknown.exit_code == 2
    assert "no server named nope" in unknown.stderr and "known: a, gone" in unknown.stderr


def test_history_reload_text_and_word_cuts(history_config) -> None:
    config, db = history_config
    old_reload = str({"added": [], "removed": [], "restarted": ["a"], "unchanged": []})
    with StoreWriter(db) as writer:
        writer.add_event(server=None, kind="reload", message=old_reload)
        writer.add_restart(
            server="a",
            reason="crash",
            attempt=1,
            backoff_s=1.5,
            old_pid=7,
            message="pid 7 exited with code 1 while loading the weights of a large model",
        )
    result = _history(config, columns="60")
    assert result.exit_code == 0, result.output
    assert "restarted a" in result.stdout and "{" not in result.stdout
    lines = result.stdout.splitlines()
    assert all(len(line) <= 60 for line in lines), lines
    message = next(line for line in lines if " a " in line and "crash" in line)
    cut = message.split("  ")[-1].strip()
    assert cut.endswith(ELLIPSIS)
    whole_text = "pid 7 exited with code 1 while loading the weights of a large model"
    kept = cut[:-1].rstrip()
    assert whole_text.startswith(kept) and whole_text[len(kept)] == " ", cut  # at a word
    whole = json.loads(_history(config, "--json").stdout)
    assert whole["restarts"][0]["backoff_s"] == 1.5 and whole["since"].endswith("Z")


def test_history_as_root_creates_no_file_beside_the_database(history_config) -> None:
    config, db = history_config
    with StoreWriter(db) as writer:
        writer.add_event(server="a", kind="state", old_state="starting", new_state="ready")
    before = sorted(p.name for p in db.parent.iterdir())
    result = _history(config)
    assert result.exit_code == 0, result.output
    assert "starting" in result.stdout
    # No -wal/-shm owned by the caller: the daemon's user could not open them later.
    assert sorted(p.name for p in db.parent.iterdir()) == before


def test_history_without_database_or_daemon_is_one_message(history_config) -> None:
    config, _ = history_config
    result = _history(config)
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "no state database at" in result.stderr and "not running" in result.stderr
