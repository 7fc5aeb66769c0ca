"""ms-client against the real daemon and simulated servers: the promises a calling
program relies on (no failed request while a healthy server exists)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port
from daemon_harness import PROFILES, sim_fault, wait_until
from ms_client import ModelServer, NoServerAvailable

# Every test runs once per simulated SGLang generation (legacy, current).
SGLANG_PROFILES = PROFILES

# Three 8B servers with clearly different speeds: a is the fastest.
SPEEDS = {"a": "0.01", "b": "0.06", "c": "0.12"}


def _servers():
    return [
        {
            "name": n,
            "port": free_port(),
            "gpus": [i],
            "extra_args": ["--sim-ttft-s", ttft, "--sim-token-latency-s", "0.002"],
        }
        for i, (n, ttft) in enumerate(SPEEDS.items())
    ]


@pytest.fixture
def fleet(daemon_factory):
    d = daemon_factory(_servers(), daemon={"probe_interval_s": 0.3}).start()
    d.wait_all_ready()
    wait_until(
        lambda: (
            d.api("GET", "/v1/best?model_size=8B&n=3")["candidates"][0]["name"] == "a"
            and all(s["latency_s"] for s in d.api("GET", "/v1/servers")["servers"])
        ),
        15,
        "probes rank a first",
    )
    return d


def _client(d, **kw) -> ModelServer:
    """A client that tries the daemon's order, best first: these tests are about
    fallback; spreading over the fleet has its own tests (test_client_library.py)."""
    kw.setdefault("spread", False)
    return ModelServer("8B", config=str(d.config_path), **kw)


def test_completion_goes_to_the_daemons_best_server(fleet):
    with _client(fleet) as llm:
        c = llm.get_completion("hello there", max_tokens=8)
    assert c.server == "a" and c.text and c.attempts == 1
    assert c.completion_tokens == 8


def test_sigkill_of_best_server_mid_stream_loses_no_request(fleet):
    results: list[object] = []
    stop = threading.Event()

    def worker() -> None:
        with _client(fleet) as llm:
            while not stop.is_set():
                try:
                    results.append(llm.get_completion("keep going", max_tokens=4))
                except Exception as exc:  # recorded, then asserted on
                    results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, 20, "requests flowing")
        os.kill(fleet.server("a")["pid"], signal.SIGKILL)
        n = len(results)
        wait_until(lambda: len(results) >= n + 40, 30, "requests after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    assert {r.server for r in results[-10:]} <= {"a", "b", "c"}


def test_hung_server_costs_a_first_token_deadline_not_the_request_timeout(fleet):
    with _client(fleet) as llm:
        assert llm.get_completion("warm up", max_tokens=2).server == "a"
        sim_fault(fleet.server("a")["port"], "hang")
        t0 = time.monotonic()
        c = llm.get_completion("are you there", max_tokens=4)
        elapsed = time.monotonic() - t0
    assert c.server != "a" and c.attempts == 2
    assert elapsed < 5.0, elapsed  # request_timeout_s is 600


def test_all_servers_down_exits_3_listing_each_attempt(fleet):
    for name in SPEEDS:
        fleet.api("POST", f"/v1/servers/{name}/stop")
    for name in SPEEDS:
        fleet.wait_state(name, "stopped")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ms_client.cli",
            "complete",
            "hi",
            "--config",
            str(fleet.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert out.stderr.strip(), "a clear message on stderr"


def test_daemon_stopped_completions_still_succeed_from_config(fleet):
    fleet.kill()  # the servers keep running (own sessions); the socket is gone
    os.unlink(fleet.socket)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ms_client.cli",
            "complete",
            "hi",
            "--json",
            "--config",
            str(fleet.config_path),
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["server"] in SPEEDS
    assert out.stderr.count("daemon not reachable") == 1  # said once


def test_sustained_slowness_reselects_but_one_outlier_does_not(fleet):
    with _client(fleet) as llm:
        for _ in range(5):
            assert llm.get_completion("steady", max_tokens=4).server == "a"
        sim_fault(fleet.server("a")["port"], "slow", slow_factor=20)
        served = [llm.get_completion("slow now", max_tokens=4).server for _ in range(8)]
    assert served[0] == "a"  # one slow answer is not enough to move
    assert served[-1] != "a", served


def test_session_keeps_a_conversation_on_one_server(fleet):
    homes = {}
    for key in ("conv-1", "conv-2", "conv-3", "conv-4"):
        with _client(fleet, session_key=key) as llm:
            homes[key] = {llm.get_completion(f"turn {i}", max_tokens=2).server for i in range(4)}
    assert all(len(servers) == 1 for servers in homes.values()), homes


def test_client_reports_reach_the_daemon(fleet):
    with _client(fleet) as llm:
        for _ in range(3):
            llm.get_completion("count me", max_tokens=2)

    def reported() -> bool:
        rows = fleet.query("select count(*) from latency_samples where source='client'")
        return rows[0][0] >= 3

    wait_until(reported, 10, "client samples in state.db")


def test_no_ready_server_raises_one_clear_error(fleet):
    for name in SPEEDS:
        fleet.api("POST", f"/v1/servers/{name}/stop")
        fleet.wait_state(name, "stopped")
    with _client(fleet) as llm, pytest.raises(NoServerAvailable):
        llm.get_completion("anyone?")
