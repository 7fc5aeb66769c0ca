"""The daemon's HTTP/1.1 + JSON API on its Unix socket (aiohttp.web).

Like Docker's API, ``curl --unix-socket /run/modelserverd/api.sock
http://localhost/v1/servers`` works. Every answer is JSON; every error is
``{"error": {"code": ..., "message": ...}}`` whose message says what was wrong
and what to do. The socket is shared by every user and program on the host, so
nothing a peer sends (garbage bytes, huge or malformed bodies, thousands of
connections, a connection that trickles one header byte a minute) may stop the
daemon from answering everyone else: each bad request gets a 4xx or its
connection is closed.

Who may change things is decided by the kernel's account of the peer
(``SO_PEERCRED``, ``SO_PEERGROUPS``), not by anything the peer says about itself.
Everyone else who reaches the socket is untrusted (DESIGN.md, "Who may do what"):

* connections are capped per peer uid and in total, below the open-files limit
  with a reserve left for supervision (probes, health checks, logs, SQLite), and
  idle keep-alive connections are closed (:class:`ConnectionGate`);
* client samples are rate-limited per uid (:class:`RateLimiter`), and what they
  may do to the selection is bounded in :meth:`Registry.record_sample`;
* history reads are capped in rows and in how many run at once, run off the
  event loop, and are dropped when their client leaves (:class:`HistoryReads`);
* the socket is only created in a folder no other user can write.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import math
import os
import platform
import pwd
import re
import resource
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import states
from .config import ConfigError
from .errors import ModelServerdError
from .gateway import GatewaySync
from .registry import Registry, ServerRecord
from .store import Store, StoreWriter

log = logging.getLogger("modelserverd.api")

MAX_BODY_BYTES = 1 << 20
MAX_SAMPLES = 1000
MAX_CANDIDATES = 64
# How long /v1/best waits for a starting daemon's adoption: under the client's 3 s
# for a daemon answer, after which it goes on from the config by itself.
ADOPTION_WAIT_S = 2.0
DEFAULT_HISTORY_LIMIT = 100
# History answers carry at most MAX_HISTORY_ROWS rows: 10,000 rows of samples were
# 241 MB of JSON. A `limit` up to MAX_HISTORY_LIMIT is still accepted (older
# clients ask for 10000) and served as MAX_HISTORY_ROWS; the answer says which.
MAX_HISTORY_LIMIT = 10000
MAX_HISTORY_ROWS = 1000
# History reads running at once (each in a thread of its own pool), and reads
# waiting for a turn; beyond that a read is answered 503 at once.
MAX_HISTORY_READS = 4
MAX_HISTORY_WAITERS = 16
# A client must finish a request (headers from connect, body from the headers)
# within this long, so half-open and trickling connections cannot pile up.
REQUEST_TIMEOUT_S = 30.0
# A connection idle between requests is closed after this long: each client
# request is a short exchange, and an idle connection holds a descriptor.
KEEPALIVE_TIMEOUT_S = 5.0
# How long to keep reading (and discarding) a refused body so that the client
# gets to read the 413 instead of a connection reset.
LINGER_S = 2.0
# Largest values accepted in a sample: beyond them the numbers are nonsense, and
# SQLite integers and the estimator's arithmetic must not overflow.
MAX_LATENCY_S = 1e6
MAX_TOKENS = 1 << 40
MAX_ERROR_CHARS = 200
# Client samples per peer uid: a token bucket refilled at SAMPLE_RATE_PER_UID per
# second holding at most SAMPLE_BURST_PER_UID (one full request of MAX_SAMPLES).
# One sample per completed request: no client program comes near it.
SAMPLE_RATE_PER_UID = 100.0
SAMPLE_BURST_PER_UID = MAX_SAMPLES
# Connections: at most MAX_CONNECTIONS in all and never more than the open-files
# limit less DESCRIPTOR_RESERVE (kept for probes, health checks, server logs and
# SQLite, so that API clients can never make supervision fail with EMFILE);
# MAX_CONNECTIONS_PER_UID per peer uid other than root and the daemon's own; the
# last ADMIN_CONNECTION_RESERVE of them only for root and the daemon's uid.
MAX_CONNECTIONS = 4096
MAX_CONNECTIONS_PER_UID = 128
ADMIN_CONNECTION_RESERVE = 16
DESCRIPTOR_RESERVE = 256
MIN_CONNECTIONS = 16
LISTEN_BACKLOG = 4096
# After a failed accept() (EMFILE, ENFILE, ENOBUFS): pause, doubling up to the
# maximum, and log one line per ACCEPT_ERROR_LOG_INTERVAL_S at most.
ACCEPT_RETRY_S = 0.05
ACCEPT_RETRY_MAX_S = 1.0
ACCEPT_ERROR_LOG_INTERVAL_S = 60.0
# Whether a daemon already answers on the socket path: the whole check, however
# slowly the other end answers.
LIVE_CHECK_DEADLINE_S = 5.0
# SO_PEERCRED answers struct ucred {pid_t pid; uid_t uid; gid_t gid;}.
_UCRED = struct.Struct("3i")
_DIGITS = re.compile(r"[0-9]{1,9}")
# SO_PEERGROUPS (Linux >= 4.13): the peer's supplementary groups as they were when
# it connected. Python names it from 3.12 on; its number is 59 on the
# architectures that use asm-generic/socket.h (x86, arm, powerpc, s390, riscv).
_GENERIC_SOCKET_ABI = ("x86_64", "i686", "i386", "aarch64", "arm", "ppc64", "s390x", "riscv64")
_SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None) or (
    59 if platform.machine().startswith(_GENERIC_SOCKET_ABI) else None
)


class SocketError(ModelServerdError):
    """The API socket cannot be created: its path is taken by something that is
    not a socket, its group does not exist, or its folder cannot be written.
    Seen by the operator when ``modelserverd run`` starts."""


class SocketInUse(SocketError):
    """A live daemon already answers on the socket: two daemons on one host
    would fight over the same GPUs, so the second one refuses to start."""


class Actions(Protocol):
    """What the API asks the daemon to do; implemented by the daemon.

    Each returns a JSON-able dict for the answer. ``reload`` raises
    :class:`config.ConfigError` when the new config is bad (the running one stays).
    """

    async def restart(self, name: str) -> dict: ...

    async def stop(self, name: str) -> dict: ...

    async def start(self, name: str) -> dict: ...

    async def reload(self) -> dict: ...


@dataclass
class ApiContext:
    registry: Registry
    store: Store  # reads
    writer: StoreWriter  # writes (client samples)
    actions: Actions
    status: Callable[[], dict]  # version, pid, uptime_s, host addresses, config path
    # The gateway whose worker list the daemon keeps ([gateway]); None: no gateway.
    gateway: GatewaySync | None = None
    # Set once the daemon has adopted the servers an earlier run left running; until
    # then /v1/best waits for it (ADOPTION_WAIT_S at most) rather than tell callers
    # that servers which are serving are not ready. None: nothing to wait for.
    adopted: asyncio.Event | None = None


CTX_KEY: web.AppKey[ApiContext] = web.AppKey("modelserverd_ctx", ApiContext)
TIMEOUT_KEY: web.AppKey[float] = web.AppKey("modelserverd_request_timeout_s", float)
# Connections that have sent at least one whole request head (see _close_stalled).
SEEN_KEY: web.AppKey[set] = web.AppKey("modelserverd_seen_connections", set)


# --- errors -------------------------------------------------------------------------


class Refused(Exception):
    """Raised inside a handler to answer with the error format (never escapes the API)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: an estimate that is not a number is unknown."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(_finite(data), default=str, separators=(",", ":")) + "\n").encode()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_json_bytes(data), status=status, content_type="application/json", charset="utf-8"
    )


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    resp = _json({"error": {"code": code, "message": message, **extra}}, status)
    if status in (408, 413):
        # The unread body may be huge or never come: do not keep the connection.
        resp.force_close()
    retry = extra.get("retry_after_s")
    if isinstance(retry, (int, float)):
        resp.headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return resp


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
}


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    status = exc.status
    if status == 404:
        return _error(
            404,
            "not_found",
            f"no such endpoint: {request.method} {request.path}; "
            "the endpoints are listed in the README (GET /v1/status, /v1/servers, /v1/best, ...)",
        )
    if status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return _error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use {allowed or 'another method'}",
        )
    if status == 413:
        return _error(
            413,
            "too_large",
            f"request body is over {MAX_BODY_BYTES} bytes; send fewer samples per request",
        )
    if status < 400:
        raise exc  # a redirect or the like: passed through unchanged
    code = _HTTP_CODES.get(status, "http_error")
    return _error(status, code, exc.reason or "request refused")


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every failure into the error format; a bug answers 500 and is logged,
    and the daemon keeps serving."""
    request.app[SEEN_KEY].add(request.protocol)
    try:
        try:
            length = request.content_length
        except ValueError:
            raise Refused(400, "bad_request", "Content-Length is not a number") from None
        if length is not None and length > MAX_BODY_BYTES:
            raise Refused(
                413,
                "too_large",
                f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES} bytes; "
                "send fewer samples per request",
            )
        return await handler(request)
    except Refused as exc:
        return _error(exc.status, exc.code, exc.message, **exc.extra)
    except web.HTTPException as exc:
        return _from_http_exception(request, exc)
    except ModelServerdError as exc:
        # E.g. the state database cannot be read: a fact for the operator, not a bug.
        log.warning("API: %s %s: %s", request.method, request.path, exc)
        return _error(503, "unavailable", str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("API: unexpected error answering %s %s", request.method, request.path)
        return _error(
            500,
            "internal",
            "the daemon hit an unexpected error answering this request (see its log: "
            "journalctl -u modelserverd); it keeps serving",
        )


# --- helpers ------------------------------------------------------------------------


def _ctx(request: web.Request) -> ApiContext:
    return request.app[CTX_KEY]


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise Refused(
            400,
            "bad_request",
            f"{name}: got {raw[:40]!r}, expected an integer from {low} to {high}",
        )
    return int(raw)


def _record(ctx: ApiContext, name: str) -> ServerRecord:
    record = ctx.registry.servers.get(name)
    if record is None:
        raise Refused(
            404,
            "unknown_server",
            f"no server named {name[:100]!r} is configured; GET /v1/servers "
            "(or `modelserverd status`) lists them",
        )
    return record


async def _read_body(request: web.Request) -> bytes:
    timeout_s = request.app.get(TIMEOUT_KEY, REQUEST_TIMEOUT_S)
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise Refused(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s; send it whole",
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "bad_json", "the body is not UTF-8 text; send JSON") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise Refused(
            400,
            "bad_json",
            f"the body is not valid JSON ({str(exc)[:120]}); send "
            '{"samples": [{"server": ..., "ok": true, "latency_s": 1.2}]}',
        ) from None


# --- samples validation -------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seconds(v: Any) -> float | None:
    """A finite number of seconds in range, or None when it is not one."""
    if not _is_number(v):
        return None
    try:
        value = float(v)
    except OverflowError:
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_LATENCY_S:
        return None
    return value


def _validate_sample(index: int, item: Any, known: Mapping[str, ServerRecord]) -> dict:
    where = f"samples[{index}]"

    def bad(field: str, got: Any, expected: str) -> Refused:
        try:
            shown = json.dumps(got)[:80]
        except (TypeError, ValueError, RecursionError):
            shown = repr(got)[:80]
        return Refused(
            400,
            "bad_sample",
            f"{where}.{field}: got {shown}, expected {expected}; nothing of this request "
            "was recorded",
            index=index,
            field=field,
        )

    if not isinstance(item, dict):
        raise Refused(
            400,
            "bad_sample",
            f"{where}: expected an object with server, ok, latency_s, ...; "
            "nothing of this request was recorded",
            index=index,
            field=None,
        )
    server = item.get("server")
    if not isinstance(server, str) or not server:
        raise bad("server", server, "the name of a configured server")
    if server not in known:
        raise bad("server", server, "the name of a configured server (GET /v1/servers)")
    ok = item.get("ok")
    if not isinstance(ok, bool):
        raise bad("ok", ok, "true or false")
    out: dict[str, Any] = {"server": server, "ok": ok}
    for field in ("latency_s", "ttft_s"):
        value = item.get(field)
        if value is None:
            out[field] = None
            continue
        seconds = _seconds(value)
        if seconds is None:
            raise bad(field, value, f"a number of seconds from 0 to {MAX_LATENCY_S:g}, or null")
        out[field] = seconds
    for field in ("prompt_tokens", "completion_tokens"):
        value = item.get(field)
        if value is None:
            out[field] = None
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS:
            raise bad(field, value, "a non-negative integer, or null")
        out[field] = value
    error = item.get("error")
    if error is not None and not isinstance(error, str):
        raise bad("error", error, "a string, or null")
    if error is not None:
        try:
            error.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON may spell a lone surrogate ("\\ud800"); it is no character, UTF-8
            # (and so SQLite) cannot hold it. Refused here, not dropped later.
            raise bad(
                "error",
                error,
                f"text of whole Unicode characters (a lone surrogate at position {exc.start} "
                "is not one)",
            ) from None
    out["error"] = error[:MAX_ERROR_CHARS] if error is not None else None
    return out


# --- handlers -----------------------------------------------------------------------


def server_json(
    record: ServerRecord, now: float | None = None, gateway: GatewaySync | None = None
) -> dict:
    """The API's server object: the record's own fields, plus what the server says
    about itself and its load (null while unknown: not reported yet, or an SGLang
    without the endpoint)."""
    data = record.to_json(now)
    data["sglang_version"] = record.sglang_version
    data["incremental_streaming_output"] = record.incremental_streaming_output
    data["running"] = record.running
    data["queued"] = record.queued
    data["capacity"] = record.capacity
    # registered | pending | removed | error at the gateway; null without one, or for
    # a server this host does not manage (never registered from here).
    managed = gateway is not None and record.config.is_managed
    data["gateway"] = gateway.server_state(record.name) if managed else None
    return data


async def _status(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    data = dict(ctx.status())
    data["servers_total"] = len(ctx.registry.servers)
    data["servers_by_state"] = ctx.registry.counts_by_state()
    if hasattr(ctx.writer, "health"):
        try:
            data["writer"] = ctx.writer.health()
        except Exception as exc:  # the status must answer even when the writer is broken
            data["writer"] = {"ok": False, "last_error": f"health unknown: {exc}"}
    gate = request.app.get(GATE_KEY)
    if gate is not None:
        data["api"] = gate.snapshot()
    if ctx.gateway is not None:
        data["gateway"] = ctx.gateway.status()
    return _json(data)


async def _servers(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    now = time.time()
    servers = [server_json(r, now, ctx.gateway) for r in ctx.registry.servers.values()]
    return _json({"servers": servers})


async def _server(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    return _json(server_json(_record(ctx, request.match_info["name"]), gateway=ctx.gateway))


async def _best(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    size = request.query.get("model_size", "")
    known = sorted(ctx.registry.known_sizes())
    if not size:
        raise Refused(
            400,
            "bad_request",
            f"model_size is missing; add ?model_size=<one of {', '.join(known) or 'none'}>",
        )
    if size not in known:
        raise Refused(
            404,
            "unknown_model_size",
            f"no server is configured for model size {size[:40]!r}; known sizes: "
            f"{', '.join(known) or 'none (the config has no servers)'}",
        )
    n = _int_param(request, "n", 3, 1, MAX_CANDIDATES)
    key = request.query.get("key") or None
    exclude = [x for x in request.query.get("exclude", "").split(",") if x]
    if ctx.adopted is not None and not ctx.adopted.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ctx.adopted.wait(), ADOPTION_WAIT_S)
    ranked = ctx.registry.best(size, n=n, key=key, exclude=exclude)
    mono = time.monotonic()
    now = time.time()
    candidates = [r for r in ranked if r.serving(mono)][:n]
    if not candidates:
        states_seen = sorted(
            {r.state for r in ctx.registry.servers.values() if r.config.model_size == size}
        )
        hint = " (all ready ones are in exclude)" if exclude else ""
        fatal = sorted(
            r.name
            for r in ctx.registry.servers.values()
            if r.config.model_size == size and r.state == states.FATAL
        )
        advice = (
            f"`modelserverd start {' '.join(fatal)}` after fixing the cause "
            "(`modelserverd status` shows it)"
            if fatal
            else "`modelserverd status` shows why; retry shortly"
        )
        raise Refused(
            503,
            "no_ready_server",
            f"no {size} server is ready right now{hint}; their states: "
            f"{', '.join(states_seen)}; {advice}",
        )
    found = [server_json(r, now, ctx.gateway) for r in candidates]
    return _json({"model_size": size, "candidates": found})


async def _sizes(request: web.Request) -> web.Response:
    return _json({"sizes": _ctx(request).registry.sizes()})


async def _samples(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    creds = peer_credentials(request)
    uid = creds[1] if creds is not None else None
    limiter = request.app[LIMITER_KEY]
    # One token for the request itself, before its body is even parsed, so that a
    # flood of bad or empty bodies is throttled too; the rest once it is valid.
    _take_samples(limiter, uid, 1)
    data = _parse_json(await _read_body(request))
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise Refused(
            400,
            "bad_request",
            'expected a JSON object {"samples": [...]} with a list of samples',
        )
    items = data["samples"]
    if len(items) > MAX_SAMPLES:
        raise Refused(
            413,
            "too_many_samples",
            f"{len(items)} samples in one request; send at most {MAX_SAMPLES} per request",
        )
    known = ctx.registry.servers
    # Validate all before recording any: a body is recorded whole or not at all.
    samples = [_validate_sample(i, item, known) for i, item in enumerate(items)]
    if len(samples) > 1:
        _take_samples(limiter, uid, len(samples) - 1)
    # Failure reports from an admin (who may stop the server anyway) eject as
    # before; anyone else's need a second uid or a probe to agree (registry).
    trusted = any(not s["ok"] for s in samples) and is_admin(
        creds, ctx.registry.config.daemon.admin_group, peer_groups(request)
    )
    now = time.time()
    mono = time.monotonic()
    for s in samples:
        ctx.registry.record_sample(
            s["server"],
            ok=s["ok"],
            latency_s=s["latency_s"],
            source="client",
            ttft_s=s["ttft_s"],
            prompt_tokens=s["prompt_tokens"],
            completion_tokens=s["completion_tokens"],
            now=now,
            mono=mono,
            reporter=uid,
            trusted=trusted,
        )
        ctx.writer.add_sample(source="client", ts=now, **s)
    return _json({"accepted": len(samples)}, status=202)


def _take_samples(limiter: RateLimiter, uid: int | None, count: int) -> None:
    wait_s = limiter.take(uid, count, time.monotonic())
    if wait_s > 0:
        who = f"uid {uid}" if uid is not None else "this peer"
        raise Refused(
            429,
            "rate_limited",
            f"{who} reports samples faster than {limiter.rate:g} per second (bursts up to "
            f"{limiter.burst:g}); nothing of this request was recorded; retry in "
            f"{wait_s:.1f} s, and report one sample per completed request",
            retry_after_s=round(wait_s, 3),
        )


class RateLimiter:
    """A token bucket per key (the peer's uid): ``rate`` tokens a second, at most
    ``burst`` saved. Keys whose bucket is full again are forgotten when there are
    more than ``max_keys``, so the table stays small whoever connects."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[Any, tuple[float, float]] = {}

    def take(self, key: Any, count: float, now: float) -> float:
        """Take ``count`` tokens: 0.0 when granted, else the seconds until they
        would be (and nothing is taken)."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if count > tokens:
            self._buckets[key] = (tokens, now)
            return (count - tokens) / self.rate
        self._buckets[key] = (tokens - count, now)
        if len(self._buckets) > self.max_keys:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key, (_tokens, at) in list(self._buckets.items()):
            if now - at >= full_after:
                del self._buckets[key]
        if len(self._buckets) > self.max_keys:
            self._buckets.clear()  # fairness lost for a moment, memory bounded


class HistoryReads:
    """History reads (``/v1/latency``, ``/v1/restarts``, ``/v1/events``) run in a
    small pool of their own, never on the event loop: the rows and their JSON are
    built in the thread.
    At most ``MAX_HISTORY_READS`` run at once and ``MAX_HISTORY_WAITERS`` wait for a
    turn; beyond that a read is refused at once. A read whose client hangs up while
    it waits never starts (aiohttp cancels the handler); one already running keeps
    its turn until its thread is done, so turns always match busy threads."""

    def __init__(self, workers: int = MAX_HISTORY_READS, waiters: int = MAX_HISTORY_WAITERS):
        self.workers = workers
        self.max_waiters = waiters
        self.waiting = 0
        self._turns = asyncio.Semaphore(workers)
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, read: Callable[[], Any]) -> Any:
        if self._turns.locked() and self.waiting >= self.max_waiters:
            raise Refused(
                503,
                "busy",
                f"{self.workers} history reads are running and {self.waiting} waiting; "
                "retry in a second, or ask for fewer rows (limit=)",
                retry_after_s=1,
            )
        self.waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="api-history")
            future = self._executor.submit(read)
        except BaseException:
            self._turns.release()
            raise

        def done(_f: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._turns.release)

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _history_handler(read: str, field: str) -> Callable[[web.Request], Any]:
    """GET /v1/latency, /v1/restarts and /v1/events: newest rows first, for one server
    or all."""

    async def handler(request: web.Request) -> web.Response:
        ctx = _ctx(request)
        server = request.query.get("server") or None
        asked = _int_param(request, "limit", DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)
        limit = min(asked, MAX_HISTORY_ROWS)
        # History queries accept servers removed from the config since: their rows stay.
        check_history = server is not None and server not in ctx.registry.servers
        store = ctx.store

        def query() -> bytes | None:
            if check_history:
                try:
                    historic = {str(s.get("name")) for s in store.servers()}
                except ModelServerdError:
                    historic = set()
                if server not in historic:
                    return None
            rows = getattr(store, read)(server=server, limit=limit)
            return _json_bytes({field: rows, "limit": limit})

        body = await request.app[HISTORY_KEY].run(query)
        if body is None:
            _record(ctx, server or "")
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    return handler


def _action_handler(action: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        ctx = _ctx(request)
        _require_admin(request, f"{action} a server")
        record = _record(ctx, request.match_info["name"])
        if not record.config.is_managed:
            where = "another host" if not record.config.local else "this host, managed = false"
            raise Refused(
                409,
                "not_managed",
                f"server {record.name} is not managed by this daemon ({where}); "
                f"{action} it on the host that runs it",
            )
        method = getattr(ctx.actions, action)
        try:
            # Shielded: a client that hangs up must not cancel a half-done restart.
            result = await asyncio.shield(method(record.name))
        except ModelServerdError as exc:
            raise Refused(409, "action_failed", f"{action} {record.name}: {exc}") from None
        return _json(result)

    return handler


async def _reload(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    _require_admin(request, "reload the config")
    try:
        result = await asyncio.shield(ctx.actions.reload())
    except ConfigError as exc:
        raise Refused(
            400,
            "bad_config",
            "the new config was refused, the running one stays in force: "
            + "; ".join(exc.problems),
            problems=list(exc.problems),
        ) from None
    return _json(result)


async def _metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    ctx = _ctx(request)
    registry.register(_ServerCollector(ctx.registry))
    if ctx.gateway is not None:
        registry.register(_GatewayCollector(ctx.gateway))
    body = generate_latest(registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


class _GatewayCollector:
    """The gateway whose worker list the daemon keeps: reachable, last sync, failures,
    and which of this host's servers it lists."""

    def __init__(self, gateway: GatewaySync):
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        status = self.gateway.status()
        reachable = GaugeMetricFamily(
            "modelserverd_gateway_reachable", "1 when the gateway answered", labels=["gateway"]
        )
        synced = GaugeMetricFamily(
            "modelserverd_gateway_last_sync_timestamp_seconds",
            "when the worker list was last found or made true",
            labels=["gateway"],
        )
        failures = GaugeMetricFamily(
            "modelserverd_gateway_sync_failures",
            "calls to the gateway that failed in a row",
            labels=["gateway"],
        )
        registered = GaugeMetricFamily(
            "modelserverd_gateway_registered",
            "1 when the gateway lists the server as this host's worker",
            labels=["server", "gateway"],
        )
        for gw in status["gateways"]:
            reachable.add_metric([gw["url"]], 1.0 if gw["reachable"] else 0.0)
            if gw["last_sync_ts"] is not None:
                synced.add_metric([gw["url"]], gw["last_sync_ts"])
            failures.add_metric([gw["url"]], gw["consecutive_failures"])
        for name, server in status["servers"].items():
            for url, entry in server["gateways"].items():
                registered.add_metric([name, url], 1.0 if entry["state"] == "registered" else 0.0)
        yield from (reachable, synced, failures, registered)


class _ServerCollector:
    """Reads the registry at scrape time, so the numbers are never stale."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        records = list(self.registry.servers.values())
        mono = time.monotonic()
        state = GaugeMetricFamily(
            "modelserverd_server_state",
            "1 for the state the server is in, 0 for the others",
            labels=["server", "state"],
        )
        latency = GaugeMetricFamily(
            "modelserverd_server_latency_seconds",
            "current latency estimate of a benchmark request",
            labels=["server", "model_size"],
        )
        restarts = CounterMetricFamily(
            "modelserverd_server_restarts",
            "relaunches after a failure or by request",
            labels=["server"],
        )
        samples = CounterMetricFamily(
            "modelserverd_server_samples",
            "latency samples received (probes and clients)",
            labels=["server"],
        )
        probe_failures = CounterMetricFamily(
            "modelserverd_server_probe_failures",
            "probes that failed",
            labels=["server"],
        )
        probe_slow = CounterMetricFamily(
            "modelserverd_server_probe_slow",
            "probes abandoned by the early skip (slower than the round's best x growing rate)",
            labels=["server"],
        )
        load = GaugeMetricFamily(
            "modelserverd_server_requests",
            "requests in the server's batch (running) and queue (queued), as its "
            "scheduler last reported",
            labels=["server", "model_size", "where"],
        )
        capacity = GaugeMetricFamily(
            "modelserverd_server_capacity",
            "requests the server runs at once (SGLang's max_running_requests)",
            labels=["server", "model_size"],
        )
        up = GaugeMetricFamily(
            "modelserverd_server_up",
            "1 when the server may receive traffic (ready and not ejected)",
            labels=["server", "model_size"],
        )
        for r in records:
            possible = states.LOCAL_STATES if r.config.is_managed else states.REMOTE_STATES
            for s in possible:
                state.add_metric([r.name, s], 1.0 if r.state == s else 0.0)
            value = r.estimate.value_s
            if value is not None and math.isfinite(value):
                latency.add_metric([r.name, r.config.model_size], value)
            restarts.add_metric([r.name], r.restarts)
            samples.add_metric([r.name], r.samples_total)
            probe_failures.add_metric([r.name], r.probe_failures_total)
            probe_slow.add_metric([r.name], r.probe_slow_total)
            up.add_metric([r.name, r.config.model_size], 1.0 if r.serving(mono) else 0.0)
            if r.running is not None and r.queued is not None:
                load.add_metric([r.name, r.config.model_size, "running"], r.running)
                load.add_metric([r.name, r.config.model_size, "queued"], r.queued)
            if r.load.capacity:
                capacity.add_metric([r.name, r.config.model_size], r.load.capacity)
        yield from (
            state,
            latency,
            restarts,
            samples,
            probe_failures,
            probe_slow,
            up,
            load,
            capacity,
        )


# --- admin check --------------------------------------------------------------------


def _peer_socket(request: web.Request) -> Any:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    return sock


def _socket_credentials(sock: Any) -> tuple[int, int, int] | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of the Unix socket, from the
    kernel, as they were when it connected."""
    sock = _peer_socket(request)
    return _socket_credentials(sock) if sock is not None else None


def peer_groups(request: web.Request) -> set[int] | None:
    """The peer's supplementary groups as they were when it connected
    (``SO_PEERGROUPS``), or None where the kernel cannot say (older than 4.13, an
    unknown architecture, more groups than fit): then :func:`is_admin` falls back
    to ``/proc``, checked against ``SO_PEERCRED``."""
    sock = _peer_socket(request)
    if sock is None or _SO_PEERGROUPS is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError:
        return None
    if len(raw) % 4:
        return None
    return set(struct.unpack(f"{len(raw) // 4}I", raw))


def _supplementary_groups(pid: int, uid: int, gid: int) -> set[int] | None:
    """The supplementary groups of process ``pid`` now, from ``/proc``, provided it is
    still the peer that connected: its effective uid and gid must be those the kernel
    recorded at connect time (``SO_PEERCRED``). A peer that exited and whose pid was
    reused by another user's process, or that changed identity, gets None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Uid", "Gid", "Groups"):
            fields[name] = rest.split()
    uids, gids = fields.get("Uid", []), fields.get("Gid", [])
    if len(uids) < 2 or len(gids) < 2 or uids[1] != str(uid) or gids[1] != str(gid):
        return None
    return {int(g) for g in fields.get("Groups", []) if g.isdigit()}


def is_admin(
    creds: tuple[int, int, int] | None, admin_group: str, groups: set[int] | None = None
) -> bool:
    """uid 0, the daemon's own uid, or a member of ``admin_group``: by primary group,
    by the group's member list, or by the supplementary groups the peer held when
    it connected (``groups``, from :func:`peer_groups`; None = ask ``/proc``)."""
    if creds is None:
        return False
    pid, uid, gid = creds
    if uid == 0 or uid == os.getuid():
        return True
    if not admin_group:
        return False
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        log.warning("API: [daemon].admin_group %r does not exist on this host", admin_group)
        return False
    if gid == group.gr_gid:
        return True
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    if user is not None and user in group.gr_mem:
        return True
    if groups is None:
        groups = _supplementary_groups(pid, uid, gid)
    return groups is not None and group.gr_gid in groups


def _require_admin(request: web.Request, what: str) -> None:
    creds = peer_credentials(request)
    group = _ctx(request).registry.config.daemon.admin_group
    if is_admin(creds, group, peer_groups(request)):
        return
    who = f"uid {creds[1]}" if creds else "this peer"
    if group:
        how = (
            f"join the group {group!r} (sudo usermod -aG {group} $USER, then log in again), "
            "or use sudo"
        )
    else:
        how = "use sudo, or have the operator set [daemon].admin_group and join that group"
    raise Refused(403, "forbidden", f"{who} may not {what}: {how}")


# --- application and socket ----------------------------------------------------------


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's connection-level log: a peer sending bytes that are not HTTP is
    answered 400 by aiohttp and is worth a debug line, not an error with a
    traceback in the journal per garbage packet. Anything else stays an error."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, HttpProcessingError):
            self.debug("API: refused a malformed request: %s", exc)
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)


HISTORY_KEY: web.AppKey[HistoryReads] = web.AppKey("modelserverd_history_reads", HistoryReads)
LIMITER_KEY: web.AppKey[RateLimiter] = web.AppKey("modelserverd_sample_limiter", RateLimiter)


def build_app(ctx: ApiContext) -> web.Application:
    """The aiohttp application; serve it with :func:`serve_unix` (tests may use any site)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_error_middleware])
    app[CTX_KEY] = ctx
    app[SEEN_KEY] = set()
    app[HISTORY_KEY] = HistoryReads()
    app[LIMITER_KEY] = RateLimiter(SAMPLE_RATE_PER_UID, SAMPLE_BURST_PER_UID)

    async def _close_history(app: web.Application) -> None:
        app[HISTORY_KEY].close()

    app.on_cleanup.append(_close_history)
    r = app.router
    r.add_get("/v1/status", _status)
    r.add_get("/v1/servers", _servers)
    r.add_get("/v1/servers/{name}", _server)
    r.add_get("/v1/best", _best)
    r.add_get("/v1/sizes", _sizes)
    r.add_post("/v1/samples", _samples)
    r.add_get("/v1/latency", _history_handler("latency_samples", "samples"))
    r.add_get("/v1/restarts", _history_handler("restarts", "restarts"))
    r.add_get("/v1/events", _history_handler("events", "events"))
    for action in ("restart", "stop", "start"):
        r.add_post(f"/v1/servers/{{name}}/{action}", _action_handler(action))
    r.add_post("/v1/reload", _reload)
    r.add_get("/metrics", _metrics)
    return app


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each API client and each
    probe holds a descriptor, and 1024 is easily reached on a busy host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("API: cannot raise the open files limit from %d: %s", soft, exc)
        return soft
    return target


