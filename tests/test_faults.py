"""Fault injection: each fault of the supervisor and the client, and what it cost.

Every scenario runs the real daemon with simulated SGLang servers on a ``file:`` GPU
view, usually with a client load (``ms_client.ModelServer``, a few threads) running
through the fault, and ends with the same audit of what was lost:

- no failed request while a healthy server existed;
- every relaunch has its ``restarts`` row: every pid the API showed for a server after
  its first one is the ``new_pid`` of one of its rows, and a server has exactly one row
  per launch after its first (``starting`` events);
- no orphan process: after the daemon's SIGTERM (exit 0) nothing started for the test
  runs, and no process of any server it ever ran (simulated scheduler children
  included) is alive;
- no GPU memory left held: while the daemon runs, only the current servers and their
  own children hold memory in the GPU view, and after the stop nobody does.

A fast subset runs with ``make test``; the rest is marked ``slow`` (``make test-all``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest
from conftest import free_port
from daemon_harness import PROFILES, DaemonUnderTest, sim_fault, wait_until
from ms_client import ModelServer, NoServerAvailable

from supervisord_ms.gpus import FileGpuView, file_gpu_register
from supervisord_ms.registry import AFFINITY_MAX_RATIO

# Every test runs once per simulated SGLang generation (legacy, current).
SGLANG_PROFILES = PROFILES

# Three servers with clearly different speeds, so "the best" is known: a, then b, then c.
SPEEDS = {"a": "0.01", "b": "0.05", "c": "0.1"}
CHILD_PID = re.compile(r"^sim: child \d+ pid=(\d+)", re.MULTILINE)


def _servers(**extra_args: list[str]) -> list[dict[str, Any]]:
    """The three servers; ``extra_args`` adds simulator flags to one of them by name."""
    return [
        {
            "name": name,
            "port": free_port(),
            "gpus": [i],
            "extra_args": [
                "--sim-ttft-s",
                ttft,
                "--sim-token-latency-s",
                "0.002",
                *extra_args.get(name, []),
            ],
        }
        for i, (name, ttft) in enumerate(SPEEDS.items())
    ]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _best(d: DaemonUnderTest) -> str:
    return d.api("GET", "/v1/best?model_size=8B&n=3")["candidates"][0]["name"]


def _start(d: DaemonUnderTest, ranked: str | None = "a") -> PidWatch:
    """Start the daemon, wait for its servers, and (``ranked``) for the probes to rank
    that server first; returns the pid watch, running."""
    d.start()
    d.wait_all_ready()
    if ranked is not None:
        wait_until(
            lambda: (
                _best(d) == ranked
                and all(
                    s["latency_s"]
                    for s in d.api("GET", "/v1/servers")["servers"]
                    if s["state"] == "ready"
                )
            ),
            15,
            f"probes rank {ranked} first",
        )
    return PidWatch(d).start()


class Load:
    """Client threads sending completions through one ``ModelServer`` until stopped;
    every outcome is kept (a Completion or the exception)."""

    def __init__(self, d: DaemonUnderTest, threads: int = 3, **client: Any):
        self.llm = ModelServer("8B", config=str(d.config_path), **client)
        self.results: list[Any] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.llm.get_completion("keep going", max_tokens=4))
            except Exception as exc:  # kept, then asserted on
                self.results.append(exc)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        self.more(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def more(self, count: int, timeout: float = 30) -> None:
        """Wait until ``count`` more requests have finished."""
        target = len(self.results) + count
        wait_until(lambda: len(self.results) >= target, timeout, f"{count} more requests")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.llm.close()

    @property
    def failures(self) -> list[Exception]:
        return [r for r in self.results if isinstance(r, Exception)]

    def served_by(self, last: int) -> set[str]:
        return {r.server for r in self.results[-last:] if not isinstance(r, Exception)}


class PidWatch:
    """Polls the API and keeps, per server, every pid it showed (in order)."""

    def __init__(self, d: DaemonUnderTest):
        self.d = d
        self.history: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PidWatch:
        self._poll()
        self._thread.start()
        return self

    def _poll(self) -> None:
        try:
            servers = self.d.api("GET", "/v1/servers")["servers"]
        except Exception:  # the daemon is restarting: nothing to see
            return
        for s in servers:
            seen = self.history.setdefault(s["name"], [])
            if s["pid"] and (not seen or seen[-1] != s["pid"]):
                seen.append(s["pid"])

    def _run(self) -> None:
        while not self._stop.wait(0.03):
            self._poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def pids(self) -> set[int]:
        return {p for seen in self.history.values() for p in seen}


def _children_of_servers(d: DaemonUnderTest, name: str = "*") -> set[int]:
    """Pids of every simulated scheduler child a server (any, by default) ever
    started (from the logs)."""
    found: set[int] = set()
    for log in (d.dir / "logs").glob(f"{name}.log*"):
        found |= {int(p) for p in CHILD_PID.findall(log.read_text(errors="replace"))}
    return found


def _family(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return set()


def _gpu_holders(d: DaemonUnderTest) -> set[int]:
    return {p.pid for g in FileGpuView(d.gpu_file).snapshot() for p in g.processes}


def _gpu_held_by_current_servers_only(d: DaemonUnderTest) -> None:
    """Live holders of GPU memory are current servers or their own children (a child
    that left the process group is still its parent's child)."""
    strangers: set[int] = set()

    def clean() -> bool:
        nonlocal strangers
        current = {s["pid"] for s in d.api("GET", "/v1/servers")["servers"] if s["pid"]}
        ours: set[int] = set()
        for pid in current:
            ours |= _family(pid)
        strangers = _gpu_holders(d) - ours
        return not strangers

    try:
        wait_until(clean, 10, "GPU memory held only by the current servers")
    except AssertionError:
        raise AssertionError(f"GPU memory still held by {sorted(strangers)}") from None


def audit(
    d: DaemonUnderTest,
    watch: PidWatch,
    *,
    load: Load | None = None,
    foreign: frozenset[int] = frozenset(),
) -> list[tuple]:
    """What was lost: the checks every scenario ends with. Stops the load and the daemon.
    Returns the restarts rows."""
    if load is not None:
        load.stop()
    watch._poll()
    watch.stop()
    _gpu_held_by_current_servers_only(d)

    # The daemon stops everything it started, cleanly, and leaves nothing behind.
    assert d.stop(timeout=60) == 0, d.log()
    left = [p for p in d.leftover_processes() if p.pid not in foreign]
    assert not left, [p.cmdline() for p in left]
    ran = watch.pids() | _children_of_servers(d)
    assert not [p for p in ran if _alive(p)], "a server process or child outlived the daemon"
    assert not _gpu_holders(d) - foreign, "GPU memory still held after the stop"

    # Every relaunch has its row (the database is complete once the daemon has exited).
    rows = d.query("select server, reason, old_pid, new_pid, signal from restarts order by id")
    for name, pids in watch.history.items():
        mine = [r for r in rows if r[0] == name]
        missing = [p for p in pids[1:] if p not in {r[3] for r in mine}]
        assert not missing, f"{name}: relaunched as {missing} without a restarts row: {mine}"
        # A launch is a "starting" state change naming the new pid; an adoption (kind
        # "adopted") and a return from port_busy while starting are not launches.
        launches = d.query(
            "select count(*) from events where server = ? and new_state = 'starting' "
            "and kind = 'state' and message like 'pid %'",
            name,
        )[0][0]
        assert len(mine) == max(launches - 1, 0), (name, launches, mine)

    if load is not None:
        assert load.results, "the load sent nothing"
        assert not load.failures, load.failures[:3]
    return rows


# --- fast: run by `make test` --------------------------------------------------------------


def test_sigkill_of_the_best_server_under_load(daemon_factory):
    d = daemon_factory(_servers())
    watch = _start(d)
    with Load(d) as load:
        old = d.server("a")["pid"]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: d.server("a")["pid"] not in (None, old), 15, "a relaunched")
        d.wait_state("a", "ready")
        load.more(30)
    rows = audit(d, watch, load=load)
    assert [(r[1], r[2], r[4]) for r in rows] == [("crash", old, 9)]


