"""The client's own cost per request stays small next to the request itself.

Three things made it so, each kept honest here: answers are read straight from the
socket (every HTTP framing an SGLang server or a proxy may use must still read
right, split anywhere), the socket timeout is set only when a deadline needs it
(yet no deadline is overrun, and a pause a kept timeout cuts short is waited out),
and latency samples gather before a post instead of one post per request.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from ms_client._models import ServerInfo
from ms_client._reporter import SampleReporter
from ms_client._sglang import APIS, AttemptFailed, Request, stream_attempt
from ms_client._transport import (
    DaemonClient,
    HttpEventStream,
    HttpTransport,
    TransportError,
    _Answer,
)
from test_client_fakes import FakeSglang, wait_for

pytest_plugins = ["test_client_fakes"]  # the sglang, daemon and short_dir fixtures

# --- reading answers, split anywhere -------------------------------------------------


class _ScriptedSocket:
    """Hands out an answer in the pieces given, one per ``recv``."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = list(pieces)
        self.timeouts: list[float] = []

    def recv(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        assert len(piece) <= size
        return piece

    def settimeout(self, value: float) -> None:
        self.timeouts.append(value)

    def shutdown(self, how: int) -> None:
        pass


class _Conn:
    sock_timeout = 10.0

    def close(self) -> None:
        pass


def _answer(raw: bytes, step: int | None = None) -> _Answer:
    pieces = [raw] if step is None else [raw[i : i + step] for i in range(0, len(raw), step)]
    answer = _Answer(_Conn(), _ScriptedSocket(pieces))  # type: ignore[arg-type]
    answer.read_head(time.monotonic() + 5)
    return answer


def _events(answer: _Answer) -> list[str]:
    stream = HttpEventStream(None, ("127.0.0.1", 1), answer)  # type: ignore[arg-type]
    found = []
    while (event := stream.next_event(time.monotonic() + 5)) is not None:
        found.append(event)
    return found


def _chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
    return body + b"0\r\n" + trailers + b"\r\n"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
SSE_BODY = _chunked(
    b'data: {"a": 1}\n\n',
    b': ping\n\ndata: {"b":',
    b" 2}\r\n\r\nevent: x\ndata:line one\ndata\ndata: line three\n\n",
    b"data: [DONE]\n\n",
    trailers=b"X-Trailer: yes\r\n",
)
SSE_EVENTS = ['{"a": 1}', '{"b": 2}', "line one\n\nline three", "[DONE]"]


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 8, 13])
def test_a_chunked_event_stream_reads_the_same_however_it_is_split(step: int | None) -> None:
    answer = _answer(SSE_HEAD + SSE_BODY, step)
    assert (answer.status, answer.content_type) == (200, "text/event-stream")
    assert _events(answer) == SSE_EVENTS
    assert answer.reusable  # read to its end, trailers included, nothing left over


def test_bare_line_feeds_interim_answers_and_a_last_line_without_newline() -> None:
    head = b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Type: text/event-stream\n"
    body = b'data: {"a": 1}\n\ndata: end'
    raw = head + b"Content-Length: %d\n\n" % len(body) + body
    for step in (None, 1, 4):
        answer = _answer(raw, step)
        assert answer.status == 200
        assert _events(answer) == ['{"a": 1}', "end"]
        assert answer.reusable


def test_an_answer_without_length_ends_with_the_connection() -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"x": 1}'
    answer = _answer(raw, 3)
    assert _events(answer) == ['{"x": 1}']  # not streamed: the whole body is one event
    assert not answer.reusable


