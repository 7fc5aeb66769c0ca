"""Issue 10: reasoning models, tool calls, /generate's streaming setting, stream errors.

A reasoning model streams a role-only first delta, then ``reasoning_content`` for as
long as it thinks, then ``content``; with tools the answer may be only ``tool_calls``.
Every delta is progress for the first-token deadline, the reasoning and the merged tool
calls come back in the Completion, and the text iterator still yields only content.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from ms_client import ModelServer, NoServerAvailable, RequestRejected
from ms_client._models import ServerInfo
from ms_client._sglang import _ChatParser, _GenerateParser
from ms_client.cli import cli
from test_client_fakes import TOKENS, FakeDaemon, wait_for, write_config

pytest_plugins = ["simtools", "test_client_fakes"]  # sim_factory; sglang, daemon, short_dir

# A tight first-token deadline: the 0.5 s floor (4 x 1 ms is less).
FAST = {"latency_s": 0.01, "ttft_s": 0.001, "latency_per_token_s": 0.0005}

THOUGHTS = ["The user", " greets me", ";", " greet back."]

WEATHER_PIECES = [
    {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    },
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
    {
        "index": 1,
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_time", "arguments": "{}"},
    },
]
WEATHER_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def client(fake: FakeDaemon, tmp_path: Path, **kwargs) -> ModelServer:
    path = write_config(tmp_path, [], socket_path=fake.socket_path)
    return ModelServer("8B", config=path, **kwargs)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# --- reasoning ----------------------------------------------------------------------


def test_a_reasoning_stream_longer_than_the_first_token_deadline_succeeds(
    sglang, daemon, tmp_path
) -> None:
    # The answer's text starts after about 0.9 s; the first-token deadline is 0.5 s.
    a = sglang("a", role_chunk=True, reasoning=THOUGHTS, think_s=0.3)
    b = sglang("b")
    fake = daemon([a.server_object(**FAST), b.server_object()])
    ms = client(fake, tmp_path)
    result = ms.get_completion("hi")
    assert (result.server, result.attempts) == ("a", 1)
    assert result.text == "Hello, world!"
    assert result.reasoning == "The user greets me; greet back."
    assert result.tool_calls is None
    assert result.latency_s >= 0.9
    # Time to first token is time to the server's first output: the role-only delta.
    assert result.ttft_s is not None and result.ttft_s < 0.5
    assert result.completion_tokens == 8
    assert not b.requests
    ms.close()
    sample = wait_for(lambda: fake.samples and fake.samples[0], what="a sample")
    assert sample["ok"] is True and sample["ttft_s"] < 0.5


def test_a_role_only_first_chunk_then_a_long_silent_think(sglang, daemon, tmp_path) -> None:
    # Nothing for 0.8 s after the role, longer than the 0.5 s first-token deadline.
    a = sglang("a", role_chunk=True, reasoning=["Hmm."], think_s=0.8)
    ms = client(daemon([a.server_object(**FAST)]), tmp_path)
    stream = ms.stream_completion("hi")
    assert list(stream) == TOKENS  # content only, as before
    assert stream.completion is not None
    assert (stream.completion.text, stream.completion.reasoning) == ("Hello, world!", "Hmm.")
    assert stream.completion.attempts == 1
    assert stream.completion.ttft_s is not None and stream.completion.ttft_s < 0.5


def test_reasoning_without_a_role_chunk_is_progress_too(sglang, daemon, tmp_path) -> None:
    a = sglang("a", reasoning=THOUGHTS, think_s=0.25)
    result = client(daemon([a.server_object(**FAST)]), tmp_path).get_completion("hi")
    assert (result.attempts, result.text) == (1, "Hello, world!")
    assert result.reasoning == "".join(THOUGHTS)


def test_a_server_with_no_output_at_all_still_misses_the_deadline(sglang, daemon, tmp_path) -> None:
    a = sglang("a", ttft_s=1.5, role_chunk=True, reasoning=THOUGHTS)
    b = sglang("b")
    fake = daemon([a.server_object(**FAST), b.server_object()])
    result = client(fake, tmp_path).get_completion("hi")
    assert (result.server, result.attempts, result.reasoning) == ("b", 2, None)


def test_a_plain_answer_has_no_reasoning_and_no_tool_calls(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    result = client(daemon([a.server_object()]), tmp_path).get_completion("hi")
    assert (result.reasoning, result.tool_calls) == (None, None)
    assert result.to_dict()["reasoning"] is None and result.to_dict()["tool_calls"] is None


# --- tool calls -------------------------------------------------------------------------


def test_tool_call_pieces_are_merged_per_index(sglang, daemon, tmp_path) -> None:
    a = sglang("a", tokens=[], role_chunk=True, tool_calls=WEATHER_PIECES, token_s=0.2)
    ms = client(daemon([a.server_object(**FAST)]), tmp_path)
    result = ms.get_completion("Weather in Paris?", tools=TOOLS, tool_choice="auto")
    assert result.text == ""
    assert result.tool_calls == WEATHER_CALLS
    assert result.reasoning is None
    assert result.to_dict()["tool_calls"] == WEATHER_CALLS
    body = a.requests[0][1]
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto"


def test_a_stream_of_only_tool_calls_yields_no_text(sglang, daemon, tmp_path) -> None:
    a = sglang("a", tokens=[], reasoning=["Need the weather."], tool_calls=WEATHER_PIECES)
    ms = client(daemon([a.server_object()]), tmp_path)
    stream = ms.stream_completion("Weather in Paris?", tools=TOOLS)
    assert list(stream) == []
    assert stream.completion is not None
    assert stream.completion.tool_calls == WEATHER_CALLS
    assert stream.completion.reasoning == "Need the weather."


def test_a_whole_answer_carries_reasoning_and_tool_calls(sglang, daemon, tmp_path) -> None:
    whole = [dict(call, function=dict(call["function"])) for call in WEATHER_CALLS]
    a = sglang("a", mode="nostream", tokens=[], reasoning=["Think."], whole_tool_calls=whole)
    result = client(daemon([a.server_object()]), tmp_path).get_completion("hi", tools=TOOLS)
    assert (result.text, result.reasoning) == ("", "Think.")
    assert result.tool_calls == WEATHER_CALLS


def test_tools_need_the_chat_api(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    fake = daemon([a.server_object()])
    with pytest.raises(ValueError, match="need api='chat'"):
        client(fake, tmp_path, api="generate").get_completion("hi", tools=TOOLS)
    with pytest.raises(ValueError, match="tools must be dicts"):
        client(fake, tmp_path).get_completion("hi", tools=["x"])
    assert not a.requests


def test_chat_parser_merges_tool_calls_like_openai() -> None:
    parser = _ChatParser()

    def feed(delta: dict) -> tuple[str, bool]:
        return parser.feed(json.dumps({"choices": [{"index": 0, "delta": delta}]}))

    assert feed({"role": "assistant", "content": ""}) == ("", True)
    assert parser.pieces == 0  # the role is progress, not generated output
    feed({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "["}}]})
    feed({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f"}}]})
    feed({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "1]"}}]})
    feed({"tool_calls": [{"index": 0, "function": {"arguments": {"x": 1}}}]})
    assert feed({"content": None, "tool_calls": None}) == ("", False)
    assert parser.tool_calls == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "[1]"}},
    ]
    assert parser.pieces == 4 and parser.reasoning is None


# --- the CLI ----------------------------------------------------------------------------


def test_complete_json_shows_reasoning_and_tool_calls(sglang, daemon, tmp_path) -> None:
    a = sglang("a", role_chunk=True, reasoning=THOUGHTS, tool_calls=WEATHER_PIECES)
    config = str(write_config(tmp_path, [], socket_path=daemon([a.server_object()]).socket_path))
    result = run("complete", "hi", "--json", "--config", config)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == "Hello, world!"
    assert answer["reasoning"] == "The user greets me; greet back."
    assert answer["tool_calls"] == WEATHER_CALLS


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_complete_prints_tool_calls_one_per_line(sglang, daemon, tmp_path, stream) -> None:
    a = sglang("a", tokens=[], role_chunk=True, reasoning=THOUGHTS, tool_calls=WEATHER_PIECES)
    config = str(write_config(tmp_path, [], socket_path=daemon([a.server_object()]).socket_path))
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": TOOLS}))
    options = ["--tools", str(tools), "--tool-choice", "get_weather", "--config", config]
    result = run("complete", "weather?", stream, *options)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ('tool call: get_weather({"city": "Paris"})\ntool call: get_time({})\n')
    body = a.requests[0][1]
    assert body["tools"] == TOOLS
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_complete_prints_text_then_tool_calls(sglang, daemon, tmp_path) -> None:
    a = sglang("a", tokens=["Checking", "."], tool_calls=WEATHER_PIECES[:3])
    config = str(write_config(tmp_path, [], socket_path=daemon([a.server_object()]).socket_path))
    result = run("complete", "weather?", "--config", config)
    assert result.stdout == 'Checking.\ntool call: get_weather({"city": "Paris"})\n'


def test_complete_refuses_a_bad_tools_file(tmp_path) -> None:
    config = str(write_config(tmp_path, []))
    bad = tmp_path / "tools.json"
    bad.write_text('{"type": "function"}')
    result = run("complete", "hi", "--tools", str(bad), "--config", config)
    assert result.exit_code == 2
    assert "must hold a list of tools" in result.stderr
    missing = run("complete", "hi", "--tools", str(tmp_path / "nope.json"), "--config", config)
    assert missing.exit_code == 2 and "cannot read" in missing.stderr


def test_complete_help_documents_reasoning_and_tool_calls() -> None:
    text = run("complete", "--help").stdout
    assert "reasoning" in text and "tool call: NAME(ARGUMENTS)" in text


# --- /generate: incremental or cumulative ---------------------------------------------------


@pytest.mark.parametrize(
    "known, incremental, tokens, expected",
    [
        (None, False, TOKENS, "Hello, world!"),
        (None, True, TOKENS, "Hello, world!"),
        (False, False, TOKENS, "Hello, world!"),
        (True, True, TOKENS, "Hello, world!"),
        (False, False, ["ab", "ab", "c"], "ababc"),
        (True, True, ["ab", "ab", "c"], "ababc"),
        # Unknown setting: a new piece that repeats the whole text so far passes for
        # cumulative text. The known setting is what avoids this guess.
        (None, True, ["ab", "ab", "c"], "abc"),
    ],
)
def test_generate_reads_chunks_by_the_servers_setting(
    sglang, daemon, tmp_path, known, incremental, tokens, expected
) -> None:
    a = sglang("a", tokens=tokens, incremental=incremental)
    obj = a.server_object(incremental_streaming_output=known, sglang_version="0.5.4")
    ms = client(daemon([obj]), tmp_path, api="generate")
    assert ms.get_completion("hi").text == expected


def test_generate_pieces_stream_as_they_come_when_incremental(sglang, daemon, tmp_path) -> None:
    a = sglang("a", tokens=["ab", "ab", "c"], incremental=True)
    obj = a.server_object(incremental_streaming_output=True)
    ms = client(daemon([obj]), tmp_path, api="generate")
    assert list(ms.stream_completion("hi")) == ["ab", "ab", "c"]


def test_generate_parser_counts_token_progress_without_text() -> None:
    parser = _GenerateParser(incremental=None)

    def feed(text: str, tokens: int) -> tuple[str, bool]:
        return parser.feed(json.dumps({"text": text, "meta_info": {"completion_tokens": tokens}}))

    assert feed("", 1) == ("", True)  # a token, not yet a whole character
    assert feed("", 1) == ("", False)
    assert feed("Hi", 2) == ("Hi", True)
    assert parser.pieces == 1


def test_server_info_reads_the_streaming_setting_and_version() -> None:
    base = {"name": "a", "ip": "10.0.0.5", "port": 30000, "model_size": "8B"}
    info = ServerInfo.from_daemon(
        {**base, "incremental_streaming_output": True, "sglang_version": "0.5.4"}
    )
    assert (info.incremental_streaming_output, info.sglang_version) == (True, "0.5.4")
    off = ServerInfo.from_daemon({**base, "incremental_streaming_output": False})
    assert off.incremental_streaming_output is False
    unknown = ServerInfo.from_daemon(base)
    assert (unknown.incremental_streaming_output, unknown.sglang_version) == (None, None)
    odd = ServerInfo.from_daemon(
        {**base, "incremental_streaming_output": "yes", "sglang_version": 5}
    )
    assert (odd.incremental_streaming_output, odd.sglang_version) == (None, None)
    made = ServerInfo(name="b", ip="10.0.0.6", port=1, model_size="8B").as_api_object()
    assert made["incremental_streaming_output"] is None and made["sglang_version"] is None


# --- errors after the 200 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk",
    [
        {"error": {"object": "error", "message": "scheduler failed", "code": 500}},
        {"object": "error", "message": "scheduler failed", "type": "InternalError", "code": 500},
        {"error": "scheduler failed"},
    ],
    ids=["sglang", "flat", "bare"],
)
def test_an_error_chunk_after_the_200_moves_to_the_next_server(
    sglang, daemon, tmp_path, chunk
) -> None:
    a = sglang("a", mode="error-chunk", error_chunk=chunk)
    b = sglang("b")
    fake = daemon([a.server_object(), b.server_object()])
    result = client(fake, tmp_path, spread=False).get_completion("hi")
    assert (result.server, result.attempts, result.text) == ("b", 2, "Hello, world!")
    fake.servers = [a.server_object()]
    alone = client(fake, tmp_path)
    with pytest.raises(NoServerAvailable) as caught:
        alone.get_completion("hi")
    assert caught.value.attempts[0].error == "error before any output: scheduler failed"


def test_a_4xx_error_chunk_is_the_callers_fault(sglang, daemon, tmp_path) -> None:
    chunk = {"object": "error", "message": "input too long", "code": 400}
    a = sglang("a", mode="error-chunk", error_chunk=chunk)
    b = sglang("b")
    ms = client(daemon([a.server_object(), b.server_object()]), tmp_path, spread=False)
    with pytest.raises(RequestRejected, match="HTTP 400: input too long"):
        ms.get_completion("hi")
    assert not b.requests


# --- against the simulator ----------------------------------------------------------------


@pytest.mark.parametrize("sglang_flags", [[], ["--tool-call-parser", "qwen25"]])
def test_a_simulated_reasoning_model_through_the_client(sim_factory, tmp_path, sglang_flags):
    """No daemon: the client probes the server itself, so its first-token deadline is
    the 0.5 s floor, while 150 tokens of reasoning take about 0.75 s before the text."""
    flags = ["--reasoning-parser", "qwen3", "--sim-reasoning-tokens", "150"]
    flags += ["--sim-ttft-s", "0.01", "--sim-token-latency-s", "0.005", *sglang_flags]
    sim = sim_factory(None, *flags)
    sim.wait_ready()
    server = Named("r1", sim.port)
    ms = ModelServer("8B", config=write_config(tmp_path, [server]))
    result = ms.get_completion("Say hello", max_tokens=160)
    assert (result.server, result.attempts) == ("r1", 1)
    assert result.reasoning and result.text
    assert result.completion_tokens == 160
    assert result.ttft_s is not None and result.ttft_s < 0.5 < result.latency_s
    if sglang_flags:
        tools = ms.get_completion("Weather?", max_tokens=200, tools=TOOLS)
        assert tools.tool_calls and tools.tool_calls[0]["function"]["name"] == "get_weather"
        json.loads(tools.tool_calls[0]["function"]["arguments"])


class Named:
    """A server as ``write_config`` names it."""

    def __init__(self, name: str, port: int, model_size: str = "8B"):
        self.name, self.port, self.model_size = name, port, model_size
