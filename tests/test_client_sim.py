"""The client without a daemon, against real simulator processes.

The config (written to tmp_path) names three simulated servers of one size, and its
daemon socket does not exist, so the client chooses by probing them itself: the
fastest wins, a killed or hung server costs one quick failed attempt, repeated
slowness moves the client, and with everything down the command exits 3 with every
attempt in one message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ms_client import ModelServer, NoServerAvailable
from ms_client import _fallback as fallback
from test_client_fakes import wait_for, write_config

pytest_plugins = ["simtools", "test_client_fakes"]  # sim_factory


@dataclass
class Named:
    """A simulator as the config names it."""

    name: str
    sim: Any  # simtools.SimProcess (simtools is loaded as a plugin, not imported)
    model_size: str = "8B"

    @property
    def port(self) -> int:
        return self.sim.port


@pytest.fixture(autouse=True)
def _fresh_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon note is once per process; each test here is a process of its own."""
    monkeypatch.setattr(fallback, "_noted", False)


@pytest.fixture
def sims(sim_factory) -> dict[str, Named]:
    specs = {
        "8B-fast": ["--sim-ttft-s", "0.01", "--sim-token-latency-s", "0.002"],
        "8B-mid": ["--sim-ttft-s", "0.1"],
        "8B-slow": ["--sim-ttft-s", "0.4"],
    }
    started = {name: Named(name, sim_factory(None, *flags)) for name, flags in specs.items()}
    for named in started.values():
        named.sim.wait_ready()
    return started


@pytest.fixture
def config(sims: dict[str, Named], tmp_path: Path) -> Path:
    return write_config(tmp_path, list(sims.values()), max_retry=3, request_timeout_s=30.0)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def env_for_subprocess() -> dict[str, str]:
    """Make ``ms_client`` importable in a child process from this checkout."""
    env = dict(os.environ)
    env.pop("MODELSERVERD_CONFIG", None)
    return env


def test_the_fastest_is_chosen_and_the_note_is_printed(sims, config, capsys) -> None:
    ms = ModelServer("8B", config=config)
    result = ms.get_completion("Say hello", max_tokens=8)
    assert result.server == "8B-fast"
    assert result.completion_tokens == 8 and result.text
    assert result.ttft_s is not None and result.ttft_s < result.latency_s
    err = capsys.readouterr().err
    assert err.count("daemon not reachable at") == 1
    assert f"choosing servers from {config} without it" in err
    # the slow servers were abandoned by the early skip, not waited for
    assert sims["8B-slow"].sim.state()["requests"]["generation"] <= 1


def test_a_killed_server_costs_one_attempt(sims, config) -> None:
    ms = ModelServer("8B", config=config)
    assert ms.get_completion("hi", max_tokens=4).server == "8B-fast"
    fast = sims["8B-fast"]
    fast.sim.kill()
    wait_for(lambda: not accepts(fast.port), what="the killed server's port closed")
    result = ms.get_completion("hi", max_tokens=4)
    assert result.server != "8B-fast" and result.attempts == 2


def test_a_hung_server_is_left_within_a_couple_of_seconds(sims, config) -> None:
    ms = ModelServer("8B", config=config)
    assert ms.get_completion("hi", max_tokens=4).server == "8B-fast"
    status, _ = sims["8B-fast"].sim.fault("hang")
    assert status == 200
    started = time.monotonic()
    result = ms.get_completion("hi", max_tokens=4)
    elapsed = time.monotonic() - started
    assert result.server != "8B-fast" and result.attempts == 2
    assert elapsed < 2.0  # not request_timeout_s (30 s)


def test_repeated_slowness_moves_to_another_server(sims, config) -> None:
    ms = ModelServer("8B", config=config)
    assert ms.get_completion("hi").server == "8B-fast"
    sims["8B-fast"].sim.fault("slow", slow_factor=5)
    served = [ms.get_completion("hi").server for _ in range(4)]
    assert served[:3] == ["8B-fast"] * 3
    assert served[3] != "8B-fast"


def test_streaming_and_the_generate_api(sims, config) -> None:
    ms = ModelServer("8B", config=config, api="generate")
    stream = ms.stream_completion("hi", max_tokens=6)
    chunks = list(stream)
    assert len(chunks) >= 2
    assert stream.completion is not None
    assert "".join(chunks) == stream.completion.text
    assert stream.completion.completion_tokens == 6


def test_all_down_exits_3_and_lists_every_attempt(sims, config) -> None:
    for named in sims.values():
        named.sim.kill()
    with pytest.raises(NoServerAvailable) as caught:
        ModelServer("8B", config=config).get_completion("hi")
    assert sorted(a.server for a in caught.value.attempts) == sorted(sims)
    proc = subprocess.run(
        [sys.executable, "-m", "ms_client.cli", "complete", "hi", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for_subprocess(),
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("daemon not reachable") == 1
    for name, named in sims.items():
        assert f"{name} (127.0.0.1:{named.port}): connection refused" in proc.stderr


def test_the_note_is_printed_once_per_process(sims, config) -> None:
    code = (
        "import sys\n"
        "from ms_client import ModelServer\n"
        "for _ in range(2):\n"
        f"    ms = ModelServer('8B', config={str(config)!r})\n"
        "    for _ in range(3):\n"
        "        ms.get_completion('hi', max_tokens=2)\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for_subprocess(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr.count("ms-client: daemon not reachable at") == 1, proc.stderr


def test_cli_complete_streams_and_prints_json(sims, config) -> None:
    base = [sys.executable, "-m", "ms_client.cli", "complete", "--config", str(config)]
    streamed = subprocess.run(
        [*base, "--max-tokens", "5", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for_subprocess(),
    )
    assert streamed.returncode == 0, streamed.stderr
    as_json = subprocess.run(
        [*base, "--max-tokens", "5", "--json", "-"],
        input="hi from stdin",
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for_subprocess(),
    )
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert set(answer) == {
        "text",
        "server",
        "latency_s",
        "ttft_s",
        "prompt_tokens",
        "completion_tokens",
        "attempts",
        "reasoning",
        "tool_calls",
    }
    assert answer["server"] == "8B-fast" and answer["completion_tokens"] == 5
    assert (answer["reasoning"], answer["tool_calls"]) == (None, None)
    assert streamed.stdout == answer["text"] + "\n"
