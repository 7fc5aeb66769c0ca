"""ModelServer against a fake daemon (the protocol) and fake SGLang servers.

Shows that the client follows the daemon's candidate order, moves on at once after an
error or a hang, raises a 4xx at once, tries at most max_retry distinct servers,
excludes a server after repeated slowness only, and reports what it measured.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from ms_client import (
    Completion,
    ModelServer,
    NoServerAvailable,
    RequestRejected,
    StreamInterrupted,
)
from test_client_fakes import FakeDaemon, wait_for, write_config

pytest_plugins = ["test_client_fakes"]  # the sglang, daemon and short_dir fixtures

FAST = {"latency_s": 0.01, "ttft_s": 0.001, "latency_per_token_s": 0.0005}
GENEROUS = {"latency_s": 1.0, "ttft_s": 0.05, "latency_per_token_s": 0.1}


def client(fake: FakeDaemon, tmp_path: Path, **kwargs) -> ModelServer:
    settings = {k: kwargs.pop(k) for k in ("max_retry", "latency_growing_rate") if k in kwargs}
    path = write_config(tmp_path, [], socket_path=fake.socket_path, **settings)
    return ModelServer("8B", config=path, **kwargs)


def test_follows_the_daemons_order_and_asks_with_n_and_key(sglang, daemon, tmp_path) -> None:
    a, b, c = sglang("a"), sglang("b"), sglang("c")
    fake = daemon([b.server_object(), a.server_object(), c.server_object()])
    ms = client(fake, tmp_path, session_key="conv-7")
    result = ms.get_completion("hi", max_tokens=8)
    assert isinstance(result, Completion)
    assert (result.text, result.server, result.attempts) == ("Hello, world!", "b", 1)
    assert (result.prompt_tokens, result.completion_tokens) == (7, 4)
    assert len(b.requests) == 1 and not a.requests and not c.requests
    assert fake.best_queries() == [{"model_size": "8B", "n": "3", "key": "conv-7"}]
    assert ms.current_server == "b"


def test_an_error_moves_to_the_next_candidate_and_both_are_reported(
    sglang, daemon, tmp_path
) -> None:
    a, b = sglang("a"), sglang("b", mode="error")
    fake = daemon([b.server_object(), a.server_object()])
    ms = client(fake, tmp_path, spread=False)
    result = ms.get_completion("hi")
    assert (result.server, result.attempts) == ("a", 2)
    ms.close()  # flushes the reporter
    samples = wait_for(lambda: len(fake.samples) == 2 and fake.samples, what="two samples")
    by_server = {s["server"]: s for s in samples}
    assert set(by_server["a"]) == {
        "server",
        "latency_s",
        "ok",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "ttft_s",
    }
    assert by_server["b"]["ok"] is False
    assert by_server["b"]["error"] == "HTTP 500: simulated failure"
    assert by_server["a"]["ok"] is True and by_server["a"]["error"] is None
    assert by_server["a"]["completion_tokens"] == 4 and by_server["a"]["ttft_s"] > 0


def test_a_4xx_is_raised_at_once_without_trying_elsewhere(sglang, daemon, tmp_path) -> None:
    a, b = sglang("a"), sglang("b", mode="reject")
    ms = client(daemon([b.server_object(), a.server_object()]), tmp_path, spread=False)
    with pytest.raises(RequestRejected, match=r"b \(127\.0\.0\.1:\d+\) rejected .* HTTP 400"):
        ms.get_completion("hi", max_tokens=10**9)
    assert not a.requests


def test_at_most_max_retry_distinct_servers_then_one_message(sglang, daemon, tmp_path) -> None:
    a = sglang("a", mode="error")
    b = sglang("b")
    b.stop()
    c = sglang("c", mode="hang")
    d = sglang("d")
    objs = [x.server_object(**FAST) for x in (a, b, c, d)]
    ms = client(daemon(objs), tmp_path, max_retry=3, spread=False)
    started = time.monotonic()
    with pytest.raises(NoServerAvailable) as caught:
        ms.get_completion("hi")
    assert time.monotonic() - started < 2.0
    err = caught.value
    assert [x.server for x in err.attempts] == ["a", "b", "c"]
    message = str(err)
    assert message.startswith("no 8B server could answer (3 attempts): ")
    assert f"a (127.0.0.1:{a.port}): HTTP 500: simulated failure" in message
    assert f"b (127.0.0.1:{b.port}): connection refused" in message
    assert f"c (127.0.0.1:{c.port}): no first token within 0.50 s" in message
    assert "ms-client servers" in message
    assert not d.requests


def test_the_daemons_answer_is_reused_for_a_moment(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    fake = daemon([a.server_object()])
    ms = client(fake, tmp_path)
    for _ in range(5):
        ms.get_completion("hi")
    assert len(fake.best_queries()) == 1
    assert len(a.requests) == 5


def test_a_hung_server_costs_the_first_token_deadline_not_the_timeout(
    sglang, daemon, tmp_path
) -> None:
    a, b = sglang("a", mode="hang"), sglang("b")
    ms = client(daemon([a.server_object(**FAST), b.server_object()]), tmp_path)
    started = time.monotonic()
    result = ms.get_completion("hi")
    assert time.monotonic() - started < 1.5
    assert (result.server, result.attempts) == ("b", 2)


def test_a_server_that_failed_is_tried_last_next_time(sglang, daemon, tmp_path) -> None:
    a, b = sglang("a"), sglang("b")
    a.stop()
    ms = client(daemon([a.server_object(), b.server_object()]), tmp_path, spread=False)
    assert ms.get_completion("hi").attempts == 2
    assert ms.get_completion("hi").attempts == 1


def test_repeated_slowness_asks_the_daemon_to_exclude_the_server(sglang, daemon, tmp_path) -> None:
    slow = sglang("a", token_s=0.02)  # 0.06 s where the daemon expects ~0.003 s
    other = sglang("b")
    fake = daemon([slow.server_object(**FAST), other.server_object(**GENEROUS)])
    ms = client(fake, tmp_path)
    served = [ms.get_completion("hi").server for _ in range(3)]
    assert served == ["a", "a", "a"]
    assert all("exclude" not in q for q in fake.best_queries())
    result = ms.get_completion("hi")
    assert result.server == "b"
    assert fake.best_queries()[-1]["exclude"] == "a"
    assert ms.current_server == "b"


def test_one_slow_request_does_not_move_the_client(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    b = sglang("b")
    usual = {"latency_s": 0.3, "ttft_s": 0.05, "latency_per_token_s": 0.02}
    fake = daemon([a.server_object(**usual), b.server_object(**usual)])
    ms = client(fake, tmp_path, spread=False)
    ms.get_completion("hi")
    a.token_s = 0.1  # one outlier: 0.3 s where 2 x (0.05 + 4 x 0.02) = 0.26 s is allowed
    assert ms.get_completion("hi").latency_s > 0.26
    a.token_s = 0.0
    served = [ms.get_completion("hi").server for _ in range(4)]
    assert served == ["a"] * 4
    assert all("exclude" not in q for q in fake.best_queries())
    assert ms.current_server == "a"


def test_when_only_the_slow_server_is_left_it_is_still_used(sglang, daemon, tmp_path) -> None:
    slow = sglang("a", token_s=0.02)
    fake = daemon([slow.server_object(**FAST)])
    ms = client(fake, tmp_path)
    for _ in range(4):
        assert ms.get_completion("hi").server == "a"
    queries = fake.best_queries()
    assert queries[-2]["exclude"] == "a" and "exclude" not in queries[-1]


def test_stream_completion_yields_text_then_the_completion(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    ms = client(daemon([a.server_object()]), tmp_path)
    stream = ms.stream_completion("hi", system="be brief")
    assert stream.completion is None
    assert list(stream) == ["Hello", ",", " world", "!"]
    assert stream.completion is not None
    assert (stream.completion.text, stream.completion.server) == ("Hello, world!", "a")
    assert a.requests[0][1]["messages"][0] == {"role": "system", "content": "be brief"}


def test_a_stream_broken_after_text_cannot_be_retried(sglang, daemon, tmp_path) -> None:
    a, b = sglang("a", mode="stall"), sglang("b")
    fake = daemon([a.server_object(), b.server_object()])
    ms = client(fake, tmp_path, idle_timeout_s=0.3, spread=False)
    got = []
    with pytest.raises(StreamInterrupted, match="failed mid-answer") as caught:
        for chunk in ms.stream_completion("hi"):
            got.append(chunk)
    assert got == ["Hello"] and caught.value.partial_text == "Hello"
    assert not b.requests
    # The whole-answer call has shown nothing yet: it retries elsewhere.
    fresh = client(fake, tmp_path, idle_timeout_s=0.3, spread=False)
    result = fresh.get_completion("hi")
    assert (result.server, result.attempts, result.text) == ("b", 2, "Hello, world!")


def test_the_daemon_having_no_ready_server_is_no_server_available(daemon, tmp_path) -> None:
    ms = client(daemon([]), tmp_path)
    with pytest.raises(NoServerAvailable, match="says: no ready 8B server") as caught:
        ms.get_completion("hi")
    assert caught.value.attempts == []


def test_generate_api_and_its_argument_checks(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    ms = client(daemon([a.server_object()]), tmp_path, api="generate")
    assert ms.get_completion("hi", max_tokens=4).text == "Hello, world!"
    assert a.requests[0][0] == "/generate"
    with pytest.raises(ValueError, match="api='chat'"):
        ms.get_completion(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="prompt or messages"):
        ms.get_completion()
    with pytest.raises(ValueError, match="api must be one of"):
        ModelServer(api="completions")


def test_one_object_serves_many_threads(sglang, daemon, tmp_path) -> None:
    a = sglang("a", token_s=0.002)
    # A first-token deadline of seconds: eight threads on a busy CI machine are slow.
    fake = daemon([a.server_object(latency_s=2.0, ttft_s=1.0, latency_per_token_s=0.2)])
    ms = client(fake, tmp_path)
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(ms.get_completion("hi").text)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and results == ["Hello, world!"] * 40
    assert len(a.requests) == 40
    assert a.connections <= 8  # kept alive and reused
    ms.close()
    wait_for(lambda: len(fake.samples) == 40, what="40 samples reported")


# --- callers without a session key ----------------------------------------------------


def test_each_instance_and_thread_is_a_caller_with_its_own_key(sglang, daemon, tmp_path) -> None:
    """Without a session key, every instance and thread asks the daemon with a key of
    its own: each caller keeps a warm server while callers spread over the fleet
    (the daemon's bounded-load hashing), instead of all taking the same "best" one."""
    a = sglang("a")
    fake = daemon([a.server_object()])
    one, two = client(fake, tmp_path), client(fake, tmp_path)
    one.get_completion("hi", max_tokens=4)
    time.sleep(1.1)  # past the candidate cache
    one.get_completion("hi", max_tokens=4)
    two.get_completion("hi", max_tokens=4)
    worker = threading.Thread(target=lambda: one.get_completion("hi", max_tokens=4))
    worker.start()
    worker.join(10)
    keys = [q.get("key") for q in fake.best_queries()]
    assert len(keys) == 4 and all(keys), keys
    assert keys[0] == keys[1]  # the same caller keeps its key
    assert len({keys[1], keys[2], keys[3]}) == 3  # another instance, another thread
    assert {q["n"] for q in fake.best_queries()} == {"3"}


def test_spread_false_asks_for_the_daemons_order(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    fake = daemon([a.server_object()])
    client(fake, tmp_path, spread=False).get_completion("hi", max_tokens=4)
    assert "key" not in fake.best_queries()[0]
