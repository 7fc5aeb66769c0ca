"""The simulator as a first-class test tool.

Tests start real simulator processes (``python -m supervisord_ms.sim``), wait for
them by polling, talk to them over HTTP with the standard library, and rely on
the ``sim_factory`` fixture to leave nothing behind: the whole process group is
killed at the end of the test, and so are children that left the group or
outlived their parent (their pids are read from the sim's log).

    def test_something(sim_factory):
        sim = sim_factory(None, "--sim-ttft-s", "0")   # None: pick a free port
        sim.wait_ready()
        status, body = http_json("POST", sim.url + "/generate", {"text": "hi"})
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

SIM_MODULE = "supervisord_ms.sim"
CHILD_MODULE = "supervisord_ms.sim.child"
DEFAULT_MODEL_PATH = "/tmp/sim-model"
CHILD_PID_RE = re.compile(r"^sim: child \d+ pid=(\d+)", re.MULTILINE)

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; a
    timeout fails the test with ``message`` instead of hanging it. Exceptions the
    predicate raises count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # "not yet"; reported on timeout
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"after {timeout}s: {message}{detail}")
        time.sleep(interval)


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def http_json(method: str, url: str, body: Any = None, timeout: float = 5) -> tuple[int, Any]:
    """One HTTP request with a JSON body; returns (status, parsed JSON, or text, or
    None when empty). HTTP error statuses are returned, not raised; connection
    problems (refused, timeout) raise ``OSError`` so tests can assert on them."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _decode(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _decode(exc.read())


def http_sse(url: str, body: Any, timeout: float = 10) -> tuple[int, list[str]]:
    """POST and read a server-sent-events answer: (status, the ``data:`` payloads in
    order, ``[DONE]`` included)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            events = [
                line[5:].strip().decode()
                for line in response.read().split(b"\n")
                if line.startswith(b"data:")
            ]
            return response.status, events
    except urllib.error.HTTPError as exc:
        with exc:
            exc.read()
            return exc.code, []


def http_status(url: str, timeout: float = 2) -> int | None:
    """GET status code, or None when nothing answers (refused, reset, timeout)."""
    try:
        return http_json("GET", url, timeout=timeout)[0]
    except OSError:
        return None


def port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection succeeds: a hung server still accepts."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class SimProcess:
    """One running simulator started by :func:`start_sim`."""

    proc: subprocess.Popen
    port: int
    host: str
    log_path: str
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _fail(self, what: str) -> None:
        raise AssertionError(f"{what}\n--- sim log ({self.log_path}) ---\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 10) -> None:
        """Wait for a log line (log lines are the simulator's contract)."""

        def seen() -> bool:
            return text in self.log()

        try:
            wait_until(seen, timeout, message=f"sim log never showed {text!r}")
        except AssertionError:
            self._fail(f"sim pid {self.pid}: no {text!r} in the log within {timeout}s")

    def wait_ready(self, timeout: float = 15) -> SimProcess:
        """Poll /health until 200; fail fast, with the log, if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"sim pid {self.pid} exited with {self.proc.returncode} before ready")
            # SGLang's /health looks for output once a second, and waits for a first
            # token: give it the time left, at least 5 s.
            left = max(5.0, deadline - time.monotonic())
            if http_status(self.url + "/health", timeout=left) == 200:
                return self
            time.sleep(0.02)
        self._fail(f"sim pid {self.pid} not ready within {timeout}s")
        return self

    def wait_exit(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"sim pid {self.pid} still running after {timeout}s")
            raise

    def children(self) -> list[int]:
        """Pids of the simulated children, from the log."""
        return [int(p) for p in CHILD_PID_RE.findall(self.log())]

    def state(self, timeout: float = 5) -> dict[str, Any]:
        status, body = http_json("GET", self.url + "/sim/state", timeout=timeout)
        assert status == 200, (status, body)
        return body

    def fault(self, mode: str | None = None, **fields: Any) -> tuple[int, Any]:
        body = dict(fields)
        if mode is not None:
            body["mode"] = mode
        return http_json("POST", self.url + "/sim/fault", body)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM the main process (what a clean stop sends) and wait for its exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL the main process only, leaving its children to their fate, as
        when a server dies without cleaning up."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)

    def cleanup(self) -> None:
        """Kill everything this sim started: its process group, and children that left
        the group or were orphaned (only processes that are simulator children)."""
        child_pids = self.children()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in child_pids:
            _kill_sim_child(pid)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie counts as dead: an orphan that exited waits for
    PID 1 to reap it, which some container inits do only every few seconds."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_sim_child(pid: int) -> None:
    try:
        process = psutil.Process(pid)
        if CHILD_MODULE not in " ".join(process.cmdline()):
            return  # the pid was reused by something this test did not start
        process.kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def start_sim(
    port: int,
    *extra_args: str,
    env: dict[str, str] | None = None,
    gpu_file: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> SimProcess:
    """Spawn a simulator in its own session (like the daemon does), stdout and stderr
    to ``log_path``. ``CUDA_VISIBLE_DEVICES`` of the test runner is not inherited,
    so GPU choice comes only from ``env`` or the flags."""
    argv = [
        sys.executable,
        "-m",
        SIM_MODULE,
        "--model-path",
        DEFAULT_MODEL_PATH,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if gpu_file is not None:
        argv += ["--sim-gpu-file", os.fspath(gpu_file)]
    argv += [str(a) for a in extra_args]
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"sim-{port}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = os.fspath(log_path)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    return SimProcess(proc=proc, port=port, host="127.0.0.1", log_path=log_path, argv=argv)


SimFactory = Callable[..., SimProcess]


@pytest.fixture
def sim_factory(tmp_path: Path) -> Iterator[SimFactory]:
    """``sim_factory(port_or_None, *flags, env=, gpu_file=, log_path=)`` starts a sim;
    every sim started is killed, with all it spawned, when the test ends."""
    started: list[SimProcess] = []

    def factory(port: int | None = None, *extra_args: str, **kwargs: Any) -> SimProcess:
        port = free_port() if port is None else port
        kwargs.setdefault("log_path", tmp_path / f"sim-{port}-{len(started)}.log")
        sim = start_sim(port, *extra_args, **kwargs)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.cleanup()
