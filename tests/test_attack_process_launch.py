"""Issue 12, item 7 (the process side): config values that silently killed
background work.

The attacks, as the review ran them:

- ``env = {"BAD=KEY" = "1"}``: the launch raised ValueError inside the supervisor
  task, the server went ``fatal`` with "internal error", and stayed fatal after the
  config was fixed and reloaded (the task had ended: nobody heard the restart).
- ``retention_days = 1000000``: housekeeping died on its first round without a log
  line; samples and server logs were never rotated again.
- housekeeping iterated ``self.supervisors`` across an await: a reload at the wrong
  moment killed it too.

The config now refuses both values (config.py); these tests hand the process side
the bad values directly, below the config's validation, because the supervisor and
the daemon must survive whatever reaches them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import free_port
from daemon_harness import make_daemon

from supervisord_ms import daemon as daemon_mod
from supervisord_ms import launcher, states
from supervisord_ms.config import Config
from supervisord_ms.daemon import Daemon, load_daemon_config
from supervisord_ms.gpus import open_gpu_view
from supervisord_ms.launcher import LaunchError, LaunchSpec, spawn
from supervisord_ms.registry import Registry
from supervisord_ms.supervisor import ServerSupervisor, SupervisorContext

PY = sys.executable


# --- spawn: what execve refuses is a launch error with a clear message ------------------


@pytest.mark.parametrize(
    ("env", "argv_extra", "expected"),
    [
        ({"BAD=KEY": "1"}, (), "'BAD=KEY'"),
        ({"": "1"}, (), "name ''"),
        ({"NUL\0NAME": "1"}, (), "NUL"),
        ({"HF_TOKEN": "hf_secret\0tail"}, (), "HF_TOKEN"),
        ({}, ("--x", "a\0b"), "NUL byte"),
    ],
)
def test_a_launch_execve_would_refuse_is_a_launch_error(
    tmp_path: Path, env: dict[str, str], argv_extra: tuple[str, ...], expected: str
):
    spec = LaunchSpec(argv=(PY, "-c", "pass", *argv_extra), env=env)
    with pytest.raises(LaunchError) as info:
        spawn(spec, tmp_path / "s.log")
    message = str(info.value)
    assert expected in message
    assert "fix the config" in message
    assert "hf_secret" not in message  # a value is never quoted: it may be a secret


# --- the supervisor: a launch that raises, then a fixed config --------------------------


@dataclass
class FakeWriter:
    """Stands in for the StoreWriter: keeps what the supervisor writes."""

    events: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add_event(self, **kw: Any) -> None:
        self.events.append(kw)

    def add_restart(self, **kw: Any) -> None:
        self.restarts.append(kw)

    def upsert_server(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


async def poll(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def _config(tmp_path: Path, **restart: Any) -> Config:
    d = make_daemon(
        tmp_path / "d",
        [{"name": "a", "port": free_port(), "gpus": [0]}],
        restart={"max_failures": 2, "backoff_initial_s": 0.05, "backoff_max_s": 0.1, **restart},
    )
    return load_daemon_config(d.config_path)


async def _supervise(
    config: Callable[[], Config], scenario: Callable[[ServerSupervisor, FakeWriter], Any]
) -> None:
    """Run one server's supervisor task on this loop, as the daemon does."""
    async with aiohttp.ClientSession() as http:
        writer = FakeWriter()
        gpus = open_gpu_view(config().daemon.gpu_backend)
        ctx = SupervisorContext(config=config, writer=writer, http=http, gpu_view=lambda: gpus)
        sup = ServerSupervisor(Registry(config()).servers["a"], ctx)
        sup.start_task()
        try:
            await scenario(sup, writer)
        finally:
            await asyncio.wait_for(sup.shutdown(), 30)


def test_bad_env_is_a_launch_failure_and_the_fixed_config_brings_it_back(tmp_path: Path):
    good = _config(tmp_path)
    bad = replace(good, sglang=replace(good.sglang, env={**good.sglang.env, "BAD=KEY": "1"}))
    current = [bad]

    async def scenario(sup: ServerSupervisor, writer: FakeWriter) -> None:
        await poll(lambda: sup.record.state == states.FATAL, 20, "fatal after failed launches")
        error = sup.record.last_error or ""
        assert "launch failed" in error and "BAD=KEY" in error, error
        assert "internal error" not in error
        # What a reload with the fixed config does: the changed server is restarted.
        current[0] = good
        sup.request("restart", reason="config_change")
        await poll(lambda: sup.record.state == states.READY, 30, "ready after the fix")
        assert writer.restarts[-1]["reason"] == "config_change"

    asyncio.run(_supervise(lambda: current[0], scenario))


