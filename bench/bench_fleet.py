"""Sixteen callers on a fleet of servers with finite capacity: how each policy shares
the fleet out, side by side in one run.

The fleet: 4 simulated SGLang servers (``python -m supervisord_ms.sim``), started here,
each with ``--max-running-requests 4`` (at most 4 decode together, the rest queue) and a
per-token time that grows by 15 % for every other request in the batch; 20 ms to the
first token, 5 ms a token alone, 16 tokens an answer (+-10 % noise). A full batch then
answers in about 0.14 s: one server does about 29 requests/s, so 16 callers on one
server keep 12 of them queued. The daemon (``modelserverd run``) knows them as servers
it does not manage (``managed = false``): it probes them every second
(``probe_interval_s = 1``) and reads their load (``/v1/loads``) about once a second.

The callers: 16 threads, each with its own client (as 16 programs would), each sending
its next request as soon as the last one is answered (a closed loop), for 1.5 s of
warm-up and then the 8 s that are measured. Every request is a chat completion of 16
tokens; every caller's prompts start with its own name.

The policies, one after the other on the same fleet and the same daemon:

* round robin: each caller sends each request to the next server in turn (its own
  turn, starting at a different server for each caller), streamed, with keep-alive
  ``http.client`` connections; no daemon.
* ours without a key: ``ModelServer("8B")`` (``spread=True``, the default): the client
  gives each instance and thread a key of its own, so the daemon keeps each caller on
  its rendezvous server unless that server is overloaded (bounded loads), as with a
  session key.
* ours with a key: ``ModelServer("8B", session_key=f"caller-{i}")``: the daemon keeps the
  key on its rendezvous server unless that server is overloaded (consistent hashing
  with bounded loads).
* sglang-router with ``power_of_two``, ``cache_aware`` (its default) and ``round_robin``
  (see ``bench/router_peer.py``), each launched in front of the same servers; the
  callers send whole (not streamed) requests through it, which spares its answers the
  delayed-ACK wait that a streamed answer through it pays (see the ``overhead`` rows).
* ours before load-aware spreading, for reference: ``ModelServer("8B", spread=False)``,
  the daemon's best server first for every request.

Two fleets: 4 equal servers; the same with one server 3x slower (``--sim-slow-factor
3``: its first token and every token take 3x as long). Each gets fresh servers and a
fresh daemon.

Rows per fleet and policy of ours (its peers in the other columns): requests/s answered
in the window, p50 and p99 latency of the requests sent in it, the busiest server's
share of them, failed requests; with keys also the share of requests served where the
caller's previous request was (affinity). Targets, against round robin in the same run:
equal fleet, no key: >= 0.9x its requests/s, p99 <= 1.5x; keys: >= 0.85x its
requests/s, >= 95 % affinity; one 3x slower, no key: >= 1.5x its requests/s, p99 <= 0.5x.
The first row of each fleet carries, in its ``detail``, every policy's figures: requests
per server, how often a request queued on one server while another had a free slot, the
busiest server's share second by second, the machine's CPU, and for ours what the daemon
showed (its latency estimates and the load it last read) against each server's own load,
sampled every 0.25 s.

Run: .venv/bin/python bench/bench_fleet.py fleet
"""

from __future__ import annotations

import contextlib
import http.client
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_peer  # noqa: E402
from bench_router import _pid_of  # noqa: E402
from common import (  # noqa: E402
    BenchDaemon,
    emit,
    free_ports,
    percentile,
    row,
    run_scenarios,
    wait_for,
    work_dir,
)
from ms_client import ModelServer  # noqa: E402
from ms_client._client import CANDIDATE_TTL_S  # noqa: E402
from router_peer import Router, RouterUnavailable  # noqa: E402

from supervisord_ms.prober import LOAD_INTERVAL_S  # noqa: E402
from supervisord_ms.registry import AFFINITY_MAX_RATIO  # noqa: E402
from supervisord_ms.selector import (  # noqa: E402
    Load,
    bounded_load_pick,
    rendezvous_order,
)


def expected_delay(latency_s: float | None, load: Load) -> float | None:
    """The daemon's latency estimate stretched by the load it shows (a request waits
    for the batch ahead of it): what a load-aware choice would go by, to judge how
    well the daemon's figures point at a server with room."""
    if latency_s is None:
        return None
    return latency_s * (1.0 + load.busy / (load.capacity or 16))


# --- the fleet ---------------------------------------------------------------------------

SERVERS = 4
CAPACITY = 4  # --max-running-requests
BATCH_SLOWDOWN = 0.15  # per-token time grows by this share per other running request
TTFT_S = 0.02
TOKEN_S = 0.005
TOKENS = 16
NOISE = 0.1
SLOW_FACTOR = 3.0
PROBE_INTERVAL_S = 1.0

# --- the callers ---------------------------------------------------------------------------

CALLERS = 16
WARMUP_S = 1.5
WINDOW_S = 8.0
SETTLE_S = 1.0  # between two policies: the queues drain, the daemon reads idle loads
REQUEST_TIMEOUT_S = 30.0  # the bare callers' socket timeout
SAMPLE_S = 0.25  # how often the daemon's picture is compared with the servers' own
JOIN_S = 40.0  # how long the callers' last requests are waited for after the window

