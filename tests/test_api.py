"""The Unix-socket API: every endpoint's answers and errors, the socket's life
cycle (mode, stale and live sockets), peer credentials, and bad peers.

The app runs on its own event loop in a thread, on a real Unix socket, and the
tests talk to it as any client would: ``http.client`` over AF_UNIX, raw sockets
for what no HTTP client would send, and curl once.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisord_ms import states
from supervisord_ms.api import (
    CTX_KEY,
    ApiContext,
    SocketError,
    SocketInUse,
    build_app,
    is_admin,
    serve_unix,
)
from supervisord_ms.config import ConfigError, parse_config
from supervisord_ms.registry import Registry
from supervisord_ms.store import Store, StoreWriter

NOBODY = 65534

CONFIG = """
[daemon]
probe_interval_s = 1.0
admin_group = "{admin_group}"

[[servers]]
name = "a"
ip = "127.0.0.1"
port = 31001
model_size = "8B"
model_path = "{model_path}"
gpus = [0]

[[servers]]
name = "b"
ip = "10.254.0.2"
port = 31002
model_size = "8B"
model_path = "/models/8b"

[[servers]]
name = "c"
ip = "10.254.0.3"
port = 31003
model_size = "70B"
model_path = "/models/70b"
"""


# --- a client ------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        err = self.json["error"]
        assert set(err) >= {"code", "message"}, err
        return err


def call(
    path: str,
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> Reply:
    """One request over the Unix socket; ``body`` may be bytes or JSON-able."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, url, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw_exchange(path: str, payload: bytes, timeout: float = 5, idle_s: float = 0.5) -> bytes:
    """Send bytes as they are and read what comes back until the server closes, or
    nothing more came for ``idle_s`` (an incomplete request is left waiting: the
    daemon closes such connections itself, after its request timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.sendall(payload)
        s.settimeout(idle_s)
        chunks = []
        with contextlib.suppress(OSError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


# --- the server under test -------------------------------------------------------------


@dataclass
class FakeActions:
    """Stands in for the daemon: records what the API asked for."""

    calls: list[tuple[str, str | None]] = field(default_factory=list)
    reload_error: Exception | None = None
    crash: bool = False

    async def _do(self, action: str, name: str | None) -> dict:
        if self.crash:
            raise RuntimeError("simulated bug in the daemon")
        self.calls.append((action, name))
        return {"server": name, "requested": action}

    async def restart(self, name: str) -> dict:
        return await self._do("restart", name)

    async def stop(self, name: str) -> dict:
        return await self._do("stop", name)

    async def start(self, name: str) -> dict:
        return await self._do("start", name)

    async def reload(self) -> dict:
        if self.reload_error is not None:
            raise self.reload_error
        return await self._do("reload", None)


class LoopThread:
    """An event loop in a thread, so the tests can use blocking clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class ApiServer:
    sock: str
    registry: Registry
    store: Store
    writer: StoreWriter
    actions: FakeActions
    loop: LoopThread
    runner: Any = None
    ctx: ApiContext | None = None

    def get(self, url: str, **kw: Any) -> Reply:
        return call(self.sock, "GET", url, **kw)

    def post(self, url: str, body: Any = None, **kw: Any) -> Reply:
        return call(self.sock, "POST", url, body, **kw)

    def set_ready(self, name: str, latency_s: float | None = None) -> None:
        def change() -> None:
            record = self.registry.servers[name]
            record.state = states.READY
            if latency_s is not None:
                self.registry.record_sample(name, ok=True, latency_s=latency_s, source="probe")

        self.loop.call(change)

    def db_samples(self, **kw: Any) -> list[dict]:
        assert self.writer.flush(10)
        return self.store.latency_samples(limit=10000, **kw)


def make_config(tmp: Path, admin_group: str = "") -> Any:
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    text = CONFIG.format(model_path=model, admin_group=admin_group)
    return parse_config(text, tmp / "config.toml", host_addresses={"127.0.0.1"})


