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

The task never ends before the daemon's shutdown (issue 12, items 1 and 7): an error
in one pass (a bug, a launch that raises, the daemon out of descriptors) is logged,
waited out and the loop goes on, so start, restart, reload and SIGTERM keep working.
A check that cannot be made because this host is short of something of its own
(EMFILE, ENFILE, ...) is skipped: "cannot check now" is never "the server failed".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
from .gateway import GatewaySync
from .gpus import GpuError, GpuView, is_gpu_free
from .launcher import LocalResourceError
from .registry import ServerRecord
from .store import StoreWriter

log = logging.getLogger("modelserverd")

# How long a stop waits for the gateway to drop the server before the SIGTERM.
GATEWAY_SETTLE_S = 2.0
# How often a ready server's scheduler is asked for its load (never less often than
# probe_interval_s): the answers spread the fleet's traffic and prove it alive ...
LOAD_INTERVAL_S = 1.0
# ... and while its last answer showed nothing running or queued: an idle server's load
# changes only when traffic arrives (the next answer shows it), and a hang is still
# found within about the silence limit plus this.
IDLE_LOAD_INTERVAL_S = 3.0
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
# How often a starting server's port is checked for a listener that is not its own,
# besides after every answer on it.
PORT_CHECK_S = 1.0
# When no pidfd can be opened (no descriptor left): how often to look for the exit.
EXIT_POLL_S = 0.5
# Before a ready server is found unhealthy or hung: how long its exit may take to
# show (see ServerSupervisor._exiting).
EXIT_GRACE_S = 0.5
# After an error in a server's task: the first wait before going on, doubled up to
# the second while errors repeat; the third says how often the log repeats them.
TASK_RETRY_S = 0.5
TASK_RETRY_MAX_S = 10.0
TROUBLE_LOG_S = 60.0


@dataclass
class Failure:
    """Why the current process has to go: becomes a ``restarts`` row on relaunch."""

    reason: str  # one of states.RESTART_REASONS
    message: str
    exit_code: int | None = None
    signal: int | None = None
    at: float = field(default_factory=time.time)
    backoff_s: float | None = None
    counted: bool = True  # False: not the server's fault; not counted towards fatal


@dataclass
class _LoadWatch:
    """The scheduler watch of one ready process: its one outstanding load query."""

    last_answer_at: float  # monotonic; the watch starts as if answered at ready
    pending_since: float | None = None  # the first query since the last answer
    task: asyncio.Task[sglang_api.Load | None] | None = None
    path: str | None = None  # the load endpoint this server answers on
    supported: bool = True
    sent_at: float | None = None  # monotonic; when the outstanding query went out
    slowest_answer_s: float = 0.0  # the longest a query waited for its answer
    steps_bounded: bool = False  # chunked prefill on (server info): no step is long

    def silence_s(self, hang_timeout_s: float) -> float:
        """How long this scheduler may stay silent (see liveness.hang_silence_s)."""
        return liveness.hang_silence_s(
            hang_timeout_s=hang_timeout_s,
            slowest_answer_s=self.slowest_answer_s,
            steps_bounded=self.steps_bounded,
        )

    def limit_words(self, hang_timeout_s: float) -> str:
        """The silence allowed and why, for the event log."""
        silence = self.silence_s(hang_timeout_s)
        if not self.steps_bounded:
            return f"hang_timeout_s {hang_timeout_s:g} s; chunked prefill off or not reported"
        if silence >= hang_timeout_s:
            return (
                f"hang_timeout_s {hang_timeout_s:g} s; its slowest step took "
                f"{self.slowest_answer_s:.2f} s"
            )
        return (
            f"limit {silence:g} s: chunked prefill on, its slowest step took "
            f"{self.slowest_answer_s:.2f} s, hang_timeout_s {hang_timeout_s:g} s"
        )

    def verdict_at(self, hang_timeout_s: float) -> float | None:
        """When the silence would become a hang, if no answer comes first."""
        if self.pending_since is None:
            return None
        silence = self.silence_s(hang_timeout_s)
        return max(self.last_answer_at + silence, self.pending_since + silence / 2)


@dataclass(frozen=True)
class _Check:
    """The outcome of one health check of a ready server."""

    kind: str  # "ok" | "fail" | "busy" (another process listens) | "local" (not made)
    what: str
    no_answer: bool = False


