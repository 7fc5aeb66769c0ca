"""``modelserverd run``: wires config, store, GPU view, supervisors, prober and API
onto one asyncio event loop, and handles SIGTERM / SIGHUP.

Nothing here decides policy; it only starts the parts and routes requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import __version__, states
from .api import ApiContext, build_app, serve_unix
from .config import Config, ConfigError, load_config, server_fields_changed
from .display import reload_summary
from .gateway import GatewaySync, WorkerSpec
from .gpus import GpuError, GpuView, open_gpu_view
from .hostaddrs import host_addresses
from .hostcheck import check_host
from .launcher import rotate_log
from .notify import Notifier
from .prober import Prober
from .registry import Registry, ServerRecord
from .store import Store, StoreWriter
from .supervisor import ServerSupervisor, SupervisorContext

log = logging.getLogger("modelserverd")

LOG_MAX_BYTES = 50 * 1024 * 1024
LOG_KEEP = 3
HOUSEKEEPING_S = 30.0
# A background task (prober, housekeeping, notify) that fails is started again
# after this long, doubled while it keeps failing, up to the second figure; its
# traceback is logged at most once per the third.
TASK_RESTART_S = 1.0
TASK_RESTART_MAX_S = 60.0
TASK_ERROR_LOG_S = 60.0


class UnknownServer(KeyError):
    """Raised for an action on a name the config does not have (the API answers 404)."""


@dataclass
class _GpuSource:
    """Opens the GPU view lazily and again after a failure, so a host whose driver
    comes up late (or an NVML hiccup) recovers without a daemon restart."""

    backend: str
    view: GpuView | None = None
    error: str | None = None
    retry_at: float = 0.0

    def get(self) -> GpuView:
        if self.view is not None:
            return self.view
        if time.monotonic() < self.retry_at and self.error:
            raise GpuError(self.error)
        try:
            self.view = open_gpu_view(self.backend)
            self.error = None
        except GpuError as exc:
            self.error = str(exc)
            self.retry_at = time.monotonic() + 10.0
            raise
        return self.view

    def close(self) -> None:
        if self.view is not None:
            with contextlib.suppress(Exception):
                self.view.close()
        self.view = None


def load_daemon_config(path: str | os.PathLike[str] | None, *, on_host: bool = True) -> Config:
    """Load the config as the daemon sees it: servers on this host's addresses are
    local. ``on_host``: also check it against this host (:mod:`hostcheck`: the
    interpreter finds the module, the GPU indexes exist), as the daemon's start, its
    reloads and ``check-config`` do; a problem raises ConfigError like one in the file."""
    from .config import parse_config, resolve_config_path

    resolved = resolve_config_path(path)
    # The interface must be known before locality can be decided: read it first.
    first = load_config(resolved)
    addresses = host_addresses(first.daemon.interface)
    config = parse_config(
        Path(resolved).read_text(encoding="utf-8"), resolved, host_addresses=addresses
    )
    return check_host(config) if on_host else config


# The daemon asks every server for its load each second: a connection per question
# would leave thousands of sockets in TIME_WAIT on a host with many servers (which
# also makes every reading of /proc/net/tcp slower). An idle connection is kept this
# long, below the 5 s after which SGLang's uvicorn closes one (timeout_keep_alive in
# http_server.py), so the daemon never reuses one the server is closing.
HTTP_KEEPALIVE_S = 2.0


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.started_mono = time.monotonic()
        self.started_at = time.time()
        self.addresses = host_addresses(config.daemon.interface)
        self.registry = Registry(config)
        self.store = Store(config.daemon.state_db)
        self.writer = StoreWriter(config.daemon.state_db)
        self.gpus = _GpuSource(config.daemon.gpu_backend)
        self.supervisors: dict[str, ServerSupervisor] = {}
        self.notifier = Notifier.from_env()
        self.stop_event = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.http: aiohttp.ClientSession | None = None
        self.ctx: SupervisorContext | None = None
        self.runner = None
        self.gateway = _make_gateway(config, self.writer)

    # --- lifecycle ----------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM; every resource is released even when start-up fails."""
        self.writer.start()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=HTTP_KEEPALIVE_S)
        )
        try:
            return await self._serve()
        finally:
            await self.http.close()
            self.writer.close()
            self.store.close()
            self.gpus.close()

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        assert self.http is not None
        self.ctx = SupervisorContext(
            config=lambda: self.config,
            writer=self.writer,
            http=self.http,
            gpu_view=self.gpus.get,
            gateway=self.gateway,
        )
        self.writer.add_event(
            server=None,
            kind="daemon_start",
            message=f"modelserverd {__version__} pid {os.getpid()}",
        )
        try:
            self.gpus.get()
        except GpuError as exc:
            log.error(
                "GPU view unavailable: %s; local servers wait, remote servers are still probed", exc
            )
        adopted = asyncio.Event()
        api_ctx = ApiContext(
            registry=self.registry,
            store=self.store,
            writer=self.writer,
            actions=self,
            status=self.status,
            gateway=self.gateway,
            adopted=adopted,
        )
        self.runner = await serve_unix(
            build_app(api_ctx),
            self.config.daemon.socket,
            mode=self.config.daemon.socket_mode_int,
            group=self.config.daemon.socket_group,
        )
        log.info("modelserverd %s listening on %s", __version__, self.config.daemon.socket)
        for sig, handler in (
            (signal.SIGTERM, self.stop_event.set),
            (signal.SIGINT, self.stop_event.set),
            (signal.SIGHUP, self._on_sighup),
        ):
            loop.add_signal_handler(sig, handler)

        await self._start_supervisors(self.config.managed_servers, adopt=True)
        adopted.set()
        for record in self.registry.servers.values():
            if not record.config.is_managed:
                self._save_unmanaged(record)
        prober = Prober(
            self.registry, self.writer, on_reachability=self._on_reachability, session=self.http
        )
        background = [
            asyncio.create_task(
                self._keep_running("prober", lambda: prober.run(self.stop_event)), name="prober"
            ),
            asyncio.create_task(
                self._keep_running("housekeeping", self._housekeeping), name="housekeeping"
            ),
            asyncio.create_task(self._keep_running("notify", self._notify_loop), name="notify"),
        ]
        gateway_stop = asyncio.Event()
        gateway_task = None
        if self.gateway is not None:
            # After adoption: a first sync before it would take adopted servers off.
            gateway = self.gateway
            gateway.set_managed(self._managed_urls())
            gateway_task = asyncio.create_task(
                self._keep_running(
                    "gateway",
                    lambda: gateway.run(
                        gateway_stop, self._gateway_desired, self.config.gateway.sync_interval_s
                    ),
                ),
                name="gateway",
            )
        self.notifier.ready(self.summary())
        await self.stop_event.wait()

        log.info("modelserverd stopping: stopping %d servers", len(self.supervisors))
        self.notifier.stopping()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(
            *(s.shutdown() for s in self.supervisors.values()), return_exceptions=True
        )
        if self.gateway is not None and gateway_task is not None:
            gateway_stop.set()
            await asyncio.gather(gateway_task, return_exceptions=True)
            await self.gateway.close(grace_s=self.config.gateway.request_timeout_s)
        await self.runner.cleanup()  # also removes the socket file, if it is still ours
        self.writer.add_event(server=None, kind="daemon_stop", message="all servers stopped")
        log.info("modelserverd stopped")
        return 0

    async def _start_supervisors(self, servers, *, adopt: bool) -> None:
        rows = {row["name"]: row for row in self.store.servers()} if adopt else {}
        assert self.ctx is not None
        new = []
        for server in servers:
            sup = ServerSupervisor(self.registry.servers[server.name], self.ctx)
            self.supervisors[server.name] = sup
            new.append(sup)
        if rows:
            await asyncio.gather(*(s.adopt(rows[s.name]) for s in new if s.name in rows))
        for sup in new:
            sup.start_task()

    def _managed_urls(self) -> list[str]:
        return [s.url for s in self.config.managed_servers]

    def _gateway_desired(self) -> dict[str, WorkerSpec]:
        """This host's servers the gateway should list: the managed ones that are ready."""
        return {
            r.name: WorkerSpec(r.config.url, r.config.gateway_priority, r.config.gateway_cost)
            for r in self.registry.servers.values()
            if r.config.is_managed and r.state == states.READY
        }

    def _on_sighup(self) -> None:
        asyncio.get_running_loop().create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, the running config stays:\n%s", exc)
        except Exception:  # a SIGHUP's task has nobody else to tell
            log.exception("reload failed; see the error above")

    def _save_unmanaged(self, record: ServerRecord) -> None:
        """Servers only probed here get a ``servers`` row too, so the table lists
        every configured server with its last known state."""
        c = record.config
        self.writer.upsert_server(
            {
                "name": c.name,
                "ip": c.ip,
                "port": c.port,
                "model_size": c.model_size,
                "model_path": c.model_path,
                "gpus": list(c.gpus),
                "local": c.local,
                "state": record.state,
                "pid": None,
                "pgid": None,
            }
        )

    def _on_reachability(self, record: ServerRecord, new_state: str, message: str) -> None:
        old = record.state
        record.state = new_state
        self._save_unmanaged(record)
        level = logging.WARNING if new_state == states.UNREACHABLE else logging.INFO
        log.log(level, "server %s: %s -> %s (%s)", record.name, old, new_state, message)
        self.writer.add_event(
            server=record.name, kind="state", old_state=old, new_state=new_state, message=message
        )

    async def _keep_running(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a background task for the daemon's life: when it fails it is logged
        and started again (issue 12, item 7), so retention, log rotation, probing and
        the systemd watchdog never stop silently. It ends when ``run`` returns."""
        delay = TASK_RESTART_S
        logged_at: float | None = None
        while True:
            began = time.monotonic()
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever it was, the task must go on
                now = time.monotonic()
                if now - began > TASK_RESTART_MAX_S:
                    delay = TASK_RESTART_S
                if logged_at is None or now - logged_at >= TASK_ERROR_LOG_S:
                    logged_at = now
                    log.error(
                        "background task %s failed (%s: %s); starting it again in %g s",
                        name,
                        type(exc).__name__,
                        exc,
                        delay,
                        exc_info=exc,
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, TASK_RESTART_MAX_S)

    async def _housekeeping(self) -> None:
        """Retention of latency samples and rotation of server logs. Each step of a
        round fails alone: a bad retention does not stop the rotation."""
        while True:
            await self._housekeeping_round()
            await asyncio.sleep(HOUSEKEEPING_S)

    async def _housekeeping_round(self) -> None:
        errors: list[str] = []
        try:
            # Never before the epoch, whatever retention_days says.
            cutoff = max(0.0, time.time() - self.config.daemon.retention_days * 86400)
            self.writer.delete_samples_older_than(cutoff)
        except Exception as exc:  # logged below; the rotation still runs
            errors.append(f"sample retention: {type(exc).__name__}: {exc}")
        log_dir = Path(self.config.daemon.log_dir)
        # A copy: a reload may change the servers while a rotation is awaited.
        for name in list(self.supervisors):
            try:
                await asyncio.to_thread(
                    rotate_log, log_dir / f"{name}.log", LOG_MAX_BYTES, LOG_KEEP
                )
            except Exception as exc:  # logged below; the other logs still rotate
                errors.append(f"log rotation of {name}: {type(exc).__name__}: {exc}")
        if errors:
            log.error("housekeeping: %s", "; ".join(errors))

    async def _notify_loop(self) -> None:
        """WATCHDOG=1 from the event loop itself: a blocked loop stops the pings."""
        interval = self.notifier.watchdog_interval_s
        last_status = ""
        while True:
            if interval:
                self.notifier.watchdog()
            summary = self.summary()
            if summary != last_status:
                self.notifier.status(summary)
                last_status = summary
            await asyncio.sleep(min(interval or 5.0, 5.0))

    # --- queries ------------------------------------------------------------------
    def summary(self) -> str:
        counts = self.registry.counts_by_state()
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{len(self.registry.servers)} servers: {parts or 'none'}"

    def status(self) -> dict:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_mono, 3),
            "started_at": self.started_at,
            "host_addresses": sorted(self.addresses),
            "config_path": self.config.path,
            "socket": self.config.daemon.socket,
            "state_db": self.config.daemon.state_db,
            "gpu_backend": self.config.daemon.gpu_backend,
            "gpu_error": self.gpus.error,
        }

    # --- actions (the API's admin endpoints) ---------------------------------------
    def _supervisor(self, name: str) -> ServerSupervisor:
        sup = self.supervisors.get(name)
        if sup is None:
            if name in self.registry.servers:
                raise PermissionError(
                    f"server {name} is not managed by this host; it is only probed"
                )
            raise UnknownServer(name)
        return sup

    async def restart(self, name: str) -> dict:
        self._supervisor(name).request("restart")
        return {"server": name, "requested": "restart"}

    async def stop(self, name: str) -> dict:
        self._supervisor(name).request("stop")
        return {"server": name, "requested": "stop"}

    async def start(self, name: str) -> dict:
        self._supervisor(name).request("start")
        return {"server": name, "requested": "start"}

    async def reload(self) -> dict:
        """Apply a new config by difference; a bad one raises ConfigError and the
        running config stays."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(load_daemon_config, self.config.path)
            except ConfigError as exc:
                self._reload_refused(exc)
                raise
            finally:
                self.notifier.ready(self.summary())
            for warning in new.warnings:
                log.warning("config: %s", warning)
            old = self.config
            old_managed = {s.name: s for s in old.managed_servers}
            new_managed = {s.name: s for s in new.managed_servers}
            sglang_changed = old.sglang != new.sglang
            removed = [n for n in old_managed if n not in new_managed]
            added = [n for n in new_managed if n not in old_managed]
            changed = [
                n
                for n in new_managed
                if n in old_managed
                and (sglang_changed or server_fields_changed(old_managed[n], new_managed[n]))
            ]
            fixed = {"socket", "state_db", "socket_mode", "socket_group", "gpu_backend"}
            needs_restart = [k for k in fixed if getattr(old.daemon, k) != getattr(new.daemon, k)]
            if old.gateway != new.gateway:
                needs_restart.append("gateway")  # the sync keeps its gateways until then
            # Stop removed servers with the old config still in force.
            await asyncio.gather(*(self.supervisors[n].shutdown() for n in removed))
            for n in removed:
                del self.supervisors[n]
            self.config = new
            self.registry.apply_config(new)
            for n, sup in self.supervisors.items():
                sup.record = self.registry.servers[n]
            # A server the operator stopped stays stopped: its new settings apply when
            # it is started.
            restarted = [n for n in changed if self.supervisors[n].want_running]
            for n in restarted:
                self.supervisors[n].request("restart", reason="config_change")
            await self._start_supervisors([new_managed[n] for n in added], adopt=False)
            if self.gateway is not None:
                self.gateway.set_managed(self._managed_urls())
                self.gateway.request_sync()
            result = {
                "added": added,
                "removed": removed,
                "restarted": restarted,
                "changed_stopped": [n for n in changed if n not in restarted],
                "unchanged": [n for n in new_managed if n not in added and n not in changed],
                "needs_daemon_restart": needs_restart,
            }
            log.info("config reloaded: %s", result)
            self.writer.add_event(server=None, kind="reload", message=reload_summary(result))
            return result

    def _reload_refused(self, exc: ConfigError) -> None:
        """A refused reload changes nothing (issue 13, item 2): no server is stopped
        or restarted, so a config whose launches cannot start never takes ready
        servers down. The ``events`` row says so, with every problem."""
        ready = sorted(
            r.name
            for r in self.registry.servers.values()
            if r.config.is_managed and r.state == states.READY
        )
        kept = f"; ready servers keep running: {', '.join(ready)}" if ready else ""
        self.writer.add_event(
            server=None,
            kind="reload_refused",
            message=f"new config refused, the running one stays in force{kept}: "
            + "; ".join(exc.problems),
        )


def _make_gateway(config: Config, writer: StoreWriter) -> GatewaySync | None:
    """The gateway sync of ``[gateway]``; None without a URL. Every registration and
    removal becomes an ``events`` row with the gateway's answer."""
    gw = config.gateway
    if not gw.enabled:
        return None
    return GatewaySync(
        gw.url,
        api_key=gw.api_key or None,
        worker_api_key=gw.worker_api_key or None,
        on_event=lambda server, kind, message: writer.add_event(
            server=server, kind=kind, message=message
        ),
        request_timeout_s=gw.request_timeout_s,
    )