def start_api(
    tmp: Path,
    *,
    sock: str | None = None,
    mode: int = 0o660,
    group: str = "",
    admin_group: str = "",
    request_timeout_s: float = 30.0,
) -> ApiServer:
    """Serve the API for a three-server config on a Unix socket under ``tmp``."""
    config = make_config(tmp, admin_group)
    registry = Registry(config)
    db = tmp / "state.db"
    writer = StoreWriter(db)
    writer.start()
    store = Store(db)
    loop = LoopThread()
    actions = FakeActions()
    started = time.monotonic()
    ctx = ApiContext(
        registry=registry,
        store=store,
        writer=writer,
        actions=actions,
        status=lambda: {
            "version": "test",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - started, 3),
            "host_addresses": ["127.0.0.1"],
            "config_path": config.path,
        },
    )
    path = sock or str(tmp / "run" / "api.sock")
    server = ApiServer(path, registry, store, writer, actions, loop, ctx=ctx)
    try:
        server.runner = loop.run(
            serve_unix(
                build_app(ctx), path, mode=mode, group=group, request_timeout_s=request_timeout_s
            )
        )
    except BaseException:
        stop_api(server)
        raise
    return server


def stop_api(server: ApiServer) -> None:
    if server.runner is not None:
        with contextlib.suppress(Exception):
            server.loop.run(server.runner.cleanup())
    server.writer.close()
    server.store.close()
    server.loop.close()


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    servers: list[ApiServer] = []

    def factory(**kwargs: Any) -> ApiServer:
        server = start_api(tmp_path, **kwargs)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        stop_api(server)


@pytest.fixture
def api(api_factory: Callable[..., ApiServer]) -> ApiServer:
    return api_factory()


# --- read endpoints --------------------------------------------------------------------


def test_status_reports_daemon_facts_and_counts_by_state(api: ApiServer) -> None:
    r = api.get("/v1/status")
    assert r.status == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json
    assert body["pid"] == os.getpid()
    assert body["version"] == "test"
    assert body["servers_total"] == 3
    assert body["servers_by_state"] == {"stopped": 1, "unreachable": 2}


def test_status_reports_the_writers_health_and_the_connections(api: ApiServer) -> None:
    ctx = api.runner.app[CTX_KEY]
    real = ctx.writer
    health = {
        "ok": False,
        "last_error": "database or disk is full",
        "queued_samples": 12,
        "queued_events": 1,
        "dropped_samples": 300,
    }

    class Reporting:
        def health(self) -> dict:
            return health

    class Broken:
        def health(self) -> dict:
            raise RuntimeError("writer thread gone")

    class Older:  # a writer without health(): the status leaves the key out
        pass

    try:
        ctx.writer = Reporting()
        assert api.get("/v1/status").json["writer"] == health
        ctx.writer = Broken()
        broken = api.get("/v1/status").json["writer"]
        assert broken["ok"] is False and "writer thread gone" in broken["last_error"]
        ctx.writer = Older()
        assert "writer" not in api.get("/v1/status").json
    finally:
        ctx.writer = real
    conns = api.get("/v1/status").json["api"]
    assert conns["connections"] >= 1 and conns["connection_limit"] >= conns["connections"]
    assert conns["connections_per_uid_limit"] >= 1


def test_servers_and_one_server(api: ApiServer) -> None:
    api.set_ready("b", 0.5)
    r = api.get("/v1/servers")
    assert r.status == 200
    servers = {s["name"]: s for s in r.json["servers"]}
    assert set(servers) == {"a", "b", "c"}
    keys = (
        "name ip port url model_size model_path gpus local state pid started_at restarts "
        "consecutive_failures latency_s latency_per_token_s last_sample_at last_error"
    )
    for key in keys.split(" "):
        assert key in servers["a"], key
    assert servers["a"]["local"] is True and servers["a"]["state"] == "stopped"
    assert servers["b"]["state"] == "ready" and servers["b"]["latency_s"] == pytest.approx(0.5)

    one = api.get("/v1/servers/b")
    assert one.status == 200 and one.json["url"] == "http://10.254.0.2:31002"

    missing = api.get("/v1/servers/nope")
    assert missing.status == 404
    assert missing.error["code"] == "unknown_server"
    assert "nope" in missing.error["message"]


SELF_REPORT_KEYS = (
    "sglang_version",
    "incremental_streaming_output",
    "running",
    "queued",
    "capacity",
)


