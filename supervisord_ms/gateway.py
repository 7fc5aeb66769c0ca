"""Keep SGLang gateways' worker lists true for this host's servers (issue 14).

The SGLang gateway (``sglang-router`` on PyPI, the ``sgl-model-gateway`` crate) learns
that a worker is bad only through its own ``/health`` checks: every 60 s, 3 failures
in a row, by default. The daemon knows first: it launched the server, it sees a hang,
and it drains the server before a stop. :class:`GatewaySync` makes the daemon the
gateway's source of truth for this host's servers:

* a server is registered (``POST /workers``) when it becomes ready;
* it is removed (``DELETE /workers/{worker_id}``) the moment it leaves ready
  (unhealthy, a suspected hang, stopping, backoff, fatal), and a stop can wait for
  that removal (:meth:`GatewaySync.settled`) before it sends SIGTERM, so the gateway
  sends nothing new to a draining server;
* it is registered again when it recovers;
* periodically (and on start and reload) ``GET /workers`` is compared with the servers
  that are ready here, and only this host's entries are corrected. Entries whose URL is
  not one of this host's servers (other hosts' workers, or anything an operator added
  by hand for another address) are never touched.

The gateway's worker API, as the ``sglang-router`` 0.3.2 release shows it (the one
``bench/router_peer.py`` installs; ``docs/fleet.md`` has the details and the source
files):

* ``POST /workers {"url", "priority"?, "cost"?, "api_key"?}`` -> 202
  ``{"status": "accepted", "worker_id": UUID, "url", "location": "/workers/UUID",
  "message"}``; the worker is added by a background job (health check, model
  discovery), so it appears in the list only when that job has finished. Posting a URL
  that is already registered answers 202 with the same id (the job then fails with
  "already exists").
* ``GET /workers`` -> 200 ``{"workers": [{"id", "url", "model_id", "priority",
  "cost", "worker_type", "is_healthy", "load", ...}], "total", "stats"}``: finished
  registrations only.
* ``GET /workers/{id}`` -> 200 worker info, with ``job_status {"job_type", "status":
  pending|processing|failed, "message"}`` while a job for it exists; 404 when unknown.
* ``DELETE /workers/{id}`` -> 202 (removal queued), 404 unknown id, 400 when the id is
  not a UUID (a URL is refused).
* ``PUT /workers/{id} {"priority"?, "cost"?}`` -> 202.
* With ``--api-key K`` (or ``--control-plane-api-keys`` with an admin key K), every
  worker API call needs ``Authorization: Bearer K``; otherwise 401 (403 for a key
  without the admin role).

Policy is pure and table-tested: :func:`plan_reconcile`, :func:`plan_updates`,
:func:`retry_delay`, :func:`normalize_url`, :func:`parse_listing` and
:func:`summarize`. :class:`GatewaySync` does the I/O. Nothing here blocks supervision:
:meth:`GatewaySync.set_ready` only records the intent and starts a background task;
every HTTP call has a timeout; an unreachable gateway is retried with backoff and
reported through :meth:`GatewaySync.status` and ``on_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .backoff import backoff_delay
from .errors import ModelServerdError

__all__ = [
    "ERROR",
    "EVENT_DOWN",
    "EVENT_ERROR",
    "EVENT_REGISTER",
    "EVENT_REMOVE",
    "EVENT_UP",
    "PENDING",
    "REGISTERED",
    "REMOVED",
    "GatewayError",
    "GatewaySync",
    "GatewayUnreachable",
    "Listed",
    "WorkerSpec",
    "normalize_url",
    "parse_listing",
    "plan_reconcile",
    "plan_updates",
    "retry_delay",
    "summarize",
]

log = logging.getLogger("modelserverd.gateway")

# A server's registration with one gateway.
REGISTERED = "registered"  # the gateway lists it (or accepted it and reported it done)
PENDING = "pending"  # a registration or removal is on its way
REMOVED = "removed"  # not in the gateway, as wanted (the server is not ready)
ERROR = "error"  # the last attempt failed; the next sync tries again
ENTRY_STATES = (REGISTERED, PENDING, REMOVED, ERROR)

# Event kinds handed to on_event (the daemon writes them to the events table).
EVENT_REGISTER = "gateway_register"  # the gateway accepted a registration (its answer)
EVENT_REMOVE = "gateway_remove"  # the gateway accepted a removal (its answer)
EVENT_ERROR = "gateway_error"  # a registration or removal failed (once per distinct error)
EVENT_DOWN = "gateway_down"  # syncing with a gateway started failing (server is None)
EVENT_UP = "gateway_up"  # syncing with a gateway works (again) (server is None)

# The gateway's job states (core/job_queue.rs, JobStatus::pending/processing/failed).
_JOB_RUNNING = ("pending", "processing")
_JOB_FAILED = "failed"

DEFAULT_REQUEST_TIMEOUT_S = 5.0
DEFAULT_CONFIRM_TIMEOUT_S = 10.0
DEFAULT_BACKOFF_INITIAL_S = 1.0
DEFAULT_BACKOFF_MAX_S = 60.0
# The most of a gateway's answer kept in an event or an error message.
ANSWER_CHARS = 300
# The most of a gateway's answer read at all (a list of thousands of workers fits).
MAX_BODY_BYTES = 16 * 1024 * 1024
# A removal that the gateway's own add job undoes (the add finished after the
# removal) is sent again at most this many times while confirming.
_MAX_REDELETES = 3
_FIRST_POLL_S = 0.05
_MAX_POLL_S = 1.0

OnEvent = Callable[[str | None, str, str], None]


# --- errors ------------------------------------------------------------------------------


class GatewayError(ModelServerdError):
    """A gateway call failed: an error answer, an answer of the wrong shape, or (the
    subclass) no answer at all. Raised inside this module only; callers of
    :class:`GatewaySync` see its effects in ``status()`` and ``on_event``."""


class GatewayUnreachable(GatewayError):
    """No answer from the gateway: connection refused or reset, a timeout, DNS."""


# --- pure policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What to register for one server: its URL and, when configured, the gateway's
    ``priority`` (default 50 there, higher preferred) and ``cost`` (default 1.0)."""

    url: str
    priority: int | None = None
    cost: float | None = None