def test_hang_of_the_best_server_under_load(daemon_factory):
    d = daemon_factory(_servers())
    watch = _start(d)
    with Load(d) as load:
        old = d.server("a")["pid"]
        sim_fault(d.server("a")["port"], "hang")
        load.more(20)  # requests go on elsewhere, each hung attempt costing a deadline
        assert "a" not in load.served_by(10)
        wait_until(lambda: d.server("a")["pid"] not in (None, old), 20, "a restarted")
        d.wait_state("a", "ready")
        load.more(10)
    rows = audit(d, watch, load=load)
    assert [(r[0], r[1], r[2]) for r in rows] == [("a", "hang", old)]


def test_killed_server_leaves_no_orphan_and_no_gpu_memory(daemon_factory):
    surviving = ["--sim-children", "2", "--sim-children-survive", "--sim-children-leave-group"]
    d = daemon_factory(_servers(a=surviving))
    watch = _start(d)
    with Load(d) as load:
        old = d.server("a")["pid"]
        children = wait_until(
            lambda: kids if len(kids := _children_of_servers(d, "a")) >= 2 else None,
            10,
            "a's two children",
        )
        time.sleep(0.8)  # a health round records them
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: d.server("a")["pid"] not in (None, old), 20, "a relaunched")
        d.wait_state("a", "ready")
        assert not [c for c in children if _alive(c)], "orphaned children left alive"
        assert not _gpu_holders(d) & {old, *children}, "the dead server's GPU memory is held"
        load.more(20)
    audit(d, watch, load=load)


