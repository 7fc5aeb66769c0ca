"""The operator's commands against a real daemon: tables for people, --json for
programs, and clear messages when the daemon is down or the socket not permitted."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import free_port
from daemon_harness import wait_until

from supervisord_ms import cli as cli_module
from supervisord_ms.logsetup import LOGGER_TREES, setup_logging


def _cli(d, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli", *args, "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
def running(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    d.wait_state("a", "ready")
    return d


def test_status_table_and_json(running):
    table = _cli(running, "status").stdout
    assert "NAME" in table and "a" in table and "ready" in table
    assert "\033[" not in table  # no colour when not a terminal
    data = json.loads(_cli(running, "status", "--json").stdout)
    (server,) = data["servers"]
    assert server["name"] == "a" and server["state"] == "ready" and server["restarts_24h"] == 0
    assert data["daemon"]["pid"] == running.proc.pid


def test_gpus_table_and_json(running):
    assert "Simulated" in _cli(running, "gpus").stdout
    gpus = json.loads(_cli(running, "gpus", "--json").stdout)["gpus"]
    assert len(gpus) == 4 and gpus[0]["processes"] and not gpus[0]["free"]


def test_restart_then_history_and_logs(running):
    pid = running.server("a")["pid"]
    assert "restart requested" in _cli(running, "restart", "a").stdout
    wait_until(lambda: running.server("a")["pid"] not in (None, pid), 15, "relaunch")
    running.wait_state("a", "ready")
    history = json.loads(_cli(running, "history", "--server", "a", "--json").stdout)
    assert [r["reason"] for r in history["restarts"]] == ["manual"]
    assert any(e["new_state"] == "ready" for e in history["events"])
    assert "manual" in _cli(running, "history", "--since", "1h").stdout
    logs = _cli(running, "logs", "a", "-n", "200").stdout
    assert "modelserverd launching" in logs and "simulator" in logs


def test_reload_reports_the_difference(running):
    out = json.loads(_cli(running, "reload", "--json").stdout)
    assert out["unchanged"] == ["a"] and out["restarted"] == []


def test_unknown_server_and_unknown_logs(running):
    out = _cli(running, "restart", "nope", check=False)
    assert out.returncode != 0 and "nope" in out.stderr
    out = _cli(running, "logs", "nope", check=False)
    assert out.returncode == 2 and "known: a" in out.stderr


def test_daemon_not_running_says_how_to_start_it(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    out = _cli(d, "status", check=False)
    assert out.returncode == 3
    assert "not running" in out.stderr and "systemctl start modelserverd" in out.stderr


def test_socket_not_permitted_names_the_group_to_join(running):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.chmod(running.dir, 0o755)
            os.chmod(running.dir.parent, 0o755)
            os.setgid(65534)
            os.setuid(65534)
            from supervisord_ms.apiclient import DaemonUnreachable, call

            try:
                call(running.socket, "GET", "/v1/status")
                message = "connected"
            except DaemonUnreachable as exc:
                message = str(exc)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    assert "not permitted" in message, message
    # The harness's socket has no group of its own (socket_group = ""): the advice is
    # the operator's socket_group, never joining root.
    assert "socket_group" in message and "-aG root" not in message, message


@pytest.fixture
def daemon_logging():
    """setup_logging() changes process-wide loggers: put them back afterwards, so
    that other tests in this worker still see their records."""
    loggers = [logging.getLogger(name) for name in LOGGER_TREES]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_journal_prefixes_when_under_systemd(monkeypatch, daemon_logging):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    setup_logging(logging.INFO, stream)
    log = logging.getLogger("modelserverd")
    log.warning("server a: ready -> backoff")
    log.info("listening")
    assert stream.getvalue().splitlines() == ["<4>server a: ready -> backoff", "<6>listening"]


def test_every_module_logs_into_the_journal_with_a_priority(monkeypatch, daemon_logging):
    """One logger tree: the state database's lines (and any module logger named
    after its import path) reach the same handler with the same prefix."""
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    setup_logging(logging.INFO, stream)
    from supervisord_ms import store

    store.log.warning("writing to state.db failed")
    logging.getLogger("supervisord_ms.notify").error("sd_notify failed")
    assert stream.getvalue().splitlines() == [
        "<4>writing to state.db failed",
        "<3>sd_notify failed",
    ]
    assert store.log.name.startswith("modelserverd.")


# --- without a daemon: the status table's columns, check-config's output --------------

SERVER_A = {
    "name": "a",
    "ip": "10.0.0.5",
    "port": 30000,
    "model_size": "8B",
    "gpus": [0],
    "local": False,
    "state": "ready",
    "pid": None,
    "uptime_s": None,
    "latency_s": 0.25,
    "last_error": None,
    "sglang_version": "0.5.4",
}


def _answers(servers: list[dict], **status: Any) -> Any:
    """A stand-in for the daemon's answers to what `status` asks."""

    def api(config: Any, method: str, path: str, body: Any = None) -> Any:
        if path == "/v1/status":
            return {
                "version": "test",
                "pid": 1,
                "uptime_s": 5,
                "config_path": config.path,
                **status,
            }
        if path == "/v1/servers":
            return {"servers": [dict(s) for s in servers]}
        assert path.startswith("/v1/restarts"), path
        return {"restarts": []}

    return api