@dataclass(frozen=True)
class Listed:
    """One entry of ``GET /workers``."""

    id: str
    url: str
    priority: int | None = None
    cost: float | None = None
    healthy: bool | None = None


def normalize_url(url: str) -> str:
    """The form URLs are compared in: scheme and host lower case, no trailing slash,
    no default port spelled out differently. ``http://10.0.0.5:30000/`` and
    ``HTTP://10.0.0.5:30000`` are the same worker.

    The gateway itself keys workers by the exact string it was given, and a URL with a
    trailing slash does not even register (its health check asks ``//health``), so
    this module always sends the normalized form."""
    text = url.strip()
    parts = urlsplit(text)
    if not parts.scheme or not parts.netloc:
        return text.rstrip("/")
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def _as_spec(value: str | WorkerSpec) -> WorkerSpec:
    if isinstance(value, WorkerSpec):
        return WorkerSpec(normalize_url(value.url), value.priority, value.cost)
    return WorkerSpec(normalize_url(value))


def plan_reconcile(
    desired: Mapping[str, str | WorkerSpec],
    listed: Sequence[Listed],
    ours: Collection[str],
    *,
    pending: Collection[str] = (),
) -> tuple[list[tuple[str, str]], list[Listed]]:
    """What to change in one gateway's list so that it holds exactly the ready servers
    of this host, touching nothing else.

    ``desired``: server name -> URL (or :class:`WorkerSpec`) of this host's servers that
    are ready now. ``listed``: the gateway's ``GET /workers``. ``ours``: every URL this
    host answers for (its managed servers' URLs, ready or not, and URLs it registered
    before); only entries with these URLs may be removed. ``pending``: URLs whose
    registration the gateway accepted and is still processing; they are not posted
    again.

    Returns ``(to_add, to_remove)``: ``[(name, url)]`` sorted by name, and the listed
    entries to delete (by their ``id``), in listing order. An entry is removed when its
    URL is ours and not desired, or when it duplicates another entry for the same
    desired URL (the one spelled exactly as desired, else the first, is kept)."""
    wanted = {name: _as_spec(v) for name, v in desired.items()}
    desired_urls = {spec.url for spec in wanted.values()}
    ours_n = {normalize_url(u) for u in ours} | desired_urls
    pending_n = {normalize_url(u) for u in pending}

    by_url: dict[str, list[Listed]] = {}
    for entry in listed:
        by_url.setdefault(normalize_url(entry.url), []).append(entry)

    to_add = [
        (name, spec.url)
        for name, spec in sorted(wanted.items())
        if spec.url not in by_url and spec.url not in pending_n
    ]
    keep: set[int] = set()
    for url in desired_urls:
        entries = by_url.get(url)
        if entries:
            exact = [e for e in entries if e.url == url]
            keep.add(id((exact or entries)[0]))
    to_remove = [e for e in listed if normalize_url(e.url) in ours_n and id(e) not in keep]
    return to_add, to_remove


def _cost_differs(want: float, have: float | None) -> bool:
    # The gateway keeps cost as an f32: 0.1 comes back as 0.10000000149.
    return have is None or abs(want - have) > 1e-5 * max(1.0, abs(want))


def plan_updates(
    desired: Mapping[str, str | WorkerSpec], listed: Sequence[Listed]
) -> list[tuple[Listed, dict[str, Any]]]:
    """``PUT /workers/{id}`` bodies for listed entries of desired servers whose
    configured priority or cost differs from what the gateway holds (a reload changed
    them). Servers without a configured value are left at whatever the gateway has."""
    by_url: dict[str, Listed] = {}
    for entry in listed:
        by_url.setdefault(normalize_url(entry.url), entry)
    updates: list[tuple[Listed, dict[str, Any]]] = []
    for _name, value in sorted(desired.items()):
        spec = _as_spec(value)
        entry = by_url.get(spec.url)
        if entry is None:
            continue
        body: dict[str, Any] = {}
        if spec.priority is not None and spec.priority != entry.priority:
            body["priority"] = spec.priority
        if spec.cost is not None and _cost_differs(spec.cost, entry.cost):
            body["cost"] = spec.cost
        if body:
            updates.append((entry, body))
    return updates


