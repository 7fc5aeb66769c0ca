"""I/O at the edge: SGLang over HTTP and the daemon over its Unix socket.

Only ``http.client`` and ``socket``: the client must import in milliseconds and must
not drag an event loop into its callers' programs.

- :class:`HttpTransport` opens a streaming POST to an SGLang server on a pooled
  keep-alive connection and hands back an :class:`EventStream` of server-sent events.
  Every read takes an absolute deadline, applied as the socket timeout, so the caller
  decides how long a first token or a pause mid-answer may take. Its ``open`` is the
  seam the tests replace.
- :class:`DaemonClient` asks the daemon over HTTP/1.1 + JSON on the Unix socket.

Lower-level errors are translated here: :class:`TransportError` (internal, caught by
the client and recorded as a failed attempt), :class:`HttpStatusError` for a non-2xx
answer, and :class:`~ms_client.DaemonUnavailable` / :class:`~ms_client.DaemonError`.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ._exceptions import DaemonError, DaemonUnavailable

# An idle keep-alive connection older than this is not reused: uvicorn (SGLang's
# server) closes idle connections after 5 s, and a request sent on a connection the
# server is closing is lost.
IDLE_EXPIRY_S = 4.0
MAX_IDLE_PER_SERVER = 8
MAX_ERROR_BODY = 64 * 1024
MAX_LINE = 16 * 1024 * 1024  # one SSE line; a whole non-streamed answer can be large

# Errors on a reused keep-alive connection before any answer arrived: the server
# closed it while idle, so the request never ran and may be sent again once.
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)


class TransportError(Exception):
    """A request to one server failed below HTTP (refused, reset, timed out, garbled).

    Internal: the client records ``reason`` as that server's attempt and moves on.
    """

    def __init__(self, reason: str, *, timeout: bool = False):
        self.reason = reason
        self.timeout = timeout
        super().__init__(reason)


class HttpStatusError(TransportError):
    """The server answered with a non-2xx status; ``message`` is from its error body."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")


def describe_os_error(exc: BaseException) -> str:
    """A short, lower-case reason for an attempt list ("connection refused")."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "connection closed while sending"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed mid-answer"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP answer ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.errno is not None:
        text = exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _error_message(raw: bytes) -> str:
    """The useful part of an error body: SGLang/OpenAI ``{"error": {"message"}}``,
    FastAPI ``{"detail"}``, or the text itself."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        for key in ("detail", "message"):
            if obj.get(key):
                return str(obj[key])[:500]
    return text[:500]


class EventStream(Protocol):
    """What the client reads an answer from (the test seam)."""

    is_sse: bool

    def next_event(self, deadline: float) -> str | None:
        """The next event's data by ``deadline`` (monotonic), or None at the end."""

    def finish(self, deadline: float) -> None:
        """The answer is complete: read what is left and keep the connection."""

    def abort(self) -> None:
        """Drop the connection now (from any thread); the server stops generating."""


class SglangTransport(Protocol):
    def open(
        self, host: str, port: int, path: str, body: Mapping[str, Any], *, deadline: float
    ) -> EventStream:
        """POST ``body`` as JSON; by ``deadline`` the status line must have arrived."""