def test_server_object_carries_version_and_load(api: ApiServer) -> None:
    # Null while unknown: nothing reported yet.
    for server in api.get("/v1/servers").json["servers"]:
        assert {key: server[key] for key in SELF_REPORT_KEYS} == dict.fromkeys(SELF_REPORT_KEYS)

    def report() -> None:
        record = api.registry.servers["b"]
        record.sglang_version = "0.5.4"
        record.incremental_streaming_output = False
        record.running, record.queued, record.capacity = 3, 1, 48
        record.load_checked_at = 1_795_000_000.0

    api.loop.call(report)
    api.set_ready("b", 0.5)
    expected = {
        "sglang_version": "0.5.4",
        "incremental_streaming_output": False,
        "running": 3,
        "queued": 1,
        "capacity": 48,
    }
    one = api.get("/v1/servers/b").json
    assert {key: one[key] for key in SELF_REPORT_KEYS} == expected
    listed = {s["name"]: s for s in api.get("/v1/servers").json["servers"]}
    assert {key: listed["b"][key] for key in SELF_REPORT_KEYS} == expected
    assert listed["a"]["sglang_version"] is None
    (best,) = api.get("/v1/best?model_size=8B&n=1").json["candidates"]
    assert best["name"] == "b" and {key: best[key] for key in SELF_REPORT_KEYS} == expected


def test_best_ranks_fastest_first_and_honours_n_key_exclude(api: ApiServer) -> None:
    api.set_ready("a", 0.9)
    api.set_ready("b", 0.3)
    r = api.get("/v1/best?model_size=8B")
    assert r.status == 200
    assert r.json["model_size"] == "8B"
    assert [c["name"] for c in r.json["candidates"]] == ["b", "a"]

    assert [c["name"] for c in api.get("/v1/best?model_size=8B&n=1").json["candidates"]] == ["b"]
    excl = api.get("/v1/best?model_size=8B&exclude=b,zzz").json["candidates"]
    assert [c["name"] for c in excl] == ["a"]
    first = {api.get("/v1/best?model_size=8B&key=conv-1").json["candidates"][0]["name"]}
    for _ in range(5):
        first.add(api.get("/v1/best?model_size=8B&key=conv-1").json["candidates"][0]["name"])
    assert len(first) == 1  # one conversation stays on one server


def test_best_errors(api: ApiServer) -> None:
    unknown = api.get("/v1/best?model_size=13B")
    assert unknown.status == 404
    assert unknown.error["code"] == "unknown_model_size"
    assert "70B" in unknown.error["message"] and "8B" in unknown.error["message"]

    none_ready = api.get("/v1/best?model_size=70B")
    assert none_ready.status == 503
    assert none_ready.error["code"] == "no_ready_server"

    missing = api.get("/v1/best")
    assert missing.status == 400 and "model_size" in missing.error["message"]

    api.set_ready("b", 0.3)
    for bad in ("0", "65", "abc", "-1", "1.5", "9" * 30):
        r = api.get(f"/v1/best?model_size=8B&n={bad}")
        assert r.status == 400, bad
        assert "1 to 64" in r.error["message"]
    assert api.get("/v1/best?model_size=8B&n=64").status == 200
    all_out = api.get("/v1/best?model_size=8B&exclude=b")
    assert all_out.status == 503 and "exclude" in all_out.error["message"]


def test_sizes_lists_sizes_with_a_ready_server(api: ApiServer) -> None:
    assert api.get("/v1/sizes").json == {"sizes": []}
    api.set_ready("c", 2.0)
    assert api.get("/v1/sizes").json == {"sizes": ["70B"]}


# --- samples -----------------------------------------------------------------------------


def test_samples_are_recorded_and_change_the_ranking(api: ApiServer) -> None:
    api.set_ready("a", 0.4)
    api.set_ready("b", 0.5)
    assert api.get("/v1/best?model_size=8B").json["candidates"][0]["name"] == "a"

    samples = [{"server": "a", "ok": False, "latency_s": None, "error": "boom"} for _ in range(3)]
    samples.append(
        {
            "server": "b",
            "ok": True,
            "latency_s": 0.2,
            "ttft_s": 0.05,
            "prompt_tokens": 12,
            "completion_tokens": 16,
            "error": None,
        }
    )
    r = api.post("/v1/samples", {"samples": samples})
    assert r.status == 202, r.body
    assert r.json == {"accepted": 4}

    rows = api.db_samples()
    assert len(rows) == 4
    assert {row["source"] for row in rows} == {"client"}
    b_row = next(row for row in rows if row["server"] == "b")
    assert b_row["ok"] is True and b_row["latency_s"] == pytest.approx(0.2)
    assert b_row["completion_tokens"] == 16 and b_row["ttft_s"] == pytest.approx(0.05)
    assert {row["error"] for row in rows if row["server"] == "a"} == {"boom"}

    # Three failures in a row eject "a"; "b" is now first.
    best = api.get("/v1/best?model_size=8B").json["candidates"]
    assert [c["name"] for c in best] == ["b"]

    latest = api.get("/v1/latency?server=b&limit=10").json["samples"]
    assert len(latest) == 1 and latest[0]["server"] == "b"


