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
(``SO_PEERCRED``), not by anything the peer says about itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import math
import os
import pwd
import re
import resource
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator, Mapping
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
from .registry import Registry, ServerRecord
from .store import Store, StoreWriter

log = logging.getLogger("modelserverd.api")

MAX_BODY_BYTES = 1 << 20
MAX_SAMPLES = 1000
MAX_CANDIDATES = 64
MAX_HISTORY_LIMIT = 10000
DEFAULT_HISTORY_LIMIT = 100
# A client must finish a request (headers from connect, body from the headers)
# within this long, so half-open and trickling connections cannot pile up.
REQUEST_TIMEOUT_S = 30.0
# How long to keep reading (and discarding) a refused body so that the client
# gets to read the 413 instead of a connection reset.
LINGER_S = 2.0
# Largest values accepted in a sample: beyond them the numbers are nonsense, and
# SQLite integers and the estimator's arithmetic must not overflow.
MAX_LATENCY_S = 1e6
MAX_TOKENS = 1 << 40
MAX_ERROR_CHARS = 4000
# SO_PEERCRED answers struct ucred {pid_t pid; uid_t uid; gid_t gid;}.
_UCRED = struct.Struct("3i")
_DIGITS = re.compile(r"[0-9]{1,9}")


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


def _json(data: Any, status: int = 200) -> web.Response:
    body = json.dumps(_finite(data), default=str, separators=(",", ":")) + "\n"
    return web.Response(text=body, status=status, content_type="application/json")


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    resp = _json({"error": {"code": code, "message": message, **extra}}, status)
    if status in (408, 413):
        # The unread body may be huge or never come: do not keep the connection.
        resp.force_close()
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


async def _known_server_or_history(ctx: ApiContext, name: str) -> None:
    """History queries accept servers removed from the config since: their rows stay."""
    if name in ctx.registry.servers:
        return
    try:
        historic = {str(s.get("name")) for s in await asyncio.to_thread(ctx.store.servers)}
    except ModelServerdError:
        historic = set()
    if name not in historic:
        _record(ctx, name)


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
    out["error"] = error[:MAX_ERROR_CHARS] if error is not None else None
    return out


# --- handlers -----------------------------------------------------------------------


def server_json(record: ServerRecord, now: float | None = None) -> dict:
    """The API's server object: the record's own fields, plus what the server says
    about itself and its load (null while unknown: not reported yet, or an SGLang
    without the endpoint)."""
    data = record.to_json(now)
    data["sglang_version"] = record.sglang_version
    data["incremental_streaming_output"] = record.incremental_streaming_output
    data["running"] = record.running
    data["queued"] = record.queued
    data["capacity"] = record.capacity
    return data


