"""Probe rounds against real simulated SGLang servers: ranking, the early skip,
dead servers becoming unreachable, and servers spared because clients use them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port

from supervisord_ms import states
from supervisord_ms.config import parse_config
from supervisord_ms.prober import Prober
from supervisord_ms.registry import Registry
from supervisord_ms.store import Store, StoreWriter

pytest_plugins = ["simtools"]

# Sim flags: latency = ttft + (tokens - 1) * per-token, with 8 benchmark tokens.
FAST = ("--sim-ttft-s", "0.02", "--sim-token-latency-s", "0.005")  # ~0.06 s
MEDIUM = ("--sim-ttft-s", "0.06", "--sim-token-latency-s", "0.01")  # ~0.13 s
SLOW = ("--sim-ttft-s", "8", "--sim-token-latency-s", "0.01")  # never within a round


def make_config(
    ports: dict[str, int],
    *,
    rate: float = 4.0,
    timeout_s: float = 30.0,
    interval_s: float = 5.0,
    managed: dict[str, Path] | None = None,
) -> Any:
    parts = [
        f"""
[daemon]
probe_interval_s = {interval_s}
health_timeout_s = {timeout_s}
health_failures = 3
hang_timeout_s = 1.0

[client]
latency_growing_rate = {rate}
benchmark_max_tokens = 8
"""
    ]
    for name, port in ports.items():
        model = (managed or {}).get(name)
        extra = f'model_path = "{model}"\ngpus = [0]' if model else 'model_path = "/m"'
        parts.append(
            f"""
