"""The daemon's life as systemd sees it: sd_notify READY/STATUS/WATCHDOG, a second
daemon on the same socket, a refused config, a state database it cannot use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from conftest import free_port
from daemon_harness import wait_until

from supervisord_ms.apiclient import call


def test_sd_notify_ready_status_and_watchdog(daemon_factory, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(0.2)
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="1000000")
    d.start(wait=False, env=env)
    messages: list[tuple[float, str]] = []
    deadline = time.monotonic() + 20
    ready_at = None
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        now = time.monotonic()
        messages.append((now, data))
        if "READY=1" in data and ready_at is None:
            ready_at = now
            # READY=1 is sent only once the API socket answers.
            assert call(d.socket, "GET", "/v1/status", timeout=2)["pid"] == d.proc.pid
        if ready_at and now - ready_at > 3.0:
            break
    sock.close()
    assert ready_at is not None, f"no READY=1 among {messages}\n{d.log()}"
    assert any("STATUS=" in m for _, m in messages)
    pings = [t for t, m in messages if "WATCHDOG=1" in m and t > ready_at]
    # WATCHDOG_USEC=1 s -> a ping every 0.5 s; allow slack for a busy 2-core machine.
    assert len(pings) >= 4, messages
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 1.0, gaps
    assert d.stop() == 0


def test_second_daemon_on_same_socket_exits_with_clear_message(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli", "run", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "another modelserverd" in out.stderr and str(d.proc.pid) in out.stderr
    assert call(d.socket, "GET", "/v1/status")["pid"] == d.proc.pid  # first one unharmed


def test_stale_socket_file_is_replaced(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.socket)
    stale.close()  # the file stays, nobody listens: a dead daemon's socket
    d.start()
    assert call(d.socket, "GET", "/v1/status")["pid"] == d.proc.pid


def test_refused_config_exits_78_and_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nprobe_intervall_s = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 78
    assert "daemon.probe_intervall_s" in out.stderr and "probe_interval_s" in out.stderr


def test_corrupt_state_db_stops_start_and_keeps_the_file(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    garbage = b"this is not a database\n" * 100
    with open(d.db, "wb") as f:
        f.write(garbage)
    d.start(wait=False)
    wait_until(lambda: d.proc.poll() is not None, 20, "daemon exit")
    assert d.proc.returncode != 0
    assert d.db in d.log()
    with open(d.db, "rb") as f:
        assert f.read() == garbage


def test_run_keeps_prompts_from_other_users_whatever_the_umask(daemon_factory):
    """Issue 12, item 9: started from a shell with umask 022 (not by the unit, whose
    UMask=0027), the daemon must still not make state.db or the server logs, which
    hold prompts and errors, readable by every user of the host."""
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    old = os.umask(0o022)
    try:
        d.start()
    finally:
        os.umask(old)
    d.wait_state("a", "ready")
    d.api("POST", "/v1/samples", {"samples": [{"server": "a", "latency_s": 0.1, "ok": True}]})
    logs = d.dir / "logs"
    wait_until(lambda: (logs / "a.log").exists() and os.path.exists(d.db + "-wal"), 10, "files")
    for path in (d.db, d.db + "-wal", d.db + "-shm", logs, logs / "a.log"):
        mode = os.stat(path).st_mode & 0o777
        assert mode & 0o007 == 0, f"{path} is mode {mode:04o}: other users may read it"
        assert mode & 0o020 == 0, f"{path} is mode {mode:04o}: the group may write it"
    assert d.stop() == 0