def test_keep_alive_follows_the_connection_header() -> None:
    ok = b"Content-Length: 2\r\n\r\n{}"
    assert _read_all(b"HTTP/1.1 200 OK\r\n" + ok).reusable
    assert not _read_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + ok).reusable
    assert not _read_all(b"HTTP/1.0 200 OK\r\n" + ok).reusable
    assert _read_all(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n" + ok).reusable
    # More bytes than the answer said: the connection cannot carry another request.
    assert not _read_all(b"HTTP/1.1 200 OK\r\n" + ok + b"junk").reusable


def _read_all(raw: bytes) -> _Answer:
    answer = _answer(raw)
    answer.read_rest(time.monotonic() + 5)
    return answer


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad HTTP answer"),
        (SSE_HEAD + b"zz\r\ndata\r\n", "bad HTTP answer (chunk size)"),
        (SSE_HEAD + b"4\r\ndataXY", "bad HTTP answer (chunk end)"),
        (SSE_HEAD + b"40\r\ndata: {}\n\n", "connection closed mid-answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "connection closed mid-answer"),
    ],
)
def test_garbled_or_cut_answers_fail_the_attempt(raw: bytes, message: str) -> None:
    with pytest.raises(TransportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _answer(raw).read_rest(time.monotonic() + 5)


# --- the socket timeout ------------------------------------------------------------


def _info(fake: FakeSglang) -> ServerInfo:
    return ServerInfo(name=fake.name, ip="127.0.0.1", port=fake.port, model_size="8B")


def _attempt(transport: HttpTransport, fake: FakeSglang, *, first: float, idle: float) -> Any:
    gen = stream_attempt(
        transport,
        _info(fake),
        APIS["chat"],
        Request(prompt="hi"),
        first_token_s=first,
        idle_s=idle,
        total_s=30,
    )
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_a_kept_alive_request_sets_no_socket_timeout(sglang, monkeypatch) -> None:
    fake = sglang("a")
    transport = HttpTransport()
    _attempt(transport, fake, first=2, idle=5)  # a connection to reuse
    calls: list[float | None] = []
    real = socket.socket.settimeout

    def counting(self: socket.socket, value: float | None) -> None:
        calls.append(value)
        real(self, value)

    monkeypatch.setattr(socket.socket, "settimeout", counting)
    for _ in range(5):
        assert _attempt(transport, fake, first=2, idle=5).text == "Hello, world!"
    assert calls == []
    assert transport.connections_opened == 1


def test_a_pause_longer_than_a_kept_timeout_is_waited_out(sglang) -> None:
    """The socket keeps the first request's short first-token timeout; a later answer
    pausing longer than that mid-answer, within its own idle timeout, still ends."""
    fake = sglang("a")
    transport = HttpTransport()
    _attempt(transport, fake, first=0.2, idle=5)
    fake.token_s = 0.5
    out = _attempt(transport, fake, first=2, idle=5)
    assert out.text == "Hello, world!"
    assert out.latency_s >= 1.5
    assert transport.connections_opened == 1


def test_a_kept_longer_timeout_does_not_stretch_a_first_token_deadline(sglang) -> None:
    fake = sglang("a")
    transport = HttpTransport()
    _attempt(transport, fake, first=5, idle=10)  # the socket keeps a 5 s timeout
    fake.mode = "hang"
    started = time.monotonic()
    with pytest.raises(AttemptFailed, match=r"no first token within 0\.30 s"):
        _attempt(transport, fake, first=0.3, idle=10)
    assert time.monotonic() - started < 1.0


def test_a_stall_after_a_pause_is_still_caught(sglang) -> None:
    fake = sglang("a")
    transport = HttpTransport()
    _attempt(transport, fake, first=0.1, idle=5)  # a short kept timeout
    fake.mode = "stall"
    started = time.monotonic()
    with pytest.raises(AttemptFailed, match=r"no data for 0.6 s mid-answer"):
        _attempt(transport, fake, first=2, idle=0.6)
    assert 0.55 < time.monotonic() - started < 1.5


# --- samples -------------------------------------------------------------------------


def test_samples_gather_into_one_post(daemon) -> None:
    fake = daemon([])
    reporter = SampleReporter(DaemonClient(fake.socket_path), gather_s=0.4)
    for i in range(20):
        reporter.report({"server": "a", "latency_s": i, "ok": True})
        time.sleep(0.005)
    time.sleep(0.1)
    assert fake.samples == []  # still gathering
    wait_for(lambda: len(fake.samples) == 20, what="the gathered samples")
    assert [q[1] for q in fake.queries] == ["/v1/samples"]


def test_a_failure_is_posted_at_once_with_what_gathered(daemon) -> None:
    fake = daemon([])
    reporter = SampleReporter(DaemonClient(fake.socket_path), gather_s=60)
    reporter.report({"server": "a", "latency_s": 0.1, "ok": True})
    reporter.report({"server": "a", "latency_s": 0.2, "ok": False, "error": "reset"})
    wait_for(lambda: len(fake.samples) == 2, what="the failure and the success before it")
    assert [q[1] for q in fake.queries] == ["/v1/samples"]


def test_flush_posts_at_once(daemon) -> None:
    fake = daemon([])
    reporter = SampleReporter(DaemonClient(fake.socket_path), gather_s=60)
    reporter.report({"server": "a", "latency_s": 0.1, "ok": True})
    started = time.monotonic()
    assert reporter.flush(5)
    assert time.monotonic() - started < 2
    assert len(fake.samples) == 1 and reporter.sent == 1


def test_a_program_that_exits_right_after_a_request_still_reports(daemon) -> None:
    fake = daemon([])
    script = textwrap.dedent(
        f"""
        from ms_client._reporter import reporter_for
        from ms_client._transport import DaemonClient
        reporter_for(DaemonClient({fake.socket_path!r})).report(
            {{"server": "a", "latency_s": 0.2, "ok": True}}
        )
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert [s["latency_s"] for s in fake.samples] == [0.2]
