"""I/O at the edge: SGLang over HTTP and the daemon over its Unix socket.

Only ``http.client`` and ``socket``: the client must import in milliseconds and must
not drag an event loop into its callers' programs.

- :class:`HttpTransport` opens a streaming POST to an SGLang server on a pooled
  keep-alive connection and hands back an :class:`EventStream` of server-sent events.
  Every read takes an absolute deadline, so the caller decides how long a first token
  or a pause mid-answer may take. A request costs the client little next to the
  server's own work (issue 11): it leaves in one write with headers built once per
  server, its answer is read straight from the socket (not through ``http.client``'s
  response), and the socket timeout is set again only when it must be. Its ``open``
  is the seam the tests replace.
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


# --- one answer, read from the socket ------------------------------------------------

# A socket timeout already set is kept while it is at most this much longer than the
# time left (a read may overrun its deadline by this much); a shorter one is kept too,
# since a read it cuts short is resumed. Setting it for every read was the client's
# most frequent system call.
TIMEOUT_SLACK_S = 0.01
RECV_SIZE = 64 * 1024
MAX_HEAD = 64 * 1024  # status line and headers of one answer
# A request longer than this may fill the socket's send buffer: its send then gets
# the exact time left, as a cut-short send cannot be resumed.
SMALL_REQUEST = 16 * 1024

# Body framing of an answer (``_Answer.framing``).
_DONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)
# ``_Answer.left`` in a chunked body, when it is not the bytes left of a chunk.
_SIZE_LINE = 0  # a chunk-size line comes next
_AFTER_DATA = -1  # the CRLF that ends a chunk's data
_TRAILERS = -2  # the trailer lines after the last chunk, up to a blank line

# Errors on a reused keep-alive connection before any byte of an answer: the server
# closed it while idle, so the request never ran and may be sent again once.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _NoAnswer(TransportError):
    """The connection ended before any byte of an answer came back."""


class _Connection(http.client.HTTPConnection):
    """A pooled keep-alive connection to one server. ``http.client`` opens it (connect
    timeout, TCP_NODELAY) and sends each request in one write; :class:`_Answer` reads
    the answers from its socket. ``sock_timeout`` is the timeout its socket has now,
    kept across requests so that it is set again only when it must be."""

    sock_timeout = 0.0


def _head_end(raw: bytes) -> tuple[int, int]:
    """Where the status line and headers end in ``raw`` and the body begins; (-1, -1)
    while incomplete. Bare ``\\n`` line ends are accepted, as ``http.client`` does."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    return (crlf, crlf + 4) if crlf >= 0 else (-1, -1)


