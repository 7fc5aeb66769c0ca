"""Descriptor exhaustion (issue 12, item 1), against the API in a process of its own
whose open-files limit is 300, as the security review ran the daemon.

Holding 400 connections took every descriptor, so every health check failed with
EMFILE; and while the descriptors were gone, each failed accept() logged a
traceback (285 MB in 40 s). Here the API keeps a reserve of descriptors whatever
its clients do, and running out of them costs a log line, not a flood.

The API runs in ``python -c`` calling :func:`serve_main` below, which also gives the
test a way to use up the process's descriptors (SIGUSR1) and give them back
(SIGUSR2), as a leak elsewhere in the daemon would.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord_ms.api import DESCRIPTOR_RESERVE, connection_limits

NOFILE = 300
HERE = Path(__file__).resolve().parent


def serve_main(folder: str, nofile: int) -> None:
    """Run in the child: the API on ``folder``/api.sock with RLIMIT_NOFILE ``nofile``."""
    import asyncio
    import logging
    import resource

    sys.path.insert(0, str(HERE))
    from test_api import FakeActions, make_config

    from supervisord_ms.api import ApiContext, build_app, serve_unix
    from supervisord_ms.registry import Registry
    from supervisord_ms.store import Store, StoreWriter

    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    config = make_config(Path(folder))
    writer = StoreWriter(Path(folder) / "state.db")
    writer.start()
    store = Store(Path(folder) / "state.db")
    ctx = ApiContext(
        registry=Registry(config),
        store=store,
        writer=writer,
        actions=FakeActions(),
        status=lambda: {"version": "test", "pid": os.getpid()},
    )
    spent: list[int] = []

    def use_up() -> None:
        with contextlib.suppress(OSError):
            while True:
                spent.append(os.open("/dev/null", os.O_RDONLY))
        print("FULL", len(spent), flush=True)

    def give_back() -> None:
        while spent:
            os.close(spent.pop())
        print("FREE", flush=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, use_up)
        loop.add_signal_handler(signal.SIGUSR2, give_back)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        runner = await serve_unix(build_app(ctx), f"{folder}/api.sock", mode=0o666)
        print("READY", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
    writer.close()
    store.close()


class ApiProcess:
    def __init__(self, folder: str, nofile: int):
        self.folder = folder
        self.sock = f"{folder}/api.sock"
        self.stderr_path = Path(folder) / "api.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); "
            "from test_attack_api_descriptors import serve_main; "
            f"serve_main({folder!r}, {nofile})"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
        )
        self.expect("READY", 30)

    def expect(self, word: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().decode()
                if line.startswith(word):
                    return line
                if not line:
                    break
        raise AssertionError(f"the API process did not say {word}:\n{self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def open_descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def get_status(self, timeout: float = 5) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    data += chunk
            return data

    def served(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.get_status(1).startswith(b"HTTP/1.1 200"):
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()


@pytest.fixture
def api_process() -> Iterator[ApiProcess]:
    folder = tempfile.mkdtemp(prefix="msd-nofile-")
    os.chmod(folder, 0o755)
    proc = ApiProcess(folder, NOFILE)
    try:
        yield proc
    finally:
        proc.stop()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _connect_many(path: str, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError:
            s.close()
            break
        held.append(s)
    return held


def test_connections_never_take_the_descriptor_reserve(api_process: ApiProcess) -> None:
    limits = connection_limits(NOFILE)
    held = _connect_many(api_process.sock, 400)
    try:
        assert len(held) == 400  # the kernel queues them; the daemon decides
        time.sleep(1.0)
        # The daemon holds at most its connection limit; the reserve stays free.
        in_use = api_process.open_descriptors()
        assert in_use <= NOFILE - DESCRIPTOR_RESERVE + 60, in_use
        refused = 0
        for s in held:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                if s.recv(12) == b"HTTP/1.1 503":
                    refused += 1
        assert refused >= 400 - limits.total, refused
    finally:
        for s in held:
            s.close()
    assert api_process.served(5), api_process.log()
    assert "Traceback" not in api_process.log()


def test_running_out_of_descriptors_logs_a_line_not_a_flood(api_process: ApiProcess) -> None:
    api_process.proc.send_signal(signal.SIGUSR1)
    api_process.expect("FULL", 10)
    held = _connect_many(api_process.sock, 200)
    try:
        time.sleep(2.0)  # the daemon cannot accept any of them meanwhile
    finally:
        api_process.proc.send_signal(signal.SIGUSR2)
        api_process.expect("FREE", 10)
        for s in held:
            s.close()
    assert api_process.served(10), api_process.log()
    log = api_process.log()
    accept_lines = [line for line in log.splitlines() if "accept" in line]
    assert 1 <= len(accept_lines) <= 2, log[-3000:]
    assert "Too many open files" in accept_lines[0]
    assert "Traceback" not in log
    assert len(log) < 20_000