# --- connections: who may hold how many ------------------------------------------------


@dataclass(frozen=True)
class ConnectionLimits:
    """How many API connections may be open: ``total`` in all, ``per_uid`` for each
    peer uid other than root and the daemon's own, and the last ``admin_reserve``
    of the total only for those two. ``nofile`` is the open-files limit they were
    derived from (None: unlimited)."""

    total: int
    per_uid: int
    admin_reserve: int
    nofile: int | None


def connection_limits(nofile: int | None) -> ConnectionLimits:
    """The limits for an open-files limit of ``nofile``: never more connections than
    ``nofile - DESCRIPTOR_RESERVE``, so API clients cannot take the descriptors that
    probes and health checks need. One uid gets at most half of what is left."""
    if nofile is None or nofile < 0 or nofile == resource.RLIM_INFINITY:
        nofile, room = None, MAX_CONNECTIONS
    else:
        room = nofile - DESCRIPTOR_RESERVE
    total = max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, room))
    admin_reserve = min(ADMIN_CONNECTION_RESERVE, total // 4)
    per_uid = max(1, min(MAX_CONNECTIONS_PER_UID, (total - admin_reserve) // 2))
    return ConnectionLimits(total, per_uid, admin_reserve, nofile)


class ConnectionGate:
    """Counts the API's open connections by peer uid and decides whether a new one
    may be admitted. Everything runs on the event loop: no locks."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.by_uid: dict[int, int] = {}
        self.refused = 0
        self._uid_of: dict[Any, tuple[int, float]] = {}  # handler -> (uid, opened at)

    @property
    def total(self) -> int:
        return len(self._uid_of)

    def refusal(self, uid: int, privileged: bool) -> str | None:
        """Why a new connection from ``uid`` is refused, or None to admit it."""
        lim = self.limits
        room = lim.total if privileged else lim.total - lim.admin_reserve
        if self.total >= room:
            limit = f" (open-files limit {lim.nofile})" if lim.nofile is not None else ""
            return (
                f"modelserverd holds {self.total} API connections, as many as it takes{limit}; "
                "retry in a moment"
            )
        if not privileged and self.by_uid.get(uid, 0) >= lim.per_uid:
            return (
                f"uid {uid} already holds {lim.per_uid} connections to modelserverd, the "
                "most one user may; each request needs one only while it runs: close idle "
                "ones and retry"
            )
        return None

    def opened(self, handler: Any, uid: int) -> None:
        self._uid_of[handler] = (uid, time.monotonic())
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1

    def closed(self, handler: Any) -> None:
        entry = self._uid_of.pop(handler, None)
        if entry is None:
            return
        uid = entry[0]
        left = self.by_uid.get(uid, 0) - 1
        if left > 0:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)

    def reconcile(self, live: set, older_than_s: float = 5.0) -> None:
        """Forget connections aiohttp no longer holds (a close it did not report)."""
        cutoff = time.monotonic() - older_than_s
        for handler, (_uid, opened_at) in list(self._uid_of.items()):
            if handler not in live and opened_at < cutoff:
                self.closed(handler)

    def snapshot(self) -> dict:
        lim = self.limits
        return {
            "connections": self.total,
            "connection_limit": lim.total,
            "connections_per_uid_limit": lim.per_uid,
            "open_files_limit": lim.nofile,
            "connections_refused": self.refused,
        }


class _Throttled:
    """One log line per ``interval_s`` for a problem that recurs; the others are
    counted, and the count is given in the next line."""

    def __init__(self, logger: logging.Logger, interval_s: float):
        self._log = logger
        self._interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d more since the last such line)"
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._next = now + self._interval_s
        self._log.warning(msg, *args)


def _refusal_bytes(message: str) -> bytes:
    body = json.dumps({"error": {"code": "too_many_connections", "message": message}}) + "\n"
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return (head + body).encode()


class _Acceptor:
    """Accepts connections on the listening socket itself, in place of asyncio's
    ``create_server``, for two reasons. Each connection is admitted or refused by
    its peer's uid (:class:`ConnectionGate`) before aiohttp sees it; a refused one
    gets a 503 and is closed at once. And running out of descriptors (EMFILE,
    ENFILE) is a pause with a log line a minute: asyncio's own accept loop logs a
    traceback for each of up to its backlog of retries, every second, which filled
    the journal by hundreds of megabytes while the descriptors were gone."""

    def __init__(self, sock: socket.socket, server: Any, gate: ConnectionGate):
        self._sock = sock
        self._server = server
        self._gate = gate
        self._errors = _Throttled(log, ACCEPT_ERROR_LOG_INTERVAL_S)
        self._refusals = _Throttled(log, ACCEPT_ERROR_LOG_INTERVAL_S)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="api-accept")
        self._task.add_done_callback(lambda _t: self._sock.close())

    def close(self) -> None:
        """Stop accepting (aiohttp's BaseSite.stop calls this)."""
        if self._task is not None:
            self._task.cancel()
        else:
            self._sock.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = ACCEPT_RETRY_S
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                self._errors.warning(
                    "API: cannot accept connections: %s; retrying (the daemon's open-files "
                    "limit may be too low: LimitNOFILE= in the systemd unit)",
                    exc,
                )
                await asyncio.sleep(pause)
                pause = min(2 * pause, ACCEPT_RETRY_MAX_S)
                continue
            pause = ACCEPT_RETRY_S
            try:
                await self._admit(loop, conn)
            except asyncio.CancelledError:
                conn.close()
                raise
            except Exception:  # never stop accepting over one connection
                conn.close()
                log.exception("API: unexpected error admitting a connection")

    async def _admit(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        creds = _socket_credentials(conn)
        uid = creds[1] if creds is not None else -1
        privileged = uid == 0 or uid == os.getuid()
        refusal = self._gate.refusal(uid, privileged)
        if refusal is not None:
            self._gate.refused += 1
            self._refusals.warning("API: refused a connection: %s", refusal)
            with contextlib.suppress(OSError):
                conn.send(_refusal_bytes(refusal))
            conn.close()
            return

        def protocol() -> Any:
            handler = self._server()
            self._gate.opened(handler, uid)
            return handler

        try:
            await loop.connect_accepted_socket(protocol, conn)
        except OSError as exc:
            conn.close()
            log.debug("API: a connection closed as it was accepted: %s", exc)


class _GatedSite(web.BaseSite):
    """An aiohttp site served by :class:`_Acceptor` on a listening Unix socket."""

    __slots__ = ("_sock", "_gate")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: ConnectionGate):
        super().__init__(runner)
        self._sock = sock
        self._gate = gate

    @property
    def name(self) -> str:
        return f"http://unix:{self._sock.getsockname()}:"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        acceptor = _Acceptor(self._sock, server, self._gate)
        acceptor.start()
        self._server = acceptor  # type: ignore[assignment]  # BaseSite.stop() closes it


def _count_closed(server: Any, gate: ConnectionGate) -> None:
    """Have aiohttp's Server tell the gate of every connection that closes."""
    notify = server.connection_lost

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        try:
            notify(handler, exc)
        finally:
            gate.closed(handler)

    server.connection_lost = connection_lost


GATE_KEY: web.AppKey[ConnectionGate] = web.AppKey("modelserverd_gate", ConnectionGate)


# --- the socket file and its folder ---------------------------------------------------------


async def _live_daemon_pid(path: str) -> tuple[bool, int | None]:
    """Whether something answers on ``path``, and the pid it reports if it is ours.
    The whole check takes at most ``LIVE_CHECK_DEADLINE_S``: whatever answers that
    slowly holds the path, and is not taken over."""
    try:
        return await asyncio.wait_for(_ask_status_pid(path), LIVE_CHECK_DEADLINE_S)
    except asyncio.TimeoutError:
        return True, None


async def _ask_status_pid(path: str) -> tuple[bool, int | None]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        return False, None
    except (asyncio.TimeoutError, OSError):
        # Connecting blocks or fails oddly: something holds it; do not take it over.
        return True, None
    try:
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        raw = b""
        while len(raw) < 1 << 16:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 2.0)
            if not chunk:
                break
            raw += chunk
        _head, _, body = raw.partition(b"\r\n\r\n")
        pid = json.loads(body).get("pid")
        return True, pid if isinstance(pid, int) else None
    except (asyncio.TimeoutError, OSError, ValueError, AttributeError):
        return True, None
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owners_own_group(uid: int, gid: int) -> bool:
    """Whether ``gid`` is the private group of user ``uid`` (the user-private-group
    scheme, where umask 002 makes every folder group-writable): named after the
    user, the user's primary group, and no other member listed."""
    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return (
        user.pw_gid == gid
        and group.gr_name == user.pw_name
        and all(member == user.pw_name for member in group.gr_mem)
    )


def check_socket_folder(folder: str) -> None:
    """Refuse a socket folder another user could use to take the socket's place.

    Whoever may write the folder can bind the socket path before the daemon, or
    swap it afterwards, and then answer every ``modelserverd`` command and client
    in the daemon's place. So the folder itself must belong to the daemon's user
    (or root) and be writable by nobody else; every folder above it, and every
    symbolic link on the way, must belong to root or the daemon's user, and a
    folder above may be writable by others only with the sticky bit (``/tmp``),
    which stops them from renaming what is not theirs. A group that is the owner's
    private group (same name, no other member) counts as the owner alone."""
    me = os.geteuid()
    trusted = {0, me}
    absolute = os.path.abspath(folder)
    todo = list(reversed(Path(absolute).parts[1:]))
    current = "/"
    hops = 0
    where = absolute

    def refuse(why: str) -> SocketError:
        return SocketError(
            f"refusing to create the API socket in {where}: {why}; another user could "
            "put their own socket in its place. Use a folder of the daemon's own (the "
            "systemd unit's RuntimeDirectory, /run/modelserverd), or set [daemon].socket"
        )

    def check_dir(path: str, last: bool) -> None:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise refuse(f"{path} is not a folder")
        if st.st_uid not in trusted:
            raise refuse(
                f"{path} belongs to {_user_name(st.st_uid)}, not to {_user_name(me)} or root "
                f"(sudo chown {me} {path})"
            )
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable & stat.S_IWGRP and _owners_own_group(st.st_uid, st.st_gid):
            writable &= ~stat.S_IWGRP  # the owner's private group (umask 002): just them
        if writable and (last or not st.st_mode & stat.S_ISVTX):
            who = (
                "its group and others"
                if writable == 0o022
                else ("its group" if writable & stat.S_IWGRP else "others")
            )
            raise refuse(
                f"{path} may be written by {who} (mode {stat.S_IMODE(st.st_mode):04o}; "
                f"chmod go-w {path})"
            )

    try:
        check_dir("/", not todo)
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, name)
            st = os.lstat(candidate)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise refuse("too many symbolic links")
                if st.st_uid not in trusted:
                    raise refuse(
                        f"the symbolic link {candidate} belongs to {_user_name(st.st_uid)}"
                    )
                target = os.readlink(candidate)
                if os.path.isabs(target):
                    current = "/"
                todo.extend(reversed([p for p in Path(target).parts if p != "/"]))
                continue
            check_dir(candidate, not todo)
            current = candidate
    except OSError as exc:
        raise SocketError(f"cannot check the API socket's folder {absolute}: {exc}") from None


def _make_socket_folder(folder: Path) -> None:
    """Create the socket's folder (and any missing above it) as the daemon's own,
    mode 0755 whatever the umask: the socket's own mode and group decide who may
    connect."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o755)
            os.chmod(path, 0o755, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SocketError(f"cannot create the socket's folder {path}: {exc}") from None


async def _clear_path(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(
            f"{path} exists and is not a socket; it is not ours to delete: move it away "
            "or set [daemon].socket to another path"
        )
    live, pid = await _live_daemon_pid(path)
    if live:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        raise SocketInUse(
            f"another modelserverd ({who}) is serving on {path}; stop it first "
            "(systemctl stop modelserverd)"
        )
    # A refused connection: the file was left by a daemon that died.
    log.info("API: removing stale socket %s left by a daemon that is gone", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketError(
            f"[daemon].socket_group: group {group!r} does not exist on this host; "
            f'create it (sudo groupadd {group}) or set socket_group = ""'
        ) from None


def _our_socket_file(path: str) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise SocketError(
            f"{path} was replaced by something else right after the daemon created it "
            "(another user can write its folder?); refusing to set its owner and mode"
        )
    return st


def _bind(path: str, mode: int, gid: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask makes the socket appear with no more than `mode`: no moment
        # in which another user could connect before the chmod below.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        # Owner and mode are set on the path itself, never through a symbolic link
        # (that would change whatever file the link names).
        _our_socket_file(path)
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        try:
            os.chmod(path, mode, follow_symlinks=False)
        except NotImplementedError:  # the path is a symbolic link now
            _our_socket_file(path)
            raise
        st = _our_socket_file(path)
        if stat.S_IMODE(st.st_mode) != mode or (gid is not None and st.st_gid != gid):
            raise SocketError(f"{path}: its mode or group did not take; refusing to serve on it")
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _close_stalled(
    runner: web.AppRunner, seen: set, timeout_s: float, gate: ConnectionGate | None = None
) -> None:
    """Close connections that have not completed a first request within ``timeout_s``.

    After a first request aiohttp's keep-alive timer guards the connection, but
    before it (a peer that connects and sends nothing, or trickles header bytes
    forever) only recent aiohttp versions close it. Without this, such peers
    would pile up until the daemon runs out of file descriptors. Also keeps the
    gate's count true to the connections aiohttp holds.
    """
    loop = asyncio.get_running_loop()
    first_seen: dict[Any, float] = {}
    interval = max(0.05, timeout_s / 4)
    while runner.server is not None:
        now = loop.time()
        live = runner.server.connections
        alive = set(live)
        seen.intersection_update(alive)
        for handler in [h for h in first_seen if h not in alive]:
            del first_seen[handler]
        for handler in live:
            if handler in seen:
                continue
            if now - first_seen.setdefault(handler, now) >= timeout_s:
                log.debug("API: closing a connection with no request after %g s", timeout_s)
                handler.force_close()
        if gate is not None:
            gate.reconcile(alive)
        await asyncio.sleep(interval)


async def serve_unix(
    app: web.Application,
    path: str,
    *,
    mode: int,
    group: str = "",
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
) -> web.AppRunner:
    """Serve ``app`` on the Unix socket ``path`` with exactly ``mode`` (and ``group``).

    The socket's folder must be one no other user can write
    (:func:`check_socket_folder`); it is created (0755) when missing. A stale socket
    left by a dead daemon is replaced; a live one is refused with
    :class:`SocketInUse`. The caller stops serving with ``await runner.cleanup()``,
    which also removes the socket file.
    """
    nofile = raise_open_files_limit()
    limits = connection_limits(nofile)
    if limits.nofile is not None and limits.nofile - DESCRIPTOR_RESERVE < MIN_CONNECTIONS:
        log.warning(
            "API: the open-files limit is %d: too low for a supervisor (set LimitNOFILE=65536)",
            limits.nofile,
        )
    gid = _group_id(group) if group else None
    parent = Path(path).parent
    _make_socket_folder(parent)
    check_socket_folder(str(parent))
    await _clear_path(path)
    try:
        sock = _bind(path, mode, gid)
    except OSError as exc:
        raise SocketError(f"cannot create the API socket {path}: {exc}") from None
    inode = os.lstat(path).st_ino
    gate = ConnectionGate(limits)

    async def _remove_socket(_app: web.Application) -> None:
        # Only our own socket: a newer daemon may have replaced it already.
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:
                os.unlink(path)

    sweeper: asyncio.Task | None = None

    async def _stop_sweeper(_app: web.Application) -> None:
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    if not app.frozen:
        app.on_shutdown.append(_stop_sweeper)
        app.on_cleanup.append(_remove_socket)
        app[TIMEOUT_KEY] = request_timeout_s
        app[GATE_KEY] = gate
    runner = web.AppRunner(
        app,
        access_log=None,
        logger=_ServerLog(logging.getLogger("modelserverd.api.http"), {}),
        # Closes a connection that has not completed a request this long after
        # connecting or after its last answer (half-open, idle, trickling headers).
        keepalive_timeout=min(keepalive_timeout_s, request_timeout_s),
        lingering_time=LINGER_S,
        max_line_size=8190,
        max_field_size=8190,
        max_headers=64,
        handle_signals=False,
        # A client that hangs up cancels its request's handler: nothing is built
        # for nobody (admin actions are shielded and always finish).
        handler_cancellation=True,
    )
    try:
        await runner.setup()
        assert runner.server is not None
        _count_closed(runner.server, gate)
        site = _GatedSite(runner, sock, gate)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    if SEEN_KEY in app:  # the mark is set by build_app's middleware
        sweeper = asyncio.create_task(
            _close_stalled(runner, app[SEEN_KEY], request_timeout_s, gate),
            name="api-stalled-connections",
        )
    log.info(
        "API: serving on %s (mode %04o%s; at most %d connections, %d per user)",
        path,
        mode,
        f", group {group}" if group else "",
        limits.total,
        limits.per_uid,
    )
    return runner
