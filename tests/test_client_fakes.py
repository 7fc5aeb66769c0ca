"""Test doubles for the client: a tiny SGLang stand-in and a fake daemon.

Both are in-process ``http.server`` servers on threads, so unit tests can script a
server's behaviour per request (hang, 500, 400, a stall mid-answer, a connection
closed while idle) and see exactly what the client sent. The end-to-end behaviour
against the real simulator is in ``test_client_sim.py``. No tests live here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

TOKENS = ["Hello", ",", " world", "!"]


class _TrackingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, fake: FakeSglang):
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _SglangHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self.lock:
            self.open_sockets.add(sock)
            self.fake.connections += 1
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up (a cancelled probe) is part of the test

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class _SglangHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TrackingServer

    def log_message(self, *args: Any) -> None:
        pass

    def _send_json(self, status: int, obj: Any) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self._chunk(f"data: {payload}\n\n".encode())

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        mode = fake.next_mode()
        with fake.lock:
            fake.requests.append((self.path, body))
        if mode == "hang":
            fake.release.wait(30)
            self.close_connection = True
            return
        if mode == "close":
            self.close_connection = True
            return
        if mode == "reject":
            self._send_json(400, {"error": {"message": "max_tokens is too large", "code": 400}})
            return
        if mode == "error":
            self._send_json(500, {"error": {"message": "simulated failure", "code": 500}})
            return
        if mode == "nostream" or not body.get("stream"):
            self._answer_whole(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        time.sleep(fake.ttft_s)
        if mode == "error-chunk":
            # issue 10: an error after the 200, before any output.
            self._event(fake.error_chunk)
            self._event("[DONE]")
            self._chunk(b"")
            return
        generate = self.path == "/generate"
        if generate:
            self._stream_generate(mode)
        else:
            self._stream_chat(mode)

    def _stream_generate(self, mode: str) -> None:
        fake = self.server.fake
        text = ""
        for i, token in enumerate(fake.tokens):
            if i:
                time.sleep(fake.token_s)
            text += token
            meta = {"prompt_tokens": 7, "completion_tokens": i + 1, "finish_reason": None}
            # --incremental-streaming-output sends only the new part (issue 10).
            self._event({"text": token if fake.incremental else text, "meta_info": meta})
            if mode == "stall":
                fake.release.wait(30)
                self.close_connection = True
                return
        if not self._ending(mode):
            return
        meta = {"prompt_tokens": 7, "completion_tokens": len(fake.tokens)}
        last = "" if fake.incremental else text
        self._event({"text": last, "meta_info": {**meta, "finish_reason": {"type": "stop"}}})
        self._done(mode)

    def _stream_chat(self, mode: str) -> None:
        fake = self.server.fake
        first = True

        def delta(part: dict[str, Any], pause: float) -> None:
            nonlocal first
            if not first:
                time.sleep(pause)
            if first and "role" not in part:
                part = {"role": "assistant", **part}
            first = False
            self._event({"choices": [{"index": 0, "delta": part, "finish_reason": None}]})

        if fake.role_chunk:
            # What SGLang sends as soon as it has output (issue 10).
            delta({"role": "assistant", "content": ""}, 0.0)
        for piece in fake.reasoning:
            delta({"reasoning_content": piece}, fake.think_s)
        for token in fake.tokens:
            delta({"content": token}, fake.token_s)
            if mode == "stall":
                fake.release.wait(30)
                self.close_connection = True
                return
        for call in fake.tool_calls:
            delta({"tool_calls": [call]}, fake.token_s)
        if not self._ending(mode):
            return
        finish = "tool_calls" if fake.tool_calls else "stop"
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        self._event({"choices": [], "usage": fake.usage()})
        self._done(mode)

    def _ending(self, mode: str) -> bool:
        """The scripted ways an answer breaks after its output; False: it broke."""
        if mode == "midstream-error":
            self._event({"error": {"message": "out of memory", "code": 500}})
            self._done(mode)
            return False
        if mode == "truncate":
            self._chunk(b"")
            self.close_connection = True
            return False
        return True

    def _done(self, mode: str) -> None:
        self._event("[DONE]")
        self._chunk(b"")
        if mode == "close-idle":
            # Looks reusable to the client, then the server drops it while idle.
            self.close_connection = True

    def _answer_whole(self, body: dict[str, Any]) -> None:
        fake = self.server.fake
        time.sleep(fake.ttft_s)
        text = "".join(fake.tokens)
        usage = fake.usage()
        if self.path == "/generate":
            self._send_json(200, {"text": text, "meta_info": usage})
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if fake.reasoning:
                message["reasoning_content"] = "".join(fake.reasoning)
            if fake.whole_tool_calls is not None:
                message["tool_calls"] = fake.whole_tool_calls
            finish = "tool_calls" if fake.whole_tool_calls else "stop"
            choice = {"index": 0, "message": message, "finish_reason": finish}
            self._send_json(200, {"choices": [choice], "usage": usage})


class FakeSglang:
    """An SGLang stand-in with scripted behaviour.

    ``mode``: ``normal``, ``hang`` (accept, never answer), ``close`` (close without an
    answer), ``reject`` (400), ``error`` (500), ``stall`` (first token, then nothing),
    ``midstream-error``, ``truncate`` (no [DONE]), ``nostream`` (ignores "stream"),
    ``close-idle`` (answers, then closes the kept-alive connection), ``error-chunk``
    (a 200, then ``error_chunk`` as the first event).
    ``script`` gives modes for the next requests, one each, before ``mode`` applies.

    A chat answer is, in order: a role-only first delta (``role_chunk``), the
    ``reasoning`` pieces ``think_s`` apart, the ``tokens`` ``token_s`` apart, then the
    ``tool_calls`` deltas (each one item of ``delta.tool_calls``). A whole answer
    (``nostream``) carries ``whole_tool_calls``. ``/generate`` chunks carry the text so
    far, or only the new part with ``incremental``.
    """

    def __init__(
        self,
        name: str,
        *,
        model_size: str = "8B",
        ttft_s: float = 0.0,
        token_s: float = 0.0,
        tokens: list[str] | None = None,
        mode: str = "normal",
        role_chunk: bool = False,
        reasoning: list[str] | None = None,
        think_s: float = 0.0,
        tool_calls: list[dict[str, Any]] | None = None,
        whole_tool_calls: list[dict[str, Any]] | None = None,
        incremental: bool = False,
        error_chunk: dict[str, Any] | None = None,
    ):
        self.name = name
        self.model_size = model_size
        self.ttft_s = ttft_s
        self.token_s = token_s
        self.tokens = list(TOKENS if tokens is None else tokens)
        self.mode = mode
        self.role_chunk = role_chunk
        self.reasoning = list(reasoning or [])
        self.think_s = think_s
        self.tool_calls = list(tool_calls or [])
        self.whole_tool_calls = whole_tool_calls
        self.incremental = incremental
        self.error_chunk = error_chunk or {
            "error": {"object": "error", "message": "scheduler failed", "code": 500}
        }
        self.script: list[str] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self._httpd = _TrackingServer(self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.running = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def next_mode(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else self.mode

    def usage(self) -> dict[str, int]:
        generated = len(self.tokens) + len(self.reasoning) + len(self.tool_calls)
        return {"prompt_tokens": 7, "completion_tokens": generated}

    def server_object(self, **fields: Any) -> dict[str, Any]:
        """This server as the daemon's API describes it."""
        obj = {
            "name": self.name,
            "ip": "127.0.0.1",
            "port": self.port,
            "url": f"http://{self.address}",
            "model_size": self.model_size,
            "model_path": "/models/fake",
            "gpus": [0],
            "local": True,
            "state": "ready",
            "pid": 1234,
            "started_at": None,
            "restarts": 0,
            "consecutive_failures": 0,
            # Loose figures: a first-token deadline of 1 s keeps a busy test machine from
            # looking like a hung server. Tests of hangs and slowness pass tight ones.
            "latency_s": 0.3,
            "latency_per_token_s": 0.01,
            "ttft_s": 0.25,
            "last_sample_at": None,
            "last_error": None,
            # From the server's /get_server_info (null: not known yet).
            "incremental_streaming_output": None,
            "sglang_version": None,
        }
        obj.update(fields)
        return obj

    def stop(self) -> None:
        """Like a killed process: the port refuses, open connections are dropped."""
        if not self.running:
            return
        self.running = False
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._httpd.lock:
            socks = list(self._httpd.open_sockets)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def sglang() -> Iterator[Callable[..., FakeSglang]]:
    """``sglang(name, **behaviour)`` starts a fake SGLang server, stopped at the end."""
    started: list[FakeSglang] = []

    def factory(name: str, **kwargs: Any) -> FakeSglang:
        fake = FakeSglang(name, **kwargs)
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        fake.stop()


