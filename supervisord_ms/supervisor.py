"""One asyncio task per local server: the state machine that launches, watches,
stops and relaunches it.

Each server has its own task, so one server's 30-minute weight loading or
missing GPU never delays another's restart. This module is the only place that
signals processes, and it only signals processes it started (see
:class:`launcher.OwnedProcess`).

    stopped ──start──> waiting_gpu / port_busy ──free──> starting ──/health 200──> ready
       ^                                                   │ exit/timeout        │ exit, hang
       └──stop── stopping <──restart/stop────────────────── backoff <────────────┘
                                                           │ max_failures
                                                           v
                                                         fatal ──start──> (again)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal as signals
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from . import backoff, launcher, liveness, sglang_api, states
from .config import Config, ServerConfig
from .gpus import GpuError, GpuView, is_gpu_free
from .registry import ServerRecord
from .store import StoreWriter

log = logging.getLogger("modelserverd")

# How often a ready server's scheduler is asked for its load (never more often than
# probe_interval_s): the answers spread the fleet's traffic and prove it alive.
LOAD_INTERVAL_S = 1.0
# How often a waiting server rechecks its GPUs and port, and a starting one its /health.
RECHECK_S = 1.0
STARTUP_POLL_S = 0.25
# Listing a process tree reads every /proc entry of the host: record a server's
# descendants once a second while it starts (and when it turns ready), then rarely.
STARTUP_REFRESH_S = 1.0
READY_REFRESH_S = 30.0
# How long an earlier daemon's server may take to answer /get_model_info (the front
# alone answers it) before it is taken for someone else's or a dead one.
ADOPT_TIMEOUT_S = 10.0
# After a stop, how long to wait for the port and GPU memory to be released.
RELEASE_EXTRA_S = 30.0


@dataclass
class Failure:
    """Why the current process has to go: becomes a ``restarts`` row on relaunch."""

    reason: str  # one of states.RESTART_REASONS
    message: str
    exit_code: int | None = None
    signal: int | None = None
    at: float = field(default_factory=time.time)
    backoff_s: float | None = None


@dataclass
class _LoadWatch:
    """The scheduler watch of one ready process: its one outstanding load query."""

    last_answer_at: float  # monotonic; the watch starts as if answered at ready
    pending_since: float | None = None  # the first query since the last answer
    task: asyncio.Task[sglang_api.Load | None] | None = None
    path: str | None = None  # the load endpoint this server answers on
    supported: bool = True

    def verdict_at(self, hang_timeout_s: float) -> float | None:
        """When the silence would become a hang, if no answer comes first."""
        if self.pending_since is None:
            return None
        return max(self.last_answer_at + hang_timeout_s, self.pending_since + hang_timeout_s / 2)


@dataclass
class SupervisorContext:
    """What every server's task shares: the daemon provides it."""

    config: Callable[[], Config]
    writer: StoreWriter
    http: aiohttp.ClientSession
    gpu_view: Callable[[], GpuView]  # raises GpuError when NVML is unavailable
    nccl_ports: set[int] = field(default_factory=set)
    rand: random.Random = field(default_factory=random.Random)


