"""The transports: one streamed SGLang request under deadlines, the daemon's socket,
and the background sample reporter."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

import pytest
from ms_client import RequestRejected
from ms_client._exceptions import DaemonError, DaemonUnavailable
from ms_client._fallback import drain
from ms_client._models import ServerInfo
from ms_client._reporter import SampleReporter
from ms_client._sglang import APIS, AttemptFailed, Request, stream_attempt
from ms_client._transport import DaemonClient, HttpTransport
from test_client_fakes import FakeDaemon, FakeSglang, wait_for

pytest_plugins = ["test_client_fakes"]  # the sglang, daemon and short_dir fixtures


def info(fake: FakeSglang) -> ServerInfo:
    return ServerInfo(name=fake.name, ip="127.0.0.1", port=fake.port, model_size="8B")


def attempt(transport, fake, api="chat", *, first=2.0, idle=2.0, total=10.0, **req):
    req.setdefault("prompt", "hi")
    fields = {"prompt", "messages", "system", "max_tokens", "temperature"}
    sampling = {k: req.pop(k) for k in list(req) if k not in fields}
    gen = stream_attempt(
        transport,
        info(fake),
        APIS[api],
        Request(**req, sampling=sampling),
        first_token_s=first,
        idle_s=idle,
        total_s=total,
    )
    chunks = []
    while True:
        try:
            chunks.append(next(gen))
        except StopIteration as stop:
            return chunks, stop.value


def test_chat_stream_yields_deltas_and_usage(sglang) -> None:
    fake = sglang("a", ttft_s=0.05)
    chunks, out = attempt(HttpTransport(), fake, max_tokens=8, temperature=0.5, top_p=0.9)
    assert chunks == ["Hello", ",", " world", "!"]
    assert out.text == "Hello, world!"
    assert (out.prompt_tokens, out.completion_tokens) == (7, 4)
    assert out.ttft_s >= 0.05 and out.latency_s >= out.ttft_s
    path, body = fake.requests[0]
    assert path == "/v1/chat/completions"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (8, 0.5, 0.9)


def test_chat_body_puts_system_first_and_keeps_messages(sglang) -> None:
    fake = sglang("a")
    history = ({"role": "user", "content": "1"}, {"role": "assistant", "content": "2"})
    attempt(HttpTransport(), fake, prompt=None, messages=history, system="be brief")
    messages = fake.requests[0][1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_generate_stream_turns_cumulative_text_into_deltas(sglang) -> None:
    fake = sglang("a")
    chunks, out = attempt(HttpTransport(), fake, "generate", max_tokens=5, stream=False)
    assert chunks == ["Hello", ",", " world", "!"]
    assert out.completion_tokens == 4
    path, body = fake.requests[0]
    assert path == "/generate"
    assert body["stream"] is True  # the caller cannot turn streaming off
    assert body["sampling_params"] == {"max_new_tokens": 5}


def test_a_server_that_ignores_stream_still_answers(sglang) -> None:
    fake = sglang("a", mode="nostream")
    for api in ("chat", "generate"):
        chunks, out = attempt(HttpTransport(), fake, api)
        assert out.text == "Hello, world!" and out.completion_tokens == 4


def test_keep_alive_reuses_one_connection(sglang) -> None:
    fake = sglang("a")
    transport = HttpTransport()
    for _ in range(5):
        attempt(transport, fake)
    assert transport.connections_opened == 1
    assert fake.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_silently(sglang) -> None:
    fake = sglang("a", mode="close-idle")
    transport = HttpTransport()
    attempt(transport, fake)
    wait_for(lambda: fake.connections == 1 and not fake._httpd.open_sockets, what="closed")
    _, out = attempt(transport, fake)
    assert out.text == "Hello, world!"
    assert transport.connections_opened == 2


def test_refused(sglang) -> None:
    fake = sglang("a")
    fake.stop()
    with pytest.raises(AttemptFailed, match="connection refused"):
        attempt(HttpTransport(), fake)


def test_hang_misses_the_first_token_deadline_quickly(sglang) -> None:
    fake = sglang("a", mode="hang")
    started = time.monotonic()
    with pytest.raises(AttemptFailed, match=r"no first token within 0\.30 s") as caught:
        attempt(HttpTransport(), fake, first=0.3)
    assert caught.value.first_token_miss
    assert time.monotonic() - started < 1.5


def test_a_slow_first_token_is_a_miss_even_after_headers(sglang) -> None:
    fake = sglang("a", ttft_s=1.0)
    with pytest.raises(AttemptFailed, match="no first token") as caught:
        attempt(HttpTransport(), fake, first=0.3)
    assert caught.value.first_token_miss


def test_a_stall_mid_answer_hits_the_idle_timeout(sglang) -> None:
    fake = sglang("a", mode="stall")
    with pytest.raises(AttemptFailed, match=r"no data for 0.3 s mid-answer") as caught:
        attempt(HttpTransport(), fake, idle=0.3)
    assert caught.value.partial == "Hello"
    assert not caught.value.first_token_miss


def test_the_whole_request_is_bounded(sglang) -> None:
    fake = sglang("a", token_s=0.2)
    with pytest.raises(AttemptFailed, match="request_timeout_s"):
        attempt(HttpTransport(), fake, idle=5, total=0.3)


def test_4xx_is_rejected_and_5xx_is_a_failed_attempt(sglang) -> None:
    fake = sglang("a", mode="reject")
    with pytest.raises(RequestRejected, match="HTTP 400: max_tokens is too large") as caught:
        attempt(HttpTransport(), fake)
    assert caught.value.server == "a" and caught.value.status == 400
    fake.mode = "error"
    with pytest.raises(AttemptFailed, match="HTTP 500: simulated failure"):
        attempt(HttpTransport(), fake)


@pytest.mark.parametrize(
    "mode, message",
    [
        ("midstream-error", "error mid-answer: out of memory"),
        ("truncate", "connection closed before the answer ended"),
        ("close", "connection closed without an answer"),
    ],
)
def test_broken_answers_are_failed_attempts(sglang, mode: str, message: str) -> None:
    fake = sglang("a", mode=mode)
    with pytest.raises(AttemptFailed, match=message):
        attempt(HttpTransport(), fake)


def test_closing_the_stream_early_drops_the_connection(sglang) -> None:
    fake = sglang("a", token_s=0.05)
    transport = HttpTransport()
    gen = stream_attempt(
        transport,
        info(fake),
        APIS["chat"],
        Request(prompt="hi"),
        first_token_s=2,
        idle_s=2,
        total_s=10,
    )
    assert next(gen) == "Hello"
    gen.close()
    wait_for(lambda: not fake._httpd.open_sockets, what="the server saw the connection close")
    assert (
        drain(
            stream_attempt(
                transport,
                info(fake),
                APIS["chat"],
                Request(prompt="hi"),
                first_token_s=2,
                idle_s=2,
                total_s=10,
            )
        ).text
        == "Hello, world!"
    )
    assert transport.connections_opened == 2


def test_concurrent_requests_get_their_own_connections(sglang) -> None:
    fake = sglang("a", token_s=0.02)
    transport = HttpTransport()
    results: list[str] = []

    def run() -> None:
        results.append(attempt(transport, fake)[1].text)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["Hello, world!"] * 6
    assert transport.connections_opened == 6


# --- the daemon ---------------------------------------------------------------------


def test_daemon_client_missing_socket(tmp_path: Path) -> None:
    client = DaemonClient(str(tmp_path / "none.sock"))
    with pytest.raises(DaemonUnavailable, match="no socket file there") as caught:
        client.sizes()
    assert caught.value.socket_path.endswith("none.sock")


def test_daemon_client_refused(short_dir: Path) -> None:
    path = str(short_dir / "dead.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.close()  # the file stays, nobody listens: a daemon that died
    with pytest.raises(DaemonUnavailable, match="connection refused"):
        DaemonClient(path).servers()


def test_daemon_client_that_never_answers_times_out(short_dir: Path) -> None:
    path = str(short_dir / "hung.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(8)  # accepts into the backlog, never answers
    try:
        with pytest.raises(DaemonUnavailable, match="no answer in time"):
            DaemonClient(path, timeout_s=0.2).sizes()
    finally:
        sock.close()


def test_daemon_client_best_and_errors(daemon, sglang) -> None:
    a, b = sglang("a"), sglang("b")
    fake: FakeDaemon = daemon([a.server_object(), b.server_object()])
    client = DaemonClient(fake.socket_path)
    found = client.best("8B", n=3, key="conv-1", exclude=["b"])
    assert [s["name"] for s in found] == ["a"]
    assert fake.best_queries()[-1] == {
        "model_size": "8B",
        "n": "3",
        "key": "conv-1",
        "exclude": "b",
    }
    with pytest.raises(DaemonError) as caught:
        client.best("70B", n=3)
    assert caught.value.code == "no_ready_server" and caught.value.status == 503
    fake.override = lambda *args: (500, b"Internal Server Error")
    with pytest.raises(DaemonUnavailable, match="answered HTTP 500"):
        client.servers()
    fake.override = lambda *args: (200, b"not json")
    with pytest.raises(DaemonUnavailable, match="no JSON object"):
        client.sizes()


# --- reporting ----------------------------------------------------------------------


def test_reporter_batches_samples_to_the_daemon(daemon) -> None:
    fake = daemon([])
    reporter = SampleReporter(DaemonClient(fake.socket_path))
    for i in range(50):
        reporter.report({"server": "a", "latency_s": i, "ok": True})
    assert reporter.flush(5)
    assert [s["latency_s"] for s in fake.samples] == list(range(50))
    posts = [q for q in fake.queries if q[1] == "/v1/samples"]
    assert len(posts) < 50  # batched


def test_reporter_never_blocks_and_drops_when_full(short_dir: Path) -> None:
    path = str(short_dir / "hung.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(8)  # a daemon that never answers
    try:
        reporter = SampleReporter(DaemonClient(path, timeout_s=0.5), maxsize=10)
        started = time.monotonic()
        for _ in range(1000):
            reporter.report({"server": "a", "latency_s": 0.1, "ok": True})
        assert time.monotonic() - started < 0.5
        assert reporter.dropped >= 900
        assert reporter.flush(5)
        assert reporter.sent == 0
    finally:
        sock.close()


def test_a_request_is_one_write_and_few_timeout_changes(sglang, monkeypatch) -> None:
    """The client's own cost per request: headers and body leave in one write, and the
    socket timeout is set again only when the deadline moves, not once per line."""
    fake = sglang("a")
    transport = HttpTransport()
    attempt(transport, fake)  # a connection to reuse
    sends: list[int] = []
    timeouts: list[float | None] = []
    real_send = http.client.HTTPConnection.send
    real_settimeout = socket.socket.settimeout

    def counting_send(self, data):
        sends.append(len(data))
        return real_send(self, data)

    def counting_settimeout(self, value):
        timeouts.append(value)
        return real_settimeout(self, value)

    monkeypatch.setattr(http.client.HTTPConnection, "send", counting_send)
    monkeypatch.setattr(socket.socket, "settimeout", counting_settimeout)
    chunks, _ = attempt(transport, fake)
    assert "".join(chunks) == "Hello, world!"
    assert len(sends) == 1, sends
    assert len(timeouts) <= 4, timeouts