TARGETS = {
    # (fleet, policy, metric): (factor of round robin's figure, comparison)
    ("equal", "spread", "rps"): (0.9, ">="),
    ("equal", "spread", "p99"): (1.5, "<="),
    ("equal", "key", "rps"): (0.85, ">="),
    ("slow", "spread", "rps"): (1.5, ">="),
    ("slow", "spread", "p99"): (0.5, "<="),
}
AFFINITY_TARGET = 95.0  # %, equal fleet, keys

# Which of the router's policies stands beside each of ours in the table.
PEER_OF = {"spread": "power_of_two", "key": "cache_aware", "old": "round_robin"}
OURS = {
    "spread": "ours without a session key (a key per caller, from the client)",
    "key": "ours with a session key per caller",
    "old": "ours before spreading (spread=False: the daemon's best first)",
}
ROUTER_POLICIES = ("power_of_two", "cache_aware", "round_robin")
BUSIEST_WORDS = f"the busiest server's share of requests ({100 / SERVERS:g} % is even)"
# A key's server is passed over above this multiple of its fair share (selector's default).
BOUND = 1.0 + inspect.signature(bounded_load_pick).parameters["epsilon"].default


def sim_args(slow_factor: float = 1.0) -> list[str]:
    args = [
        "--max-running-requests", str(CAPACITY),
        "--sim-batch-slowdown", str(BATCH_SLOWDOWN),
        "--sim-ttft-s", str(TTFT_S),
        "--sim-token-latency-s", str(TOKEN_S),
        "--sim-output-tokens", str(TOKENS),
        "--sim-noise", str(NOISE),
        "--sim-startup-s", "0",
        "--sim-warmup-s", "0",
    ]  # fmt: skip
    if slow_factor != 1.0:
        args += ["--sim-slow-factor", str(slow_factor)]
    return args


def full_batch_s(slow_factor: float = 1.0) -> float:
    """One answer's time with the batch full (no noise)."""
    per_token = TOKEN_S * (1.0 + BATCH_SLOWDOWN * (CAPACITY - 1))
    return slow_factor * (TTFT_S + TOKENS * per_token)