def _config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


REMOTE = (
    '[[servers]]\nname = "a"\nip = "10.0.0.5"\nport = 30000\nmodel_size = "8B"\nmodel_path = "/m"\n'
)


def test_status_shows_the_sglang_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    unknown = {**SERVER_A, "name": "b", "port": 30001, "sglang_version": None}
    monkeypatch.setattr(cli_module, "_api", _answers([SERVER_A, unknown]))
    config = _config_file(tmp_path, REMOTE)
    result = CliRunner().invoke(cli_module.cli, ["status", "--config", config])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split()[5:9] == ["PID", "UPTIME", "VERSION", "LATENCY_S"]
    column = header.index("VERSION")
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 1 :]}
    assert rows["a"][column:].split()[0] == "0.5.4"
    assert rows["b"][column:].split()[0] == "-"

    result = CliRunner().invoke(cli_module.cli, ["status", "--json", "--config", config])
    servers = {s["name"]: s for s in json.loads(result.stdout)["servers"]}
    assert servers["a"]["sglang_version"] == "0.5.4" and servers["b"]["sglang_version"] is None


def _local_server(tmp_path: Path, **extra: str) -> str:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    lines = [
        "[[servers]]",
        'name = "a"',
        'ip = "127.0.0.1"',
        "port = 30000",
        'model_size = "8B"',
        f'model_path = "{model}"',
        "gpus = [0]",
        *(f"{k} = {v}" for k, v in extra.items()),
        # check-config refuses an interpreter that cannot run the module (issue 13).
        "[sglang]",
        f"python = {json.dumps(sys.executable)}",
        'module = "supervisord_ms.sim"',
    ]
    return "\n".join(lines) + "\n"


def test_check_config_prints_warnings_and_the_default_flags(tmp_path: Path):
    text = '[sglang.env]\nSGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION = "false"\n\n'
    config = _config_file(tmp_path, text + _local_server(tmp_path))
    warning = (
        f'{config}: sglang.env.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION: "false" makes '
        "SGLang's /health answer 200 without generating a token, so it cannot see a hung "
        "scheduler; modelserverd then relies on its own scheduler check to find hangs"
    )
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--config", config])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"warning: {warning}"]
    assert "OK, 1 servers (1 launched by this host)" in result.stdout
    assert '"--enable-metrics", "--log-level-http", "warning"' in result.stdout

    result = CliRunner().invoke(cli_module.cli, ["check-config", "--json", "--config", config])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["warnings"] == [warning]
    (server,) = data["servers"]
    argv = server["argv"]
    assert argv[argv.index("--enable-metrics") :][:3] == [
        "--enable-metrics",
        "--log-level-http",
        "warning",
    ]