def test_samples_latency_history_newest_first_and_limit(api: ApiServer) -> None:
    for i in range(5):
        r = api.post("/v1/samples", {"samples": [{"server": "c", "ok": True, "latency_s": i}]})
        assert r.status == 202
        time.sleep(0.002)
    api.db_samples()
    rows = api.get("/v1/latency?limit=3").json["samples"]
    assert [row["latency_s"] for row in rows] == [4.0, 3.0, 2.0]
    assert api.get("/v1/latency").status == 200
    for bad in ("0", "10001", "x"):
        r = api.get(f"/v1/latency?limit={bad}")
        assert r.status == 400 and "limit" in r.error["message"]
    assert api.get("/v1/latency?server=ghost").status == 404


BAD_SAMPLES = [
    ({"server": "nope", "ok": True}, "server"),
    ({"server": 3, "ok": True}, "server"),
    ({"ok": True}, "server"),
    ({"server": "a"}, "ok"),
    ({"server": "a", "ok": "yes"}, "ok"),
    ({"server": "a", "ok": 1}, "ok"),
    ({"server": "a", "ok": True, "latency_s": -1}, "latency_s"),
    ({"server": "a", "ok": True, "latency_s": "1.0"}, "latency_s"),
    ({"server": "a", "ok": True, "latency_s": True}, "latency_s"),
    ({"server": "a", "ok": True, "latency_s": 1e7}, "latency_s"),
    ({"server": "a", "ok": True, "ttft_s": [1]}, "ttft_s"),
    ({"server": "a", "ok": True, "prompt_tokens": 1.5}, "prompt_tokens"),
    ({"server": "a", "ok": True, "completion_tokens": -3}, "completion_tokens"),
    ({"server": "a", "ok": True, "completion_tokens": 10**30}, "completion_tokens"),
    ({"server": "a", "ok": True, "error": 42}, "error"),
]


@pytest.mark.parametrize(("sample", "field_name"), BAD_SAMPLES)
def test_a_bad_sample_refuses_the_whole_body(api: ApiServer, sample: dict, field_name: str) -> None:
    good = {"server": "b", "ok": True, "latency_s": 0.1}
    body = json.dumps({"samples": [good, sample, good]}, allow_nan=True)
    r = api.post("/v1/samples", body.encode())
    assert r.status == 400, r.body
    assert r.error["code"] == "bad_sample"
    assert f"samples[1].{field_name}" in r.error["message"]
    assert r.error["index"] == 1 and r.error["field"] == field_name
    assert api.db_samples() == []
    assert api.loop.call(lambda: api.registry.servers["b"].samples_total) == 0


def test_sample_bodies_that_are_not_samples(api: ApiServer) -> None:
    cases = [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b'{"samples": [{"server": "a", "ok": true, "latency_s": NaN}]}', "bad_json"),
        (b"[" * 100000 + b"]" * 100000, "bad_json"),
        (b"[]", "bad_request"),
        (b'{"samples": {}}', "bad_request"),
        (b'{"samples": [1]}', "bad_sample"),
        (b'{"samples": [{"server": "a", "ok": true, "latency_s": 1e400}]}', "bad_sample"),
        (b"", "bad_json"),
    ]
    for body, code in cases:
        r = api.post("/v1/samples", body)
        assert r.status == 400, (body[:40], r.body)
        assert r.error["code"] == code, body[:40]
    too_many = {"samples": [{"server": "a", "ok": True}] * 1001}
    r = api.post("/v1/samples", too_many)
    assert r.status == 413 and "1000" in r.error["message"]
    assert api.db_samples() == []


