"""The supervisor end to end: the real daemon, simulated SGLang servers, the
``file:`` GPU view. Each test is one scenario an operator relies on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import free_port
from daemon_harness import PROFILES, sim_fault, wait_until

from supervisord_ms.gpus import FileGpuView, file_gpu_register

# Every test runs once per simulated SGLang generation (legacy, current).
SGLANG_PROFILES = PROFILES


def _restarts(d, name):
    return d.query(
        "select reason, signal, exit_code, backoff_s, old_pid, new_pid from restarts "
        "where server = ? order by id",
        name,
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_launch_waits_for_gpu_held_by_foreign_process(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        file_gpu_register(d.gpu_file, foreign.pid, [0], 70000)
        d.start()
        s = d.wait_state("a", "waiting_gpu", 10)
        assert f"pid {foreign.pid}" in s["last_error"]
        assert s["pid"] is None
        foreign.kill()
        foreign.wait()
        d.wait_state("a", "ready", 20)
        assert foreign.returncode == -signal.SIGKILL  # killed by the test, not the daemon
    finally:
        foreign.kill()


def test_foreign_process_on_port_gives_port_busy_and_is_left_alone(daemon_factory):
    port = free_port()
    foreign = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)",
        ]
    )
    try:
        wait_until(lambda: _listening(port), 10, "foreign listener")
        d = daemon_factory([{"name": "a", "port": port, "gpus": [0]}]).start()
        s = d.wait_state("a", "port_busy", 10)
        assert f"pid {foreign.pid}" in s["last_error"]
        time.sleep(1.0)  # several rechecks
        assert foreign.poll() is None, "the daemon must never signal a foreign process"
        assert d.server("a")["state"] == "port_busy"
        foreign.kill()
        foreign.wait()
        d.wait_state("a", "ready", 20)
    finally:
        foreign.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigkill_of_server_is_relaunched_with_restart_row(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    old = d.wait_state("a", "ready")["pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: d.server("a")["pid"] not in (None, old), 10, "relaunch")
    new = d.wait_state("a", "ready")
    rows = _restarts(d, "a")
    assert rows and rows[-1][0] == "crash" and rows[-1][1] == 9
    assert rows[-1][4] == old and rows[-1][5] == new["pid"]
    assert new["restarts"] == 1


def test_hang_is_detected_and_restarted_with_reason_hang(daemon_factory):
    port = free_port()
    d = daemon_factory([{"name": "a", "port": port, "gpus": [0]}]).start()
    old = d.wait_state("a", "ready")["pid"]
    sim_fault(port, "hang")
    wait_until(lambda: d.server("a")["pid"] not in (None, old), 15, "relaunch after hang")
    d.wait_state("a", "ready")
    assert [r[0] for r in _restarts(d, "a")] == ["hang"]
    states = [r[0] for r in d.query("select new_state from events where server='a'")]
    assert "unhealthy" in states


def test_crash_loop_backs_off_then_goes_fatal(daemon_factory):
    d = daemon_factory(
        [{"name": "a", "port": free_port(), "gpus": [0], "extra_args": ["--sim-crash-after", "0"]}],
        restart={"max_failures": 4, "backoff_initial_s": 0.2, "backoff_max_s": 5.0},
    ).start()
    s = d.wait_state("a", "fatal", 30)
    rows = _restarts(d, "a")
    assert len(rows) == 3  # failures 1..3 relaunched, the 4th is fatal
    delays = [r[3] for r in rows]
    assert delays == sorted(delays) and delays[-1] > delays[0] * 2, delays
    assert all(r[0] == "crash" and r[2] is not None for r in rows)
    assert "start" in s["last_error"]  # tells the operator what to do
    time.sleep(1.0)
    assert d.server("a")["state"] == "fatal"  # stays down until a manual start


def test_never_ready_hits_startup_timeout(daemon_factory):
    d = daemon_factory(
        [{"name": "a", "port": free_port(), "gpus": [0], "extra_args": ["--sim-startup-s", "60"]}],
        daemon={"startup_timeout_s": 1.0},
    ).start()
    wait_until(lambda: _restarts(d, "a"), 15, "a restart row")
    assert _restarts(d, "a")[0][0] == "startup_timeout"


def test_orphaned_children_are_killed_and_gpu_memory_released(daemon_factory):
    d = daemon_factory(
        [
            {
                "name": "a",
                "port": free_port(),
                "gpus": [0],
                "extra_args": [
                    "--sim-children",
                    "2",
                    "--sim-children-survive",
                    "--sim-children-leave-group",
                ],
            }
        ]
    ).start()
    old = d.wait_state("a", "ready")["pid"]
    children = wait_until(
        lambda: (
            [c.pid for c in psutil.Process(old).children()]
            if len(psutil.Process(old).children()) >= 2
            else None
        ),
        10,
        "two children",
    )
    time.sleep(0.8)  # a health round records them
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: d.server("a")["pid"] not in (None, old), 20, "relaunch")
    d.wait_state("a", "ready")
    assert not [c for c in children if _alive(c)], "orphaned children left alive"
    held = {p.pid for g in FileGpuView(d.gpu_file).snapshot() for p in g.processes}
    assert not held & {old, *children}, "GPU memory of dead server still held"
    kinds = [r[0] for r in d.query("select kind from events where server='a'")]
    assert "orphans_killed" in kinds


def test_daemon_sigkill_then_restart_adopts_servers(daemon_factory):
    d = daemon_factory(
        [
            {"name": "a", "port": free_port(), "gpus": [0]},
            {"name": "b", "port": free_port(), "gpus": [1]},
        ]
    ).start()
    d.wait_all_ready()
    pids = {n: d.server(n)["pid"] for n in ("a", "b")}
    d.kill()
    assert all(_alive(p) for p in pids.values()), "servers must survive a daemon crash"
    d.start()
    for name, pid in pids.items():
        s = d.wait_state(name, "ready")
        assert s["pid"] == pid, "adopted, not relaunched"
    assert _restarts(d, "a") == [] and _restarts(d, "b") == []

    def adopted() -> set[str]:
        return {r[0] for r in d.query("select server from events where kind='adopted'")}

    wait_until(lambda: adopted() == {"a", "b"}, 10, f"adopted events, got {adopted()}")


def test_daemon_sigterm_leaves_no_process(daemon_factory):
    d = daemon_factory(
        [
            {
                "name": "a",
                "port": free_port(),
                "gpus": [0],
                "extra_args": ["--sim-children", "1", "--sim-ignore-sigterm"],
            },
            {"name": "b", "port": free_port(), "gpus": [1]},
        ]
    ).start()
    d.wait_all_ready()
    assert d.stop() == 0
    left = d.leftover_processes()
    assert not left, [p.cmdline() for p in left]
    assert not os.path.exists(d.socket)


def test_sighup_restarts_only_the_changed_server(daemon_factory):
    pa, pb = free_port(), free_port()
    d = daemon_factory(
        [{"name": "a", "port": pa, "gpus": [0]}, {"name": "b", "port": pb, "gpus": [1]}]
    ).start()
    d.wait_all_ready()
    pids = {n: d.server(n)["pid"] for n in ("a", "b")}
    text = d.config_path.read_text().replace(
        f"port = {pb}\n", f'port = {pb}\nextra_args = ["--sim-ttft-s", "0.01"]\n'
    )
    d.config_path.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.server("b")["pid"] not in (None, pids["b"]), 15, "b relaunched")
    d.wait_state("b", "ready")
    assert d.server("a")["pid"] == pids["a"]
    assert [r[0] for r in _restarts(d, "b")] == ["config_change"]
    assert _restarts(d, "a") == []


def test_bad_config_on_reload_keeps_the_running_one(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    pid = d.wait_state("a", "ready")["pid"]
    good = d.config_path.read_text()
    d.config_path.write_text(good + "\n[daemon2]\nx = 1\n")
    with pytest.raises(Exception) as err:
        d.api("POST", "/v1/reload")
    assert "daemon2" in str(err.value)
    assert d.server("a")["pid"] == pid and d.server("a")["state"] == "ready"


def test_reload_leaves_a_stopped_server_stopped(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    d.wait_state("a", "ready")
    d.api("POST", "/v1/servers/a/stop")
    d.wait_state("a", "stopped")
    d.config_path.write_text(d.config_path.read_text().replace("gpus = [0]", "gpus = [1]"))
    result = d.api("POST", "/v1/reload")
    assert result["changed_stopped"] == ["a"] and result["restarted"] == [], result
    time.sleep(1.0)  # what would have been a restart has had its chance to begin
    assert d.server("a")["state"] == "stopped" and d.server("a")["gpus"] == [1]
    d.api("POST", "/v1/servers/a/start")
    d.wait_state("a", "ready")


def test_manual_stop_start_restart(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    pid = d.wait_state("a", "ready")["pid"]
    d.api("POST", "/v1/servers/a/stop")
    d.wait_state("a", "stopped")
    assert not _alive(pid)
    d.api("POST", "/v1/servers/a/start")
    pid2 = d.wait_state("a", "ready")["pid"]
    d.api("POST", "/v1/servers/a/restart")
    wait_until(lambda: d.server("a")["pid"] not in (None, pid2), 10, "restart")
    d.wait_state("a", "ready")
    assert [r[0] for r in _restarts(d, "a")] == ["manual"]