def test_check_config_without_warnings(tmp_path: Path):
    config = _config_file(
        tmp_path, _local_server(tmp_path, extra_args='["--log-level-http", "info"]')
    )
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--json", "--config", config])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data["warnings"] == []
    argv = data["servers"][0]["argv"]
    assert argv.count("--log-level-http") == 1 and argv[-2:] == ["--log-level-http", "info"]


def test_check_config_refuses_a_health_timeout_sglang_outlasts(tmp_path: Path):
    text = "[daemon]\nhealth_timeout_s = 20.0\n\n" + _local_server(tmp_path)
    config = _config_file(tmp_path, text)
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--config", config])
    assert result.exit_code == cli_module.EXIT_CONFIG
    assert result.stderr.splitlines() == [
        "modelserverd: config refused (1 problem(s)):",
        f"{config}: daemon.health_timeout_s: got 20.0, expected a number above 20, the "
        "SGLANG_HEALTH_CHECK_TIMEOUT of a (SGLang's default): SGLang's /health waits that "
        "long for one generated token before it answers 503, so a check that gives up sooner "
        "fails servers that are slow but alive; set health_timeout_s to 30 or more, or lower "
        "SGLANG_HEALTH_CHECK_TIMEOUT",
    ]


# --- the state database writer's health (issue 12, item 4) ------------------------------

FULL = (
    "writing to /var/lib/modelserverd/state.db failed: OperationalError: database or disk is full"
)


@pytest.mark.parametrize(
    ("writer", "line"),
    [
        (
            {
                "ok": False,
                "last_error": FULL,
                "queued_samples": 1200,
                "queued_events": 3,
                "dropped_samples": 50,
            },
            f"state database: writes are failing: {FULL}; 3 events/restarts and 1200 latency "
            "samples wait to be written; 50 latency samples dropped since the daemon started",
        ),
        (
            {
                "ok": True,
                "last_error": FULL,
                "queued_samples": 0,
                "queued_events": 0,
                "dropped_samples": 7,
            },
            "state database: 7 latency samples dropped since the daemon started; "
            f"last error: {FULL}",
        ),
        (
            {
                "ok": True,
                "last_error": FULL,
                "queued_samples": 2,
                "queued_events": 0,
                "dropped_samples": 0,
            },
            None,
        ),
        (None, None),
    ],
)
def test_status_shows_a_failing_state_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Any, line: str | None
):
    extra = {} if writer is None else {"writer": writer}
    monkeypatch.setattr(cli_module, "_api", _answers([SERVER_A], **extra))
    config = _config_file(tmp_path, REMOTE)
    result = CliRunner().invoke(cli_module.cli, ["status", "--config", config])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("modelserverd test pid 1")
    if line is None:
        assert lines[1].startswith("NAME")
    else:
        assert lines[1] == line and lines[2].startswith("NAME")
    result = CliRunner().invoke(cli_module.cli, ["status", "--json", "--config", config])
    assert json.loads(result.stdout)["daemon"].get("writer") == writer


def test_stop_and_start_take_several_names_and_a_stopped_server_says_so(daemon_factory):
    d = daemon_factory(
        [{"name": n, "port": free_port(), "gpus": [i]} for i, n in enumerate(("a", "b"))]
    ).start()
    d.wait_all_ready()
    out = _cli(d, "stop", "a", "b").stdout
    assert "a: stop requested" in out and "b: stop requested" in out
    d.wait_state("a", "stopped")
    d.wait_state("b", "stopped")
    assert _cli(d, "stop", "a").stdout.strip() == "a: already stopped"
    assert "start requested" in _cli(d, "start", "a", "b").stdout
    d.wait_state("a", "ready")


def test_plain_modelserverd_prints_help_and_exits_0():
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "Usage: " in out.stdout and "status" in out.stdout