def test_oversized_bodies_are_refused_with_413(api: ApiServer) -> None:
    big = b'{"samples": [], "pad": "' + b"x" * (1 << 20) + b'"}'
    r = api.post("/v1/samples", big)
    assert r.status == 413 and r.error["code"] == "too_large"

    # A Content-Length over the limit is refused before any body is read.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(api.sock)
        s.sendall(
            b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000000\r\n\r\n{"
        )
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:100]

    # A chunked body without a length is cut off at the limit too.
    conn = _UnixHTTPConnection(api.sock, 10)
    try:
        conn.putrequest("POST", "/v1/samples")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(20):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    assert api.get("/v1/status").status == 200


# --- restarts, metrics ---------------------------------------------------------------------


def test_restarts_history(api: ApiServer) -> None:
    api.writer.add_restart(server="a", reason="crash", attempt=1, backoff_s=1.0, old_pid=10)
    api.writer.add_restart(server="a", reason="manual", attempt=1, backoff_s=None, old_pid=11)
    api.writer.add_restart(server="c", reason="hang", attempt=2, backoff_s=2.0, old_pid=12)
    assert api.writer.flush(10)
    rows = api.get("/v1/restarts?server=a").json["restarts"]
    assert [r["reason"] for r in rows] == ["manual", "crash"]
    assert len(api.get("/v1/restarts").json["restarts"]) == 3
    assert len(api.get("/v1/restarts?limit=1").json["restarts"]) == 1
    assert api.get("/v1/restarts?limit=0").status == 400
    assert api.get("/v1/restarts?server=ghost").status == 404


def test_events_history(api: ApiServer) -> None:
    api.writer.add_event(server="a", kind="state", old_state="ready", new_state="backoff")
    api.writer.add_event(server=None, kind="reload", message="unchanged a")
    assert api.writer.flush(10)
    rows = api.get("/v1/events?server=a").json["events"]
    assert [(r["kind"], r["new_state"]) for r in rows] == [("state", "backoff")]
    assert {r["kind"] for r in api.get("/v1/events").json["events"]} >= {"state", "reload"}
    assert api.get("/v1/events?limit=0").status == 400
    assert api.get("/v1/events?server=ghost").status == 404


def test_best_waits_for_the_adoption_of_running_servers(api: ApiServer) -> None:
    """A daemon that has just started has not yet adopted the servers an earlier run
    left serving: /v1/best waits for that instead of saying none is ready."""
    assert api.ctx is not None
    adopted = api.loop.call(asyncio.Event)
    api.ctx.adopted = adopted

    def adopt() -> None:
        api.registry.servers["b"].state = states.READY
        adopted.set()

    api.loop.call(lambda: asyncio.get_running_loop().call_later(0.3, adopt))
    r = api.get("/v1/best?model_size=8B&n=1")
    assert r.status == 200, r.json
    assert [c["name"] for c in r.json["candidates"]] == ["b"]


