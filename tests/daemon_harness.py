"""Run the real daemon as a subprocess against simulated servers and GPUs.

Every end-to-end test gets its own folder with a generated config, a ``file:``
GPU view, the socket, state.db and logs; cleanup is registered at spawn time and
kills whatever the test left (any process whose command line names the folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisord_ms.apiclient import ApiError, DaemonUnreachable, call
from supervisord_ms.gpus import write_file_gpu_view

FAST_DAEMON = {
    "probe_interval_s": 0.3,
    # Above the SGLANG_HEALTH_CHECK_TIMEOUT below, as check-config demands: SGLang's
    # /health takes at least 1 s (it looks for output once a second).
    "health_timeout_s": 6.0,
    "health_failures": 2,
    # The scheduler watch calls a server with quick steps hung after half of this
    # (liveness.hang_silence_s): 3 s, short yet long enough for a loaded 2-core
    # machine to answer /v1/loads. Below SGLANG_HEALTH_CHECK_TIMEOUT, as the
    # defaults are (10 s and 20 s), so that a hang is found by the scheduler watch
    # before SGLang's own /health gives up.
    "hang_timeout_s": 6.0,
    "startup_timeout_s": 20.0,
    "stop_timeout_s": 2.0,
}
FAST_RESTART = {
    "backoff_initial_s": 0.2,
    "backoff_max_s": 2.0,
    "max_failures": 5,
    "failure_window_s": 60.0,
    "stable_after_s": 60.0,
}
# The drain after SIGTERM looks every 0.2 s instead of SGLang's 5 s, so that the
# hundreds of stops in the suite do not each wait seconds; the stop tests that are
# about draining use SGLang's own period.
SIM_ARGS = [
    "--sim-startup-s",
    "0.2",
    "--sim-warmup-s",
    "0.2",
    "--sim-gpu-mib",
    "60000",
    "--sim-drain-poll-s",
    "0.2",
]
SGLANG_ENV = {"SGLANG_HEALTH_CHECK_TIMEOUT": "5"}
PROFILES = ("current", "legacy")


def _toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _table(name: str, values: dict[str, Any]) -> list[str]:
    return [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items()), ""]


def sim_fault(port: int, mode: str, **extra: Any) -> dict[str, Any]:
    """Change a running simulated server's behaviour (``POST /sim/fault``); its answer
    is the simulator's state (``/sim/state``) at that moment."""
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/sim/fault",
        data=json.dumps({"mode": mode, **extra}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"{}")