def _set_timeout(sock: socket.socket | None, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransportError("deadline passed", timeout=True)
    if sock is not None:
        sock.settimeout(remaining)


# A socket timeout already set is kept while the deadline it implies is within this
# of the one asked for: a stream reads a line per token, and a settimeout per line
# was a fifth of the client's own time per request.
TIMEOUT_SLACK_S = 0.05


class _Deadline:
    """The socket timeout of one stream, set again only when its deadline moves."""

    __slots__ = ("_sock", "_until")

    def __init__(self, sock: socket.socket | None):
        self._sock = sock
        self._until: float | None = None

    def apply(self, deadline: float) -> None:
        now = time.monotonic()
        if deadline <= now:
            raise TransportError("deadline passed", timeout=True)
        if self._sock is None:
            return
        if self._until is not None and abs(self._until - deadline) <= TIMEOUT_SLACK_S:
            return
        self._sock.settimeout(deadline - now)
        self._until = deadline


class _OneWriteConnection(http.client.HTTPConnection):
    """Sends a request's headers and bytes body in one write: two writes cost an extra
    system call, and with delayed ACKs can hold the body back on the wire."""

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", b""))
            message = b"\r\n".join(self._buffer) + message_body
            del self._buffer[:]
            self.send(message)
            return
        super()._send_output(message_body, encode_chunked)


class HttpEventStream:
    """Server-sent events from one HTTP response, read under deadlines."""

    def __init__(
        self,
        transport: HttpTransport,
        key: tuple[str, int],
        conn: http.client.HTTPConnection,
        sock: socket.socket | None,
        resp: http.client.HTTPResponse,
    ):
        self._transport = transport
        self._key = key
        self._conn = conn
        self._sock = sock
        self._resp = resp
        self._timeout = _Deadline(sock)
        self._lock = threading.Lock()
        self._closed = False
        self._body_done = False
        content_type = resp.getheader("Content-Type", "") or ""
        self.is_sse = "text/event-stream" in content_type.lower()

    def _readline(self, deadline: float) -> bytes:
        self._timeout.apply(deadline)
        try:
            return self._resp.readline(MAX_LINE)
        except TimeoutError:
            raise TransportError("timed out", timeout=True) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self._closed:
                raise TransportError("aborted") from None
            raise TransportError(describe_os_error(exc)) from None

    def next_event(self, deadline: float) -> str | None:
        if self._body_done:
            return None
        if not self.is_sse:
            # A server that ignored "stream": the whole answer is one event.
            self._body_done = True
            return self._read_rest(deadline).decode("utf-8", "replace")
        data: list[str] = []
        while True:
            line = self._readline(deadline)
            if not line:
                self._body_done = True
                return "\n".join(data) if data else None
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                if data:
                    return "\n".join(data)
                continue
            if text.startswith(":"):
                continue  # an SSE comment (keep-alive ping)
            field, _, value = text.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)

    def _read_rest(self, deadline: float) -> bytes:
        chunks: list[bytes] = []
        while True:
            self._timeout.apply(deadline)
            try:
                chunk = self._resp.read1(65536)
            except TimeoutError:
                raise TransportError("timed out", timeout=True) from None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise TransportError(describe_os_error(exc)) from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def finish(self, deadline: float) -> None:
        try:
            self._read_rest(deadline)
        except TransportError:
            self.abort()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        reusable = not self._resp.will_close and self._conn.sock is not None
        self._resp.close()
        if reusable:
            self._transport._put(self._key, self._conn)
        else:
            self._conn.close()

    def abort(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._resp.close()
        self._conn.close()


class HttpTransport:
    """Streaming POSTs to SGLang servers over pooled keep-alive connections.

    Thread-safe: a connection is checked out of the pool for one request and only put
    back after its answer was read to the end, so no two requests share one.
    """

    def __init__(
        self,
        *,
        max_idle_per_server: int = MAX_IDLE_PER_SERVER,
        idle_expiry_s: float = IDLE_EXPIRY_S,
    ):
        self._max_idle = max_idle_per_server
        self._expiry = idle_expiry_s
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[tuple[float, http.client.HTTPConnection]]] = {}
        self.connections_opened = 0  # for tests and benchmarks: keep-alive at work

    def _take(self, key: tuple[str, int]) -> http.client.HTTPConnection | None:
        now = time.monotonic()
        stale: list[http.client.HTTPConnection] = []
        found = None
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                since, conn = idle.pop()
                if now - since < self._expiry and conn.sock is not None:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def _put(self, key: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def open(
        self, host: str, port: int, path: str, body: Mapping[str, Any], *, deadline: float
    ) -> HttpEventStream:
        key = (host, port)
        payload = json.dumps(body).encode()
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream, application/json",
        }
        while True:
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError("timed out", timeout=True)
                conn = _OneWriteConnection(host, port, timeout=remaining)
            try:
                if conn.sock is None:
                    conn.connect()
                    with self._lock:
                        self.connections_opened += 1
                sock = conn.sock
                _set_timeout(sock, deadline)
                conn.request("POST", path, body=payload, headers=headers)
                resp = conn.getresponse()
            except TransportError:
                conn.close()
                raise
            except _STALE as exc:
                conn.close()
                if reused:
                    continue  # the server had closed it while idle: a fresh one
                raise TransportError(describe_os_error(exc)) from None
            except TimeoutError:
                conn.close()
                raise TransportError("timed out", timeout=True) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise TransportError(describe_os_error(exc)) from None
            stream = HttpEventStream(self, key, conn, sock, resp)
            if 200 <= resp.status < 300:
                return stream
            try:
                raw = stream._read_rest(deadline)
            except TransportError:
                raw = b""
            stream.abort()
            raise HttpStatusError(resp.status, _error_message(raw[:MAX_ERROR_BODY]))

    def close(self) -> None:
        """Close every idle connection (requests in flight are not touched)."""
        with self._lock:
            conns = [conn for idle in self._idle.values() for _, conn in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


# --- the daemon ---------------------------------------------------------------------

DAEMON_TIMEOUT_S = 3.0


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket, like ``curl --unix-socket``."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _daemon_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no socket file there; is modelserverd running?"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; is modelserverd running?"
    if isinstance(exc, PermissionError):
        return "permission denied; join the socket's group (daemon.socket_group)"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return describe_os_error(exc)


class DaemonClient:
    """Questions to the daemon over its Unix socket; one short connection each, since a
    local connect costs microseconds and keeps this class trivially thread-safe."""

    def __init__(self, socket_path: str, *, timeout_s: float = DAEMON_TIMEOUT_S):
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout_s)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(
                socket_path=self.socket_path, reason=_daemon_reason(exc)
            ) from None
        finally:
            conn.close()
        try:
            obj = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except ValueError:
            obj = None
        if 200 <= status < 300:
            if not isinstance(obj, dict):
                raise DaemonUnavailable(
                    socket_path=self.socket_path, reason=f"answered {status} with no JSON object"
                )
            return obj
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and (status < 500 or err.get("code") == "no_ready_server"):
            raise DaemonError(
                socket_path=self.socket_path,
                status=status,
                code=str(err.get("code", "error")),
                message=str(err.get("message", "")),
            )
        # A daemon failing in itself is as good as none: the caller falls back.
        detail = _error_message(raw[:MAX_ERROR_BODY])
        raise DaemonUnavailable(
            socket_path=self.socket_path,
            reason=f"answered HTTP {status}" + (f": {detail}" if detail else ""),
        )

    def best(
        self, model_size: str, *, n: int, key: str | None = None, exclude: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"model_size": model_size, "n": n}
        if key:
            query["key"] = key
        excluded = [name for name in exclude if name]
        if excluded:
            query["exclude"] = ",".join(excluded)
        answer = self.request("GET", "/v1/best?" + urllib.parse.urlencode(query))
        candidates = answer.get("candidates")
        if not isinstance(candidates, list):
            raise DaemonUnavailable(
                socket_path=self.socket_path, reason="answered /v1/best without candidates"
            )
        return [c for c in candidates if isinstance(c, dict)]

    def servers(self) -> list[dict[str, Any]]:
        servers = self.request("GET", "/v1/servers").get("servers")
        return [s for s in servers if isinstance(s, dict)] if isinstance(servers, list) else []

    def sizes(self) -> list[str]:
        sizes = self.request("GET", "/v1/sizes").get("sizes")
        return [str(s) for s in sizes] if isinstance(sizes, list) else []

    def latency(self, *, server: str | None = None, limit: int | None = None) -> list[dict]:
        query: dict[str, Any] = {}
        if server:
            query["server"] = server
        if limit is not None:
            query["limit"] = limit
        path = "/v1/latency" + ("?" + urllib.parse.urlencode(query) if query else "")
        samples = self.request("GET", path).get("samples")
        return [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []

    def post_samples(self, samples: list[dict[str, Any]]) -> None:
        self.request("POST", "/v1/samples", {"samples": samples})