class _Answer:
    """One HTTP/1.1 answer read straight from the connection's socket under deadlines.

    ``http.client``'s response cannot be read on after a timeout, so each read needed a
    socket timeout of exactly the time left, set again whenever the deadline moved; and
    its line-by-line chunked reading was most of the client's own time per streamed
    request. Here a read cut short by a timeout kept from an earlier, shorter deadline
    is resumed, so the timeout is set only when it is longer than the time left (after
    a slow read or a shorter deadline), and a chunked body is decoded a read at a time.
    """

    __slots__ = (
        "conn",
        "sock",
        "status",
        "content_type",
        "will_close",
        "framing",
        "left",
        "closed",
        "_raw",
        "_any",
    )

    def __init__(self, conn: _Connection, sock: socket.socket):
        self.conn = conn
        self.sock = sock
        self.status = 0
        self.content_type = ""
        self.will_close = True
        self.framing = _UNTIL_CLOSE
        self.left = 0
        self.closed = False  # aborted from another thread: errors say "aborted"
        self._raw = b""  # received, not yet consumed
        self._any = False  # whether any byte of the answer arrived

    def _settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        self.conn.sock_timeout = seconds

    def _error(self, exc: OSError) -> TransportError:
        if self.closed:
            return TransportError("aborted")
        if not self._any and isinstance(exc, _STALE):
            return _NoAnswer(describe_os_error(exc))
        return TransportError(describe_os_error(exc))

    def send(self, request: bytes, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError("timed out", timeout=True)
        if len(request) > SMALL_REQUEST or self.conn.sock_timeout > remaining + TIMEOUT_SLACK_S:
            self._settimeout(remaining)
        try:
            self.conn.send(request)
        except TimeoutError:
            raise TransportError("timed out", timeout=True) from None
        except OSError as exc:
            raise self._error(exc) from None

    def _recv(self, deadline: float) -> bytes:
        """The next bytes by ``deadline``; b"" when the server closed the connection."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError("timed out", timeout=True)
            if self.conn.sock_timeout > remaining + TIMEOUT_SLACK_S:
                self._settimeout(remaining)
            try:
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                # Cut short by a timeout kept from a shorter deadline: wait the rest.
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._settimeout(remaining)
                continue
            except OSError as exc:
                raise self._error(exc) from None
            if data:
                self._any = True
            elif self.closed:
                raise TransportError("aborted")
            return data

    def read_head(self, deadline: float) -> None:
        """The status line and headers (interim 1xx answers skipped)."""
        raw = b""
        while True:
            end, body = _head_end(raw)
            if end < 0:
                if len(raw) > MAX_HEAD:
                    raise TransportError("bad HTTP answer (headers too long)")
                more = self._recv(deadline)
                if not more:
                    if not raw:
                        raise _NoAnswer("connection closed without an answer")
                    raise TransportError("connection closed mid-answer")
                raw += more
                continue
            lines = raw[:end].split(b"\n")
            raw = raw[body:]
            version, _, rest = lines[0].rstrip(b"\r").partition(b" ")
            try:
                status = int(rest[:3])
            except ValueError:
                status = 0
            if not version.startswith(b"HTTP/") or not 100 <= status <= 999:
                raise TransportError("bad HTTP answer (status line)")
            if status < 200 and status != 101:
                continue  # 100 Continue, 103 Early Hints: the answer follows
            break
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self.status = status
        self.content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        connection = headers.get(b"connection", b"").lower()
        keep_alive = b"keep-alive" in connection if version == b"HTTP/1.0" else True
        self.will_close = b"close" in connection or not keep_alive
        if status in (204, 304):
            self.framing = _DONE
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self.framing = _CHUNKED
            self.left = _SIZE_LINE
        elif b"content-length" in headers:
            try:
                self.left = int(headers[b"content-length"])
            except ValueError:
                raise TransportError("bad HTTP answer (Content-Length)") from None
            if self.left < 0:
                raise TransportError("bad HTTP answer (Content-Length)")
            self.framing = _LENGTH if self.left else _DONE
        else:
            self.framing = _UNTIL_CLOSE
            self.will_close = True
        self._raw = raw

    def read_body(self, deadline: float) -> bytes:
        """The next part of the body as sent (chunk framing removed); b"" at its end."""
        while True:
            framing = self.framing
            raw = self._raw
            if framing == _CHUNKED:
                piece = self._dechunk(raw)
                if piece or self.framing == _DONE:
                    return piece
            elif framing == _LENGTH:
                if raw:
                    piece = raw[: self.left]
                    self._raw = raw[len(piece) :]
                    self.left -= len(piece)
                    if not self.left:
                        self.framing = _DONE
                    return piece
            elif framing == _UNTIL_CLOSE:
                if raw:
                    self._raw = b""
                    return raw
            else:
                return b""
            more = self._recv(deadline)
            if not more:
                if framing != _UNTIL_CLOSE:
                    raise TransportError("connection closed mid-answer")
                self.framing = _DONE
                return b""
            self._raw = self._raw + more if self._raw else more

    def _dechunk(self, raw: bytes) -> bytes:
        """The data of every chunk complete or begun in ``raw``; the rest stays."""
        pieces: list[bytes] = []
        pos = 0
        end = len(raw)
        left = self.left
        while pos < end:
            if left > 0:
                piece = raw[pos : pos + left]
                pieces.append(piece)
                pos += len(piece)
                left -= len(piece)
                if not left:
                    left = _AFTER_DATA
                continue
            if left == _AFTER_DATA:
                if raw[pos] == 13:  # \r\n
                    if end - pos < 2:
                        break
                    if raw[pos + 1] != 10:
                        raise TransportError("bad HTTP answer (chunk end)")
                    pos += 2
                elif raw[pos] == 10:
                    pos += 1
                else:
                    raise TransportError("bad HTTP answer (chunk end)")
                left = _SIZE_LINE
                continue
            newline = raw.find(b"\n", pos)
            if newline < 0:
                if end - pos > MAX_HEAD:
                    raise TransportError("bad HTTP answer (chunk size line too long)")
                break
            line = raw[pos:newline]
            pos = newline + 1
            if left == _TRAILERS:
                if not line.strip():
                    self.framing = _DONE
                    break
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                raise TransportError("bad HTTP answer (chunk size)")
            left = size if size else _TRAILERS
        self.left = left
        self._raw = raw[pos:]
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def read_rest(self, deadline: float, limit: int | None = None) -> bytes:
        """The body up to its end (or once ``limit`` bytes came)."""
        pieces: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            piece = self.read_body(deadline)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces)

    @property
    def reusable(self) -> bool:
        """Read to its end, nothing after it, and the server keeps the connection."""
        return self.framing == _DONE and not self._raw and not self.will_close


class HttpEventStream:
    """Server-sent events from one answer, read under deadlines."""

    def __init__(self, transport: HttpTransport, key: tuple[str, int], answer: _Answer):
        self._transport = transport
        self._key = key
        self._answer = answer
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False
        self._buf = b""  # body bytes not yet split into lines
        self.is_sse = "text/event-stream" in answer.content_type

    def next_event(self, deadline: float) -> str | None:
        if self._ended:
            return None
        answer = self._answer
        if not self.is_sse:
            # A server that ignored "stream": the whole answer is one event.
            self._ended = True
            return answer.read_rest(deadline).decode("utf-8", "replace")
        data: list[bytes] = []
        buf = self._buf
        pos = 0
        while True:
            newline = buf.find(b"\n", pos)
            if newline >= 0:
                line = buf[pos:newline]
                pos = newline + 1
            else:
                rest = buf[pos:]
                if len(rest) > MAX_LINE:
                    raise TransportError("an event line over 16 MiB")
                piece = answer.read_body(deadline)
                if piece:
                    buf = rest + piece if rest else piece
                    pos = 0
                    continue
                self._ended = True  # the body ended; a last line without \n counts
                self._buf = b""
                if not rest:
                    return b"\n".join(data).decode("utf-8", "replace") if data else None
                line = rest
                buf = b""
                pos = 0
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    self._buf = buf[pos:]
                    return b"\n".join(data).decode("utf-8", "replace")
                continue
            if line[:5] == b"data:":
                value = line[5:]
            elif line[:1] == b":":
                continue  # an SSE comment (keep-alive ping)
            else:
                field, _, value = line.partition(b":")
                if field != b"data":
                    continue
            data.append(value[1:] if value[:1] == b" " else value)

    def finish(self, deadline: float) -> None:
        answer = self._answer
        try:
            while answer.read_body(deadline):
                pass
        except TransportError:
            self.abort()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if answer.reusable:
            self._transport._put(self._key, answer.conn)
        else:
            answer.conn.close()

    def abort(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        answer = self._answer
        answer.closed = True
        try:
            answer.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        answer.conn.close()


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
        self._idle: dict[tuple[str, int], list[tuple[float, _Connection]]] = {}
        # The request line and fixed headers per (host, port, path), built once.
        self._heads: dict[tuple[str, int, str], bytes] = {}
        self.connections_opened = 0  # for tests and benchmarks: keep-alive at work

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        now = time.monotonic()
        stale: list[_Connection] = []
        found = None
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                since, conn = idle.pop()
                if now - since < self._expiry and conn.sock is not None:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def _head(self, host: str, port: int, path: str) -> bytes:
        """The request up to the Content-Length value: the same for every request to
        one server and path. Host as ``http.client`` writes it."""
        head = self._heads.get((host, port, path))
        if head is None:
            name = f"[{host}]" if ":" in host else host
            netloc = name if port == http.client.HTTP_PORT else f"{name}:{port}"
            head = (
                f"POST {path} HTTP/1.1\r\n".encode("ascii")
                + b"Host: "
                + netloc.encode("ascii" if netloc.isascii() else "idna")
                + b"\r\n"
                b"Accept-Encoding: identity\r\n"
                b"Content-Type: application/json\r\n"
                b"Accept: text/event-stream, application/json\r\n"
                b"Content-Length: "
            )
            if len(self._heads) >= 1024:
                self._heads.clear()
            self._heads[(host, port, path)] = head
        return head

    def _connect(self, host: str, port: int, deadline: float) -> _Connection:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError("timed out", timeout=True)
        conn = _Connection(host, port, timeout=remaining)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise TransportError("timed out", timeout=True) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransportError(describe_os_error(exc)) from None
        conn.sock_timeout = remaining
        with self._lock:
            self.connections_opened += 1
        return conn

    def open(
        self, host: str, port: int, path: str, body: Mapping[str, Any], *, deadline: float
    ) -> HttpEventStream:
        key = (host, port)
        payload = json.dumps(body).encode()
        request = b"%s%d\r\n\r\n%s" % (self._head(host, port, path), len(payload), payload)
        while True:
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = self._connect(host, port, deadline)
            sock = conn.sock
            assert sock is not None
            answer = _Answer(conn, sock)
            try:
                answer.send(request, deadline)
                answer.read_head(deadline)
            except _NoAnswer:
                conn.close()
                if reused:
                    continue  # the server had closed it while idle: a fresh one
                raise
            except TransportError:
                conn.close()
                raise
            stream = HttpEventStream(self, key, answer)
            if 200 <= answer.status < 300:
                return stream
            try:
                raw = answer.read_rest(deadline, MAX_ERROR_BODY)
            except TransportError:
                raw = b""
            stream.abort()
            raise HttpStatusError(answer.status, _error_message(raw[:MAX_ERROR_BODY]))

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