class ServerSupervisor:
    def __init__(self, record: ServerRecord, ctx: SupervisorContext):
        self.record = record
        self.ctx = ctx
        self.want_running = True
        self.history = backoff.FailureHistory()
        self.pending: Failure | None = None  # the failure the next launch answers
        self.proc: launcher.Spawned | None = None
        self.owned: launcher.OwnedProcess | None = None
        self.recorded: list[launcher.OwnedProcess] = []
        self.exit_future: asyncio.Future[int | None] | None = None
        self._pidfd: int | None = None
        self._wake = asyncio.Event()
        self._request: str | None = None  # "restart" | "stop" | "start" | "shutdown"
        self._restart_reason = "manual"
        self._task: asyncio.Task[None] | None = None
        self.nccl_port: int | None = None
        self.last_pid: int | None = None  # the process the next launch replaces

    # --- public -------------------------------------------------------------------
    @property
    def server(self) -> ServerConfig:
        return self.record.config

    @property
    def name(self) -> str:
        return self.record.name

    def start_task(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"supervise {self.name}")
        return self._task

    def request(self, what: str, *, reason: str = "manual") -> None:
        """Ask the task to restart, stop or start; it acts at its next await.
        ``reason`` is what a restart's row will say (``manual``, ``config_change``)."""
        self._restart_reason = reason
        if what in ("start", "restart"):
            self.want_running = True
        elif what in ("stop", "shutdown"):
            self.want_running = False
        self._request = what
        self._wake.set()

    async def shutdown(self) -> None:
        """Stop the server (if running) and end the task."""
        self.request("shutdown")
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- state --------------------------------------------------------------------
    def set_state(self, new: str, message: str = "", *, kind: str = "state") -> None:
        old = self.record.state
        if old == new and kind == "state" and not message:
            return
        self.record.state = new
        if new in (states.BACKOFF, states.FATAL, states.WAITING_GPU, states.PORT_BUSY) and message:
            self.record.last_error = message
        if new == states.READY:
            self.record.ready_since = time.monotonic()
        elif old == states.READY:
            self.record.ready_since = None
        text = f"server {self.name}: {old} -> {new}" + (f" ({message})" if message else "")
        level = (
            logging.WARNING
            if new in (states.FATAL, states.UNHEALTHY, states.BACKOFF)
            else logging.INFO
        )
        if old != new:
            log.log(level, text)
        self.ctx.writer.add_event(
            server=self.name, kind=kind, old_state=old, new_state=new, message=message or None
        )
        self.save()

    def save(self) -> None:
        """Mirror the record into the ``servers`` table (adoption reads it back)."""
        s, r = self.server, self.record
        self.ctx.writer.upsert_server(
            {
                "name": s.name,
                "ip": s.ip,
                "port": s.port,
                "model_size": s.model_size,
                "model_path": s.model_path,
                "gpus": list(s.gpus),
                "local": 1,
                "state": r.state,
                "pid": r.pid,
                "pgid": r.pgid,
                "started_at": r.started_at,
                "updated_at": time.time(),
                "proc_create_time": self.owned.create_time if self.owned else None,
                "cmdline": self.proc.cmdline if self.proc else self._adopted_cmdline,
                "descendants": [[p.pid, p.create_time] for p in self.recorded],
                "sglang_version": r.sglang_version,
            }
        )

    _adopted_cmdline: list[str] | None = None

    # --- main loop ----------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                req, self._request = self._request, None
                self._wake.clear()
                if req == "shutdown":
                    await self._stop_process("daemon shutting down")
                    self.set_state(states.STOPPED, "daemon shut down")
                    return
                if req == "restart" and (self.owned is None or not self.owned.alive()):
                    self.want_running = True
                    if self.pending is None:
                        self.pending = Failure(self._restart_reason, "restart requested")
                if req in ("start", "restart") and self.record.state == states.FATAL:
                    self.history = self.history.reset()
                    self.record.consecutive_failures = 0
                    self.pending = Failure("manual", "started by request after fatal")
                if not self.want_running:
                    await self._stop_process("stop requested")
                    self.set_state(states.STOPPED, "stopped by request" if req else "")
                    await self._wake.wait()
                    continue
                if self.record.state == states.FATAL and req not in ("start", "restart"):
                    await self._wake.wait()
                    continue
                if self.owned is None or not self.owned.alive():
                    if not await self._wait_for_resources():
                        continue
                    if not await self._launch():
                        continue
                failure = await self._watch()
                if failure is None:  # a request interrupted the watch
                    if self._request == "restart":
                        self._request = None
                        why = (
                            "config changed"
                            if self._restart_reason == "config_change"
                            else "restart requested"
                        )
                        self.pending = Failure(self._restart_reason, why)
                        await self._stop_process(why)
                    continue
                await self._handle_failure(failure)
        except asyncio.CancelledError:
            raise
        except Exception:  # the daemon must outlive a bug in one server's task
            log.exception("server %s: supervisor task failed; server left as is", self.name)
            self.set_state(states.FATAL, "internal error in the supervisor; see the daemon log")

    # --- before launch --------------------------------------------------------------
    async def _wait_for_resources(self) -> bool:
        """Wait until every GPU of the server is free and its port is free."""
        while True:
            blocker = await asyncio.to_thread(self._check_resources)
            if blocker is None:
                return True
            state, message = blocker
            if self.record.state != state or self.record.last_error != message:
                self.set_state(state, message)
            if await self._sleep_or_wake(RECHECK_S):
                return False

    def _check_resources(self) -> tuple[str, str] | None:
        cfg = self.ctx.config().daemon
        try:
            view = self.ctx.gpu_view()
            gpus = {g.index: g for g in view.snapshot()}
        except GpuError as exc:
            return states.WAITING_GPU, f"cannot read GPUs: {exc}"
        for index in self.server.gpus:
            info = gpus.get(index)
            if info is None:
                have = ", ".join(str(i) for i in sorted(gpus)) or "none"
                return states.WAITING_GPU, f"GPU {index} not found (this host has GPUs {have})"
            if not is_gpu_free(info, cfg.gpu_free_ratio):
                holders = ", ".join(f"pid {p.pid} ({p.used_mib} MiB)" for p in info.processes)
                return (
                    states.WAITING_GPU,
                    f"GPU {index} has {info.free_mib} of {info.total_mib} MiB free "
                    f"(needs {cfg.gpu_free_ratio:.0%}); held by {holders or 'unknown processes'}",
                )
        holder = launcher.port_listener(self.server.ip, self.server.port)
        if holder is not None:
            who = f"pid {holder}" if holder else "a process this daemon cannot see"
            return states.PORT_BUSY, f"port {self.server.port} on {self.server.ip} is held by {who}"
        return None

    async def _launch(self) -> bool:
        cfg = self.ctx.config()
        if (
            self.nccl_port is None
            or launcher.port_listener("127.0.0.1", self.nccl_port) is not None
        ):
            self.ctx.nccl_ports.discard(self.nccl_port or -1)
            self.nccl_port = launcher.free_tcp_port(
                self.ctx.nccl_ports | {s.port for s in cfg.servers}
            )
            self.ctx.nccl_ports.add(self.nccl_port)
        spec = launcher.build_launch(self.server, cfg.sglang, self.nccl_port)
        log_path = Path(cfg.daemon.log_dir) / f"{self.name}.log"
        old_pid = self.last_pid
        try:
            spawned = await asyncio.to_thread(launcher.spawn, spec, log_path)
        except launcher.LaunchError as exc:
            await self._handle_failure(Failure("crash", str(exc)))
            return False
        self.proc = spawned
        self.owned = spawned.owned
        self.recorded = []
        self._adopted_cmdline = None
        self.record.pid = spawned.pid
        self.record.pgid = spawned.pid
        self.record.started_at = time.time()
        self._forget_process_facts()
        self._watch_exit(spawned.pid)
        if self.pending is not None:
            failure, self.pending = self.pending, None
            self.record.restarts += 1
            self.ctx.writer.add_restart(
                server=self.name,
                reason=failure.reason,
                attempt=self.history.count(time.monotonic(), cfg.restart.failure_window_s)
                if failure.reason != "manual"
                else 0,
                backoff_s=failure.backoff_s,
                old_pid=old_pid,
                new_pid=spawned.pid,
                exit_code=failure.exit_code,
                signal=failure.signal,
                message=failure.message,
                ts=failure.at,
            )
        self.set_state(states.STARTING, f"pid {spawned.pid}: {spec.shell_line()}")
        return True

    def _forget_process_facts(self) -> None:
        """What the last process reported (version, load) is not this one's."""
        r = self.record
        r.sglang_version = r.incremental_streaming_output = None
        r.running = r.queued = r.capacity = r.load_checked_at = None

    # --- watching -------------------------------------------------------------------
    def _watch_exit(self, pid: int) -> None:
        """Resolve ``exit_future`` when the process exits (pidfd: works for adopted
        processes too, which are not our children)."""
        loop = asyncio.get_running_loop()
        self._close_pidfd()
        fut: asyncio.Future[int | None] = loop.create_future()
        self.exit_future = fut
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            fut.set_result(self._reap())
            return
        self._pidfd = fd

        def on_exit() -> None:
            self._close_pidfd()
            if not fut.done():
                fut.set_result(self._reap())

        loop.add_reader(fd, on_exit)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def _reap(self) -> int | None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                return self.proc.popen.wait(timeout=1.0)
        return None

    async def _watch(self) -> Failure | None:
        """Follow the process from starting to ready and while ready; return why it
        must be replaced, or None when a request (stop/restart) interrupted."""
        if self.record.state == states.STARTING:
            failure = await self._watch_startup()
            if failure is not None or self.record.state != states.READY:
                return failure
        return await self._watch_ready()

    async def _watch_startup(self) -> Failure | None:
        """Poll /health until 200: connection refused and 503 mean "still loading"."""
        d = self.ctx.config().daemon
        assert self.exit_future is not None
        launched = time.monotonic()
        last_refresh = 0.0
        while True:
            if time.monotonic() - launched > d.startup_timeout_s:
                return Failure(
                    "startup_timeout",
                    f"not ready after {d.startup_timeout_s:g} s (startup_timeout_s)",
                )
            if await self._wait_exit_or_wake(STARTUP_POLL_S):
                return self._exit_failure()
            if self._request is not None:
                return None
            if time.monotonic() - last_refresh >= STARTUP_REFRESH_S:
                self._refresh_descendants()
                last_refresh = time.monotonic()
            status = await self._health(d.health_timeout_s)
            if self.exit_future.done():
                return self._exit_failure()
            if status == 200:
                # SGLang's scheduler children exist by now: record them before any crash.
                self._refresh_descendants()
                self.set_state(states.READY, f"/health answered 200 (pid {self.record.pid})")
                return None

    async def _watch_ready(self) -> Failure | None:
        """Two watches while ready:

        * ``/health`` every probe_interval_s, without waiting for the check before
          (SGLang's own check can take up to SGLANG_HEALTH_CHECK_TIMEOUT):
          health_failures failures in a row make the server unhealthy;
        * the scheduler, through a load query every LOAD_INTERVAL_S, one at a time
          (see :mod:`liveness`): no answer for hang_timeout_s while the process lives
          is a hang, found within hang_timeout_s instead of SGLang's 20 s (or never,
          on versions whose /health does not generate). The answers are also the
          server's load, which spreads the fleet's traffic.
        """
        d = self.ctx.config().daemon
        assert self.exit_future is not None
        pending: deque[asyncio.Task[int | None]] = deque()
        load = _LoadWatch(time.monotonic())
        next_check = time.monotonic() + d.probe_interval_s
        load_every = min(LOAD_INTERVAL_S, d.probe_interval_s)
        next_load = time.monotonic() + load_every
        last_refresh = time.monotonic()
        failures = timeouts = 0
        info = asyncio.create_task(self._read_server_info(d.hang_timeout_s))
        try:
            while True:
                room = len(pending) < d.health_failures
                wakes = [next_load]
                if room:
                    wakes.append(next_check)
                verdict = load.verdict_at(d.hang_timeout_s)
                if verdict is not None:
                    wakes.append(verdict)
                timeout = max(0.0, min(wakes) - time.monotonic())
                wake = asyncio.ensure_future(self._wake.wait())
                waits: set[asyncio.Future] = {self.exit_future, wake}
                if pending:
                    waits.add(pending[0])
                if load.task is not None:
                    waits.add(load.task)
                try:
                    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                if self.exit_future.done():
                    return self._exit_failure()
                if self._request is not None:
                    return None
                now = time.monotonic()
                if load.task is not None and load.task.done():
                    self._take_load(load, now)
                if room and now >= next_check:
                    pending.append(asyncio.create_task(self._health(d.health_timeout_s)))
                    next_check = now + d.probe_interval_s
                if now >= next_load:
                    if load.task is None and load.supported:
                        load.task = asyncio.create_task(self._query_load(load, d.hang_timeout_s))
                        if load.pending_since is None:
                            load.pending_since = now
                    next_load = now + load_every
                if liveness.scheduler_hung(
                    last_answer_at=load.last_answer_at,
                    pending_since=load.pending_since,
                    now=now,
                    hang_timeout_s=d.hang_timeout_s,
                ):
                    front = await sglang_api.front_answers(
                        self.ctx.http, self.server.url, min(2.0, d.hang_timeout_s)
                    )
                    message = (
                        f"the scheduler answered no load query ({load.path}) for "
                        f"{now - load.last_answer_at:.1f} s (hang_timeout_s) while "
                        + ("the HTTP front answers" if front else "the HTTP front is silent too")
                    )
                    self.set_state(states.UNHEALTHY, message)
                    return Failure("hang", message)
                if now - last_refresh >= READY_REFRESH_S:
                    self._refresh_descendants()
                    last_refresh = now
                while pending and pending[0].done():
                    status = pending.popleft().result()
                    if status == 200:
                        failures = timeouts = 0
                        if self.record.state == states.UNHEALTHY:
                            self.set_state(states.READY, "/health answers again")
                        self._maybe_stable()
                        continue
                    failures += 1
                    timeouts += status is None
                    what = "no answer" if status is None else f"HTTP {status}"
                    if failures >= d.health_failures:
                        reason = "hang" if timeouts else "unhealthy"
                        message = f"{failures} consecutive failed health checks (last: {what})"
                        self.set_state(states.UNHEALTHY, message)
                        return Failure(reason, message)
                    log.info(
                        "server %s: health check failed (%s), %d of %d",
                        self.name,
                        what,
                        failures,
                        d.health_failures,
                    )
        finally:
            for task in (*pending, load.task, info):
                if task is not None:
                    task.cancel()

    async def _query_load(self, watch: _LoadWatch, timeout_s: float) -> sglang_api.Load | None:
        """One load query; None when the server has no load endpoint (old SGLang)."""
        try:
            load, watch.path = await sglang_api.read_load(
                self.ctx.http, self.server.url, timeout_s, prefer=watch.path
            )
        except sglang_api.NoLoadEndpoint:
            return None
        return load

    def _take_load(self, watch: _LoadWatch, now: float) -> None:
        """Read a finished load query. Only an answer ends the silence: after a query
        that got none, ``pending_since`` keeps the time the silence began."""
        task, watch.task = watch.task, None
        assert task is not None
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, sglang_api.NoAnswer):
            log.info("server %s: load query: %s", self.name, exc.reason)
            return
        if exc is not None:
            log.warning("server %s: load query failed: %r", self.name, exc)
            return
        load = task.result()
        if load is None:
            watch.supported, watch.pending_since = False, None
            log.info(
                "server %s: no /v1/loads or /get_load (an old SGLang): hangs are "
                "found by /health alone",
                self.name,
            )
            return
        watch.last_answer_at, watch.pending_since = now, None
        r = self.record
        r.running, r.queued, r.load_checked_at = load.running, load.queued, time.time()
        if load.capacity:
            r.capacity = load.capacity

    async def _read_server_info(self, timeout_s: float) -> None:
        """Version and streaming setting, once per process; not fatal when missing."""
        try:
            info = await sglang_api.read_server_info(self.ctx.http, self.server.url, timeout_s)
        except sglang_api.NoAnswer as exc:
            log.info("server %s: no server info: %s", self.name, exc.reason)
            return
        r = self.record
        r.sglang_version = info.version
        r.incremental_streaming_output = info.incremental_streaming_output
        if info.max_running_requests and not r.capacity:
            r.capacity = info.max_running_requests
        self.save()

    def _maybe_stable(self) -> None:
        cfg = self.ctx.config().restart
        if self.record.consecutive_failures and backoff.is_stable(
            self.record.ready_since, time.monotonic(), cfg.stable_after_s
        ):
            self.history = self.history.reset()
            self.record.consecutive_failures = 0
            self.ctx.writer.add_event(
                server=self.name,
                kind="stable",
                message=f"ready for {cfg.stable_after_s:g} s; failure count reset",
            )

    async def _wait_exit_or_wake(self, timeout: float) -> bool:
        assert self.exit_future is not None
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait(
                {self.exit_future, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            wake.cancel()
        return self.exit_future.done()

    async def _sleep_or_wake(self, timeout: float) -> bool:
        """Sleep; True when a request arrived meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        if self._request is not None:
            return True
        self._wake.clear()
        return False

    async def _health(self, timeout_s: float) -> int | None:
        """HTTP status of GET /health, or None when there was no answer."""
        url = f"{self.server.url}/health"
        try:
            async with self.ctx.http.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    def _refresh_descendants(self) -> None:
        if self.owned is None:
            return
        known = {p.pid: p for p in self.recorded if p.alive()}
        before = set(known)
        for child in launcher.descendants(self.owned.pid):
            known.setdefault(child.pid, child)
        self.recorded = list(known.values())
        if set(known) != before:
            self.save()

    def _exit_failure(self) -> Failure:
        assert self.exit_future is not None
        code = self.exit_future.result()
        if code is None:
            return Failure("crash", f"pid {self.record.pid} exited (exit status unknown)")
        if code < 0:
            sig = -code
            try:
                name = signals.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return Failure("crash", f"pid {self.record.pid} killed by {name}", signal=sig)
        return Failure("crash", f"pid {self.record.pid} exited with code {code}", exit_code=code)

    # --- failure and stop -------------------------------------------------------------
    async def _handle_failure(self, failure: Failure) -> None:
        cfg = self.ctx.config().restart
        # A hung server's requests can never finish: no drain, SIGKILL at once.
        await self._stop_process(failure.message, failed=True, drain=failure.reason != "hang")
        now = time.monotonic()
        self.history = self.history.record(now, cfg.failure_window_s)
        self.record.consecutive_failures = self.history.count(now, cfg.failure_window_s)
        self.record.last_error = failure.message
        decision = backoff.decide_restart(
            self.history,
            now,
            max_failures=cfg.max_failures,
            window_s=cfg.failure_window_s,
            initial_s=cfg.backoff_initial_s,
            max_s=cfg.backoff_max_s,
            rand=self.ctx.rand.random(),
            name=self.name,
        )
        if decision.action == "fatal":
            self.pending = None
            self.set_state(states.FATAL, f"{failure.message}; {decision.reason_text}")
            return
        failure.backoff_s = decision.delay_s
        self.pending = failure
        self.set_state(
            states.BACKOFF,
            f"{failure.reason}: {failure.message}; relaunch in {decision.delay_s:.2f} s "
            f"(attempt {decision.attempt})",
        )
        # The backoff counts from the failure: the cleanup above is part of the wait.
        await self._sleep_or_wake(max(0.0, decision.delay_s - (time.time() - failure.at)))

    async def _stop_process(self, why: str, *, failed: bool = False, drain: bool = True) -> None:
        """Stop whatever is left of the process tree and wait until its port and GPU
        memory are released. ``drain``: give SGLang ``stop_timeout_s`` to finish its
        requests after the SIGTERM."""
        owned, pgid = self.owned, self.record.pgid
        if owned is None:
            return
        self.last_pid = owned.pid
        cfg = self.ctx.config().daemon
        self._refresh_descendants()
        recorded = list(self.recorded)
        if owned.alive():
            if not failed:
                self.set_state(states.STOPPING, why)
            notes = await launcher.stop_tree(
                owned, pgid, recorded, timeout_s=cfg.stop_timeout_s if drain else 0.0
            )
            for note in notes:
                log.warning("server %s: %s", self.name, note)
                self.ctx.writer.add_event(server=self.name, kind="escalation", message=note)
        else:
            killed = await launcher.kill_leftovers(pgid, recorded)
            if killed:
                note = f"killed leftover processes of the dead server: {killed}"
                log.warning("server %s: %s", self.name, note)
                self.ctx.writer.add_event(server=self.name, kind="orphans_killed", message=note)
        if self.exit_future is not None and not self.exit_future.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exit_future), 2.0)
        self._close_pidfd()
        pids = {owned.pid, *(p.pid for p in recorded)}
        await self._wait_released(pids, cfg.stop_timeout_s + RELEASE_EXTRA_S)
        self.owned = None
        self.proc = None
        self.recorded = []
        self.record.pid = None
        self.record.pgid = None
        self.save()

    async def _wait_released(self, pids: set[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            holding = await asyncio.to_thread(self._still_held, pids)
            if not holding:
                return
            if time.monotonic() >= deadline:
                msg = f"after stop, still held: {holding}; continuing"
                log.warning("server %s: %s", self.name, msg)
                self.ctx.writer.add_event(server=self.name, kind="release_timeout", message=msg)
                return
            await asyncio.sleep(0.1)

    def _still_held(self, pids: set[int]) -> str:
        held = []
        holder = launcher.port_listener(self.server.ip, self.server.port)
        if holder is not None and (holder == 0 or holder in pids):
            held.append(f"port {self.server.port}")
        try:
            for gpu in self.ctx.gpu_view().snapshot():
                if gpu.index in self.server.gpus:
                    mine = [p for p in gpu.processes if p.pid in pids and psutil.pid_exists(p.pid)]
                    if mine:
                        held.append(f"GPU {gpu.index} memory of pids {[p.pid for p in mine]}")
        except GpuError:
            pass
        return ", ".join(held)

    # --- adoption -----------------------------------------------------------------------
    async def adopt(self, row: dict) -> bool:
        """Take over a server an earlier daemon launched, if it is still that process."""
        pid, ctime = row.get("pid"), row.get("proc_create_time")
        recorded = launcher.decode_processes(row.get("descendants"))
        if not pid or ctime is None:
            return False
        owned = launcher.OwnedProcess(int(pid), float(ctime))
        cmdline = row.get("cmdline")
        if not isinstance(cmdline, list):
            cmdline = None
        answering = False
        same = owned.alive() and cmdline is not None
        if same:
            try:
                same = psutil.Process(owned.pid).cmdline() == cmdline
            except psutil.Error:
                same = False
        if same:
            # The front alone answers /get_model_info; /health may take SGLang's
            # 20 s health timeout. Whether it is ready is the startup watch's call.
            answering = await sglang_api.front_answers(
                self.ctx.http, self.server.url, ADOPT_TIMEOUT_S
            )
        if not same or not answering:
            leftovers = [p for p in [owned, *recorded] if p.alive()]
            why = (
                "process gone"
                if not owned.alive()
                else "not the process we launched or not answering"
            )
            if leftovers and (owned.alive() or recorded):
                await launcher.stop_tree(
                    leftovers[0], None, leftovers, timeout_s=self.ctx.config().daemon.stop_timeout_s
                )
            self.ctx.writer.add_event(
                server=self.name,
                kind="stale_record",
                message=f"recorded pid {pid}: {why}; cleaned"
                + (f", stopped leftovers {[p.pid for p in leftovers]}" if leftovers else ""),
            )
            log.info("server %s: stale record of pid %s (%s); cleaned", self.name, pid, why)
            return False
        self.owned = owned
        self.recorded = [p for p in recorded if p.alive()]
        self._adopted_cmdline = row.get("cmdline")
        self.record.pid = owned.pid
        self.record.pgid = row.get("pgid")
        self.record.started_at = _parse_iso(row.get("started_at"))
        self._watch_exit(owned.pid)
        self.set_state(
            states.STARTING,
            f"adopted running pid {owned.pid} from an earlier daemon; waiting for /health",
            kind="adopted",
        )
        return True


def _parse_iso(text: str | None) -> float | None:
    from .store import parse_iso

    return parse_iso(text) if text else None