[[servers]]
name = "{name}"
ip = "127.0.0.1"
port = {port}
model_size = "8B"
{extra}
"""
        )
    # Servers on 127.0.0.1 count as remote unless the test manages them.
    addresses = {"127.0.0.1"} if managed else set()
    return parse_config("".join(parts), "/tmp/prober-test.toml", host_addresses=addresses)


class Harness:
    """A registry, a real state database and a prober; changes reported to a list."""

    def __init__(self, tmp: Path, config: Any):
        self.registry = Registry(config)
        self.db = tmp / "state.db"
        self.writer = StoreWriter(self.db)
        self.writer.start()
        self.changes: list[tuple[str, str, str, str]] = []
        self._prober: Prober | None = None

        def on_reachability(record: Any, new_state: str, message: str) -> None:
            self.changes.append((record.name, record.state, new_state, message))

        self.on_reachability = on_reachability

    def prober(self) -> Prober:
        return Prober(self.registry, self.writer, on_reachability=self.on_reachability)

    def rounds(self, n: int = 1) -> list[dict[str, str]]:
        """Rounds of one long-lived prober (it counts failures across rounds); its
        connection pool is closed after each call, with the event loop it lives on."""
        if self._prober is None:
            self._prober = self.prober()
        prober = self._prober

        async def go() -> list[dict[str, str]]:
            try:
                return [await prober.run_round() for _ in range(n)]
            finally:
                await prober.close()

        return asyncio.run(go())

    def samples(self, server: str) -> list[dict]:
        assert self.writer.flush(10)
        with Store(self.db) as store:
            return store.latency_samples(server=server)

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def harness_factory(tmp_path: Path):
    made: list[Harness] = []

    def factory(config: Any) -> Harness:
        h = Harness(tmp_path, config)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


def _start(sim_factory: Any, *flags: str) -> Any:
    # SGLang's /health generates a token, so a server with an 8 s first token takes 8 s
    # to say it is healthy; these tests are about probe rounds, so /health answers at
    # once (SGLang's own switch for it).
    env = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}
    return sim_factory(None, *flags, "--sim-output-tokens", "64", env=env).wait_ready()


def test_one_round_ranks_the_fastest_first(sim_factory: Any, harness_factory: Any) -> None:
    sims = {
        "medium": _start(sim_factory, *MEDIUM),
        "fast": _start(sim_factory, *FAST),
        "slow": _start(sim_factory, *SLOW),
    }
    # A generous growing rate: "medium" must finish even on a loaded test machine.
    h = harness_factory(make_config({name: s.port for name, s in sims.items()}, rate=10.0))
    (outcome,) = h.rounds(1)
    assert outcome == {"fast": "ok", "medium": "ok", "slow": "slow"}
    ranked = [r.name for r in h.registry.best("8B", n=3)]
    assert ranked == ["fast", "medium", "slow"]
    assert h.registry.incumbents["8B"].name == "fast"

    fast = h.registry.servers["fast"]
    assert fast.state == states.READY
    assert fast.estimate.ttft_s is not None and 0.01 < fast.estimate.ttft_s < fast.estimate.value_s
    rows = h.samples("fast")
    assert len(rows) == 1
    row = rows[0]
    assert row["source"] == "probe" and row["ok"] is True
    assert row["completion_tokens"] == 8 and row["prompt_tokens"] > 0
    assert row["latency_s"] == pytest.approx(fast.estimate.value_s)
    # Every remote server answered, so every one became ready, reported once each.
    assert sorted((c[0], c[1], c[2]) for c in h.changes) == [
        ("fast", "unreachable", "ready"),
        ("medium", "unreachable", "ready"),
        ("slow", "unreachable", "ready"),
    ]


def test_early_skip_abandons_a_slow_server_long_before_the_timeout(
    sim_factory: Any, harness_factory: Any
) -> None:
    fast = _start(sim_factory, *FAST)
    slow = _start(sim_factory, *SLOW)
    h = harness_factory(make_config({"fast": fast.port, "slow": slow.port}, rate=2.0))

    async def one_round() -> tuple[dict[str, str], float, list]:
        prober = h.prober()
        try:
            began = time.monotonic()
            outcome = await prober.run_round()
            took = time.monotonic() - began
            # Still inside the round's event loop, with the prober's pool open.
            left = [
                c
                for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.raddr.port == slow.port and c.status == "ESTABLISHED"
            ]
            return outcome, took, left
        finally:
            await prober.close()

    outcome, took, left = asyncio.run(one_round())
    assert outcome == {"fast": "ok", "slow": "slow"}
    assert took < 3.0, f"the round waited {took:.1f} s for a server it should have skipped"
    # The abandoned request's connection is closed, not left hanging on the server.
    assert left == []

    fast_latency = h.registry.servers["fast"].estimate.value_s
    slow_record = h.registry.servers["slow"]
    assert slow_record.probe_slow_total == 1 and slow_record.probe_failures_total == 0
    assert slow_record.state == states.READY  # slow is not failed
    # Its sample is the time it had run: a lower bound just past 2 x the best, never
    # an ok latency; it raises the estimate.
    (row,) = h.samples("slow")
    assert row["ok"] is False and row["error"].startswith("cut by the early skip after ")
    assert 2.0 * fast_latency * 0.9 <= row["latency_s"] < 3.0
    assert slow_record.estimate.value_s > fast_latency


def test_nobody_answers_then_the_timeout_fails_the_round(
    sim_factory: Any, harness_factory: Any
) -> None:
    slow = _start(sim_factory, *SLOW)
    h = harness_factory(make_config({"slow": slow.port}, timeout_s=0.5))
    began = time.monotonic()
    (outcome,) = h.rounds(1)
    assert outcome == {"slow": "failed"}
    assert time.monotonic() - began < 3.0
    (row,) = h.samples("slow")
    assert row["ok"] is False and "no answer within 0.5 s" in row["error"]


def test_a_dead_server_fails_and_becomes_unreachable_after_three_rounds(
    sim_factory: Any, harness_factory: Any
) -> None:
    sim = _start(sim_factory, *FAST)
    h = harness_factory(make_config({"x": sim.port}))
    assert h.rounds(1) == [{"x": "ok"}]
    assert h.changes == [("x", "unreachable", "ready", "answered a probe")]
    sim.kill()

    outcomes = []
    for _ in range(3):
        outcomes += h.rounds(1)
        if len(outcomes) < 3:
            assert len(h.changes) == 1, "unreachable before the third failure"
    assert outcomes == [{"x": "failed"}] * 3
    record = h.registry.servers["x"]
    assert record.probe_failures_total == 3
    assert record.state == states.UNREACHABLE
    name, old, new, message = h.changes[1]
    assert (name, old, new) == ("x", "ready", "unreachable")
    assert "cannot connect" in message
    assert len(h.changes) == 2
    rows = h.samples("x")
    assert [r["ok"] for r in rows] == [False, False, False, True]
    assert "cannot connect" in rows[0]["error"]
    # Further failures change nothing: one event per change.
    h.rounds(1)
    assert len(h.changes) == 2


def test_a_never_started_server_counts_failed(harness_factory: Any) -> None:
    h = harness_factory(make_config({"gone": free_port()}))
    assert h.rounds(3) == [{"gone": "failed"}] * 3
    # Remote servers start unreachable: no change to report.
    assert h.changes == []
    assert h.registry.servers["gone"].probe_failures_total == 3


def test_a_recent_client_request_spares_the_probe(sim_factory: Any, harness_factory: Any) -> None:
    busy = _start(sim_factory, *FAST)
    idle = _start(sim_factory, *FAST)
    h = harness_factory(make_config({"busy": busy.port, "idle": idle.port}, interval_s=30))
    h.registry.record_sample("busy", ok=True, latency_s=0.1, source="client")
    (outcome,) = h.rounds(1)
    assert outcome == {"busy": "skipped", "idle": "ok"}
    assert h.samples("busy") == []
    assert busy.state()["requests"]["generation"] == 0
    assert idle.state()["requests"]["generation"] == 1


def test_local_servers_are_probed_only_when_ready_or_unhealthy(
    sim_factory: Any, harness_factory: Any, tmp_path: Path
) -> None:
    sim = _start(sim_factory, *FAST)
    model = tmp_path / "model"
    model.mkdir()
    h = harness_factory(make_config({"local": sim.port}, managed={"local": model}))
    record = h.registry.servers["local"]
    assert record.config.is_managed and record.state == states.STOPPED
    assert h.rounds(1) == [{}]
    record.state = states.UNHEALTHY
    assert h.rounds(1) == [{"local": "ok"}]
    record.state = states.READY
    sim.kill()
    assert h.rounds(1) == [{"local": "failed"}]
    # The supervisor owns local states: the prober never reports reachability for them.
    assert h.changes == [] and record.state == states.READY


def test_run_repeats_rounds_until_stopped(sim_factory: Any, harness_factory: Any) -> None:
    sim = _start(sim_factory, *FAST)
    h = harness_factory(make_config({"x": sim.port}, interval_s=0.2))

    async def go() -> tuple[int, float]:
        prober = h.prober()
        stop = asyncio.Event()
        task = asyncio.create_task(prober.run(stop))
        deadline = time.monotonic() + 10
        while prober.rounds < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        began = time.monotonic()
        await asyncio.wait_for(task, 5)
        return prober.rounds, time.monotonic() - began

    rounds, stop_took = asyncio.run(go())
    assert rounds >= 3
    assert stop_took < 2.0
    assert len(h.samples("x")) == rounds


def test_an_error_answer_is_a_failure_with_the_servers_message(
    sim_factory: Any, harness_factory: Any
) -> None:
    sim = _start(sim_factory, *FAST, "--sim-error-rate", "1")
    h = harness_factory(make_config({"x": sim.port}))
    assert h.rounds(1) == [{"x": "failed"}]
    (row,) = h.samples("x")
    assert row["ok"] is False and row["error"].startswith("HTTP 500 from ")
    assert h.registry.servers["x"].last_error == row["error"]


def test_a_hung_remote_server_becomes_unreachable_although_it_is_only_skipped(
    sim_factory: Any, harness_factory: Any
) -> None:
    """SGLang's usual hang: the scheduler stops, the front answers. With another
    server answering, its probes are early-skipped every round without headers (a
    chat stream sends them with its first token), which proves nothing; the load
    query its scheduler never answers is the evidence."""
    fast = _start(sim_factory, *FAST)
    hung = _start(sim_factory, *FAST, "--sim-hang-after", "1")
    h = harness_factory(make_config({"fast": fast.port, "hung": hung.port}))
    assert h.rounds(1) == [{"fast": "ok", "hung": "ok"}]
    assert h.registry.servers["hung"].state == states.READY
    assert h.rounds(3) == [{"fast": "ok", "hung": "slow"}] * 3
    assert h.registry.servers["hung"].state == states.UNREACHABLE
    name, old, new, message = h.changes[-1]
    assert (name, old, new) == ("hung", "ready", "unreachable")
    assert f"no answer from http://127.0.0.1:{hung.port}/v1/loads within 1 s" in message


def test_a_slower_remote_server_stays_a_candidate(sim_factory: Any, harness_factory: Any) -> None:
    """Early-skipped probes are neutral: a server that is only slower (its first
    token, and so its headers, come after the round's deadline) stays ready while
    its scheduler answers."""
    fast = _start(sim_factory, *FAST)
    slow = _start(sim_factory, *SLOW)
    h = harness_factory(make_config({"fast": fast.port, "slow": slow.port}, rate=2.0))
    assert h.rounds(4) == [{"fast": "ok", "slow": "slow"}] * 4
    assert h.registry.servers["slow"].state == states.READY
    assert [c for c in h.changes if c[0] == "slow" and c[2] == "unreachable"] == []
