"""Best-server selection through the real daemon's socket: probing, hysteresis,
ejection, affinity, servers that are only probed, and admin checks."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import psutil
from conftest import free_port
from daemon_harness import sim_fault, wait_until


def _best(d, **params) -> list[str]:
    query = "&".join(f"{k}={v}" for k, v in {"model_size": "8B", **params}.items())
    return [c["name"] for c in d.api("GET", f"/v1/best?{query}")["candidates"]]


def _sim(name: str, port: int, ttft: str, gpu: int, *extra: str) -> dict:
    return {
        "name": name,
        "port": port,
        "gpus": [gpu],
        "extra_args": ["--sim-ttft-s", ttft, "--sim-token-latency-s", "0.002", *extra],
    }


def test_fastest_first_then_replaced_after_a_3x_slowdown(daemon_factory):
    pa, pb = free_port(), free_port()
    d = daemon_factory(
        [_sim("a", pa, "0.03", 0), _sim("b", pb, "0.06", 1)], daemon={"probe_interval_s": 0.25}
    ).start()
    d.wait_all_ready()
    wait_until(lambda: _best(d)[:2] == ["a", "b"], 10, "a ranked first")
    sim_fault(pa, "slow", slow_factor=3)
    t0 = time.monotonic()
    wait_until(lambda: _best(d)[0] == "b", 10, "b replaces the slowed a")
    rounds = (time.monotonic() - t0) / 0.25
    assert rounds < 30, rounds


def test_two_equal_servers_under_noise_do_not_flip_flop(daemon_factory):
    noisy = ["--sim-noise", "0.3"]
    d = daemon_factory(
        [_sim("a", free_port(), "0.04", 0, *noisy), _sim("b", free_port(), "0.04", 1, *noisy)],
        daemon={"probe_interval_s": 0.1},
    ).start()
    d.wait_all_ready()
    wait_until(
        lambda: all(s["latency_s"] for s in d.api("GET", "/v1/servers")["servers"]),
        10,
        "both measured",
    )
    answers = []
    deadline = time.monotonic() + 8.0  # ~80 probe rounds
    while time.monotonic() < deadline:
        answers.append(_best(d)[0])
        time.sleep(0.05)
    switches = sum(1 for x, y in zip(answers, answers[1:], strict=False) if x != y)
    assert switches <= 2, (switches, len(answers))


def test_failing_server_is_ejected_and_comes_back(daemon_factory):
    pa, pb = free_port(), free_port()
    d = daemon_factory(
        [_sim("a", pa, "0.01", 0), _sim("b", pb, "0.05", 1)], daemon={"probe_interval_s": 0.25}
    ).start()
    d.wait_all_ready()
    wait_until(lambda: _best(d)[0] == "a", 10, "a first")
    sim_fault(pa, "error")  # generations answer 500; /health still 200: ready but failing
    wait_until(lambda: "a" not in _best(d), 10, "a ejected")
    assert d.server("a")["state"] == "ready" and d.server("a")["ejected"]
    sim_fault(pa, "normal")
    wait_until(lambda: "a" in _best(d), 30, "a back after recovery")


def test_key_stays_on_its_server_and_only_a_failed_servers_keys_move(daemon_factory):
    names = ["a", "b", "c"]
    d = daemon_factory(
        [_sim(n, free_port(), "0.02", i) for i, n in enumerate(names)],
        daemon={"probe_interval_s": 0.25},
    ).start()
    d.wait_all_ready()
    # Keys are placed over measured servers: wait until all three are measured.
    wait_until(
        lambda: all(s["latency_s"] for s in d.api("GET", "/v1/servers")["servers"]),
        10,
        "three measured candidates",
    )
    keys = [f"conv-{i}" for i in range(30)]
    home = {k: _best(d, key=k)[0] for k in keys}
    assert len(set(home.values())) >= 2, home  # keys spread over servers
    for _ in range(3):
        assert {k: _best(d, key=k)[0] for k in keys} == home
    victim = home[keys[0]]
    d.api("POST", f"/v1/servers/{victim}/stop")
    d.wait_state(victim, "stopped")
    after = {k: _best(d, key=k)[0] for k in keys}
    for k in keys:
        if home[k] == victim:
            assert after[k] != victim
        else:
            assert after[k] == home[k], k


def test_remote_and_unmanaged_servers_are_probed_never_launched(daemon_factory, sim_factory):
    remote_port, unmanaged_port = free_port(), free_port()
    sim_factory(remote_port, "--host", "127.0.0.2", "--sim-ttft-s", "0.01")
    unmanaged = sim_factory(unmanaged_port, "--sim-ttft-s", "0.01")
    unmanaged.wait_ready(20)  # the remote one is checked through the daemon's probes
    d = daemon_factory(
        [
            {"name": "remote", "ip": "127.0.0.2", "port": remote_port},
            {"name": "unmanaged", "port": unmanaged_port, "managed": False},
        ],
        daemon={"probe_interval_s": 0.25},
    ).start()
    for name in ("remote", "unmanaged"):
        s = d.wait_state(name, "ready", 15)
        assert s["pid"] is None and not s["managed"]
    assert set(_best(d, n=5)) == {"remote", "unmanaged"}
    unmanaged.kill()
    d.wait_state("unmanaged", "unreachable", 15)
    time.sleep(1.0)
    assert d.server("unmanaged")["state"] == "unreachable"
    assert d.query("select count(*) from restarts")[0][0] == 0
    ours = [p for p in psutil.Process(d.proc.pid).children(recursive=True)]
    assert not ours, "the daemon launched something for servers it does not manage"
    for action in ("restart", "stop", "start"):
        try:
            d.api("POST", f"/v1/servers/remote/{action}")
            raise AssertionError("admin action on a remote server must be refused")
        except Exception as exc:  # noqa: BLE001 - the message is what matters
            assert "remote" in str(exc)


def test_non_admin_peer_gets_403_on_restart(daemon_factory):
    # The socket must be reachable by nobody: a world-traversable folder of its own.
    sock_dir = tempfile.mkdtemp(prefix="ms-403-")
    os.chmod(sock_dir, 0o755)
    d = daemon_factory(
        [_sim("a", free_port(), "0.02", 0)],
        daemon={"socket_mode": "0666", "socket": os.path.join(sock_dir, "api.sock")},
    )
    d.start()
    d.wait_state("a", "ready")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, then ask
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            results = []
            for method, path in (("POST", "/v1/servers/a/restart"), ("GET", "/v1/servers")):
                s = socket.socket(socket.AF_UNIX)
                s.connect(d.socket)
                s.sendall(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                results.append(data.decode(errors="replace"))
            os.write(write, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        restart, listing = json.loads(f.read() or '["", ""]')
    os.waitpid(pid, 0)
    assert restart.startswith("HTTP/1.1 403"), restart[:200]
    assert '"error"' in restart
    assert listing.startswith("HTTP/1.1 200")
    assert d.query("select count(*) from restarts")[0][0] == 0


def test_servers_table_lists_unmanaged_servers_with_their_state(daemon_factory, sim_factory):
    port = free_port()
    sim_factory(port, "--sim-ttft-s", "0.01").wait_ready(20)
    d = daemon_factory(
        [{"name": "probed", "port": port, "managed": False}], daemon={"probe_interval_s": 0.25}
    ).start()
    d.wait_state("probed", "ready", 15)
    wait_until(
        lambda: (
            d.query("select state, local, pid from servers where name='probed'")
            == [("ready", 1, None)]
        ),
        10,
        "servers row of the probed server",
    )