@dataclass
class SupervisorContext:
    """What every server's task shares: the daemon provides it."""

    config: Callable[[], Config]
    writer: StoreWriter
    http: aiohttp.ClientSession
    gpu_view: Callable[[], GpuView]  # raises GpuError when NVML is unavailable
    nccl_ports: set[int] = field(default_factory=set)
    rand: random.Random = field(default_factory=random.Random)
    # The gateway whose worker list follows this host's ready servers ([gateway]).
    gateway: GatewaySync | None = None


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
        self._shutting_down = False
        self._exit_poll: asyncio.Task[None] | None = None
        self.nccl_port: int | None = None
        self.last_pid: int | None = None  # the process the next launch replaces
        self._launched_at: float | None = None  # monotonic; the current process's launch
        self._been_ready = False  # the current process has been ready at least once
        # Sockets on ip:port found to be held by the server's own process tree, and
        # what was found listening there that is not (issue 12, item 3).
        self._own_inodes: frozenset[int] = frozenset()
        self._port_taken: str | None = None
        # "Cannot check now" (a local shortage) and errors of the task: since when,
        # how many, when last logged.
        self._trouble_since: float | None = None
        self._trouble_skipped = 0
        self._trouble_logged_at = 0.0
        self._error_logged_at: float | None = None

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
        if what == "shutdown":
            self._shutting_down = True
        self._request = what
        self._wake.set()
        if self._task is not None and self._task.done() and not self._shutting_down:
            # Not expected: the task ends only at shutdown. A request must not be lost.
            log.error("server %s: its supervisor task had ended; starting it again", self.name)
            self.start_task()

    async def shutdown(self) -> None:
        """Stop the server (if running) and end the task."""
        self.request("shutdown")
        if self._task is not None and self._task.done():
            self.start_task()  # not expected (see request); the stop must still happen
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
        gateway = self.ctx.gateway
        if gateway is not None and old != new and states.READY in (old, new):
            # Leaving ready takes the server off the gateway at once; coming back
            # puts it on again. The HTTP work runs in the background.
            gateway.set_ready(
                self.name,
                self.server.url,
                new == states.READY,
                message or f"{old} -> {new}",
                priority=self.server.gateway_priority,
                cost=self.server.gateway_cost,
            )
        text = f"server {self.name}: {old} -> {new}" + (f" ({message})" if message else "")
        level = (
            logging.WARNING
            if new in (states.FATAL, states.UNHEALTHY, states.BACKOFF, states.PORT_BUSY)
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
                # Start times in clock ticks since boot (launcher.OwnedProcess).
                "proc_create_time": self.owned.record_value() if self.owned else None,
                "cmdline": self.proc.cmdline if self.proc else self._adopted_cmdline,
                "descendants": [[p.pid, p.record_value()] for p in self.recorded],
                "sglang_version": r.sglang_version,
            }
        )

    _adopted_cmdline: list[str] | None = None

    # --- main loop ----------------------------------------------------------------
    async def _run(self) -> None:
        """The server's task. It ends only at the daemon's shutdown: an error in a
        pass is logged (with its traceback, at most once a minute), waited out with a
        doubling delay, and the loop goes on from the server's current facts."""
        delay = TASK_RETRY_S
        while True:
            began = time.monotonic()
            try:
                await self._supervise()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server must stay supervised whatever happened
                if time.monotonic() - began > TROUBLE_LOG_S:
                    delay = TASK_RETRY_S
                self._task_error(exc, delay)
            await self._sleep_or_wake(delay)
            delay = min(delay * 2, TASK_RETRY_MAX_S)

    async def _supervise(self) -> None:
        while True:
            req, self._request = self._request, None
            self._wake.clear()
            try:
                if await self._step(req):
                    return
            except BaseException:
                if req is not None and self._request is None:
                    self._request = req  # acted on again after the error
                raise

    async def _step(self, req: str | None) -> bool:
        """One turn of the state machine; True when the task is done (shutdown)."""
        if self._shutting_down:
            ran = await self._stop_process("daemon shutting down")
            self._note_end(ran, "stopped: the daemon is shutting down")
            self.set_state(states.STOPPED, "daemon shut down")
            return True
        if req == "restart" and (self.owned is None or not self.owned.alive()):
            self.want_running = True
            self.pending = self._requested(self.pending)
        if req in ("start", "restart") and self.record.state == states.FATAL:
            self.history = self.history.reset()
            self.record.consecutive_failures = 0
            if self._restart_reason == "config_change":
                self.pending = Failure("config_change", "config changed while fatal")
            else:
                self.pending = Failure("manual", "started by request after fatal")
        if not self.want_running:
            ran = await self._stop_process("stop requested")
            self._note_end(ran, "stopped by request")
            self.set_state(states.STOPPED, "stopped by request" if req else "")
            await self._wake.wait()
            return False
        if self.record.state == states.FATAL and req not in ("start", "restart"):
            await self._wake.wait()
            return False
        if self.owned is not None and not self.owned.alive():
            # Gone while the task was getting over an error: a crash like any other
            # (its leftovers are killed, the failure is counted, a row is written).
            gone = self.exit_future is not None and self.exit_future.done()
            await self._handle_failure(
                self._exit_failure() if gone else Failure("crash", f"pid {self.owned.pid} exited")
            )
            return False
        if self.owned is None:
            if not await self._wait_for_resources():
                return False
            if not await self._launch():
                return False
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
                ran = await self._stop_process(why)
                self._note_end(ran, f"stopped: {why} ({self._restart_reason}); relaunching")
            return False
        await self._handle_failure(failure)
        return False

    def _requested(self, pending: Failure | None) -> Failure:
        """The failure a requested restart of a server with no live process answers.
        The request's reason wins over a failure that waits out its backoff (the
        relaunch happens now because of the request, e.g. a reload that fixed the
        config); what that failure said is kept in the message."""
        why = "config changed" if self._restart_reason == "config_change" else "restart requested"
        if pending is None:
            return Failure(self._restart_reason, why)
        if pending.reason == self._restart_reason:
            return pending
        return Failure(
            self._restart_reason,
            f"{why} (after {pending.reason}: {pending.message})",
            exit_code=pending.exit_code,
            signal=pending.signal,
        )

    def _running_for(self) -> float | None:
        """Seconds since the current process was launched (or, adopted, started);
        None when there is no process."""
        if self.owned is None:
            return None
        if self._launched_at is not None:
            return time.monotonic() - self._launched_at
        if self.record.started_at is not None:
            return max(0.0, time.time() - self.record.started_at)
        return None

    def _note_end(self, ran_s: float | None, how: str) -> None:
        """Say in the server's own log why its launch ended and what comes next, so
        that ``modelserverd logs NAME`` answers "why did it restart?" (issue 13,
        item 3). ``ran_s`` None: no process of the server was running, nothing ended."""
        if ran_s is None:
            return
        self._log_line(f"launch ended after {ran_s:.1f} s: {how}")

    def _log_line(self, text: str) -> None:
        path = Path(self.ctx.config().daemon.log_dir) / f"{self.name}.log"
        try:
            launcher.append_log_note(path, text)
        except OSError as exc:  # the log is for people; supervision goes on without it
            log.warning("server %s: cannot write to its log %s: %s", self.name, path, exc)

    def _task_error(self, exc: Exception, delay: float) -> None:
        if launcher.local_errno(exc) is not None:
            self._cannot_check(str(exc) or type(exc).__name__)
            return
        message = (
            f"error in the supervisor ({type(exc).__name__}: {exc}); state {self.record.state} "
            f"kept, going on in {delay:g} s"
        )
        self.record.last_error = message
        now = time.monotonic()
        if self._error_logged_at is None or now - self._error_logged_at >= TROUBLE_LOG_S:
            self._error_logged_at = now
            log.error("server %s: %s", self.name, message, exc_info=exc)
            self.ctx.writer.add_event(server=self.name, kind="supervisor_error", message=message)

    # --- local trouble --------------------------------------------------------------
    def _cannot_check(self, why: str) -> None:
        """A check or a launch could not be made now because this host is short of
        something of its own (descriptors, memory): logged at most once a minute and
        never counted as a failure of the server."""
        now = time.monotonic()
        self._trouble_skipped += 1
        if self._trouble_since is None:
            self._trouble_since = self._trouble_logged_at = now
            message = f"cannot check now: {why}; not counted as a failure, retrying"
            log.warning("server %s: %s", self.name, message)
            self.ctx.writer.add_event(server=self.name, kind="check_skipped", message=message)
        elif now - self._trouble_logged_at >= TROUBLE_LOG_S:
            self._trouble_logged_at = now
            log.warning(
                "server %s: still cannot check (%d checks skipped in %.0f s): %s",
                self.name,
                self._trouble_skipped,
                now - self._trouble_since,
                why,
            )

    def _checks_resumed(self) -> None:
        if self._trouble_since is None:
            return
        message = (
            f"checks work again after {time.monotonic() - self._trouble_since:.1f} s "
            f"({self._trouble_skipped} skipped)"
        )
        self._trouble_since, self._trouble_skipped = None, 0
        log.info("server %s: %s", self.name, message)
        self.ctx.writer.add_event(server=self.name, kind="check_resumed", message=message)

    # --- before launch --------------------------------------------------------------
    async def _wait_for_resources(self) -> bool:
        """Wait until every GPU of the server is free and its port is free."""
        while True:
            try:
                blocker = await asyncio.to_thread(self._check_resources)
            except LocalResourceError as exc:
                self._cannot_check(str(exc))
            else:
                self._checks_resumed()
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
            if launcher.local_errno(exc) is not None:
                raise LocalResourceError(f"cannot read GPUs now: {exc}") from exc
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
        holder = launcher.port_holder(self.server.ip, self.server.port)
        if holder is not None:
            return (
                states.PORT_BUSY,
                f"port {self.server.port} on {self.server.ip} is held by {holder.describe()}",
            )
        return None

    async def _launch(self) -> bool:
        """Start the process. A launch that fails is a failure of the server (it backs
        off and, repeated, goes fatal until a start or a reload); a launch this host
        cannot make now (no descriptor left) is retried and not counted."""
        cfg = self.ctx.config()
        log_path = Path(cfg.daemon.log_dir) / f"{self.name}.log"
        old_pid = self.last_pid
        try:
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
            spawned = await asyncio.to_thread(launcher.spawn, spec, log_path)
        except LocalResourceError as exc:
            self._cannot_check(str(exc))
            await self._sleep_or_wake(RECHECK_S)
            return False
        except launcher.LaunchError as exc:
            failure = Failure("crash", f"launch failed: {exc}")
            self._record_relaunch(cfg, old_pid, None, launch_error=str(exc))
            self.last_pid = None  # the next launch replaces no process
            await self._handle_failure(failure)
            return False
        self._checks_resumed()
        if self.proc is not None:
            self.proc.popen.poll()  # reap the previous process, if that was not done
        self.proc = spawned
        self.owned = spawned.owned
        self.recorded = []
        self._adopted_cmdline = None
        self._been_ready = False
        self._own_inodes = frozenset()
        self._port_taken = None
        self.record.pid = spawned.pid
        self.record.pgid = spawned.pid
        self.record.started_at = time.time()
        self._launched_at = time.monotonic()
        self._forget_process_facts()
        self._watch_exit(spawned.pid)
        self._record_relaunch(cfg, old_pid, spawned.pid)
        self.set_state(states.STARTING, f"pid {spawned.pid}: {spec.shell_line()}")
        return True

    def _record_relaunch(
        self,
        cfg: Config,
        old_pid: int | None,
        new_pid: int | None,
        *,
        launch_error: str | None = None,
    ) -> None:
        """The ``restarts`` row of a launch that answers a failure or a request.

        Every relaunch is a row, one whose launch failed included (``new_pid`` NULL,
        the launch's error in ``message``): a crash loop of launches that cannot
        start, or a reload whose new settings cannot start, must show in "restarts in
        the last 24 h" (issue 13, item 3). A first start, or a start after a stop, is
        no relaunch and has no row."""
        if self.pending is None:
            return
        failure, self.pending = self.pending, None
        self.record.restarts += 1
        message = failure.message
        if launch_error is not None and message == f"launch failed: {launch_error}":
            message = f"{message}; this launch failed the same way"
        elif launch_error is not None:
            message = f"{message}; this launch failed: {launch_error}"
        self.ctx.writer.add_restart(
            server=self.name,
            reason=failure.reason,
            attempt=self.history.count(time.monotonic(), cfg.restart.failure_window_s)
            if failure.reason != "manual"
            else 0,
            backoff_s=failure.backoff_s,
            old_pid=old_pid,
            new_pid=new_pid,
            exit_code=failure.exit_code,
            signal=failure.signal,
            message=message,
            ts=failure.at,
        )

    def _forget_process_facts(self) -> None:
        """What the last process reported (version, load) is not this one's."""
        r = self.record
        r.sglang_version = r.incremental_streaming_output = None
        r.running = r.queued = r.capacity = r.load_checked_at = None

    # --- watching -------------------------------------------------------------------
    def _watch_exit(self, pid: int) -> None:
        """Resolve ``exit_future`` when the process exits (pidfd: works for adopted
        processes too, which are not our children; without a descriptor to spare,
        a poll of its start time instead)."""
        loop = asyncio.get_running_loop()
        self._close_pidfd()
        fut: asyncio.Future[int | None] = loop.create_future()
        self.exit_future = fut
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fut.set_result(self._exit_status())
            return
        except OSError as exc:
            if self.owned is None or self.owned.pid != pid:
                fut.set_result(self._exit_status())
                return
            log.info(
                "server %s: no pidfd for pid %d (%s); polling for its exit", self.name, pid, exc
            )
            self._exit_poll = asyncio.create_task(self._poll_exit(fut, self.owned))
            return
        self._pidfd = fd

        def on_exit() -> None:
            self._close_pidfd()
            if not fut.done():
                fut.set_result(self._exit_status())

        loop.add_reader(fd, on_exit)

    async def _poll_exit(
        self, fut: asyncio.Future[int | None], owned: launcher.OwnedProcess
    ) -> None:
        while not fut.done():
            await asyncio.sleep(EXIT_POLL_S)
            try:
                running = owned.alive()
            except LocalResourceError:
                continue
            if not running and not fut.done():
                fut.set_result(self._exit_status())

    def _close_pidfd(self) -> None:
        if self._exit_poll is not None:
            self._exit_poll.cancel()
            self._exit_poll = None
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def _exit_status(self) -> int | None:
        """How our child ended (negative: the signal), read without reaping it: the
        zombie keeps its pid, and so its process group's id, ours until what the
        tree left is killed (launcher.group_is_ours). None for an adopted process."""
        if self.proc is None:
            return None
        popen = self.proc.popen
        if popen.returncode is not None:
            return popen.returncode
        try:
            info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return popen.returncode
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def _reap(self) -> None:
        """Let the exited process go (after its group was dealt with)."""
        if self.proc is not None:
            with contextlib.suppress(ChildProcessError):
                self.proc.popen.poll()

    async def _watch(self) -> Failure | None:
        """Follow the process from starting to ready and while ready; return why it
        must be replaced, or None when a request (stop/restart) interrupted."""
        if not self._been_ready:
            failure = await self._watch_startup()
            if failure is not None or not self._been_ready:
                return failure
        return await self._watch_ready()

    async def _watch_startup(self) -> Failure | None:
        """Poll /health until 200: connection refused and 503 mean "still loading".

        Ready also needs the listener on ip:port to be the server's own (issue 12,
        item 3): while SGLang loads its weights its port is closed, and anyone on the
        host can bind it and answer /health. A listener of another process is
        reported as ``port_busy`` with its pid and uid, and the server is not ready.
        """
        d = self.ctx.config().daemon
        assert self.exit_future is not None
        launched = time.monotonic()
        last_refresh = last_port_check = 0.0
        checked = True  # the last check could be made (no local shortage)
        while True:
            if time.monotonic() - launched > d.startup_timeout_s and checked:
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
            try:
                status = await self._health(d.health_timeout_s)
                if self.exit_future.done():
                    return self._exit_failure()
                port = None
                if status is not None or time.monotonic() - last_port_check >= PORT_CHECK_S:
                    last_port_check = time.monotonic()
                    port = await self._port_check()
            except LocalResourceError as exc:
                self._cannot_check(str(exc))
                checked = False
                continue
            checked = True
            self._checks_resumed()
            if port is None:
                continue
            if port.foreign:
                self._port_busy(self._busy_message(port))
                continue
            if self.record.state == states.PORT_BUSY:
                self.set_state(
                    states.STARTING,
                    f"no other process listens on port {self.server.port} any more; "
                    "waiting for /health",
                )
            if status == 200 and port.ours:
                # SGLang's scheduler children exist by now: record them before any crash.
                self._refresh_descendants()
                self._been_ready = True
                self.set_state(states.READY, f"/health answered 200 (pid {self.record.pid})")
                return None

    async def _port_check(self, max_age_s: float = 0.0) -> launcher.ListenerCheck:
        """Who listens on the server's ip:port: its own process tree, or others; from
        a reading of the host's listening sockets up to ``max_age_s`` old (the ready
        server's periodic checks share one reading, see launcher.listeners)."""
        owned, recorded = self.owned, list(self.recorded)

        def tree() -> list[int]:
            pids = [p.pid for p in recorded if p.alive()]
            if owned is not None and owned.alive():
                pids += [owned.pid, *(p.pid for p in launcher.descendants(owned.pid))]
            return pids

        check = await asyncio.to_thread(
            launcher.check_listeners,
            self.server.ip,
            self.server.port,
            tree,
            self._own_inodes,
            max_age_s=max_age_s,
        )
        self._own_inodes = check.ours
        return check

    def _busy_message(self, check: launcher.ListenerCheck) -> str:
        who = ", ".join(holder.describe() for holder in check.foreign)
        return (
            f"port {self.server.port} on {self.server.ip} is served by {who}, not by this "
            f"server's own processes (pid {self.record.pid}); no traffic is sent to it "
            "until that listener is gone"
        )

    def _port_busy(self, message: str) -> None:
        self._port_taken = message
        if self.record.state != states.PORT_BUSY or self.record.last_error != message:
            self.set_state(states.PORT_BUSY, message)

    async def _watch_ready(self) -> Failure | None:
        """Two watches while ready:

        * ``/health`` every probe_interval_s, without waiting for the check before
          (SGLang's own check can take up to SGLANG_HEALTH_CHECK_TIMEOUT):
          health_failures failures in a row make the server unhealthy;
        * the scheduler, through a load query every LOAD_INTERVAL_S, one at a time
          (see :mod:`liveness`): no answer for as long as one step cannot take (half
          of hang_timeout_s with chunked prefill and quick steps, at most
          hang_timeout_s) while the process lives is a hang, found well before
          SGLang's own 20 s (or never, on versions whose /health does not
          generate). The answers are also the server's load, which spreads the
          fleet's traffic.

        Each health check also looks at who listens on ip:port (see _watch_startup):
        a listener that is not the server's own makes it ``port_busy`` (no traffic)
        until it is gone. A check that cannot be made for a local shortage is
        skipped, neither a failure nor a success.
        """
        d = self.ctx.config().daemon
        assert self.exit_future is not None
        pending: deque[asyncio.Task[_Check]] = deque()
        load = _LoadWatch(time.monotonic())
        next_check = time.monotonic() + d.probe_interval_s
        load_every = min(LOAD_INTERVAL_S, d.probe_interval_s)
        idle_every = min(IDLE_LOAD_INTERVAL_S, d.probe_interval_s)
        next_load = time.monotonic() + load_every
        last_refresh = time.monotonic()
        failures = timeouts = 0
        info = asyncio.create_task(self._read_server_info(d.hang_timeout_s, load))
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
                    pending.append(asyncio.create_task(self._check(d.health_timeout_s)))
                    next_check = now + d.probe_interval_s
                if now >= next_load:
                    if load.task is None and load.supported:
                        load.task = asyncio.create_task(self._query_load(load, d.hang_timeout_s))
                        load.sent_at = now
                        if load.pending_since is None:
                            load.pending_since = now
                    r = self.record
                    idle = not (r.running or r.queued) and r.load_checked_at is not None
                    next_load = now + (idle_every if idle else load_every)
                if liveness.scheduler_hung(
                    last_answer_at=load.last_answer_at,
                    pending_since=load.pending_since,
                    now=now,
                    silence_s=load.silence_s(d.hang_timeout_s),
                ):
                    if await self._exiting():
                        return self._exit_failure()
                    front = await sglang_api.front_answers(
                        self.ctx.http, self.server.url, min(2.0, d.hang_timeout_s)
                    )
                    message = (
                        f"the scheduler answered no load query ({load.path}) for "
                        f"{now - load.last_answer_at:.1f} s ({load.limit_words(d.hang_timeout_s)}) "
                        "while "
                        + ("the HTTP front answers" if front else "the HTTP front is silent too")
                    )
                    self.set_state(states.UNHEALTHY, message)
                    return Failure("hang", message)
                if now - last_refresh >= READY_REFRESH_S:
                    self._refresh_descendants()
                    last_refresh = now
                while pending and pending[0].done():
                    check = pending.popleft().result()
                    if check.kind == "local":
                        self._cannot_check(check.what)
                        continue
                    self._checks_resumed()
                    if check.kind == "busy":
                        self._port_busy(check.what)
                        continue
                    if check.kind == "ok":
                        failures = timeouts = 0
                        if self.record.state == states.UNHEALTHY:
                            self.set_state(states.READY, "/health answers again")
                        elif self.record.state == states.PORT_BUSY:
                            self.set_state(
                                states.READY,
                                f"only this server listens on port {self.server.port} again",
                            )
                        self._maybe_stable()
                        continue
                    failures += 1
                    timeouts += check.no_answer
                    what = check.what
                    if failures >= d.health_failures:
                        if await self._exiting():
                            return self._exit_failure()
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
        if launcher.local_errno(exc) is not None:
            # The query never reached the server: no evidence either way.
            watch.pending_since = None
            self._cannot_check(f"load query: {exc}")
            return
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
        if watch.sent_at is not None:
            watch.slowest_answer_s = max(watch.slowest_answer_s, now - watch.sent_at)
        watch.last_answer_at, watch.pending_since = now, None
        r = self.record
        r.running, r.queued, r.load_checked_at = load.running, load.queued, time.time()
        if load.capacity:
            r.capacity = load.capacity

    async def _read_server_info(self, timeout_s: float, watch: _LoadWatch) -> None:
        """Version, streaming setting and whether prefill is chunked (how long one
        step can take, for the scheduler watch), once per process; not fatal when
        missing."""
        try:
            info = await sglang_api.read_server_info(self.ctx.http, self.server.url, timeout_s)
        except sglang_api.NoAnswer as exc:
            log.info("server %s: no server info: %s", self.name, exc.reason)
            return
        watch.steps_bounded = info.chunked_prefill_size is not None
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

    async def _exiting(self) -> bool:
        """Whether the process is on its way out: a process killed by a signal closes
        its sockets (every check in flight fails at once) a moment before its exit
        is seen, and that is a crash, not an unhealthy server."""
        assert self.exit_future is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exit_future), EXIT_GRACE_S)
        return self.exit_future.done()

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
        """HTTP status of GET /health, or None when there was no answer. Raises
        LocalResourceError when the request could not be made (EMFILE, ...)."""
        url = f"{self.server.url}/health"
        try:
            async with self.ctx.http.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            code = launcher.local_errno(exc)
            if code is not None:
                raise LocalResourceError(
                    f"cannot ask {url}: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
                ) from exc
            return None

    async def _check(self, timeout_s: float) -> _Check:
        """One health check of a ready server: /health, then who listens on its port."""
        try:
            status = await self._health(timeout_s)
            port = None
            if status is not None:
                port = await self._port_check(launcher.LISTEN_TABLE_MAX_AGE_S)
                if port.foreign or not port.ours:
                    # A verdict against the server rests on a fresh reading.
                    port = await self._port_check()
        except LocalResourceError as exc:
            return _Check("local", str(exc))
        if port is not None and port.foreign:
            return _Check("busy", self._busy_message(port))
        if status == 200 and port is not None and port.ours:
            return _Check("ok", "")
        if status == 200:
            return _Check(
                "fail",
                f"/health answered, but no process of this server listens on "
                f"{self.server.ip}:{self.server.port}",
            )
        if status is None:
            return _Check("fail", "no answer", no_answer=True)
        return _Check("fail", f"HTTP {status}")

    def _refresh_descendants(self) -> None:
        if self.owned is None:
            return
        try:
            known = {p.pid: p for p in self.recorded if p.alive()}
            before = set(known)
            for child in launcher.descendants(self.owned.pid) if self.owned.alive() else ():
                known.setdefault(child.pid, child)
        except LocalResourceError as exc:
            self._cannot_check(str(exc))
            return
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
        ran = await self._stop_process(failure.message, failed=True, drain=failure.reason != "hang")
        if self._port_taken is not None:
            # Another process listened on the server's port meanwhile: whatever went
            # wrong next (SGLang cannot bind, never gets ready) is not the server's
            # fault, and a local user who takes the port must not make it fatal.
            failure.message = (
                f"{failure.message} (another process had taken its port: {self._port_taken})"
            )
            failure.counted = False
            self._port_taken = None
        self.record.last_error = failure.message
        if not failure.counted:
            failure.backoff_s = cfg.backoff_initial_s
            self.pending = failure
            self._note_failure(
                ran,
                failure,
                f"not counted as a failure; relaunch in {cfg.backoff_initial_s:.1f} s "
                "once the port is free",
            )
            self.set_state(
                states.BACKOFF,
                f"{failure.reason}: {failure.message}; not counted as a failure; relaunch "
                f"in {cfg.backoff_initial_s:.2f} s once the port is free",
            )
            await self._sleep_or_wake(max(0.0, cfg.backoff_initial_s - (time.time() - failure.at)))
            return
        now = time.monotonic()
        self.history = self.history.record(now, cfg.failure_window_s)
        self.record.consecutive_failures = self.history.count(now, cfg.failure_window_s)
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
            self._note_failure(ran, failure, f"fatal: {decision.reason_text}")
            self.set_state(states.FATAL, f"{failure.message}; {decision.reason_text}")
            return
        failure.backoff_s = decision.delay_s
        self.pending = failure
        self._note_failure(ran, failure, decision.reason_text)
        self.set_state(
            states.BACKOFF,
            f"{failure.reason}: {failure.message}; relaunch in {decision.delay_s:.2f} s "
            f"(attempt {decision.attempt})",
        )
        # The backoff counts from the failure: the cleanup above is part of the wait.
        await self._sleep_or_wake(max(0.0, decision.delay_s - (time.time() - failure.at)))

    def _note_failure(self, ran_s: float | None, failure: Failure, then: str) -> None:
        """The log line of a failure: how the launch ended (or that it could not be
        made at all) and what the supervisor does next."""
        if ran_s is None:  # no process: the launch itself failed
            self._log_line(f"{failure.message}; {then}")
        else:
            self._note_end(ran_s, f"{failure.message} ({failure.reason}); {then}")

    async def _stop_process(
        self, why: str, *, failed: bool = False, drain: bool = True
    ) -> float | None:
        """Stop whatever is left of the process tree and wait until its port and GPU
        memory are released. ``drain``: give SGLang ``stop_timeout_s`` to finish its
        requests after the SIGTERM. Returns how long the process had run (None: there
        was none).

        A main process of ours that exited is reaped only after its leftovers are
        killed: until then its zombie keeps the group's id ours (issue 12, item 10)."""
        owned, pgid = self.owned, self.record.pgid
        if owned is None:
            return None
        ran_s = self._running_for()
        self.last_pid = owned.pid
        cfg = self.ctx.config().daemon
        self._refresh_descendants()
        recorded = list(self.recorded)
        if owned.alive():
            if not failed:
                self.set_state(states.STOPPING, why)
            if self.ctx.gateway is not None:
                # Off the gateway before the SIGTERM, so it sends nothing new to a
                # server that drains; a gateway that does not answer never holds a stop.
                await self.ctx.gateway.settled(self.name, GATEWAY_SETTLE_S)
            notes = await launcher.stop_tree(
                owned, pgid, recorded, timeout_s=cfg.stop_timeout_s if drain else 0.0
            )
            for note in notes:
                log.warning("server %s: %s", self.name, note)
                self.ctx.writer.add_event(server=self.name, kind="escalation", message=note)
        else:
            killed = await launcher.kill_leftovers(pgid, recorded, leader=owned)
            if killed:
                note = f"killed leftover processes of the dead server: {killed}"
                log.warning("server %s: %s", self.name, note)
                self.ctx.writer.add_event(server=self.name, kind="orphans_killed", message=note)
        if self.exit_future is not None and not self.exit_future.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exit_future), 2.0)
        self._close_pidfd()
        self._reap()
        pids = {owned.pid, *(p.pid for p in recorded)}
        await self._wait_released(pids, cfg.stop_timeout_s + RELEASE_EXTRA_S)
        self.owned = None
        self.proc = None
        self._launched_at = None
        self.recorded = []
        self.record.pid = None
        self.record.pgid = None
        self.save()
        return ran_s

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
        holder = launcher.port_holder(self.server.ip, self.server.port)
        if holder is not None and (holder.pid is None or holder.pid in pids):
            held.append(f"port {self.server.port}")
        try:
            for gpu in self.ctx.gpu_view().snapshot():
                if gpu.index in self.server.gpus:
                    mine = [p for p in gpu.processes if p.pid in pids and _running(p.pid)]
                    if mine:
                        held.append(f"GPU {gpu.index} memory of pids {[p.pid for p in mine]}")
        except GpuError as exc:
            if launcher.local_errno(exc) is not None:
                raise LocalResourceError(f"cannot read GPUs now: {exc}") from exc
        return ", ".join(held)

    # --- adoption -----------------------------------------------------------------------
    async def adopt(self, row: dict) -> bool:
        """Take over a server an earlier daemon launched, if it is still that process.

        Nothing the database says is signalled unchecked (issue 12, item 10): the
        process must have the recorded start time, command line and the daemon's
        uid; its process group is the one the kernel reports for it (the recorded
        ``pgid`` is only compared); a recorded descendant is kept only while it is
        in its tree, session or group, or runs under the daemon's uid and started
        after it."""
        pid, start = row.get("pid"), row.get("proc_create_time")
        if not pid or start is None:
            return False
        try:
            owned = launcher.OwnedProcess.from_record(int(pid), float(start))
            recorded = launcher.decode_processes(row.get("descendants"))
            same = owned.alive() and launcher.uid_of(owned.pid) == os.geteuid()
        except (LocalResourceError, TypeError, ValueError) as exc:
            log.warning("server %s: cannot read the recorded pid %s now: %s", self.name, pid, exc)
            return False
        cmdline = row.get("cmdline")
        if not isinstance(cmdline, list):
            cmdline = None
        answering = False
        if same and cmdline is not None:
            try:
                same = psutil.Process(owned.pid).cmdline() == cmdline
            except (psutil.Error, OSError):
                same = False
        else:
            same = False
        recorded = self._trusted_descendants(owned, recorded)
        if same:
            # The front alone answers /get_model_info; /health may take SGLang's
            # 20 s health timeout. Whether it is ready is the startup watch's call.
            answering = await sglang_api.front_answers(
                self.ctx.http, self.server.url, ADOPT_TIMEOUT_S
            )
        if not same or not answering:
            ours = owned.alive() and launcher.uid_of(owned.pid) == os.geteuid()
            leftovers = [p for p in [owned, *recorded] if p.alive() and (p is not owned or ours)]
            why = (
                "process gone"
                if not owned.alive()
                else "not the process we launched or not answering"
            )
            if leftovers:
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
        self.recorded = recorded
        self._adopted_cmdline = row.get("cmdline")
        self._been_ready = False
        self._own_inodes = frozenset()
        self.record.pid = owned.pid
        self.record.pgid = self._adopted_pgid(owned, row.get("pgid"))
        self.record.started_at = _parse_iso(row.get("started_at"))
        self._watch_exit(owned.pid)
        if row.get("state") == states.READY and await self._serves_its_port():
            # It was serving when the earlier daemon stopped, and still is: callers
            # keep it while the ready watch (health, scheduler) checks it again, rather
            # than being told no server is ready during the first /health.
            self._refresh_descendants()
            self._been_ready = True
            self.set_state(
                states.READY,
                f"adopted running pid {owned.pid} from an earlier daemon, which had it "
                "ready; its front answers on its own port",
                kind="adopted",
            )
            return True
        self.set_state(
            states.STARTING,
            f"adopted running pid {owned.pid} from an earlier daemon; waiting for /health",
            kind="adopted",
        )
        return True

    async def _serves_its_port(self) -> bool:
        """Whether only the server's own processes listen on its ip:port."""
        try:
            check = await self._port_check()
        except LocalResourceError:
            return False
        return bool(check.ours) and not check.foreign

    def _adopted_pgid(self, owned: launcher.OwnedProcess, recorded: object) -> int | None:
        """The group to stop with the adopted process: its own, as the kernel says (it
        was started in a session of its own, so it leads its group)."""
        st = owned.stat()
        live = st.pgrp if st is not None else None
        pgid = live if live == owned.pid else None
        if recorded is not None and recorded != pgid:
            note = (
                f"recorded pgid {recorded} is not the process group of pid {owned.pid} "
                f"(the kernel says {live}); not used"
            )
            log.warning("server %s: %s", self.name, note)
            self.ctx.writer.add_event(server=self.name, kind="record_mismatch", message=note)
        return pgid

    def _trusted_descendants(
        self, owned: launcher.OwnedProcess, recorded: list[launcher.OwnedProcess]
    ) -> list[launcher.OwnedProcess]:
        me = os.geteuid()
        alive = owned.alive()
        tree = {p.pid for p in launcher.descendants(owned.pid)} if alive else set()
        kept, dropped = [], []
        for proc in recorded:
            st = proc.stat()
            if st is None:
                continue
            related = alive and (proc.pid in tree or owned.pid in (st.session, st.pgrp))
            if related or (
                launcher.uid_of(proc.pid) == me and proc.start_ticks >= owned.start_ticks
            ):
                kept.append(proc)
            else:
                dropped.append(proc.pid)
        if dropped:
            note = (
                f"recorded descendants {dropped} are neither in the tree of pid {owned.pid} "
                "nor processes of this daemon's user; left alone"
            )
            log.warning("server %s: %s", self.name, note)
            self.ctx.writer.add_event(server=self.name, kind="record_mismatch", message=note)
        return kept


def _running(pid: int) -> bool:
    st = launcher.read_stat(pid)
    return st is not None and not st.exited


def _parse_iso(text: str | None) -> float | None:
    from .store import parse_iso

    return parse_iso(text) if text else None