@dataclass
class Sim:
    name: str
    port: int
    proc: subprocess.Popen
    slow_factor: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _health(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@contextlib.contextmanager
def sims(folder: Path, slow: tuple[float, ...]) -> Iterator[list[Sim]]:
    """One simulator per slow factor, each in its own session; all killed on the way out.
    Their command line names ``folder`` (the model path), so run.py finds leftovers."""
    model = folder / "model"
    model.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONUNBUFFERED"] = "1"
    started: list[Sim] = []
    try:
        for i, (port, factor) in enumerate(zip(free_ports(len(slow)), slow, strict=True)):
            argv = [
                sys.executable, "-m", "supervisord_ms.sim",
                "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port),
                *sim_args(factor),
            ]  # fmt: skip
            with open(folder / f"sim-f{i}.log", "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            started.append(Sim(f"f{i}", port, proc, factor))
        for sim in started:

            def up(sim: Sim = sim) -> bool:
                if sim.proc.poll() is not None:
                    raise RuntimeError(f"simulator {sim.name} exited with {sim.proc.returncode}")
                return _health(sim.port) == 200

            wait_for(up, 60, f"simulator {sim.name} healthy", 0.1)
        yield started
    finally:
        for sim in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sim.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sim.proc.wait(10)


@contextlib.contextmanager
def fleet(folder: Path, slow: tuple[float, ...]) -> Iterator[tuple[list[Sim], BenchDaemon]]:
    """The simulators and a daemon that knows them as servers it does not manage, each
    with a latency estimate and a load reading (so the first choices are informed)."""
    with sims(folder, slow) as started:
        servers = [
            {"name": s.name, "ip": "127.0.0.1", "port": s.port, "managed": False} for s in started
        ]
        daemon = {"probe_interval_s": PROBE_INTERVAL_S, "stop_timeout_s": 5.0}
        with BenchDaemon(folder, servers, daemon=daemon, gpus=1) as d:
            d.start()
            d.wait_all_ready(60)
            wait_for(
                lambda: all(
                    s["latency_s"] is not None and s.get("capacity") for s in d.all_servers()
                ),
                60,
                "a latency estimate and a load reading for every server",
                0.2,
            )
            yield started, d


# --- one policy's run ------------------------------------------------------------------------


@dataclass
class Request:
    caller: int
    start: float
    end: float | None = None
    ok: bool = False
    server: str | None = None
    error: str | None = None


# A caller's client: send(k) sends its k-th request and returns the server that
# answered; close() ends it.
@dataclass
class Caller:
    send: Callable[[int], str | None]
    close: Callable[[], None] = lambda: None


def prompt(caller: int, k: int) -> str:
    return f"Caller {caller:02d} asks, request {k}: say hello in one short sentence."


def _chat(model: str, text: str, *, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": TOKENS,
    }
    if stream:  # what ModelServer sends
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


class Connections:
    """Keep-alive ``http.client`` connections of one caller, one per port."""

    def __init__(self) -> None:
        self._conns: dict[int, http.client.HTTPConnection] = {}

    def post(self, port: int, payload: bytes) -> bytes:
        conn = self._conns.get(port)
        if conn is None:
            conn = self._conns[port] = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=REQUEST_TIMEOUT_S
            )
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=payload,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            del self._conns[port]
            raise
        if resp.will_close:
            conn.close()
            del self._conns[port]
        if resp.status != 200:
            raise RuntimeError(f"answered {resp.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def round_robin_callers(started: list[Sim], model: str) -> Callable[[int], Caller]:
    def make(i: int) -> Caller:
        conns = Connections()

        def send(k: int) -> str | None:
            sim = started[(i + k) % len(started)]
            data = conns.post(sim.port, _chat(model, prompt(i, k), stream=True))
            if b"[DONE]" not in data:
                raise RuntimeError(f"{sim.name}: the stream ended without [DONE]")
            return sim.name

        return Caller(send, conns.close)

    return make


MOVED_FAILED = "an attempt on its server failed"
MOVED_EXCLUDED = "the client had excluded its server after slow answers"
MOVED_DAEMON = "the daemon offered another server first (bounded loads)"


@dataclass
class Moves:
    """When a caller's request left the server of its previous one: from where, to
    where and why (``(monotonic time, caller, previous server, server, reason)``)."""

    seen: list[tuple[float, int, str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self, window: tuple[float, float], names: list[str]) -> dict[str, Any]:
        a, b = window
        with self.lock:
            inside = [m[1:] for m in self.seen if a <= m[0] < b]
        home = {i: key_home(i, names) for i in range(CALLERS)}
        return {
            "count": len(inside),
            "why": dict(Counter(why for *_, why in inside).most_common()),
            "from": dict(Counter(before for _, before, _, _ in inside).most_common()),
            "left_home": sum(1 for i, before, _, _ in inside if before == home[i]),
            "came_home": sum(1 for i, _, after, _ in inside if after == home[i]),
            "callers_that_moved": len({i for i, *_ in inside}),
        }


def key_home(caller: int, names: list[str]) -> str:
    """The server a caller's key hashes to (its rendezvous choice among all servers)."""
    return rendezvous_order(f"caller-{caller}", names)[0]


def ours_callers(config: str, policy: str, moves: Moves | None = None) -> Callable[[int], Caller]:
    def make(i: int) -> Caller:
        llm = ModelServer(
            "8B",
            config=config,
            session_key=f"caller-{i}" if policy == "key" else None,
            spread=policy != "old",
        )
        previous: list[str] = []

        def send(k: int) -> str | None:
            began = time.monotonic()
            c = llm.get_completion(prompt(i, k), max_tokens=TOKENS)
            if moves is not None and previous and c.server != previous[-1]:
                before = previous[-1]
                if c.attempts > 1:
                    why = MOVED_FAILED
                elif before in llm._excluded:
                    why = MOVED_EXCLUDED
                else:
                    why = MOVED_DAEMON
                with moves.lock:
                    moves.seen.append((began, i, before, c.server, why))
            previous[:] = [c.server]
            return c.server

        return Caller(send, llm.close)

    return make


def router_callers(router: Router, model: str, names: dict[int, str]) -> Callable[[int], Caller]:
    def make(i: int) -> Caller:
        conns = Connections()

        def send(k: int) -> str | None:
            data = conns.post(router.port, _chat(model, prompt(i, k), stream=False))
            answer = json.loads(data)
            if not answer.get("choices"):
                raise RuntimeError(f"the router's answer has no choices: {data[:200]!r}")
            return names.get(_pid_of(str(answer.get("id", ""))) or -1)

        return Caller(send, conns.close)

    return make


@dataclass
class Run:
    policy: str
    requests: list[Request]
    window: tuple[float, float]
    names: list[str]
    cpu_percent: float | None = None  # the whole machine's, during the window
    bench_cpu_percent: float | None = None  # this process's (the callers), of one core
    unfinished: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def in_window(self) -> list[Request]:
        a, b = self.window
        return [r for r in self.requests if a <= r.start < b]

    def rps(self) -> float:
        a, b = self.window
        done = sum(1 for r in self.requests if r.ok and r.end is not None and a <= r.end < b)
        return round(done / (b - a), 1)

    def latencies(self) -> list[float]:
        out = []
        for r in self.in_window():
            end = r.end if r.end is not None else self.window[1] + JOIN_S
            out.append(end - r.start)
        return out

    def pct(self, q: float) -> float | None:
        lat = self.latencies()
        return round(percentile(lat, q), 3) if lat else None

    def failed(self) -> int:
        return sum(1 for r in self.in_window() if not r.ok)

    def load(self) -> Counter:
        return Counter(r.server for r in self.in_window() if r.ok)

    def busiest(self) -> float | None:
        load = self.load()
        total = sum(load.values())
        if not total:
            return None
        return round(100 * max(load.get(n, 0) for n in self.names) / total, 1)

    def affinity(self) -> float | None:
        """Share of a caller's requests sent in the window that its previous request's
        server answered (the previous one may be from the warm-up)."""
        same = pairs = 0
        by_caller: dict[int, list[Request]] = {}
        for r in sorted(self.requests, key=lambda r: r.start):
            by_caller.setdefault(r.caller, []).append(r)
        a, b = self.window
        for reqs in by_caller.values():
            ok = [r for r in reqs if r.ok]
            for before, now in zip(ok, ok[1:], strict=False):
                if a <= now.start < b:
                    pairs += 1
                    same += before.server == now.server
        return round(100 * same / pairs, 1) if pairs else None

    def queued_while_free(self) -> float:
        """Share of the window during which one server had more requests than batch
        slots (some queued) while another had a free slot: load that a perfect spread
        would not have queued (client-side in-flight counts)."""
        events: list[tuple[float, int, str]] = []
        a, b = self.window
        for r in self.requests:
            if r.server is None or r.end is None:
                continue
            events.append((r.start, 1, r.server))
            events.append((r.end, -1, r.server))
        events.sort()
        inflight = dict.fromkeys(self.names, 0)
        bad = 0.0
        last = a
        for t, step, server in events:
            clipped = min(max(t, a), b)
            if clipped > last:
                counts = inflight.values()
                if max(counts) > CAPACITY and min(counts) < CAPACITY:
                    bad += clipped - last
                last = clipped
            if server in inflight:
                inflight[server] += step
        return round(100 * bad / (b - a), 1)

    def busiest_per_second(self) -> float | None:
        """The busiest server's share of the requests sent in each second, averaged:
        high when callers move together from one server to the next (herding)."""
        a, b = self.window
        bins: dict[int, Counter] = {}
        for r in self.in_window():
            if r.ok and r.server is not None:
                bins.setdefault(int(r.start - a), Counter())[r.server] += 1
        shares = [100 * max(c.values()) / sum(c.values()) for c in bins.values() if c]
        return round(sum(shares) / len(shares), 1) if shares else None

    def figures(self) -> dict[str, Any]:
        load = self.load()
        return {
            "requests_per_s": self.rps(),
            "p50_s": self.pct(50),
            "p99_s": self.pct(99),
            "busiest_share_percent": self.busiest(),
            "failed": self.failed(),
            "affinity_percent": self.affinity(),
            "requests_in_window": len(self.in_window()),
            "per_server": {n: load.get(n, 0) for n in self.names},
            "unidentified": sum(1 for r in self.in_window() if r.ok and r.server is None),
            "queued_while_a_slot_was_free_percent": self.queued_while_free(),
            "busiest_share_per_second_percent": self.busiest_per_second(),
            "machine_cpu_percent": self.cpu_percent,
            "callers_cpu_percent_of_a_core": self.bench_cpu_percent,
            "unfinished_after_window": self.unfinished,
            "errors": sorted({r.error for r in self.requests if r.error})[:5],
            **self.extra,
        }


def run_policy(
    policy: str,
    make: Callable[[int], Caller],
    names: list[str],
    sample: Callable[[], dict[str, Any]] | None = None,
) -> Run:
    """CALLERS closed-loop callers for WARMUP_S + WINDOW_S; the requests sent in the
    window are the ones measured. ``sample`` is called every SAMPLE_S in the window
    (what the daemon shows against the servers' own load); its results go to
    ``Run.extra["samples"]``."""
    requests: list[Request] = []
    lock = threading.Lock()
    ready = threading.Barrier(CALLERS + 1)
    go = threading.Event()
    clock: dict[str, float] = {}

    def caller(i: int) -> None:
        try:
            client = make(i)
        except BaseException as exc:
            ready.abort()
            raise RuntimeError(f"caller {i}: {exc}") from exc
        try:
            ready.wait()
            go.wait()
            stop = clock["stop"]
            k = 0
            while time.monotonic() < stop:
                r = Request(i, time.monotonic())
                with lock:  # listed at once: one still running at the end counts too
                    requests.append(r)
                try:
                    r.server = client.send(k)
                    r.ok = True
                except Exception as exc:  # a failed request is a figure, not a crash
                    r.error = f"{type(exc).__name__}: {exc}"[:300]
                r.end = time.monotonic()
                k += 1
        finally:
            client.close()

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(CALLERS)]
    for t in threads:
        t.start()
    ready.wait(60)
    began = time.monotonic()
    window = (began + WARMUP_S, began + WARMUP_S + WINDOW_S)
    clock["stop"] = window[1]
    go.set()
    samples: list[dict[str, Any]] = []
    sampler = None
    if sample is not None:

        def sample_loop() -> None:
            time.sleep(max(0.0, window[0] - time.monotonic()))
            while time.monotonic() < window[1]:
                with contextlib.suppress(Exception):  # a missed sample is no figure
                    samples.append(sample())
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample_loop, daemon=True)
        sampler.start()
    me = psutil.Process()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    psutil.cpu_percent(None)
    cpu0 = me.cpu_times()
    t0 = time.monotonic()
    time.sleep(max(0.0, window[1] - time.monotonic()))
    machine_cpu = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
    load_average = os.getloadavg()[0]
    cpu1 = me.cpu_times()
    bench_cpu = 100 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system))
    bench_cpu /= max(1e-9, time.monotonic() - t0)
    deadline = time.monotonic() + JOIN_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    unfinished = sum(t.is_alive() for t in threads)
    if sampler is not None:
        sampler.join(5)
    with lock:
        done = list(requests)
    # A request still running now counts as failed (see Run.latencies).
    return Run(
        policy,
        done,
        window,
        names,
        cpu_percent=round(machine_cpu, 1),
        bench_cpu_percent=round(bench_cpu, 1),
        unfinished=unfinished,
        extra={
            "load_average_1min_at_window_end": round(load_average, 2),
            **({"samples": samples} if sample is not None else {}),
        },
    )