def retry_delay(
    failures: int,
    *,
    initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
    max_s: float = DEFAULT_BACKOFF_MAX_S,
    jitter: float = 0.2,
    rand: float = 0.5,
) -> float:
    """Seconds before the next sync attempt after ``failures`` failed ones in a row
    (1 = the first failure). The nominal delay doubles from ``initial_s`` and stops at
    ``max_s``; jitter (``rand`` in [0, 1] picks within ``nominal * (1 +- jitter)``)
    keeps the daemons of a whole fleet from knocking on a restarted gateway in the same
    instant. Never above ``max_s``, never below 0."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    return backoff_delay(
        failures, initial_s=initial_s, max_s=max_s, jitter=jitter, rand=rand, quick_first=False
    )


def summarize(entry_states: Iterable[str]) -> str:
    """One server's registration state over all gateways: ``error`` if any gateway's
    is, else ``pending`` if any change is on its way, else ``registered`` if every
    gateway lists it, else ``removed``. No gateway at all: ``removed``."""
    seen = set(entry_states)
    for state in (ERROR, PENDING):
        if state in seen:
            return state
    if seen and seen <= {REGISTERED}:
        return REGISTERED
    if REGISTERED in seen:  # listed by some gateways, removed from others: a change
        return PENDING
    return REMOVED


def parse_listing(data: Any) -> list[Listed]:
    """The entries of a ``GET /workers`` answer (``{"workers": [...]}``); raises
    :class:`GatewayError` when the answer has another shape."""
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        raise GatewayError('GET /workers answered without a "workers" list')
    listed: list[Listed] = []
    for item in data["workers"]:
        if not isinstance(item, dict):
            raise GatewayError("GET /workers listed an entry that is not an object")
        wid, url = item.get("id"), item.get("url")
        if not isinstance(wid, str) or not isinstance(url, str):
            raise GatewayError("GET /workers listed an entry without a string id and url")
        priority = item.get("priority")
        cost = item.get("cost")
        healthy = item.get("is_healthy")
        listed.append(
            Listed(
                id=wid,
                url=url,
                priority=priority if isinstance(priority, int) else None,
                cost=float(cost) if isinstance(cost, (int, float)) else None,
                healthy=healthy if isinstance(healthy, bool) else None,
            )
        )
    return listed


# --- state ---------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    ms = int(round(ts * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _clip(text: str, limit: int = ANSWER_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Entry:
    """One server's registration with one gateway, as this daemon knows it."""

    state: str = REMOVED
    worker_id: str | None = None  # the gateway's id of the current registration
    url: str | None = None  # the URL that registration is for
    error: str | None = None
    healthy: bool | None = None  # the gateway's own view, from its last listing
    since: float = field(default_factory=time.time)
    accepted: bool = False  # a POST for ``url`` was answered 202 (job may still run)
    dirty: bool = False  # the intent changed while an operation was under way
    reason: str = ""  # why the next operation happens (for its event)

    def set(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.since = time.time()
        self.state = state
        self.error = error


@dataclass
class _Gateway:
    url: str
    entries: dict[str, _Entry] = field(default_factory=dict)
    reachable: bool | None = None  # the last call got an answer
    ok: bool | None = None  # the last sync succeeded
    last_error: str | None = None
    last_sync_at: float | None = None
    last_attempt_at: float | None = None
    next_sync_at: float | None = None
    failures: int = 0
    listed_ours: int = 0
    wake: asyncio.Event | None = None

    def entry(self, name: str) -> _Entry:
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = _Entry()
        return entry


@dataclass
class _Answer:
    status: int
    data: Any
    text: str

    def summary(self) -> str:
        return f"{self.status} {_clip(self.text)}" if self.text else str(self.status)


# --- the sync --------------------------------------------------------------------------------


class GatewaySync:
    """Registers this host's ready servers with one or more SGLang gateways, removes
    them when they leave ready, and keeps the gateways' lists true.

    ``gateway_urls``: one URL or several (``http://gw.internal:30000``). ``api_key``:
    sent as ``Authorization: Bearer <key>`` on every call (the gateway's ``--api-key``,
    or an admin key of its ``--control-plane-api-keys``); never logged or reported.
    ``worker_api_key``: when the SGLang servers themselves require a key, the key the
    gateway must send them (the ``api_key`` field of ``POST /workers``).
    ``session_factory``: makes the ``aiohttp.ClientSession`` used (created on first
    use, closed by :meth:`close`). ``on_event(server, kind, message)``: an audit row,
    ``server`` None for the gateway as a whole; kinds are the ``EVENT_*`` constants.
    """

    def __init__(
        self,
        gateway_urls: str | Iterable[str],
        *,
        api_key: str | None = None,
        worker_api_key: str | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        on_event: OnEvent | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S,
        backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        rand: random.Random | None = None,
    ):
        urls = [gateway_urls] if isinstance(gateway_urls, str) else list(gateway_urls)
        seen: dict[str, _Gateway] = {}
        for url in urls:
            norm = normalize_url(url)
            parts = urlsplit(norm)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"gateway URL {url!r} is not http(s)://host:port")
            seen.setdefault(norm, _Gateway(norm))
        if not seen:
            raise ValueError("at least one gateway URL is needed")
        self._gateways = list(seen.values())
        self._api_key = api_key or None
        self._worker_api_key = worker_api_key or None
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._on_event = on_event
        self.request_timeout_s = request_timeout_s
        self.confirm_timeout_s = confirm_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._rand = rand or random.Random()
        # The intent: name -> what to register (ready) or None (not ready).
        self._want: dict[str, WorkerSpec | None] = {}
        # The last URL known for each name (to remove a server that is no longer ready).
        self._urls: dict[str, str] = {}
        # URLs this host answers for: managed servers' URLs, and every URL it registered.
        self._ours: set[str] = set()
        self._drivers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Calls not tied to one server's work: stale entries' removals, updates.
        self._side: set[asyncio.Future[Any]] = set()

    # --- public ---------------------------------------------------------------------
    @property
    def gateway_urls(self) -> list[str]:
        return [gw.url for gw in self._gateways]

    def set_managed(self, urls: Iterable[str]) -> None:
        """The URLs of every server this host manages, ready or not (call on start and
        on reload). Entries with these URLs are this host's to correct: a server that
        is not ready is removed even if an earlier daemon run registered it. URLs this
        daemon registered stay its own after a reload drops them, so they are removed."""
        self._ours.update(normalize_url(u) for u in urls)

    def set_ready(
        self,
        name: str,
        url: str,
        ready: bool,
        reason: str = "",
        *,
        priority: int | None = None,
        cost: float | None = None,
    ) -> None:
        """Record that server ``name`` (at ``url``) is ready or not, and start
        registering or removing it with every gateway in the background. Returns at
        once, so synchronous code (the supervisor's ``set_state``) may call it; the
        intent is recorded before it returns, so a :meth:`settled` right after it
        waits for this very change. ``reason`` goes into the event. Needs a running
        event loop."""
        norm = normalize_url(url)
        spec = WorkerSpec(norm, priority, cost) if ready else None
        self._urls[name] = norm
        self._ours.add(norm)
        self._want[name] = spec
        for gw in self._gateways:
            entry = gw.entry(name)
            entry.reason = reason
            if self._needs_action(entry, spec):
                entry.set(PENDING, entry.error)
                self._kick(gw, name)

    async def settled(self, name: str, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the background work for ``name`` is done
        on every gateway. True when the gateways now match the intent: for a stop,
        call it after ``set_ready(..., False)`` and before SIGTERM, so that no gateway
        sends new requests to the draining server. False on a timeout or an error
        (the stop should go on anyway: the gateway's own checks remain)."""
        tasks = [t for (g, n), t in self._drivers.items() if n == name and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, timeout_s))
            if any(not t.done() for t in tasks):
                return False
        want = self._want.get(name)
        goal = REGISTERED if want is not None else REMOVED
        return all(gw.entry(name).state == goal for gw in self._gateways)

    async def reconcile(self, desired: Mapping[str, str | WorkerSpec]) -> bool:
        """Read every gateway's list, add this host's ready servers that are missing,
        remove this host's entries that are stale, and wait (bounded) for that work.
        ``desired``: name -> URL (or :class:`WorkerSpec`) of the servers ready now; it
        replaces the intent for every name. True when every gateway was synced."""
        specs = self._apply_desired(desired)
        results = await asyncio.gather(
            *(self._reconcile_gateway(gw, specs) for gw in self._gateways),
            return_exceptions=True,
        )
        for gw, result in zip(self._gateways, results, strict=True):
            if isinstance(result, BaseException):
                log.error("gateway %s: sync failed: %s", gw.url, result, exc_info=result)
        return all(result is True for result in results)

    def request_sync(self) -> None:
        """Make :meth:`run` reconcile every gateway now (after a reload)."""
        for gw in self._gateways:
            if gw.wake is not None:
                gw.wake.set()

    async def run(
        self,
        stop: asyncio.Event,
        desired: Callable[[], Mapping[str, str | WorkerSpec]],
        interval_s: float,
    ) -> None:
        """Reconcile every gateway at once, then every ``interval_s``; a gateway whose
        sync fails is retried after :func:`retry_delay` instead (each gateway keeps
        its own pace). Returns when ``stop`` is set, after giving removals under way
        up to ``request_timeout_s`` to reach the gateways."""
        loops = [
            asyncio.ensure_future(self._gateway_loop(gw, stop, desired, interval_s))
            for gw in self._gateways
        ]
        try:
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.close(grace_s=self.request_timeout_s)

    async def close(self, grace_s: float = 0.0) -> None:
        """Let work under way finish for up to ``grace_s``, cancel the rest, and close
        the session this object made."""
        running = [t for t in (*self._drivers.values(), *self._side) if not t.done()]
        if running and grace_s > 0:
            await asyncio.wait(running, timeout=grace_s)
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._drivers.clear()
        self._side.clear()
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def server_state(self, name: str) -> str:
        """``registered``, ``pending``, ``removed`` or ``error`` (see :func:`summarize`):
        the ``gateway`` field of a server object."""
        return summarize(gw.entries[name].state for gw in self._gateways if name in gw.entries)

    def status(self) -> dict[str, Any]:
        """For ``/v1/status``, ``/metrics`` and ``modelserverd status``::

            {"gateways": [{"url", "reachable", "ok", "last_error", "last_sync_at",
                           "last_sync_ts", "last_attempt_at", "consecutive_failures",
                           "next_sync_in_s", "registered"}],
             "servers": {name: {"state", "want", "gateways": {gateway_url:
                           {"state", "worker_id", "error", "healthy", "since"}}}}}

        ``reachable``: the gateway answered the last call (None before any).
        ``last_sync_at``: the last successful sync (UTC ISO text; ``_ts``: epoch s).
        ``registered``: this host's entries in its last listing."""
        now = time.time()
        gateways = []
        for gw in self._gateways:
            gateways.append(
                {
                    "url": gw.url,
                    "reachable": gw.reachable,
                    "ok": gw.ok,
                    "last_error": gw.last_error,
                    "last_sync_at": _iso(gw.last_sync_at),
                    "last_sync_ts": gw.last_sync_at,
                    "last_attempt_at": _iso(gw.last_attempt_at),
                    "consecutive_failures": gw.failures,
                    "next_sync_in_s": (
                        None if gw.next_sync_at is None else max(0.0, gw.next_sync_at - now)
                    ),
                    "registered": gw.listed_ours,
                }
            )
        names = sorted({n for gw in self._gateways for n in gw.entries} | set(self._want))
        servers: dict[str, Any] = {}
        for name in names:
            per: dict[str, Any] = {}
            for gw in self._gateways:
                entry = gw.entries.get(name)
                if entry is None:
                    continue
                per[gw.url] = {
                    "state": entry.state,
                    "worker_id": entry.worker_id,
                    "error": entry.error,
                    "healthy": entry.healthy,
                    "since": _iso(entry.since),
                }
            servers[name] = {
                "state": summarize(v["state"] for v in per.values()),
                "want": REGISTERED if self._want.get(name) is not None else REMOVED,
                "gateways": per,
            }
        return {"gateways": gateways, "servers": servers}

    # --- intent -----------------------------------------------------------------------
    def _apply_desired(self, desired: Mapping[str, str | WorkerSpec]) -> dict[str, WorkerSpec]:
        # Synchronous on purpose: nothing may run between reading the supervisor's
        # states and replacing the intent, so a set_ready that comes later wins.
        specs = {name: _as_spec(value) for name, value in desired.items()}
        for name in list(self._want):
            if name not in specs:
                self._want[name] = None
        for name, spec in specs.items():
            self._want[name] = spec
            self._urls[name] = spec.url
            self._ours.add(spec.url)
        return specs

    @staticmethod
    def _needs_action(entry: _Entry, spec: WorkerSpec | None) -> bool:
        if spec is not None:
            return not (
                entry.state in (REGISTERED, PENDING)
                and entry.accepted
                and entry.url == spec.url
                and not entry.dirty
            )
        return entry.state != REMOVED or entry.worker_id is not None

    # --- background work per (gateway, server) ---------------------------------------------
    def _kick(self, gw: _Gateway, name: str) -> asyncio.Task[None]:
        key = (gw.url, name)
        task = self._drivers.get(key)
        if task is not None and not task.done():
            gw.entry(name).dirty = True
            return task
        task = asyncio.ensure_future(self._drive(gw, name))
        self._drivers[key] = task
        return task

    async def _drive(self, gw: _Gateway, name: str) -> None:
        """Bring one server's registration with one gateway to the intent, one call at
        a time (so a quick ready -> unhealthy -> ready keeps its order). A change of
        intent during a call is picked up right after it; a failure ends the work
        until the next sync."""
        entry = gw.entry(name)
        try:
            for _ in range(8):  # bounded: each pass is a whole add or removal
                entry.dirty = False
                spec = self._want.get(name)
                if spec is not None:
                    if not self._needs_action(entry, spec):
                        return
                    if entry.url is not None and entry.url != spec.url and entry.accepted:
                        ok = await self._remove(gw, name, entry, entry.url, "its address changed")
                        if not ok:
                            return
                    ok = await self._register(gw, name, entry, spec)
                else:
                    if not self._needs_action(entry, None):
                        return
                    ok = await self._remove(gw, name, entry, self._urls.get(name), entry.reason)
                if not ok and not entry.dirty:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not end supervision
            log.error("gateway %s, server %s: %s", gw.url, name, exc, exc_info=exc)
            self._entry_error(gw, name, entry, f"internal error: {exc}")

    async def _register(self, gw: _Gateway, name: str, entry: _Entry, spec: WorkerSpec) -> bool:
        body: dict[str, Any] = {"url": spec.url}
        if spec.priority is not None:
            body["priority"] = spec.priority
        if spec.cost is not None:
            body["cost"] = spec.cost
        if self._worker_api_key:
            body["api_key"] = self._worker_api_key
        reason = entry.reason
        entry.set(PENDING, entry.error)
        try:
            answer = await self._call(gw, "POST", "/workers", body)
        except GatewayError as exc:
            self._entry_error(gw, name, entry, f"could not register with {gw.url}: {exc}")
            return False
        worker_id = answer.data.get("worker_id") if isinstance(answer.data, dict) else None
        if answer.status not in (200, 201, 202) or not isinstance(worker_id, str):
            self._entry_error(
                gw,
                name,
                entry,
                f"{gw.url} refused the registration of {spec.url}: {answer.summary()}",
            )
            return False
        entry.worker_id, entry.url, entry.accepted = worker_id, spec.url, True
        self._ours.add(spec.url)
        self._event(
            name,
            EVENT_REGISTER,
            f"registered {spec.url} with {gw.url} as {worker_id}"
            + (f" ({reason})" if reason else "")
            + f"; the gateway answered {answer.summary()}",
        )
        return await self._confirm_added(gw, name, entry, worker_id)

    async def _confirm_added(self, gw: _Gateway, name: str, entry: _Entry, wid: str) -> bool:
        """Poll ``GET /workers/{id}`` until the gateway's add job is done. Stops early
        when the intent changes (a removal must not wait for a slow add)."""
        deadline = time.monotonic() + self.confirm_timeout_s
        pause = _FIRST_POLL_S
        while not entry.dirty:
            try:
                answer = await self._call(gw, "GET", f"/workers/{wid}")
            except GatewayError:
                return True  # accepted; the next sync looks again
            if entry.dirty:
                return True
            if answer.status == 404:
                self._lost(entry)
                self._entry_error(
                    gw,
                    name,
                    entry,
                    f"{gw.url} accepted {entry.url} but then dropped it (its add job failed, "
                    "or it restarted); see the gateway's log",
                )
                return False
            job = _job(answer.data)
            if job is not None and job[1] == _JOB_FAILED and _registered(answer.data):
                # "Worker ... already exists": the URL was registered already (posting
                # it again answers the same id, and that second add job fails).
                job = None
            if answer.status == 200 and job is None:
                healthy = answer.data.get("is_healthy") if isinstance(answer.data, dict) else None
                entry.healthy = healthy if isinstance(healthy, bool) else None
                entry.set(REGISTERED)
                return True
            if answer.status == 200 and job is not None and job[1] == _JOB_FAILED:
                self._lost(entry)
                self._entry_error(
                    gw, name, entry, f"{gw.url} could not add {entry.url}: {job[2] or 'no reason'}"
                )
                return False
            if answer.status != 200 or time.monotonic() >= deadline:
                return True  # still pending: the next sync looks again
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_POLL_S)
        return True

    async def _remove(
        self, gw: _Gateway, name: str, entry: _Entry, url: str | None, reason: str
    ) -> bool:
        entry.set(PENDING, entry.error)
        ids: list[str] = []
        if entry.worker_id is not None and (url is None or entry.url == url):
            ids.append(entry.worker_id)
        else:
            # No id known here (registered by an earlier run, or the add never answered):
            # look the URL up in the list.
            try:
                listing = await self._list(gw)
            except GatewayError as exc:
                self._entry_error(gw, name, entry, f"could not remove from {gw.url}: {exc}")
                return False
            targets = {normalize_url(u) for u in (url, entry.url) if u}
            ids = [w.id for w in listing if normalize_url(w.url) in targets]
        for wid in ids:
            if not await self._delete(gw, name, entry, wid, url or entry.url or "?", reason):
                return False
        # Removed (or removal queued at the gateway): a registration must be posted anew.
        self._lost(entry)
        if not entry.dirty:
            entry.set(REMOVED)
        return True

    async def _delete(
        self, gw: _Gateway, name: str | None, entry: _Entry | None, wid: str, url: str, reason: str
    ) -> bool:
        """``DELETE /workers/{wid}`` and wait (bounded) until the gateway no longer
        knows it. A 404 means it is gone already."""
        try:
            answer = await self._call(gw, "DELETE", f"/workers/{wid}")
        except GatewayError as exc:
            self._entry_error(gw, name, entry, f"could not remove {url} from {gw.url}: {exc}")
            return False
        if answer.status == 404:
            return True
        if answer.status not in (200, 202, 204):
            self._entry_error(
                gw, name, entry, f"{gw.url} refused the removal of {url}: {answer.summary()}"
            )
            return False
        self._event(
            name,
            EVENT_REMOVE,
            f"removed {url} ({wid}) from {gw.url}"
            + (f" ({reason})" if reason else "")
            + f"; the gateway answered {answer.summary()}",
        )
        deadline = time.monotonic() + self.confirm_timeout_s
        pause = _FIRST_POLL_S
        redeletes = 0
        while time.monotonic() < deadline and not (entry is not None and entry.dirty):
            try:
                check = await self._call(gw, "GET", f"/workers/{wid}")
            except GatewayError:
                return True  # accepted; the next sync looks again
            if check.status == 404:
                return True
            job = _job(check.data)
            if check.status == 200 and job is None and redeletes < _MAX_REDELETES:
                # The gateway's add job finished after our removal and put it back.
                redeletes += 1
                with contextlib.suppress(GatewayError):
                    await self._call(gw, "DELETE", f"/workers/{wid}")
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_POLL_S)
        return True

    @staticmethod
    def _lost(entry: _Entry) -> None:
        entry.worker_id, entry.accepted, entry.healthy = None, False, None

    # --- reconcile one gateway ---------------------------------------------------------------
    async def _reconcile_gateway(self, gw: _Gateway, specs: Mapping[str, WorkerSpec]) -> bool:
        gw.last_attempt_at = time.time()
        try:
            listing = await self._list(gw)
        except GatewayError as exc:
            self._sync_failed(gw, exc)
            return False
        self._sync_ok(gw)
        by_url: dict[str, Listed] = {}
        for w in listing:
            by_url.setdefault(normalize_url(w.url), w)
        busy = {n for (g, n), t in self._drivers.items() if g == gw.url and not t.done()}

        # Learn from the list: what is registered, what the gateway lost.
        tasks_early: list[asyncio.Future[Any]] = []
        pending_urls: list[str] = []
        for name, spec in specs.items():
            if name in busy:
                pending_urls.append(spec.url)
                continue
            entry = gw.entry(name)
            found = by_url.get(spec.url)
            if found is not None:
                entry.worker_id, entry.url, entry.accepted = found.id, spec.url, True
                entry.healthy = found.healthy
                entry.set(REGISTERED)
            elif entry.accepted and entry.worker_id and entry.url == spec.url:
                if await self._still_adding(gw, entry):
                    pending_urls.append(spec.url)
                else:
                    self._lost(entry)
        for name, entry in list(gw.entries.items()):
            if name in specs or name in busy:
                continue
            url = self._urls.get(name)
            found = by_url.get(url) if url else None
            if found is not None:  # not ready here, yet listed: it must go
                entry.worker_id, entry.url, entry.accepted = found.id, url, True
                entry.healthy = found.healthy
            elif entry.accepted and entry.worker_id and await self._still_adding(gw, entry):
                # Not listed yet, but an add job for it still runs: remove it too.
                entry.reason = "reconcile: its registration is still being added"
                tasks_early.append(self._kick(gw, name))
            else:
                self._lost(entry)
                entry.set(REMOVED)
        gw.listed_ours = sum(1 for w in listing if normalize_url(w.url) in self._ours)

        to_add, to_remove = plan_reconcile(specs, listing, self._ours, pending=pending_urls)
        tasks: list[asyncio.Future[Any]] = tasks_early
        for name, _url in to_add:
            if self._want.get(name) is None:
                continue  # left ready since the snapshot; its removal is under way
            entry = gw.entry(name)
            entry.reason = "reconcile: missing from the gateway's list"
            entry.set(PENDING, entry.error)
            tasks.append(self._kick(gw, name))
        names_by_url = {u: n for n, u in self._urls.items()}
        for stale in to_remove:
            name = names_by_url.get(normalize_url(stale.url))
            if name is not None:
                entry = gw.entry(name)
                want = self._want.get(name)
                if want is not None and want.url == normalize_url(stale.url):
                    if stale.id == entry.worker_id:
                        continue  # ready again since the snapshot: keep it
                elif stale.id == entry.worker_id:
                    if name not in busy:
                        entry.reason = "reconcile: listed, but not ready here"
                        entry.set(PENDING, entry.error)
                        tasks.append(self._kick(gw, name))
                    continue
                if name in busy:
                    continue  # its own work is under way; the next sync looks again
            # A duplicate, or an entry of this host that no server here answers for.
            tasks.append(
                self._side_task(
                    self._delete(
                        gw,
                        name,
                        None,
                        stale.id,
                        stale.url,
                        "reconcile: an entry of this host that is not a ready server",
                    )
                )
            )
        for entry_listed, body in plan_updates(specs, listing):
            tasks.append(self._side_task(self._update(gw, entry_listed, body)))
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self.request_timeout_s + self.confirm_timeout_s)
        return True

    def _side_task(self, coro: Any) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)
        return task

    async def _still_adding(self, gw: _Gateway, entry: _Entry) -> bool:
        """Whether the gateway's add job for the entry's id is still running."""
        try:
            answer = await self._call(gw, "GET", f"/workers/{entry.worker_id}")
        except GatewayError:
            return True
        job = _job(answer.data)
        return answer.status == 200 and job is not None and job[1] in _JOB_RUNNING

    async def _update(self, gw: _Gateway, listed: Listed, body: dict[str, Any]) -> None:
        name = {u: n for n, u in self._urls.items()}.get(normalize_url(listed.url))
        try:
            answer = await self._call(gw, "PUT", f"/workers/{listed.id}", body)
        except GatewayError as exc:
            self._event(name, EVENT_ERROR, f"could not update {listed.url} on {gw.url}: {exc}")
            return
        fields = ", ".join(f"{k} {v}" for k, v in sorted(body.items()))
        kind = EVENT_REGISTER if answer.status in (200, 202) else EVENT_ERROR
        self._event(
            name,
            kind,
            f"set {fields} for {listed.url} on {gw.url}; the gateway answered {answer.summary()}",
        )

    async def _gateway_loop(
        self,
        gw: _Gateway,
        stop: asyncio.Event,
        desired: Callable[[], Mapping[str, str | WorkerSpec]],
        interval_s: float,
    ) -> None:
        gw.wake = asyncio.Event()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                gw.wake.clear()
                ok = False
                try:
                    specs = self._apply_desired(desired())
                    sync = asyncio.ensure_future(self._reconcile_gateway(gw, specs))
                    await asyncio.wait({sync, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if not sync.done():  # stopping: the work it started is left to close()
                        sync.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sync
                        break
                    ok = sync.result()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # desired() or a bug: log, wait, go on
                    log.error("gateway %s: sync failed: %s", gw.url, exc, exc_info=exc)
                if ok:
                    delay = interval_s
                else:
                    delay = retry_delay(
                        max(gw.failures, 1),
                        initial_s=min(self.backoff_initial_s, interval_s),
                        max_s=max(self.backoff_max_s, interval_s),
                        rand=self._rand.random(),
                    )
                gw.next_sync_at = time.time() + delay
                waker = asyncio.ensure_future(gw.wake.wait())
                try:
                    await asyncio.wait(
                        {stopper, waker}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waker.cancel()
        finally:
            stopper.cancel()
            gw.next_sync_at = None

    # --- reporting ---------------------------------------------------------------------------
    def _event(self, server: str | None, kind: str, message: str) -> None:
        level = logging.WARNING if kind in (EVENT_ERROR, EVENT_DOWN) else logging.INFO
        log.log(level, "%s%s", f"server {server}: " if server else "", message)
        if self._on_event is None:
            return
        try:
            self._on_event(server, kind, message)
        except Exception as exc:  # the audit trail must not stop the sync
            log.error("gateway event callback failed: %s", exc, exc_info=exc)

    def _entry_error(
        self, gw: _Gateway, name: str | None, entry: _Entry | None, message: str
    ) -> None:
        if entry is None:
            self._event(name, EVENT_ERROR, message)
            return
        repeated = entry.state == ERROR and entry.error == message
        entry.set(ERROR, message)
        if not repeated:
            self._event(name, EVENT_ERROR, message)

    def _sync_failed(self, gw: _Gateway, exc: GatewayError) -> None:
        gw.failures += 1
        message = str(exc)
        was_ok, old_error = gw.ok, gw.last_error
        gw.ok, gw.last_error = False, message
        if was_ok is not False or old_error != message:
            self._event(
                None,
                EVENT_DOWN,
                f"{message}; serving goes on, the gateway is tried again with backoff",
            )

    def _sync_ok(self, gw: _Gateway) -> None:
        was_ok, failures = gw.ok, gw.failures
        gw.ok, gw.failures, gw.last_error = True, 0, None
        gw.last_sync_at = time.time()
        if was_ok is not True:
            after = f" after {failures} failed attempts" if failures else ""
            self._event(None, EVENT_UP, f"{gw.url}: in sync{after}")

    # --- HTTP ---------------------------------------------------------------------------------
    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._session_factory is not None:
                self._session = self._session_factory()
            else:
                # force_close: a few calls a minute need no pool, and a kept connection
                # the gateway closes while idle would turn the next call into an error.
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True),
                    timeout=aiohttp.ClientTimeout(total=None),
                )
        return self._session

    async def _list(self, gw: _Gateway) -> list[Listed]:
        answer = await self._call(gw, "GET", "/workers")
        if answer.status != 200:
            raise GatewayError(f"{gw.url}: GET /workers answered {answer.summary()}")
        try:
            return parse_listing(answer.data)
        except GatewayError as exc:
            raise GatewayError(f"{gw.url}: {exc}") from None

    async def _call(
        self, gw: _Gateway, method: str, path: str, body: dict[str, Any] | None = None
    ) -> _Answer:
        """One call; lower-layer errors become :class:`GatewayUnreachable`, refused
        credentials :class:`GatewayError`. Other answers are returned as they are."""
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        try:
            session = self._get_session()
            async with session.request(
                method, gw.url + path, json=body, headers=headers, timeout=timeout
            ) as resp:
                raw = await resp.content.read(MAX_BODY_BYTES)
                status = resp.status
        except asyncio.TimeoutError:
            gw.reachable = False
            raise GatewayUnreachable(
                f"{gw.url}: no answer to {method} {path} within {self.request_timeout_s:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            gw.reachable = False
            why = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc)
            raise GatewayUnreachable(f"{gw.url}: cannot connect ({why})") from None
        except (aiohttp.ClientError, OSError) as exc:
            gw.reachable = False
            raise GatewayUnreachable(
                f"{gw.url}: {method} {path} failed ({type(exc).__name__}: {exc})"
            ) from None
        gw.reachable = True
        text = raw.decode("utf-8", "replace")
        if status in (401, 403):
            raise GatewayError(
                f"{gw.url} refused the credentials ({status} {_clip(text) or 'no body'}): "
                "set [gateway] api_key to the gateway's --api-key, or to an admin key of "
                "its --control-plane-api-keys"
            )
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = None
        return _Answer(status, data, text)


def _registered(data: Any) -> bool:
    """Whether a ``GET /workers/{id}`` answer describes a registered worker rather
    than the stub the gateway shows while only an add job exists (whose
    ``worker_type`` and ``connection_mode`` are ``"unknown"``)."""
    return isinstance(data, dict) and data.get("worker_type", "unknown") != "unknown"


def _job(data: Any) -> tuple[str, str, str | None] | None:
    """``(job_type, status, message)`` of a worker info's ``job_status``, if any."""
    if not isinstance(data, dict):
        return None
    job = data.get("job_status")
    if not isinstance(job, dict):
        return None
    message = job.get("message")
    return (
        str(job.get("job_type", "")),
        str(job.get("status", "")),
        message if isinstance(message, str) else None,
    )