def test_an_error_in_the_supervisor_task_is_logged_and_the_task_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # Any exception a pass of the task did not foresee (here: the first launch).
    config = _config(tmp_path)
    real_spawn = launcher.spawn
    calls: list[int] = []

    def spawn_once_broken(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in a launch")
        return real_spawn(*args, **kw)

    monkeypatch.setattr(launcher, "spawn", spawn_once_broken)

    async def scenario(sup: ServerSupervisor, writer: FakeWriter) -> None:
        await poll(lambda: sup.record.state == states.READY, 30, "ready after the error")
        assert len(calls) == 2
        kinds = [e["kind"] for e in writer.events]
        assert "supervisor_error" in kinds
        # Stop and start still work: the task is alive.
        sup.request("stop")
        await poll(lambda: sup.record.state == states.STOPPED, 20, "stopped")
        sup.request("start")
        await poll(lambda: sup.record.state == states.READY, 30, "ready again")

    with caplog.at_level(logging.ERROR, logger="modelserverd"):
        asyncio.run(_supervise(lambda: config, scenario))
    assert any("a bug in a launch" in r.getMessage() for r in caplog.records)


# --- housekeeping and the other background tasks ----------------------------------------


def _daemon(tmp_path: Path, **daemon: Any) -> Daemon:
    config = _config(tmp_path)
    if daemon:
        config = replace(config, daemon=replace(config.daemon, **daemon))
    return Daemon(config)


def _close(d: Daemon) -> None:
    d.writer.close()
    d.store.close()


async def _run_briefly(coro: Any, until: Callable[[], bool], what: str) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    try:
        await poll(lambda: until() or task.done(), 10, what)
        await asyncio.sleep(0.05)
        assert not task.done(), f"the task ended: {task.exception()!r}"
        return task
    finally:
        task.cancel()


def test_housekeeping_survives_a_retention_far_beyond_any_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(daemon_mod, "HOUSEKEEPING_S", 0.02)
    monkeypatch.setattr(daemon_mod, "LOG_MAX_BYTES", 10)
    d = _daemon(tmp_path, retention_days=1_000_000)
    try:
        log_dir = Path(d.config.daemon.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "a.log").write_text("x" * 100)
        d.supervisors = {"a": object()}  # type: ignore[dict-item]  # only names are read
        rotated = log_dir / "a.log.1"
        asyncio.run(_run_briefly(d._housekeeping(), rotated.exists, "the log rotated"))
        assert rotated.read_text() == "x" * 100
    finally:
        _close(d)


def test_housekeeping_survives_a_reload_during_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(daemon_mod, "HOUSEKEEPING_S", 0.02)
    d = _daemon(tmp_path)
    calls: list[Path] = []

    def rotate_while_servers_change(path: Any, *args: Any) -> bool:
        calls.append(Path(path))
        # A reload adds a server while the round awaits this rotation.
        d.supervisors[f"added{len(calls)}"] = object()  # type: ignore[assignment]
        return False

    monkeypatch.setattr(daemon_mod, "rotate_log", rotate_while_servers_change)
    try:
        d.supervisors = {"a": object(), "b": object()}  # type: ignore[dict-item]
        asyncio.run(_run_briefly(d._housekeeping(), lambda: len(calls) >= 8, "several rounds"))
    finally:
        _close(d)


def test_a_failing_housekeeping_step_is_logged_and_the_rest_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(daemon_mod, "HOUSEKEEPING_S", 0.02)
    monkeypatch.setattr(daemon_mod, "LOG_MAX_BYTES", 10)
    d = _daemon(tmp_path)

    def broken(cutoff: float, batch: int = 500) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(d.writer, "delete_samples_older_than", broken)
    try:
        log_dir = Path(d.config.daemon.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "a.log").write_text("x" * 100)
        d.supervisors = {"a": object()}  # type: ignore[dict-item]
        with caplog.at_level(logging.ERROR, logger="modelserverd"):
            asyncio.run(_run_briefly(d._housekeeping(), (log_dir / "a.log.1").exists, "rotation"))
    finally:
        _close(d)
    assert any(
        "housekeeping" in r.getMessage() and "No space left" in r.getMessage()
        for r in caplog.records
    )


def test_a_background_task_that_fails_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(daemon_mod, "TASK_RESTART_S", 0.01)
    d = _daemon(tmp_path)
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    try:
        with caplog.at_level(logging.ERROR, logger="modelserverd"):
            asyncio.run(asyncio.wait_for(d._keep_running("prober", flaky), 10))
    finally:
        _close(d)
    assert len(runs) == 3
    logged = [r.getMessage() for r in caplog.records]
    assert any("background task prober failed" in m and "failure 1" in m for m in logged)
