"""The operator's commands against a real daemon: tables for people, --json for
programs, and clear messages when the daemon is down or the socket not permitted."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import free_port
from daemon_harness import wait_until

from supervisord_ms.logsetup import setup_logging


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
    assert "not permitted" in message and "join the group" in message, message


def test_journal_prefixes_when_under_systemd(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    setup_logging(logging.INFO, stream)
    log = logging.getLogger("modelserverd")
    log.warning("server a: ready -> backoff")
    log.info("listening")
    assert stream.getvalue().splitlines() == ["<4>server a: ready -> backoff", "<6>listening"]