def wait_until(
    predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {message}")
        time.sleep(interval)


@dataclass
class DaemonUnderTest:
    dir: Path
    config_path: Path
    servers: list[dict]
    proc: subprocess.Popen | None = None
    socket_path: str | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.dir / "daemon.log"

    @property
    def socket(self) -> str:
        return self.socket_path or str(self.dir / "api.sock")

    @property
    def db(self) -> str:
        return str(self.dir / "state.db")

    @property
    def gpu_file(self) -> str:
        return str(self.dir / "gpus.json")

    def start(
        self,
        *,
        wait: bool = True,
        env: dict | None = None,
        log_level: str = "debug",
        timeout: float = 20.0,
        new_session: bool = False,
    ) -> DaemonUnderTest:
        """Spawn ``modelserverd run``; ``new_session`` lets a caller kill its whole
        group (the benchmarks do), ``log_level`` keeps debug logging out of CPU figures."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "supervisord_ms.cli",
                    "run",
                    "--config",
                    str(self.config_path),
                    "--log-level",
                    log_level,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or dict(os.environ),
                start_new_session=new_session,
            )
        finally:
            log.close()
        if wait:
            wait_until(self._answers, timeout, f"daemon socket {self.socket}\n{self.log()}")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            call(self.socket, "GET", "/v1/status", timeout=2)
            return True
        except DaemonUnreachable:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        return call(self.socket, method, path, body, timeout=timeout)

    def server(self, name: str) -> dict:
        return self.api("GET", f"/v1/servers/{name}")

    def wait_state(self, name: str, state: str, timeout: float = 20) -> dict:
        def check() -> dict | None:
            s = self.server(name)
            return s if s["state"] == state else None

        try:
            return wait_until(check, timeout, f"{name} in state {state}")
        except AssertionError:
            raise AssertionError(
                f"{name} not {state} after {timeout} s: {self.server(name)}\n{self.log()}"
            ) from None

    def wait_all_ready(self, timeout: float = 30) -> None:
        for s in self.servers:
            if s.get("managed", True):
                self.wait_state(s["name"], "ready", timeout)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def query(self, sql: str, *args: Any) -> list[tuple]:
        import sqlite3

        conn = sqlite3.connect(self.db, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes whose command line names this test's folder (sims and their children)."""
        me = str(self.dir)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                ours = any(me in part for part in proc.info["cmdline"] or [])
                if ours and (self.proc is None or proc.pid != self.proc.pid):
                    found.append(proc)
        return found


def make_daemon(
    directory: Path,
    servers: list[dict],
    *,
    daemon: dict | None = None,
    restart: dict | None = None,
    sim_args: list[str] | None = None,
    gpus: int = 4,
    profile: str = "current",
    sglang_env: dict[str, str] | None = None,
) -> DaemonUnderTest:
    directory.mkdir(parents=True, exist_ok=True)
    write_file_gpu_view(str(directory / "gpus.json"), gpus)
    lines = _table(
        "daemon",
        {
            "socket": str(directory / "api.sock"),
            "state_db": str(directory / "state.db"),
            "log_dir": str(directory / "logs"),
            "gpu_backend": "file:" + str(directory / "gpus.json"),
            **FAST_DAEMON,
            **(daemon or {}),
        },
    )
    lines += _table("restart", {**FAST_RESTART, **(restart or {})})
    lines += _table(
        "sglang",
        {
            "python": sys.executable,
            "module": "supervisord_ms.sim",
            "extra_args": [
                *SIM_ARGS,
                "--sim-sglang-profile",
                profile,
                "--sim-gpu-file",
                str(directory / "gpus.json"),
                *(sim_args or []),
            ],
        },
    )
    lines += _table("sglang.env", SGLANG_ENV if sglang_env is None else sglang_env)
    model = directory / "model"
    model.mkdir(exist_ok=True)
    for server in servers:
        values = {"ip": "127.0.0.1", "model_size": "8B", "model_path": str(model), **server}
        lines += ["[[servers]]", *(f"{k} = {_toml_value(v)}" for k, v in values.items()), ""]
    config_path = directory / "config.toml"
    config_path.write_text("\n".join(lines))
    return DaemonUnderTest(
        dir=directory,
        config_path=config_path,
        servers=servers,
        socket_path=(daemon or {}).get("socket"),
    )


@pytest.fixture
def sglang_profile(request: pytest.FixtureRequest) -> str:
    """The simulated SGLang generation of a test's daemons: "current", or each of
    PROFILES in a module that sets ``SGLANG_PROFILES = PROFILES``."""
    return getattr(request, "param", "current")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    profiles = getattr(metafunc.module, "SGLANG_PROFILES", None)
    if profiles and "sglang_profile" in metafunc.fixturenames:
        metafunc.parametrize("sglang_profile", profiles, indirect=True)


@pytest.fixture
def daemon_factory(tmp_path: Path, sglang_profile: str) -> Iterator[Callable[..., DaemonUnderTest]]:
    made: list[DaemonUnderTest] = []

    def factory(servers: list[dict], **kw: Any) -> DaemonUnderTest:
        kw.setdefault("profile", sglang_profile)
        d = make_daemon(tmp_path / f"d{len(made)}", servers, **kw)
        made.append(d)
        return d

    yield factory
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(Exception):
                d.stop(timeout=20)
            if d.proc.poll() is None:
                d.proc.kill()
        for proc in d.leftover_processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()


__all__ = [
    "ApiError",
    "DaemonUnderTest",
    "daemon_factory",
    "make_daemon",
    "sglang_profile",
    "sim_fault",
    "wait_until",
]