async def _status(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    data = dict(ctx.status())
    data["servers_total"] = len(ctx.registry.servers)
    data["servers_by_state"] = ctx.registry.counts_by_state()
    return _json(data)


async def _servers(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    now = time.time()
    return _json({"servers": [server_json(r, now) for r in ctx.registry.servers.values()]})


async def _server(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    return _json(server_json(_record(ctx, request.match_info["name"])))


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
    ranked = ctx.registry.best(size, n=n, key=key, exclude=exclude)
    mono = time.monotonic()
    now = time.time()
    candidates = [r for r in ranked if r.serving(mono)][:n]
    if not candidates:
        states_seen = sorted(
            {r.state for r in ctx.registry.servers.values() if r.config.model_size == size}
        )
        hint = " (all ready ones are in exclude)" if exclude else ""
        raise Refused(
            503,
            "no_ready_server",
            f"no {size} server is ready right now{hint}; their states: "
            f"{', '.join(states_seen)}; `modelserverd status` shows why; retry shortly",
        )
    return _json({"model_size": size, "candidates": [server_json(r, now) for r in candidates]})


async def _sizes(request: web.Request) -> web.Response:
    return _json({"sizes": _ctx(request).registry.sizes()})


async def _samples(request: web.Request) -> web.Response:
    ctx = _ctx(request)
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
        )
        ctx.writer.add_sample(source="client", ts=now, **s)
    return _json({"accepted": len(samples)}, status=202)


def _history_handler(read: str, field: str) -> Callable[[web.Request], Any]:
    """GET /v1/latency and /v1/restarts: newest rows first, for one server or all."""

    async def handler(request: web.Request) -> web.Response:
        ctx = _ctx(request)
        server = request.query.get("server") or None
        limit = _int_param(request, "limit", DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)
        if server is not None:
            await _known_server_or_history(ctx, server)
        # The store is thread-safe: a 10000-row read must not pause the event loop.
        rows = await asyncio.to_thread(getattr(ctx.store, read), server=server, limit=limit)
        return _json({field: rows})

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
    registry.register(_ServerCollector(_ctx(request).registry))
    body = generate_latest(registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


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


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of the Unix socket, from the kernel."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _supplementary_groups(pid: int) -> set[int]:
    """The peer's supplementary groups (``usermod -aG`` membership of its session)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:] if g.isdigit()}
    return set()


def is_admin(creds: tuple[int, int, int] | None, admin_group: str) -> bool:
    """uid 0, the daemon's own uid, or a member of ``admin_group``."""
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
    return group.gr_gid in _supplementary_groups(pid)


def _require_admin(request: web.Request, what: str) -> None:
    creds = peer_credentials(request)
    group = _ctx(request).registry.config.daemon.admin_group
    if is_admin(creds, group):
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


def build_app(ctx: ApiContext) -> web.Application:
    """The aiohttp application; serve it with :func:`serve_unix` (tests may use any site)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_error_middleware])
    app[CTX_KEY] = ctx
    app[SEEN_KEY] = set()
    r = app.router
    r.add_get("/v1/status", _status)
    r.add_get("/v1/servers", _servers)
    r.add_get("/v1/servers/{name}", _server)
    r.add_get("/v1/best", _best)
    r.add_get("/v1/sizes", _sizes)
    r.add_post("/v1/samples", _samples)
    r.add_get("/v1/latency", _history_handler("latency_samples", "samples"))
    r.add_get("/v1/restarts", _history_handler("restarts", "restarts"))
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


async def _live_daemon_pid(path: str) -> tuple[bool, int | None]:
    """Whether something answers on ``path``, and the pid it reports if it is ours."""
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
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _close_stalled(runner: web.AppRunner, seen: set, timeout_s: float) -> None:
    """Close connections that have not completed a first request within ``timeout_s``.

    After a first request aiohttp's keep-alive timer guards the connection, but
    before it (a peer that connects and sends nothing, or trickles header bytes
    forever) only recent aiohttp versions close it. Without this, such peers
    would pile up until the daemon runs out of file descriptors.
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
        await asyncio.sleep(interval)


async def serve_unix(
    app: web.Application,
    path: str,
    *,
    mode: int,
    group: str = "",
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> web.AppRunner:
    """Serve ``app`` on the Unix socket ``path`` with exactly ``mode`` (and ``group``).

    A stale socket left by a dead daemon is replaced; a live one is refused with
    :class:`SocketInUse`. The caller stops serving with ``await runner.cleanup()``,
    which also removes the socket file.
    """
    raise_open_files_limit()
    gid = _group_id(group) if group else None
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SocketError(f"cannot create the socket's folder {parent}: {exc}") from None
    await _clear_path(path)
    try:
        sock = _bind(path, mode, gid)
    except OSError as exc:
        raise SocketError(f"cannot create the API socket {path}: {exc}") from None
    inode = os.stat(path).st_ino

    async def _remove_socket(_app: web.Application) -> None:
        # Only our own socket: a newer daemon may have replaced it already.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
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
    runner = web.AppRunner(
        app,
        access_log=None,
        logger=_ServerLog(logging.getLogger("modelserverd.api.http"), {}),
        # Closes a connection that has not completed a request this long after
        # connecting or after its last answer (half-open, idle, trickling headers).
        keepalive_timeout=request_timeout_s,
        lingering_time=LINGER_S,
        max_line_size=8190,
        max_field_size=8190,
        max_headers=64,
        handle_signals=False,
    )
    try:
        await runner.setup()
        site = web.SockSite(runner, sock, backlog=4096)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    if SEEN_KEY in app:  # the mark is set by build_app's middleware
        sweeper = asyncio.create_task(
            _close_stalled(runner, app[SEEN_KEY], request_timeout_s),
            name="api-stalled-connections",
        )
    log.info("API: serving on %s (mode %04o%s)", path, mode, f", group {group}" if group else "")
    return runner