def _true_load(port: int) -> int:
    """Requests in a simulator's batch and queue, asked of it directly."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/get_load")
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    return sum(int(entry["num_reqs"]) for entry in body)


def daemon_view(d: BenchDaemon, started: list[Sim]) -> Callable[[], dict[str, Any]]:
    """One sample of what a client is told (the daemon's latency estimate and the load
    it last read) beside each server's load at that moment."""

    def sample() -> dict[str, Any]:
        true = {s.name: _true_load(s.port) for s in started}
        seen = {s["name"]: s for s in d.all_servers()}
        out: dict[str, Any] = {"t": time.monotonic()}
        for name, busy in true.items():
            s = seen[name]
            load = Load(s.get("running") or 0, s.get("queued") or 0, s.get("capacity"))
            out[name] = {
                "true_busy": busy,
                "reported_busy": load.busy,
                "latency_s": s["latency_s"],
                "expected_delay_s": expected_delay(s["latency_s"], load),
            }
        return out

    return sample


def summarise_view(samples: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """How far the daemon's picture is from the servers' own, over a run's samples."""
    if not samples:
        return {"samples": 0}
    errors = [abs(s[n]["true_busy"] - s[n]["reported_busy"]) for s in samples for n in names]
    # The daemon's figures lag the servers': the shift that matches them best says by
    # how much (in sampling steps, converted to seconds).
    step = (samples[-1]["t"] - samples[0]["t"]) / max(1, len(samples) - 1)
    by_lag = {}
    for lag in range(0, min(12, len(samples) - 1)):
        pairs = [
            abs(samples[i][n]["reported_busy"] - samples[i - lag][n]["true_busy"])
            for i in range(lag, len(samples))
            for n in names
        ]
        by_lag[lag] = sum(pairs) / len(pairs)
    best_lag = min(by_lag, key=lambda k: by_lag[k]) if by_lag else 0
    favourite_busiest = favourite_busy = 0
    chance = 0.0
    mean_busy = 0.0
    spreads = []
    counted = 0
    for s in samples:
        delays = {n: s[n]["expected_delay_s"] for n in names if s[n]["expected_delay_s"]}
        lat = [s[n]["latency_s"] for n in names if s[n]["latency_s"]]
        if lat:
            spreads.append(max(lat) / min(lat))
        if not delays:
            continue
        counted += 1
        fav = min(delays, key=lambda n: delays[n])
        busy = {n: s[n]["true_busy"] for n in names}
        favourite_busiest += busy[fav] == max(busy.values())
        # A server drawn at random is the busiest (ties count) this often.
        chance += sum(b == max(busy.values()) for b in busy.values()) / len(busy)
        favourite_busy += busy[fav]
        mean_busy += sum(busy.values()) / len(busy)
    latency = {n: [s[n]["latency_s"] for s in samples if s[n]["latency_s"]] for n in names}
    return {
        "samples": len(samples),
        "mean_abs_error_reported_vs_true_busy": round(sum(errors) / len(errors), 2),
        "true_busy_mean": round(
            sum(s[n]["true_busy"] for s in samples for n in names) / len(errors), 2
        ),
        "reported_matches_true_best_this_many_s_earlier": round(best_lag * step, 2),
        "mean_abs_error_at_that_lag": round(by_lag.get(best_lag, 0.0), 2),
        "lowest_expected_delay_was_truly_busiest_percent": (
            round(100 * favourite_busiest / counted, 1) if counted else None
        ),
        "a_random_server_was_busiest_percent": (
            round(100 * chance / counted, 1) if counted else None
        ),
        "true_busy_of_lowest_expected_delay_mean": (
            round(favourite_busy / counted, 2) if counted else None
        ),
        "true_busy_fleet_mean": round(mean_busy / counted, 2) if counted else None,
        "latency_estimate_max_over_min_mean": (
            round(sum(spreads) / len(spreads), 2) if spreads else None
        ),
        "latency_estimate_s_mean": {
            n: round(sum(v) / len(v), 3) if v else None for n, v in latency.items()
        },
    }


# --- a fleet, every policy ---------------------------------------------------------------------


def run_fleet(label: str, slow: tuple[float, ...], peer_error: str | None) -> dict[str, Any]:
    runs: dict[str, Run] = {}
    with work_dir(f"fleet_{label}") as folder, fleet(folder, slow) as (started, d):
        names = [s.name for s in started]
        model = str(d.all_servers()[0]["model_path"])
        config = str(d.harness.config_path)
        pids = {s.proc.pid: s.name for s in started}

        def settle() -> None:
            time.sleep(SETTLE_S)

        def one(policy: str, make: Callable[[int], Caller], watch: bool = False) -> None:
            print(f"{label}: {policy}", file=sys.stderr, flush=True)
            run = run_policy(policy, make, names, daemon_view(d, started) if watch else None)
            if watch:
                run.extra["daemon_view"] = summarise_view(run.extra.pop("samples"), names)
            runs[policy] = run
            settle()

        one("round_robin", round_robin_callers(started, model))
        one("spread", ours_callers(config, "spread"), watch=True)
        moves = Moves()
        one("key", ours_callers(config, "key", moves), watch=True)
        runs["key"].extra["moves"] = moves.summary(runs["key"].window, names)
        runs["key"].extra["keys_per_home_server"] = dict(
            sorted(Counter(key_home(i, names) for i in range(CALLERS)).items())
        )
        if peer_error is None:
            for policy in ROUTER_POLICIES:
                try:
                    with Router(folder, [s.url for s in started], policy=policy) as router:
                        router.start()
                        one(f"router_{policy}", router_callers(router, model, pids))
                except RouterUnavailable as exc:
                    peer_error = str(exc)
                    break
        one("old", ours_callers(config, "old"), watch=True)
        estimates = {
            s["name"]: {
                "latency_s": s["latency_s"],
                "capacity": s.get("capacity"),
            }
            for s in d.all_servers()
        }
    return {"runs": runs, "peer_error": peer_error, "estimates_at_end": estimates}


def _target(fleet_label: str, policy: str, metric: str, rr: float | None) -> str | None:
    spec = TARGETS.get((fleet_label, policy, metric))
    if spec is None or rr is None:
        return None
    factor, op = spec
    bound = factor * rr
    return f"{op} {round(bound, 3 if metric != 'rps' else 1):g}"


def _fleet_words(label: str) -> str:
    if label == "equal":
        return f"{SERVERS} equal servers"
    return f"{SERVERS} servers, one {SLOW_FACTOR:g}x slower"


def _describe(label: str) -> str:
    alone = full_batch_s()
    return (
        f"{_fleet_words(label)} (simulated: --max-running-requests {CAPACITY}, per-token "
        f"time +{100 * BATCH_SLOWDOWN:g} % per other request in the batch, {1e3 * TTFT_S:g} ms "
        f"to the first token, {1e3 * TOKEN_S:g} ms a token, {TOKENS} tokens, +-"
        f"{100 * NOISE:g} % noise: a full batch answers in about {alone:.2f} s, about "
        f"{CAPACITY / alone:.0f} requests/s a server"
        + (
            f"; the slow one {full_batch_s(SLOW_FACTOR):.2f} s, "
            f"{CAPACITY / full_batch_s(SLOW_FACTOR):.0f} requests/s"
            if label == "slow"
            else ""
        )
        + f"), probed-only by the daemon (probe and load read every {PROBE_INTERVAL_S:g} s); "
        f"{CALLERS} callers, each its own client, closed loop, {WINDOW_S:g} s measured after "
        f"{WARMUP_S:g} s of warm-up"
    )


def _summary(name: str, f: dict[str, Any]) -> str:
    return (
        f"{name} {f['requests_per_s']:g} requests/s, p50 {f['p50_s']} s, p99 {f['p99_s']} s, "
        f"busiest server {f['busiest_share_percent']} %"
    )


LABELS = {
    "round_robin": "round robin",
    "spread": "ours without a key",
    "key": "ours with keys",
    "old": "ours before spreading",
    "router_power_of_two": "the router's power_of_two",
    "router_cache_aware": "the router's cache_aware",
    "router_round_robin": "the router's round_robin",
}


def _share(f: dict[str, Any], name: str) -> float:
    total = sum(f["per_server"].values()) or 1
    return round(100 * f["per_server"].get(name, 0) / total, 1)


def _per_server(f: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{n} {f['per_server'][n]}" for n in names)


def _spread_remark(label: str, figs: dict[str, dict[str, Any]], names: list[str]) -> str:
    """What the run showed about spreading without a key (a remark under the table)."""
    f = figs["spread"]
    rr = figs["round_robin"]
    parts = [
        f"ours without a key: requests per server {_per_server(f, names)}; the busiest "
        f"server's share of each second's requests averaged "
        f"{f['busiest_share_per_second_percent']} % (round robin "
        f"{rr['busiest_share_per_second_percent']} %), and a request waited in one server's "
        f"queue while another had a free batch slot "
        f"{f['queued_while_a_slot_was_free_percent']:g} % of the window (round robin "
        f"{rr['queued_while_a_slot_was_free_percent']:g} %)",
    ]
    view = f.get("daemon_view") or {}
    if view.get("samples"):
        estimates = view["latency_estimate_s_mean"]
        parts.append(
            f"sampled every {SAMPLE_S:g} s, the load the daemon showed was off the servers' "
            f"own by {view['mean_abs_error_reported_vs_true_busy']:g} requests on average "
            f"(they held {view['true_busy_mean']:g}) and matched best their load "
            f"{view['reported_matches_true_best_this_many_s_earlier']:g} s earlier; the "
            "server with the lowest expected delay in the daemon's figures was in fact the "
            f"busiest in {view['lowest_expected_delay_was_truly_busiest_percent']} % of "
            f"samples (a server drawn at random: {view['a_random_server_was_busiest_percent']} "
            f"%) and held {view['true_busy_of_lowest_expected_delay_mean']} requests on average "
            f"(the fleet's mean {view['true_busy_fleet_mean']})"
            + (
                ": the load figures did not point the callers to a server with room"
                if view["true_busy_of_lowest_expected_delay_mean"] >= view["true_busy_fleet_mean"]
                else ""
            )
            + "; the latency estimates "
            "(which client samples taken under load feed) averaged "
            + ", ".join(f"{n} {v} s" for n, v in estimates.items())
        )
    parts.append(
        "each request draws two servers and takes the one with the smaller expected delay "
        "(latency estimate x (1 + requests there / capacity)) from the load the daemon read "
        f"up to {LOAD_INTERVAL_S:g} s earlier, which the client keeps up to another "
        f"{CANDIDATE_TTL_S:g} s (its "
        "candidate cache), plus only its own requests in flight (one at most here): the "
        f"other {CALLERS - 1} callers' recent requests are invisible to it, and while the "
        "expected delays keep one order, two random choices give the servers 50, 33, 17 "
        "and 0 % of the requests"
    )
    if label == "slow":
        parts.append(
            f"the slow server {names[-1]} served {_share(f, names[-1])} % of the requests "
            f"(round robin {_share(rr, names[-1])} %)"
        )
    return "; ".join(parts) + "."


def _key_remark(label: str, figs: dict[str, dict[str, Any]], names: list[str]) -> str:
    f = figs["key"]
    homes = f.get("keys_per_home_server") or {}
    text = (
        f"ours with keys: requests per server {_per_server(f, names)}, "
        f"{f['affinity_percent']} % of requests on the caller's previous server. Rendezvous "
        f"hashing put the {CALLERS} keys "
        + ", ".join(f"{homes.get(n, 0)} on {n}" for n in names)
        + f" ({CALLERS // len(names)} each would be even), and bounded loads move a key only "
        f"while its server, in the load last read, is both over {BOUND:g}x its share and out "
        "of batch slots"
    )
    cache = figs.get("router_cache_aware")
    if cache is not None:
        text += (
            f"; the router's cache_aware ({_per_server(cache, names)}) sent each caller's first "
            "request, whose prompt matched no worker's cached text well enough, to the worker "
            "with the smallest cache tree, which spreads new prompts evenly, and then kept "
            "each caller where its own prompt prefix was cached (every caller's prompts "
            "start with its name)"
        )
    text += "; " + _moves_words(f, names, label)
    if label == "slow":
        text += (
            f"; the slow server {names[-1]} served {_share(f, names[-1])} % of the requests: "
            f"a server {SLOW_FACTOR:g}x slower than the fastest still owns keys (the affinity "
            f"pool leaves out only servers {AFFINITY_MAX_RATIO:g}x slower), so its keys stay on "
            "it while it has "
            "free batch slots"
        )
    return text + "."


def _moves_words(f: dict[str, Any], names: list[str], label: str) -> str:
    moves = f.get("moves") or {}
    if not moves.get("count"):
        return "no request moved"
    why = ", ".join(f"{n} because {reason}" for reason, n in moves["why"].items())
    text = (
        f"{moves['count']} requests of {moves['callers_that_moved']} callers moved ({why}): "
        f"{moves['left_home']} left the server the key hashes to and {moves['came_home']} "
        "came back to it (a key passed over and given back moves twice); they left "
        + ", ".join(f"{n} {c} times" for n, c in moves["from"].items())
    )
    if label == "slow":
        text += f" ({names[-1]} is the slow one)"
    return text


def emit_fleet(label: str, out: dict[str, Any]) -> None:
    runs: dict[str, Run] = out["runs"]
    names = next(iter(runs.values())).names
    figs = {policy: run.figures() for policy, run in runs.items()}
    rr = figs["round_robin"]
    scenario = _scenario(label)
    detail = {
        "fleet": _describe(label),
        "servers": {
            n: {"slow_factor": SLOW_FACTOR if (label == "slow" and n == names[-1]) else 1.0}
            for n in names
        },
        "policies": figs,
        "daemon_estimates_at_end": out["estimates_at_end"],
        "sglang_router_error": out["peer_error"],
        "targets": {
            f"{p} {m}": f"{op} {k:g}x round robin"
            for (fl, p, m), (k, op) in TARGETS.items()
            if fl == label
        },
    }
    if label == "equal":
        detail["targets"]["key affinity"] = f">= {AFFINITY_TARGET:g} %"
    routers = "; ".join(_summary(LABELS[p], figs[p]) for p in figs if p.startswith("router_"))
    remarks = {
        ("spread", "rps"): (
            f"{_describe(label)}. "
            + "; ".join(
                _summary(LABELS[p], figs[p]) for p in ("round_robin", "spread", "key", "old")
            )
            + (f"; {routers}" if routers else "")
            + (f". sglang-router not measured: {out['peer_error']}" if out["peer_error"] else "")
            + "."
        ),
        ("spread", "p99"): _spread_remark(label, figs, names),
        ("key", "rps"): _key_remark(label, figs, names),
    }
    metrics = (
        ("rps", "requests/s answered", "requests/s", "requests_per_s", "higher"),
        ("p50", "p50 latency", "s", "p50_s", "lower"),
        ("p99", "p99 latency", "s", "p99_s", "lower"),
        ("busiest", BUSIEST_WORDS, "%", "busiest_share_percent", "lower"),
        ("failed", "requests failed", "requests", "failed", "lower"),
    )
    for policy in ("spread", "key", "old"):
        f = figs[policy]
        peer = figs.get(f"router_{PEER_OF[policy]}")
        for metric, words, unit, key, better in metrics:
            factor = TARGETS.get((label, policy, metric))
            target_words = f"; target {factor[1]} {factor[0]:g}x round robin" if factor else ""
            r = row(
                scenario,
                f"{words}, {OURS[policy]} (sglang-router: {PEER_OF[policy]}{target_words})",
                unit,
                f[key],
                better=better,
                target=_target(label, policy, metric, rr[key]),
                round_robin=rr[key],
                sglang_router=peer[key] if peer else None,
            )
            if _flagged(r):
                r["note"] = _note(label, policy, metric, figs, names)
            # The whole fleet's figures once, on its first row.
            extra = {"detail": detail} if (policy, metric) == ("spread", "rps") else {}
            emit({**r, "remark": remarks.get((policy, metric)), **extra})
        if policy == "key":
            cache = figs.get("router_cache_aware")
            r = row(
                scenario,
                f"requests served where the caller's previous one was, {OURS[policy]} "
                "(sglang-router: cache_aware)",
                "%",
                f["affinity_percent"],
                better="higher",
                target=f">= {AFFINITY_TARGET:g}" if label == "equal" else None,
                round_robin=rr["affinity_percent"],
                sglang_router=cache["affinity_percent"] if cache else None,
            )
            if _flagged(r):
                r["note"] = _note(label, policy, "affinity", figs, names)
            emit(r)


def _flagged(r: dict[str, Any]) -> bool:
    """Whether the report will mark the row: a missed target or a comparison ahead."""
    ours = r["ours"]
    if ours is None:
        return True
    if r["target"]:
        op, _, number = r["target"].partition(" ")
        if not {">=": ours >= float(number), "<=": ours <= float(number)}[op]:
            return True
    for key in ("round_robin", "sglang_router"):
        other = r.get(key)
        if other is not None and (ours < other if r["better"] == "higher" else ours > other):
            return True
    return False


def _note(
    label: str, policy: str, metric: str, figs: dict[str, dict[str, Any]], names: list[str]
) -> str:
    """The run's own account of a marked row, briefly (the remarks above the list hold
    the whole picture)."""
    f = figs[policy]
    rr = figs["round_robin"]
    if f["requests_per_s"] is None or f["p50_s"] is None:
        return "no request was answered in the window"
    per_second = (
        f"the busiest server took {f['busiest_share_per_second_percent']} % of each second's "
        f"requests (round robin {rr['busiest_share_per_second_percent']} %)"
    )
    if policy == "old":
        return f"for reference: the daemon's best first crowds the callers together; {per_second}"
    if policy == "spread":
        if label == "slow" and metric in ("p50", "busiest"):
            return (
                f"the slow server got {_share(f, names[-1])} % of the requests, so the fast "
                "ones carry more than under round robin, which keeps a quarter of the callers "
                "queued on the slow one (a faster median, a far slower p99)"
            )
        if metric == "busiest":
            return f"even over the window, not second by second: {per_second}"
        view = f.get("daemon_view") or {}
        fav = view.get("lowest_expected_delay_was_truly_busiest_percent")
        text = f"herding on a stale picture of the load: {per_second}"
        if fav is not None:
            text += (
                f"; the server with the lowest expected delay was in fact the busiest in {fav} "
                f"% of samples (a random one: {view.get('a_random_server_was_busiest_percent')} "
                "%)"
            )
        return text + f"; see the remarks on {_scenario(label)}"
    if metric == "affinity":
        return _moves_words(f, names, label)
    homes = f.get("keys_per_home_server") or {}
    return (
        "the keys hash unevenly ("
        + ", ".join(f"{homes.get(n, 0)} on {n}" for n in names)
        + ") and move only while their server looks overloaded in the load last read; see "
        f"the remarks on {_scenario(label)}"
    )


def _scenario(label: str) -> str:
    return f"fleet_{label}"


def bench_fleet() -> None:
    peer_error = router_peer.unavailable_reason()
    equal = run_fleet("equal", (1.0,) * SERVERS, peer_error)
    emit_fleet("equal", equal)
    slow = run_fleet("slow", (1.0,) * (SERVERS - 1) + (SLOW_FACTOR,), equal["peer_error"])
    emit_fleet("slow", slow)


SCENARIOS: dict[str, Callable[[], None]] = {"fleet": bench_fleet}


def main() -> int:
    return run_scenarios(SCENARIOS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
