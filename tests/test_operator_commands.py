"""Operator commands against the real daemon (issue 13, items 5, 10, 11, 13): read
commands work for a user who cannot write the state directory, `restart --wait`
shows the states as they come or says why the server did not come back, a
refused reload is in the history, and both tools count restarts alike."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port
from daemon_harness import wait_until
from ms_client import cli as client_cli

# Imported here, before any test drops root: a child that runs as nobody cannot read
# the interpreter's own library folder (under /root) to import them later.
from supervisord_ms import apiclient, cli, display, gpus, store  # noqa: F401

NOBODY = 65534
ARROW = "\u2192"


def _cli(d, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli", *args, "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_no_columns(), **(env or {})},
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _no_columns() -> dict[str, str]:
    """The environment without $COLUMNS: a pipe gets whole rows, whatever the test
    runner's terminal (readline sets COLUMNS in the process environment)."""
    return {k: v for k, v in os.environ.items() if k != "COLUMNS"}


def as_nobody(args: list[str], tmp: Path) -> tuple[int, str, str]:
    """``modelserverd ARGS`` as uid/gid 65534, through the real entry point (so an
    uncaught exception prints its traceback on stderr, as it would for a user)."""
    out_path, err_path = tmp / "nobody.out", tmp / "nobody.err"
    with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                sys.argv = ["modelserverd", *args]
                try:
                    cli.main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    sys.excepthook(*sys.exc_info())
                    code = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out_path.read_text(), err_path.read_text()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may enter but only root may write (pytest's own are root's only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a command as another user")
    path = Path(tempfile.mkdtemp(prefix="msd-ro-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def running(daemon_factory, open_dir: Path):
    """A daemon whose state.db is in a folder only root may write, readable by all."""
    state = open_dir / "state"
    state.mkdir(mode=0o755)
    d = daemon_factory(
        [{"name": "a", "port": free_port(), "gpus": [0]}],
        daemon={"state_db": str(state / "state.db")},
    ).start()
    d.wait_state("a", "ready")
    wait_until(lambda: (state / "state.db-wal").exists(), 10, "state.db and its WAL")
    for path in state.iterdir():  # as the daemon's group would have them: readable
        path.chmod(0o644)
    config = open_dir / "config.toml"
    shutil.copy(d.config_path, config)
    config.chmod(0o644)
    d.public_config = config
    return d


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


def test_history_as_a_user_who_cannot_write_the_state_directory(running, open_dir: Path):
    state = open_dir / "state"
    _cli(running, "restart", "a", "--wait")
    # While the daemon writes (its -wal and -shm exist, the user may not write them).
    code, out, err = as_nobody(["history", "--config", str(running.public_config)], open_dir)
    _no_traceback(err)
    assert code == 0, err
    assert "manual" in out and "ready" in out and "not writable" not in err
    code, out, err = as_nobody(
        ["history", "--json", "--config", str(running.public_config)], open_dir
    )
    assert code == 0 and json.loads(out)["restarts"][0]["reason"] == "manual"
    # With the daemon stopped the WAL files are gone: read without creating them.
    assert running.stop() == 0
    files = sorted(p.name for p in state.iterdir())
    code, out, err = as_nobody(["history", "--config", str(running.public_config)], open_dir)
    _no_traceback(err)
    assert code == 0, err
    assert "manual" in out
    assert sorted(p.name for p in state.iterdir()) == files


def test_read_commands_as_nobody_end_in_one_message(running, open_dir: Path):
    config = str(running.public_config)
    (open_dir / "state" / "state.db").chmod(0o600)  # the daemon's user only
    (open_dir / "logs").mkdir(mode=0o755)
    (open_dir / "logs" / "a.log").write_text("prompt text\n")
    (open_dir / "logs" / "a.log").chmod(0o600)
    text = running.public_config.read_text()
    running.public_config.write_text(
        re.sub(r'log_dir = ".*"', f'log_dir = "{open_dir / "logs"}"', text)
    )
    for args, expect in (
        (["history"], "cannot read the history"),
        (["logs", "a"], "cannot read"),
        (["status"], "not permitted"),
        (["gpus"], "modelserverd: "),
    ):
        code, out, err = as_nobody([*args, "--config", config], open_dir)
        _no_traceback(err)
        assert code != 0 and expect in err, (args, code, out, err)
        assert len(err.strip().splitlines()) <= 2, err


def test_restart_wait_shows_the_states_then_both_tools_count_it(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    d.wait_state("a", "ready")
    pid = d.server("a")["pid"]
    out = _cli(d, "restart", "a", "--wait")
    line = out.stdout.splitlines()[-1]
    assert re.fullmatch(rf"a: stopping {ARROW} (\S+ {ARROW} )*ready \(\d+\.\d s\)", line), line
    assert d.server("a")["state"] == "ready" and d.server("a")["pid"] != pid
    status = _cli(d, "status", env={"COLUMNS": "200"}).stdout
    servers = CliRunner(env={"COLUMNS": "200"}).invoke(
        client_cli.cli, ["servers", "--config", str(d.config_path)]
    )
    assert servers.exit_code == 0, servers.output
    for text in (status, servers.stdout):
        lines = text.splitlines()
        header = next(line for line in lines if line.startswith("NAME"))
        row = next(line for line in lines if line.startswith("a "))
        at = header.index("RESTARTS_24H")
        assert row[at:].split()[0] == "1", text
        assert "LATENCY_S" in header
    data = json.loads(_cli(d, "restart", "a", "--wait", "--json").stdout)
    assert data[0]["ready"] is True and data[0]["states"][-1] == "ready"


def test_restart_wait_fails_with_the_error_and_exit_code(daemon_factory):
    d = daemon_factory(
        [
            {
                "name": "a",
                "port": free_port(),
                "gpus": [0],
                "extra_args": ["--sim-crash-after", "0", "--sim-exit-code", "3"],
            }
        ],
        restart={"max_failures": 1},
    ).start()
    d.wait_state("a", "fatal")
    out = _cli(d, "restart", "a", "--wait", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(rf"^a: starting {ARROW} .*fatal \(\d+\.\d s\)$", out.stdout, re.M), out.stdout
    assert "a did not come back (fatal)" in out.stderr and "exited with code 3" in out.stderr
    assert "modelserverd start a" in out.stderr
    _no_traceback(out.stderr)


def test_a_refused_reload_is_in_the_history(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    d.wait_state("a", "ready")
    assert _cli(d, "reload").returncode == 0
    good = d.config_path.read_text()
    d.config_path.write_text(good + "\nbogus = 1\n")
    out = _cli(d, "reload", check=False)
    assert out.returncode == 4 and "refused" in out.stderr and "bogus" in out.stderr
    d.config_path.write_text(good)

    def refused() -> list:
        return d.query("SELECT message FROM events WHERE kind = 'reload_refused'")

    wait_until(refused, 10, "the reload_refused event")
    history = _cli(d, "history").stdout  # a pipe: whole messages
    assert "reload_refused" in history and "bogus" in history
    reload_line = next(line for line in history.splitlines() if "  reload  " in line)
    assert "unchanged a" in reload_line and "{" not in reload_line
    assert d.server("a")["state"] == "ready"


def test_history_of_a_host_whose_database_cannot_be_read_comes_from_the_daemon(
    daemon_factory, tmp_path: Path
):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    d.wait_state("a", "ready")
    _cli(d, "restart", "a", "--wait")
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(
        re.sub(
            r'state_db = ".*"',
            f'state_db = "{tmp_path / "none" / "state.db"}"',
            d.config_path.read_text(),
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli", "history", "--config", str(elsewhere)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_no_columns(),
    )
    assert out.returncode == 0, out.stderr
    assert "manual" in out.stdout and "the history comes from the daemon" in out.stderr
    # the events too: the restart's state changes
    assert "stopping" in out.stdout and "ready" in out.stdout, out.stdout
