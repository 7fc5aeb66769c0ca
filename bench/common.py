"""Helpers shared by the benchmarks: result rows, the machine line, work folders,
and a daemon-under-benchmark that always cleans up after itself.

Every benchmark prints one JSON line per result row (see :func:`emit`); ``bench/run.py``
collects them into ``bench/results.json``. A row:

    {"scenario", "metric", "unit", "ours", "sglang_router", "seed_policy",
     "round_robin", "target", "better", "note"}

``target`` is text with its comparison (``">= 10000"``, ``"<= 1"``, ``"< 5"``) or None;
``better`` says which way is good (``"higher"`` or ``"lower"``), so the report can tell
when ours is behind a comparison; ``note`` is the benchmark's own account of a miss.

Daemons are started with the real ``modelserverd run`` against simulated SGLang servers
(``python -m supervisord_ms.sim``) and a ``file:`` GPU view; the config comes from the
test harness's ``make_daemon`` (``tests/daemon_harness.py``). Unlike the tests, the
daemon logs at the default level (debug logging would inflate its CPU use), and every
process it left behind is found by the work folder named on its command line and killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import make_daemon, sim_fault  # noqa: E402, F401 - shared with the tests
from daemon_harness import wait_until as wait_for  # noqa: E402, F401 - shared with the tests

from supervisord_ms.store import parse_iso  # noqa: E402

# The daemon's defaults from the design contract; the benchmarks start from these,
# not from the test harness's fast settings, unless a scenario says otherwise.
DEFAULT_DAEMON = {
    "probe_interval_s": 5.0,
    "health_timeout_s": 30.0,
    "health_failures": 3,
    "hang_timeout_s": 10.0,
    "startup_timeout_s": 1800.0,
    "stop_timeout_s": 30.0,
}
DEFAULT_RESTART = {
    "backoff_initial_s": 1.0,
    "backoff_max_s": 300.0,
    "max_failures": 5,
    "failure_window_s": 600.0,
    "stable_after_s": 300.0,
}
# Where run.py asks a benchmark to work (so it can find leftovers after a timeout).
WORK_ENV = "MSBENCH_WORK_DIR"
# Set on processes whose command line cannot name their folder (the SGLang router
# retitles itself "sglang::router"): leftovers are found by this variable instead.
FOLDER_ENV = "MSBENCH_FOLDER"


# --- rows ----------------------------------------------------------------------------


def row(
    scenario: str,
    metric: str,
    unit: str,
    ours: float | None,
    *,
    better: str,
    target: str | None = None,
    seed_policy: float | None = None,
    round_robin: float | None = None,
    sglang_router: float | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    return {
        "scenario": scenario,
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "sglang_router": sglang_router,
        "seed_policy": seed_policy,
        "round_robin": round_robin,
        "target": target,
        "better": better,
        "note": note,
    }


def emit(r: dict[str, Any]) -> None:
    """Print one result row as one JSON line (what run.py collects)."""
    print(json.dumps(r), flush=True)


def meets(value: float | None, target: str | None) -> bool | None:
    """Whether ``value`` meets a target written like ``">= 10000"``; None when either
    is missing."""
    if value is None or not target:
        return None
    op, _, number = target.strip().partition(" ")
    bound = float(number)
    checks: dict[str, Callable[[float, float], bool]] = {
        ">=": lambda a, b: a >= b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b,
    }
    if op not in checks:
        raise ValueError(f"target {target!r}: expected '<op> <number>' with op in {list(checks)}")
    return checks[op](float(value), bound)


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        raise ValueError("percentile of nothing")
    k = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[k - 1]


# --- the machine -----------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count() or 0
    ram_gib = psutil.virtual_memory().total / 2**30
    return (
        f"{model}, {cores} cores, {ram_gib:.1f} GiB RAM, "
        f"Python {platform.python_version()} ({platform.system()} {platform.release()})"
    )


# --- work folders and signals ----------------------------------------------------------


@contextlib.contextmanager
def work_dir(name: str) -> Iterator[Path]:
    """A fresh folder for one scenario: under run.py's folder when given, else a temp
    folder. Removed afterwards (run.py removes its own)."""
    parent = os.environ.get(WORK_ENV)
    if parent:
        path = Path(parent) / name
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        own = False
    else:
        path = Path(tempfile.mkdtemp(prefix=f"msbench-{name}-"))
        own = True
    try:
        yield path
    finally:
        kill_processes_naming(path)
        if own:
            shutil.rmtree(path, ignore_errors=True)


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (what run.py sends on a timeout) into SystemExit, so ``finally``
    blocks stop the daemons and simulators this process started."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def kill_processes_naming(folder: Path | str, *, exclude: set[int] | None = None) -> list[int]:
    """Kill every process whose command line names ``folder`` (daemons and simulators
    started for one benchmark carry its config and GPU-view paths), or whose
    ``MSBENCH_WORK_DIR`` / ``MSBENCH_FOLDER`` variable lies in it (what run.py and the
    router launcher set). Returns their pids."""
    me = str(folder)
    skip = {os.getpid(), *(exclude or set())}
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline", "status", "environ"], ad_value=None):
        with contextlib.suppress(psutil.Error):
            if proc.pid in skip or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.info["environ"] or {}
            marked = any(
                env.get(key, "") == me or env.get(key, "").startswith(me + os.sep)
                for key in (WORK_ENV, FOLDER_ENV)
            )
            if marked or any(me in part for part in proc.info["cmdline"] or []):
                found.append(proc)
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(found, timeout=10)
    return [p.pid for p in found]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_scenarios(scenarios: dict[str, Callable[[], Any]], doc: str | None) -> int:
    """The command line every benchmark script shares: run the named scenarios."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("scenarios", nargs="+", choices=sorted(scenarios))
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    for name in args.scenarios:
        scenarios[name]()
    return 0