def test_metrics_in_prometheus_text_format(api: ApiServer) -> None:
    api.set_ready("b", 0.25)
    r = api.get("/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert 'modelserverd_server_state{server="b",state="ready"} 1.0' in text
    assert 'modelserverd_server_state{server="b",state="unreachable"} 0.0' in text
    assert 'modelserverd_server_state{server="a",state="stopped"} 1.0' in text
    assert 'modelserverd_server_latency_seconds{model_size="8B",server="b"} 0.25' in text
    assert 'modelserverd_server_up{model_size="8B",server="b"} 1.0' in text
    assert 'modelserverd_server_up{model_size="8B",server="a"} 0.0' in text
    for name in (
        "modelserverd_server_restarts_total",
        "modelserverd_server_samples_total",
        "modelserverd_server_probe_failures_total",
    ):
        assert f'{name}{{server="c"}} 0.0' in text, name
    assert 'modelserverd_server_samples_total{server="b"} 1.0' in text


# --- errors of routing ------------------------------------------------------------------


def test_unknown_paths_and_methods_answer_in_the_error_format(api: ApiServer) -> None:
    r = api.get("/v2/whatever")
    assert r.status == 404 and r.error["code"] == "not_found"
    assert "/v2/whatever" in r.error["message"]
    r = api.post("/v1/status")
    assert r.status == 405 and r.error["code"] == "method_not_allowed"
    assert "GET" in r.error["message"]
    r = call(api.sock, "DELETE", "/v1/servers/a")
    assert r.status == 405
    r = api.get("/v1/servers/a/restart")
    assert r.status == 405 and "POST" in r.error["message"]


def test_an_unexpected_error_answers_500_and_the_daemon_keeps_serving(
    api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    api.actions.crash = True
    r = api.post("/v1/servers/a/restart")
    assert r.status == 500 and r.error["code"] == "internal"
    assert "simulated bug" in caplog.text
    api.actions.crash = False
    assert api.post("/v1/servers/a/restart").status == 200


# --- admin endpoints ----------------------------------------------------------------------


def test_admin_actions_as_root(api: ApiServer) -> None:
    for action in ("restart", "stop", "start"):
        r = api.post(f"/v1/servers/a/{action}")
        assert r.status == 200, r.body
        assert r.json == {"server": "a", "requested": action}
    assert api.post("/v1/reload").json == {"server": None, "requested": "reload"}
    assert api.actions.calls == [("restart", "a"), ("stop", "a"), ("start", "a"), ("reload", None)]

    assert api.post("/v1/servers/ghost/restart").status == 404
    remote = api.post("/v1/servers/b/restart")
    assert remote.status == 409 and remote.error["code"] == "not_managed"
    assert "b" in remote.error["message"]

    api.actions.reload_error = ConfigError(["/etc/x.toml: servers[0].port: got 0, expected ..."])
    bad = api.post("/v1/reload")
    assert bad.status == 400 and bad.error["code"] == "bad_config"
    assert "servers[0].port" in bad.error["message"]
    assert "running one stays" in bad.error["message"]


def _as_user(sock: str, request: bytes, *, uid: int, gid: int, groups: list[int]) -> bytes:
    """Fork a child that drops to ``uid``/``gid`` before connecting (SO_PEERCRED is
    taken at connect time) and returns what the daemon answered."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only raw system calls, then _exit
        code = 0
        try:
            os.close(read_fd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock)
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            os.write(write_fd, data or b"EMPTY")
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(write_fd, f"CHILD-ERROR {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    out = b""
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        out += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    return out


RESTART_A = b"POST /v1/servers/a/restart HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
STATUS = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A folder every user may enter (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="msd-api-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_non_admin_peer_gets_403_and_reads_still_work(
    api_factory: Callable[..., ApiServer], open_dir: str
) -> None:
    api = api_factory(sock=f"{open_dir}/api.sock", mode=0o666, admin_group="users")
    out = _as_user(api.sock, RESTART_A, uid=NOBODY, gid=NOBODY, groups=[])
    assert out.startswith(b"HTTP/1.1 403"), out[:200]
    err = json.loads(out.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "forbidden"
    assert "users" in err["message"] and "usermod" in err["message"]
    assert api.actions.calls == []

    out = _as_user(api.sock, STATUS, uid=NOBODY, gid=NOBODY, groups=[])
    assert out.startswith(b"HTTP/1.1 200"), out[:200]

    # Root is always allowed.
    assert api.post("/v1/servers/a/restart").status == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_admin_group_members_are_allowed(
    api_factory: Callable[..., ApiServer], open_dir: str
) -> None:
    api = api_factory(sock=f"{open_dir}/api.sock", mode=0o666, admin_group="users")
    users_gid = 100
    # A supplementary group (usermod -aG), found in /proc/<pid>/status.
    out = _as_user(api.sock, RESTART_A, uid=NOBODY, gid=NOBODY, groups=[users_gid])
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    # The primary group.
    out = _as_user(api.sock, RESTART_A, uid=NOBODY, gid=users_gid, groups=[])
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    assert api.actions.calls == [("restart", "a"), ("restart", "a")]


def test_is_admin_rules() -> None:
    me = os.getuid()
    assert is_admin((1, 0, 0), "")
    assert is_admin((1, me, 12345), "")
    assert not is_admin(None, "")
    assert not is_admin((1, 54321, 54321), "")
    assert not is_admin((1, 54321, 54321), "no-such-group-here")
    assert is_admin((1, 54321, 100), "users")


# --- the socket -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_socket_mode_is_exact_and_socket_removed_on_cleanup(
    api_factory: Callable[..., ApiServer], mode: int
) -> None:
    old_umask = os.umask(0o022)
    try:
        api = api_factory(mode=mode)
    finally:
        os.umask(old_umask)
    st = os.stat(api.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode
    assert api.get("/v1/status").status == 200
    api.loop.run(api.runner.cleanup())
    assert not os.path.exists(api.sock)


def test_socket_group(api_factory: Callable[..., ApiServer]) -> None:
    api = api_factory(group="nogroup")
    assert os.stat(api.sock).st_gid == NOBODY
    assert stat.S_IMODE(os.stat(api.sock).st_mode) == 0o660


def test_unknown_socket_group_is_refused(tmp_path: Path) -> None:
    from aiohttp import web

    with pytest.raises(SocketError, match="no-such-group-xyz"):
        asyncio.run(
            serve_unix(
                web.Application(), str(tmp_path / "s.sock"), mode=0o660, group="no-such-group-xyz"
            )
        )


def test_stale_socket_is_replaced(api_factory: Callable[..., ApiServer], tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "api.sock")
    os.makedirs(os.path.dirname(path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nothing listens: what a killed daemon leaves
    api = api_factory(sock=path)
    assert api.get("/v1/status").status == 200


def test_live_socket_is_refused(api_factory: Callable[..., ApiServer]) -> None:
    first = api_factory()
    with pytest.raises(SocketInUse) as info:
        api_factory(sock=first.sock)
    assert f"pid {os.getpid()}" in str(info.value)
    assert "systemctl stop modelserverd" in str(info.value)
    assert first.get("/v1/status").status == 200


def test_a_file_in_the_sockets_place_is_refused(tmp_path: Path) -> None:
    from aiohttp import web

    path = tmp_path / "api.sock"
    path.write_text("precious")
    with pytest.raises(SocketError, match="not a socket"):
        asyncio.run(serve_unix(web.Application(), str(path), mode=0o660))
    assert path.read_text() == "precious"


def test_curl_talks_to_the_socket(api: ApiServer) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    out = subprocess.run(
        [curl, "-sS", "--unix-socket", api.sock, "http://localhost/v1/servers"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert {s["name"] for s in json.loads(out.stdout)["servers"]} == {"a", "b", "c"}
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            api.sock,
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"samples": [{"server": "c", "ok": true, "latency_s": 1.5}]}',
            "http://localhost/v1/samples",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == b"202"


# --- bad peers ------------------------------------------------------------------------------


def test_garbage_gets_400_or_is_closed_and_others_are_served(api: ApiServer) -> None:
    for payload in (
        b"\x00\x01\x02\xff" * 100,
        b"GET / HTTP/9.9\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
        b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{",
    ):
        out = raw_exchange(api.sock, payload)
        status = out.split(b" ", 2)[1] if out.startswith(b"HTTP/1.") else b""
        assert out == b"" or status.startswith(b"4"), (payload[:30], out[:80])
    assert api.get("/v1/status").status == 200


def test_trickling_and_idle_connections_are_closed(
    api_factory: Callable[..., ApiServer],
) -> None:
    api = api_factory(request_timeout_s=1.0)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trickle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        idle.connect(api.sock)
        trickle.connect(api.sock)
        idle.settimeout(5)
        began = time.monotonic()
        closed_at = None
        for byte in b"GET /v1/status HTTP/1.1\r\nHost: x\r\n":
            try:
                trickle.send(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.1)
        assert closed_at is not None, "a client trickling headers was never closed"
        assert closed_at - began < 3.0
        assert idle.recv(1) == b""  # closed by the daemon
        assert time.monotonic() - began < 5.0
    finally:
        idle.close()
        trickle.close()
    assert api.get("/v1/status").status == 200


def test_a_body_that_never_arrives_gets_408(api_factory: Callable[..., ApiServer]) -> None:
    api = api_factory(request_timeout_s=1.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(api.sock)
        began = time.monotonic()
        s.sendall(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 408"), head[:100]
        assert b"request_timeout" in head
        assert time.monotonic() - began < 4.0
    assert api.db_samples() == []
    assert api.get("/v1/status").status == 200


def test_many_concurrent_connections(api: ApiServer) -> None:
    held = []
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(api.sock)
            held.append(s)
        # Every held connection may still send a request and get its answer.
        for s in held[::200]:
            s.sendall(STATUS)
            assert s.recv(12) == b"HTTP/1.1 200"
        # ... and requests in parallel on fresh connections are all answered.
        with ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(lambda _: api.get("/v1/servers").status, range(500)))
        assert statuses == [200] * 500
    finally:
        for s in held:
            s.close()
    assert api.get("/v1/servers").status == 200