def test_daemon_sigterm_leaves_nothing_even_with_a_stubborn_server(daemon_factory):
    d = daemon_factory(_servers(a=["--sim-children", "1", "--sim-ignore-sigterm"]))
    watch = _start(d)
    with Load(d) as load:
        load.more(10)
    audit(d, watch, load=load)  # SIGTERM: a ignores it and must be killed, child included


# --- slow: `make test-all` ------------------------------------------------------------------


@pytest.mark.slow
def test_500s_from_the_best_server_under_load(daemon_factory):
    d = daemon_factory(_servers())
    watch = _start(d)
    with Load(d) as load:
        sim_fault(d.server("a")["port"], "error")
        load.more(40)
        assert "a" not in load.served_by(20)
    assert audit(d, watch, load=load) == []  # errors are the client's business: no restart


@pytest.mark.slow
def test_sustained_slowness_moves_the_load_without_losing_a_request(daemon_factory):
    d = daemon_factory(_servers())
    watch = _start(d)
    with Load(d) as load:
        sim_fault(d.server("a")["port"], "slow", slow_factor=20)
        load.more(40)

        def a_owns_no_keys() -> bool:
            # registry.AFFINITY_MAX_RATIO: more than this times the fastest owns no keys
            latencies = {s["name"]: s["latency_s"] for s in d.api("GET", "/v1/servers")["servers"]}
            others = [v for n, v in latencies.items() if n != "a" and v]
            return bool(others) and latencies["a"] > AFFINITY_MAX_RATIO * min(others)

        wait_until(a_owns_no_keys, 15, "the daemon's estimate of a to show its slowness")
        # Then the clients' cached answers (a second) and the requests already on a end.
        load.more(40)
        assert "a" not in load.served_by(15)
    assert audit(d, watch, load=load) == []


@pytest.mark.slow
def test_crash_loop_goes_fatal_while_the_others_serve(daemon_factory):
    servers = _servers(a=["--sim-crash-after", "0"])
    d = daemon_factory(servers, restart={"max_failures": 4, "backoff_initial_s": 0.2})
    d.start()
    d.wait_state("b", "ready")
    d.wait_state("c", "ready")
    watch = PidWatch(d).start()
    with Load(d) as load:
        d.wait_state("a", "fatal", 30)
        load.more(20)
        assert load.served_by(20) <= {"b", "c"}
    rows = audit(d, watch, load=load)
    assert [r[1] for r in rows if r[0] == "a"] == ["crash"] * 3  # the 4th failure is fatal


@pytest.mark.slow
def test_server_that_never_gets_ready_is_restarted_while_the_others_serve(daemon_factory):
    servers = _servers(a=["--sim-startup-s", "60"])
    # Short, yet long enough for b and c to get ready on a loaded 2-core machine.
    d = daemon_factory(servers, daemon={"startup_timeout_s": 3.0})
    d.start()
    d.wait_state("b", "ready")
    watch = PidWatch(d).start()
    with Load(d) as load:
        wait_until(
            lambda: d.query("select count(*) from restarts where server = 'a'")[0][0] >= 2,
            20,
            "two startup timeouts",
        )
        load.more(10)
    rows = audit(d, watch, load=load)
    assert {r[1] for r in rows} == {"startup_timeout"}