# --- a daemon under benchmark -------------------------------------------------------------


class BenchDaemon:
    """``modelserverd run`` on a generated config, in its own session, at the default
    log level. Use as a context manager: leaving it stops the daemon (SIGTERM, which
    stops every server it launched), then kills anything that names the folder."""

    def __init__(
        self,
        folder: Path,
        servers: list[dict[str, Any]],
        *,
        daemon: dict[str, Any] | None = None,
        restart: dict[str, Any] | None = None,
        sim_args: list[str] | None = None,
        gpus: int = 4,
        stop_timeout: float = 90.0,
        profile: str = "current",
        sglang_env: dict[str, str] | None = None,
    ):
        self.folder = folder
        self.servers = servers
        self.harness = make_daemon(
            folder,
            servers,
            daemon={**DEFAULT_DAEMON, **(daemon or {})},
            restart={**DEFAULT_RESTART, **(restart or {})},
            sim_args=sim_args,
            gpus=gpus,
            profile=profile,
            sglang_env=sglang_env,
        )
        self.stop_timeout = stop_timeout

    @property
    def socket(self) -> str:
        return self.harness.socket

    @property
    def db(self) -> str:
        return self.harness.db

    def __enter__(self) -> BenchDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.harness.proc

    def start(self, timeout: float = 60.0) -> BenchDaemon:
        self.harness.start(log_level="info", timeout=timeout, new_session=True)
        return self

    def log(self) -> str:
        return self.harness.log()

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        return self.harness.api(method, path, body, timeout=timeout)

    def server(self, name: str) -> dict[str, Any]:
        return self.harness.server(name)

    def wait_state(self, name: str, state: str, timeout: float = 30) -> dict[str, Any]:
        return self.harness.wait_state(name, state, timeout)

    def all_servers(self) -> list[dict[str, Any]]:
        return self.api("GET", "/v1/servers", timeout=30)["servers"]

    def wait_all_ready(self, timeout: float) -> None:
        names = {s["name"] for s in self.servers}

        def ready() -> bool:
            return all(s["state"] == "ready" for s in self.all_servers() if s["name"] in names)

        wait_for(ready, timeout, f"all {len(names)} servers ready\n{self.log()}", 0.5)

    def query(self, sql: str, *args: Any) -> list[tuple]:
        return self.harness.query(sql, *args)

    def event_time(self, server: str, new_state: str, after: float, timeout: float = 15) -> float:
        """Unix time of the first state change of ``server`` to ``new_state`` after
        ``after`` (events are written in batches: poll until it is on disk)."""

        def find() -> float | None:
            for (ts,) in self.query(
                "select ts from events where server = ? and new_state = ? order by id",
                server,
                new_state,
            ):
                t = parse_iso(ts)
                if t >= after - 0.001:
                    return t
            return None

        return wait_for(find, timeout, f"event {server} -> {new_state}", 0.1)

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            kill_processes_naming(self.folder)


def to_unix(iso: str) -> float:
    return parse_iso(iso)