# --- the daemon -----------------------------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, fake: FakeDaemon):
        self.fake = fake
        super().__init__(path, _DaemonHandler)


class _DaemonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixHTTPServer

    def log_message(self, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        status, answer = self.server.fake.handle(method, parsed.path, query, body)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


class FakeDaemon:
    """The daemon's socket API, answering from a list of server objects.

    ``/v1/best`` returns the ready servers of the size in list order (the test decides
    who is "best"), without the excluded ones, at most ``n``. Every query and every
    posted sample is recorded. ``override(method, path, query, body)`` may return
    ``(status, answer)`` to script anything else.
    """

    def __init__(self, socket_path: str, servers: list[dict[str, Any]] | None = None):
        self.socket_path = socket_path
        self.servers = list(servers or [])
        self.queries: list[tuple[str, str, dict[str, str]]] = []
        self.samples: list[dict[str, Any]] = []
        self.override: Callable[..., tuple[int, Any] | None] | None = None
        self.lock = threading.Lock()
        self._httpd = _UnixHTTPServer(socket_path, self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def best_queries(self) -> list[dict[str, str]]:
        with self.lock:
            return [q for _, path, q in self.queries if path == "/v1/best"]

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        with self.lock:
            self.queries.append((method, path, query))
        if self.override is not None:
            answer = self.override(method, path, query, body)
            if answer is not None:
                return answer
        if method == "POST" and path == "/v1/samples":
            with self.lock:
                self.samples.extend(body["samples"])
            return 202, {"accepted": len(body["samples"])}
        if path == "/v1/best":
            size = query.get("model_size")
            excluded = set(filter(None, query.get("exclude", "").split(",")))
            found = [
                s
                for s in self.servers
                if s["model_size"] == size and s["state"] == "ready" and s["name"] not in excluded
            ][: int(query.get("n", 3))]
            if not found:
                message = f"no ready {size} server"
                return 503, {"error": {"code": "no_ready_server", "message": message}}
            return 200, {"model_size": size, "candidates": found}
        if path == "/v1/servers":
            return 200, {"servers": self.servers}
        if path == "/v1/sizes":
            ready = [s["model_size"] for s in self.servers if s["state"] == "ready"]
            return 200, {"sizes": sorted(set(ready))}
        if path == "/v1/latency":
            with self.lock:
                samples = [dict(s, source="client") for s in reversed(self.samples)]
            if query.get("server"):
                samples = [s for s in samples if s["server"] == query["server"]]
            return 200, {"samples": samples[: int(query.get("limit", 100))]}
        return 404, {"error": {"code": "not_found", "message": f"no route {path}"}}

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temporary folder: a Unix socket path must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="msc-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[Callable[..., FakeDaemon]]:
    """``daemon(servers)`` starts a fake daemon on ``short_dir/api.sock``."""
    started: list[FakeDaemon] = []

    def factory(servers: list[dict[str, Any]] | None = None) -> FakeDaemon:
        fake = FakeDaemon(str(short_dir / "api.sock"), servers)
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        fake.stop()


def write_config(
    folder: Path,
    servers: list[Any],
    *,
    socket_path: str | None = None,
    **client: Any,
) -> Path:
    """A config file naming ``servers`` (fakes or sims: ``name``, ``port``,
    ``model_size``) with ``[client]`` settings; the socket path defaults to one that
    does not exist, so the client works without a daemon."""
    sock = socket_path or str(folder / "no-daemon.sock")
    lines = ["[daemon]", f'socket = "{sock}"', "", "[client]"]
    settings = {"request_timeout_s": 30.0, **client}
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for server in servers:
        lines += [
            "",
            "[[servers]]",
            f'name = "{server.name}"',
            'ip = "127.0.0.1"',
            f"port = {server.port}",
            f'model_size = "{getattr(server, "model_size", "8B")}"',
            'model_path = "/models/fake"',
            "managed = false",
        ]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (tests poll, never sleep a fixed time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s: {what}")
        time.sleep(0.01)