@pytest.mark.slow
def test_gpu_held_by_a_foreign_process_delays_the_launch_only(daemon_factory):
    d = daemon_factory(_servers())
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        file_gpu_register(d.gpu_file, foreign.pid, [0], 70000)
        d.start()
        d.wait_state("a", "waiting_gpu", 10)
        d.wait_state("b", "ready")
        watch = PidWatch(d).start()
        with Load(d) as load:
            load.more(10)
            assert d.server("a")["pid"] is None
            foreign.kill()
            foreign.wait()
            d.wait_state("a", "ready", 20)
            load.more(10)
        assert foreign.returncode == -signal.SIGKILL  # the test killed it, not the daemon
        assert audit(d, watch, load=load) == []
    finally:
        foreign.kill()
        foreign.wait()


@pytest.mark.slow
def test_foreign_process_on_a_port_is_left_alone(daemon_factory):
    servers = _servers()
    port = servers[0]["port"]
    foreign = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)",
        ]
    )
    try:
        wait_until(lambda: _listens(port), 10, "the foreign listener")
        d = daemon_factory(servers)
        d.start()
        d.wait_state("a", "port_busy", 10)
        d.wait_state("b", "ready")
        watch = PidWatch(d).start()
        with Load(d) as load:
            load.more(20)
        assert foreign.poll() is None, "the daemon must never signal a foreign process"
        assert audit(d, watch, load=load, foreign=frozenset({foreign.pid})) == []
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()


def _listens(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_daemon_sigkill_under_load_then_adoption(daemon_factory):
    d = daemon_factory(_servers())
    watch = _start(d)
    pids = {n: d.server(n)["pid"] for n in SPEEDS}
    with Load(d) as load:
        d.kill()  # the servers keep running; the client goes on from the config
        load.more(20, timeout=60)
        d.start()
        for name, pid in pids.items():
            assert d.wait_state(name, "ready")["pid"] == pid, "adopted, not relaunched"
        load.more(10)
    assert audit(d, watch, load=load) == []
    assert watch.history == {n: [p] for n, p in pids.items()}


@pytest.mark.slow
def test_sighup_with_a_changed_server_loses_no_request(daemon_factory):
    d = daemon_factory(_servers())
    watch = _start(d)
    pids = {n: d.server(n)["pid"] for n in SPEEDS}
    with Load(d) as load:
        port = d.server("a")["port"]
        text = d.config_path.read_text().replace(
            f"port = {port}\n", f'port = {port}\nenv = {{ SIM_CHANGED = "1" }}\n'
        )
        d.config_path.write_text(text)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.server("a")["pid"] not in (None, pids["a"]), 15, "a relaunched")
        d.wait_state("a", "ready")
        load.more(20)
    rows = audit(d, watch, load=load)
    assert [(r[0], r[1]) for r in rows] == [("a", "config_change")]
    assert watch.history["b"] == [pids["b"]] and watch.history["c"] == [pids["c"]]


@pytest.mark.slow
def test_every_server_failing_is_one_clear_error_not_a_hang(daemon_factory):
    # Probes every 5 s: the request below meets the servers before any probe does, so
    # the daemon still offers them all and the error lists one attempt per server.
    d = daemon_factory(_servers(), daemon={"probe_interval_s": 5.0})
    watch = _start(d)
    for name in SPEEDS:
        sim_fault(d.server(name)["port"], "error")
    with ModelServer("8B", config=str(d.config_path)) as llm:
        began = time.monotonic()
        with pytest.raises(NoServerAvailable) as err:
            llm.get_completion("anyone?", max_tokens=4)
        assert time.monotonic() - began < 10
    assert len(err.value.attempts) == 3, err.value.attempts  # max_retry, each named
    assert {a.server for a in err.value.attempts} == set(SPEEDS)
    for name in SPEEDS:
        sim_fault(d.server(name)["port"], "normal")
    with ModelServer("8B", config=str(d.config_path)) as llm:
        assert llm.get_completion("back?", max_tokens=4).text
    assert audit(d, watch) == []
