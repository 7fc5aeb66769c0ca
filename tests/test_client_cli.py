"""``ms-client``: commands with and without the daemon, output formats, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from ms_client import _fallback as fallback
from ms_client.cli import cli
from test_client_fakes import FakeDaemon, write_config

pytest_plugins = ["test_client_fakes"]  # the sglang, daemon and short_dir fixtures

COMMANDS = ["complete", "best", "servers", "latency", "sizes"]


@pytest.fixture(autouse=True)
def _fresh_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fallback, "_noted", False)
    monkeypatch.delenv("MODELSERVERD_CONFIG", raising=False)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def with_daemon(fake: FakeDaemon, tmp_path: Path, servers: list = ()) -> str:
    return str(write_config(tmp_path, list(servers), socket_path=fake.socket_path))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert "ms-client " + command in result.stdout


def test_group_help_lists_the_exit_codes() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "3 no server could answer" in result.stdout
    assert all(command in result.stdout for command in COMMANDS)


def test_complete_follows_the_daemon_and_prints_json(sglang, daemon, tmp_path) -> None:
    a, b = sglang("a"), sglang("b")
    fake = daemon([b.server_object(), a.server_object()])
    config = with_daemon(fake, tmp_path)
    result = run("complete", "hi", "--json", "--session", "s1", "--config", config)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["server"] == "b" and answer["text"] == "Hello, world!"
    assert answer["attempts"] == 1
    assert fake.best_queries()[0]["key"] == "s1"
    assert result.stderr == ""  # the daemon answered: no note


def test_complete_streams_text_and_reads_stdin(sglang, daemon, tmp_path) -> None:
    a = sglang("a")
    config = with_daemon(daemon([a.server_object()]), tmp_path)
    result = run("complete", "-", "--system", "terse", "--config", config, input="from stdin")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Hello, world!\n"
    messages = a.requests[0][1]["messages"]
    assert messages == [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "from stdin"},
    ]
    no_stream = run("complete", "hi", "--no-stream", "--max-tokens", "3", "--config", config)
    assert no_stream.stdout == "Hello, world!\n"
    assert a.requests[1][1]["max_tokens"] == 3


def test_no_server_exits_3_with_the_attempts(sglang, daemon, tmp_path) -> None:
    a, b = sglang("a", mode="error"), sglang("b")
    b.stop()
    config = with_daemon(daemon([a.server_object(), b.server_object()]), tmp_path)
    result = run("complete", "hi", "--config", config)
    assert result.exit_code == 3
    assert result.stdout == ""
    assert f"a (127.0.0.1:{a.port}): HTTP 500: simulated failure" in result.stderr
    assert f"b (127.0.0.1:{b.port}): connection refused" in result.stderr
    assert result.stderr.startswith("ms-client: no 8B server could answer (2 attempts)")


def test_a_rejected_request_exits_1(sglang, daemon, tmp_path) -> None:
    a = sglang("a", mode="reject")
    config = with_daemon(daemon([a.server_object()]), tmp_path)
    result = run("complete", "hi", "--config", config)
    assert result.exit_code == 1
    assert "rejected the request with HTTP 400: max_tokens is too large" in result.stderr


def test_config_problems_exit_4_with_one_line_each(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[client]\nmax_retry = 0\nlatency_growing_rate = "fast"\n')
    result = run("complete", "hi", "--config", str(config))
    assert result.exit_code == 4
    lines = result.stderr.splitlines()
    assert any("client.max_retry: got 0, expected an integer >= 1" in line for line in lines)
    assert any("client.latency_growing_rate" in line for line in lines)
    assert lines[-1] == "ms-client: fix the config above (or pass --config PATH)"
    missing = run("best", "--config", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 4
    assert "no such config file" in missing.stderr


def test_usage_errors_exit_2(tmp_path) -> None:
    config = str(write_config(tmp_path, []))
    result = run("complete", "hi", "--api", "generate", "--system", "x", "--config", config)
    assert result.exit_code == 2
    assert "api='chat'" in result.stderr
    assert run("complete", "--max-tokens", "0", "hi").exit_code == 2
    assert run("complete").exit_code == 2


def test_best_servers_sizes_latency_from_the_daemon(sglang, daemon, tmp_path) -> None:
    a, b = sglang("a"), sglang("b", model_size="70B")
    fake = daemon([a.server_object(), b.server_object(state="starting")])
    fake.samples = [{"server": "a", "latency_s": 0.25, "ok": True, "ts": "2026-01-01T00:00:00Z"}]
    config = with_daemon(fake, tmp_path)

    best = run("best", "--config", config)
    assert best.exit_code == 0, best.stderr
    header, first = best.stdout.splitlines()[:2]
    assert header.split() == ["#", "NAME", "ADDRESS", "STATE", "LATENCY_S", "TTFT_S", "S_PER_TOKEN"]
    assert first.split()[:4] == ["1", "a", a.address, "ready"]
    best_json = json.loads(run("best", "--json", "--config", config).stdout)
    assert best_json["source"] == "daemon"
    assert [c["name"] for c in best_json["candidates"]] == ["a"]

    servers = run("servers", "--config", config)
    assert "starting" in servers.stdout and b.address in servers.stdout
    names = [
        s["name"]
        for s in json.loads(run("servers", "--json", "--config", config).stdout)["servers"]
    ]
    assert names == ["a", "b"]

    assert run("sizes", "--config", config).stdout == "8B\n"
    assert json.loads(run("sizes", "--json", "--config", config).stdout) == {"sizes": ["8B"]}

    latency = run("latency", "--server", "a", "--limit", "5", "--config", config)
    assert latency.exit_code == 0
    assert "0.25" in latency.stdout and "client" in latency.stdout
    assert {"server": "a", "limit": "5"} in [q for _, p, q in fake.queries if p == "/v1/latency"]
    samples = json.loads(run("latency", "--json", "--config", config).stdout)["samples"]
    assert samples[0]["latency_s"] == 0.25


def test_best_with_no_ready_server_exits_3(daemon, tmp_path) -> None:
    result = run("best", "--config", with_daemon(daemon([]), tmp_path))
    assert result.exit_code == 3
    assert "no ready 8B server" in result.stderr


def test_without_the_daemon_best_servers_sizes_probe_the_config(sglang, tmp_path) -> None:
    fast = sglang("8B-fast")
    slow = sglang("8B-slow", ttft_s=0.3)
    down = sglang("70B-a", model_size="70B")
    down.stop()
    config = str(write_config(tmp_path, [slow, fast, down]))

    best = run("best", "--json", "--config", config)
    assert best.exit_code == 0, best.stderr
    answer = json.loads(best.stdout)
    assert answer["source"] == "probe"
    assert [c["name"] for c in answer["candidates"]] == ["8B-fast", "8B-slow"]
    assert [c["state"] for c in answer["candidates"]] == ["ready", "slow"]
    assert "daemon not reachable at" in best.stderr
    assert f"choosing servers from {config} without it" in best.stderr

    servers = json.loads(run("servers", "--json", "--config", config).stdout)["servers"]
    states = {s["name"]: (s["state"], s["last_error"]) for s in servers}
    assert states == {
        "8B-fast": ("ready", None),
        "8B-slow": ("ready", None),
        "70B-a": ("unreachable", "connection refused"),
    }
    table = run("servers", "--config", config).stdout
    assert "unreachable" in table and "connection refused" in table

    assert run("sizes", "--config", config).stdout == "8B\n"


def test_best_without_the_daemon_and_everything_down_exits_3(sglang, tmp_path) -> None:
    a = sglang("a")
    a.stop()
    result = run("best", "--config", str(write_config(tmp_path, [a])))
    assert result.exit_code == 3
    assert f"a (127.0.0.1:{a.port}): connection refused" in result.stderr


def test_latency_says_the_daemon_is_needed(tmp_path) -> None:
    result = run("latency", "--config", str(write_config(tmp_path, [])))
    assert result.exit_code == 1
    assert "latency needs the daemon" in result.stderr
    assert "no socket file there" in result.stderr


def test_a_readable_default_config_is_not_required_when_the_daemon_answers(
    sglang, daemon, tmp_path, monkeypatch
) -> None:
    """On a daemon host the config may be root-only while the socket is open to a group;
    the client then needs only the socket. Shown with ModelServer(socket_path=...)."""
    from ms_client import ConfigProblem, ModelServer

    from supervisord_ms import config as config_module

    a = sglang("a")
    fake = daemon([a.server_object()])
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    ms = ModelServer("8B", socket_path=fake.socket_path)
    assert ms.get_completion("hi").server == "a"
    fake.stop()
    ms2 = ModelServer("8B", socket_path=fake.socket_path)
    with pytest.raises(ConfigProblem, match="absent.toml: no such config file"):
        ms2.get_completion("hi")


@pytest.mark.parametrize("command", ["complete", "best"])
def test_a_size_in_the_wrong_case_is_a_usage_error_with_a_suggestion(
    sglang, daemon, tmp_path, command
) -> None:
    a = sglang("a")
    config = with_daemon(daemon([a.server_object()]), tmp_path, [a])
    args = [command, "hi"] if command == "complete" else [command]
    result = CliRunner().invoke(cli, [*args, "--model-size", "8b", "--config", config])
    assert result.exit_code == 2, result.output
    assert "no model size '8b'; did you mean '8B'?" in result.output
    assert not a.requests
