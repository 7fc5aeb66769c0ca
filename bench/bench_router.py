"""Ours (``ms_client.ModelServer`` + the daemon) against the SGLang router, on the same
simulated servers, in the same run.

Every fleet here is the real daemon (``modelserverd run``, the contract's default
settings) supervising simulated SGLang servers (``python -m supervisord_ms.sim``) on a
``file:`` GPU view. The peer is ``sglang-router`` (see ``bench/router_peer.py``),
launched on loopback in front of the same kind of fleet with its default settings.

* ``overhead``: one server answering at once (no simulated time to first token or per
  token). The same streamed chat request (8 tokens) three ways, interleaved in random
  order: the streamed floor straight to the server (the baseline),
  ``ModelServer.get_completion`` (asks the daemon at most once a second, streams,
  parses, reports the sample in the background), and the streamed floor through the
  router. The floor is the leanest caller that gets the answer's text from a stream
  (see :class:`SseFloor`): a keep-alive ``http.client`` connection whose timeout is
  set once when it opens, one POST, the response read line by line, each ``data:``
  event's JSON parsed with ``json.loads`` for its ``delta.content`` until ``[DONE]``,
  then the rest of the body read so the connection can be reused. Parsing is part of
  it because no caller gets tokens without it; reading lines and parsing nothing would
  be a floor no real caller sits on. ``ModelServer`` can come out at or below it: it
  reads the answer from the socket itself, not through ``http.client``'s response
  (whose line-by-line chunked reading is most of the floor's own time). The same
  request not streamed (one read of the whole body, no parsing) goes direct and through
  the router too, for the router's remark only. Rows: the added latency per request
  over the floor, p50 and p99.
* ``failover_kill`` / ``failover_hang`` / ``failover_errors`` / ``failover_slow``: three
  equal servers; a steady open-loop stream of chat requests (20 a second for 10 s, each
  on its own thread, so a request that hangs does not hold the next one back); after 2 s
  the fault goes into the server that answered most requests in the last second (the one
  currently chosen): SIGKILL of the simulator; ``/sim/fault`` hang (the port stays open,
  nothing answers); 500 on every generation request; every latency 5x. The fault window
  is the 8 s after it; requests still unanswered 2 s after the window are counted as
  failed. Rows: requests failed, p99 latency of the requests sent in the window (a
  failure counts with the time its caller waited), and the time from the fault to the
  last request sent to the faulty server (ours: the client's attempts, seen in its
  transport; the router: its per-worker attempt counters, sampled every 0.1 s). After a
  SIGKILL the daemon relaunches the server; requests to the new process once it is
  ready do not count as sent to the faulty server. Ours and the router each get a fresh
  fleet.
* ``affinity``: 4 servers, 100 conversations x 5 turns, interleaved at random (fixed
  seed); every turn sends the whole conversation so far (a system prompt, the user
  turns and the answers). Ours: one ``ModelServer`` per conversation with the
  conversation as session key; the router with its default ``cache_aware`` policy, and
  with ``round_robin``. Rows: the share of turns served where the conversation's previous
  turn was, and the load spread (max / min requests per server).

Run: .venv/bin/python bench/bench_router.py overhead|failover_kill|...|affinity [...]
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_peer  # noqa: E402
from common import (  # noqa: E402
    BenchDaemon,
    emit,
    free_ports,
    percentile,
    row,
    run_scenarios,
    sim_fault,
    wait_for,
    work_dir,
)
from ms_client import ModelServer  # noqa: E402
from ms_client._policy import MID_ANSWER_FLOOR_S  # noqa: E402
from ms_client._transport import HttpTransport  # noqa: E402
from router_peer import Router, RouterUnavailable  # noqa: E402

from supervisord_ms.store import parse_iso  # noqa: E402

PROMPT = "Say hello in one short sentence."
MAX_TOKENS = 8
# Ready at once, little simulated GPU memory; the speeds are per scenario.
QUICK_SIM = ["--sim-startup-s", "0", "--sim-warmup-s", "0", "--sim-gpu-mib", "1024"]
# Teardown only: a hung simulator is not kept waiting for the default 30 s.
DAEMON = {"stop_timeout_s": 5.0}


def _sim(ttft_s: float, token_s: float, output_tokens: int = 32) -> list[str]:
    return [
        *QUICK_SIM,
        "--sim-ttft-s",
        str(ttft_s),
        "--sim-token-latency-s",
        str(token_s),
        "--sim-output-tokens",
        str(output_tokens),
    ]


@contextlib.contextmanager
def fleet(
    folder: Path, count: int, sim: list[str], *, estimates: bool = True
) -> Iterator[BenchDaemon]:
    """The daemon with ``count`` simulated servers, all ready (and, for ours, with a
    latency estimate each, so the client's first choice is an informed one)."""
    ports = free_ports(count)
    servers = [{"name": f"s{i}", "port": ports[i], "gpus": [i]} for i in range(count)]
    with BenchDaemon(folder, servers, daemon=DAEMON, sim_args=sim, gpus=count) as d:
        d.start()
        d.wait_all_ready(120)
        if estimates:
            wait_for(
                lambda: all(s["latency_s"] is not None for s in d.all_servers()),
                60,
                "a latency estimate for every server",
                0.2,
            )
        yield d


def _urls(d: BenchDaemon) -> list[str]:
    return [f"http://127.0.0.1:{s['port']}" for s in d.servers]


def _chat_body(model: str, messages: list[dict[str, Any]], *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS}
    if stream:  # what ModelServer sends
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


class BareClient:
    """Keep-alive POSTs with ``http.client``, one connection per thread: the least a
    caller can do (the baseline, and how requests reach the router here)."""

    def __init__(self, port: int):
        self.port = port
        self._local = threading.local()

    def post(self, path: str, payload: bytes, timeout: float) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            self._local.conn = None
            raise
        if resp.will_close:
            conn.close()
            self._local.conn = None
        return resp.status, data


def _pid_of(answer_id: str) -> int | None:
    """The simulator's pid from a response id (``chatcmpl-<pid hex><8 hex digits>``)."""
    tail = answer_id.rsplit("-", 1)[-1]
    if len(tail) <= 8:
        return None
    try:
        return int(tail[:-8], 16)
    except ValueError:
        return None


class Names:
    """Server name of a simulator pid, from the daemon (refreshed on a miss: a
    relaunched server has a new pid)."""

    def __init__(self, d: BenchDaemon):
        self.d = d
        self._lock = threading.Lock()
        self._by_pid: dict[int, str] = {}
        self.refresh()

    def refresh(self) -> None:
        with contextlib.suppress(Exception):
            found = {s["pid"]: s["name"] for s in self.d.all_servers() if s["pid"]}
            with self._lock:
                self._by_pid.update(found)

    def name(self, pid: int | None) -> str | None:
        if pid is None:
            return None
        with self._lock:
            known = self._by_pid.get(pid)
        if known is None:
            self.refresh()
            with self._lock:
                known = self._by_pid.get(pid)
        return known


# --- overhead -------------------------------------------------------------------------------


class SseFloor:
    """The leanest streamed chat request a caller can make, for the ``overhead`` floor.

    One keep-alive ``http.client`` connection, its timeout set once when it opens;
    per request one POST, then the response line by line: each ``data:`` event is
    parsed with ``json.loads`` and its ``choices[0].delta.content`` kept, until
    ``[DONE]``; what follows (the chunked body's end) is read so the connection stays
    reusable. No deadlines per read, no pool, no report: the least that still gets the
    text of a streamed answer.
    """

    def __init__(self, port: int, timeout: float = 10.0):
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def chat(self, payload: bytes) -> str:
        conn = self._conn
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self._conn = conn
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=payload,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"answered {resp.status}: {resp.read()[:200]!r}")
            parts: list[str] = []
            for line in iter(resp.readline, b""):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                choices = json.loads(data).get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        parts.append(content)
            resp.read()
        except BaseException:
            conn.close()
            self._conn = None
            raise
        if resp.will_close:
            conn.close()
            self._conn = None
        return "".join(parts)


# Issue 11: the client's choice must stay cheap next to the request itself.
OVERHEAD_TARGET_MS = 0.15


def bench_overhead(rounds: int = 600, warmup: int = 100) -> None:
    peer_error = router_peer.unavailable_reason()
    names = ("direct", "ours", "router", "direct_plain", "router_plain")
    samples: dict[str, list[float]] = {name: [] for name in names}
    with work_dir("overhead") as folder, fleet(folder, 1, _sim(0.0, 0.0, MAX_TOKENS)) as d:
        server = d.all_servers()[0]
        messages = [{"role": "user", "content": PROMPT}]
        streamed = json.dumps(_chat_body(server["model_path"], messages, stream=True)).encode()
        plain = json.dumps(_chat_body(server["model_path"], messages, stream=False)).encode()
        direct = BareClient(server["port"])
        floor = SseFloor(server["port"])
        router: Router | None = None
        via_router: BareClient | None = None
        floor_via_router: SseFloor | None = None
        try:
            if peer_error is None:
                try:
                    router = Router(folder, _urls(d)).start()
                    via_router = BareClient(router.port)
                    floor_via_router = SseFloor(router.port)
                except RouterUnavailable as exc:
                    peer_error = str(exc)
            llm = ModelServer("8B", config=str(d.harness.config_path))
            try:

                def bare(client: BareClient, payload: bytes) -> Callable[[], None]:
                    def run() -> None:
                        status, body = client.post("/v1/chat/completions", payload, 10)
                        if status != 200:
                            raise RuntimeError(f"answered {status}: {body[:200]!r}")

                    return run

                def streamed_floor(client: SseFloor) -> Callable[[], None]:
                    def run() -> None:
                        if not client.chat(streamed):
                            raise RuntimeError("the streamed answer had no text")

                    return run

                def run_ours() -> None:
                    llm.get_completion(PROMPT, max_tokens=MAX_TOKENS)

                paths: dict[str, Callable[[], None]] = {
                    "direct": streamed_floor(floor),
                    "ours": run_ours,
                    "direct_plain": bare(direct, plain),
                }
                if via_router is not None and floor_via_router is not None:
                    paths["router"] = streamed_floor(floor_via_router)
                    paths["router_plain"] = bare(via_router, plain)
                rng = random.Random(7)
                order = list(paths)
                for i in range(warmup + rounds):
                    rng.shuffle(order)
                    for name in order:
                        began = time.perf_counter()
                        paths[name]()
                        took = time.perf_counter() - began
                        if i >= warmup:
                            samples[name].append(took * 1e3)
            finally:
                llm.close()
        finally:
            if router is not None:
                router.close()

    def pct(name: str, q: float) -> float | None:
        return percentile(samples[name], q) if samples[name] else None

    def added(name: str, base: str, q: float) -> float | None:
        a, b = pct(name, q), pct(base, q)
        return round(a - b, 3) if a is not None and b is not None else None

    detail: dict[str, Any] = {
        "rounds": rounds,
        "request": f"streamed chat completion, {MAX_TOKENS} tokens, server answers at once",
        "ms": {
            name: {"p50": round(pct(name, 50) or 0.0, 4), "p99": round(pct(name, 99) or 0.0, 4)}
            for name in names
            if samples[name]
        },
        "sglang_router_error": peer_error,
    }
    remark = _peer_remark(peer_error)
    plain50 = added("router_plain", "direct_plain", 50)
    if remark is None and plain50 is not None:
        detail["router_added_ms_not_streamed"] = {
            "p50": plain50,
            "p99": added("router_plain", "direct_plain", 99),
        }
        remark = (
            f"a streamed answer through the router ends about 40 ms late: the router does not "
            f"set TCP_NODELAY on the connections it accepts, so its last small write waits "
            f"for the client's delayed ACK (up to 40 ms on Linux); the same request not "
            f"streamed adds {plain50:g} ms p50 through the router. ModelServer always "
            "streams (it is how it tells a hung server from a slow one)"
        )
    for q in (50, 99):
        ours = added("ours", "direct", q)
        assert ours is not None
        peer = added("router", "direct", q)
        target = f"<= {OVERHEAD_TARGET_MS:g}" if q == 50 else None
        reasons = []
        if peer is not None and ours > peer:
            reasons.append(f"the router hop adds {peer:.3f} ms at p{q}, ours {ours:.3f} ms")
        if target and ours > OVERHEAD_TARGET_MS:
            reasons.append(f"ours adds {ours:.3f} ms, over the {OVERHEAD_TARGET_MS:g} ms target")
        note = None
        if reasons:
            note = (
                "; ".join(reasons)
                + ": beyond the floor's own work (one POST, the stream read line by line, "
                "each event parsed), ModelServer checks its cached candidates (it asks the "
                "daemon over the Unix socket at most once a second), applies a deadline to "
                "every read, parses each event for reasoning, tool calls and usage too, "
                "and queues a latency sample for the daemon"
            )
        emit(
            {
                **row(
                    "overhead",
                    f"added latency per request over the leanest streamed request "
                    f"(http.client, SSE read line by line, {MAX_TOKENS} tokens): p{q}",
                    "ms",
                    ours,
                    better="lower",
                    target=target,
                    sglang_router=peer,
                    note=note,
                ),
                "remark": remark if q == 50 else None,
                "detail": detail,
            }
        )


def _peer_remark(error: str | None) -> str | None:
    if error:
        return f"sglang-router not measured: {error}"
    return None


# --- failover ------------------------------------------------------------------------------

RATE = 20.0  # requests a second, open loop
PRE_S = 2.0  # the stream runs this long before the fault
WINDOW_S = 8.0  # the fault window
GRACE_S = 2.0  # how long after the window unanswered requests are still waited for
SAMPLE_S = 0.1  # how often the router's counters are read
FAILOVER_TTFT_S = 0.02  # the simulated servers' time to first token (then 5 ms a token)


@dataclass
class Outcome:
    start: float
    end: float | None = None
    ok: bool = False
    server: str | None = None
    error: str | None = None


def router_sender(
    client: BareClient, payload: bytes, names: Names
) -> Callable[[Outcome, float], None]:
    """A whole (not streamed) chat request through a router, filling in an Outcome:
    which server answered (from the response id), or why it failed."""

    def send(o: Outcome, cutoff: float) -> None:
        try:
            timeout = max(0.05, cutoff - time.monotonic())
            status, data = client.post("/v1/chat/completions", payload, timeout)
            if status != 200:
                o.error = f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}"
                return
            answer = json.loads(data)
            o.ok = bool(answer.get("choices"))
            o.server = names.name(_pid_of(str(answer.get("id", ""))))
            if not o.ok:
                o.error = f"no choices in {data[:200]!r}"
        except TimeoutError:
            o.error = "no answer by the end of the window"
        except Exception as exc:  # counted, then reported
            o.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            o.end = time.monotonic()

    return send


class TapTransport:
    """The client's own HTTP transport, noting when each attempt goes to which port."""

    def __init__(self) -> None:
        self.inner = HttpTransport()
        self.attempts: list[tuple[float, int]] = []

    def open(self, host: str, port: int, path: str, body: Any, *, deadline: float) -> Any:
        self.attempts.append((time.monotonic(), port))
        return self.inner.open(host, port, path, body, deadline=deadline)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Fault:
    kind: str
    name: str
    port: int
    at: float  # monotonic
    at_wall: float
    healthy_again: float | None = None  # monotonic; a relaunched server once ready


FAULTS: dict[str, dict[str, Any]] = {
    "hang": {"mode": "hang"},
    "errors": {"mode": "error"},
    "slow": {"mode": "slow", "slow_factor": 5},
}


def _inject(d: BenchDaemon, kind: str, name: str) -> Fault:
    info = d.server(name)
    at_wall, at = time.time(), time.monotonic()
    if kind == "kill":
        os.kill(info["pid"], signal.SIGKILL)
    else:
        sim_fault(info["port"], **FAULTS[kind])
    return Fault(kind, name, info["port"], at, at_wall)


def _chosen(outcomes: list[Outcome], now: float) -> str | None:
    recent = Counter(o.server for o in outcomes if o.ok and o.end and o.end >= now - 1.0)
    if not recent:
        recent = Counter(o.server for o in outcomes if o.ok)
    return recent.most_common(1)[0][0] if recent else None


@dataclass
class Phase:
    outcomes: list[Outcome]
    fault: Fault
    to_faulty: list[float]  # monotonic times of requests sent to the faulty server
    cutoff: float
    stop: float
    extra: dict[str, Any] = field(default_factory=dict)


def _stream(
    d: BenchDaemon,
    kind: str,
    send: Callable[[Outcome, float], None],
    before_fault: Callable[[], None] | None = None,
) -> tuple[list[Outcome], Fault, float, float]:
    """The open-loop stream with the fault injected ``PRE_S`` in. Returns the outcomes,
    the fault, the end of the window and the cutoff."""
    outcomes: list[Outcome] = []
    threads: list[threading.Thread] = []
    begin = time.monotonic()
    fault_at = begin + PRE_S
    stop = fault_at + WINDOW_S
    cutoff = stop + GRACE_S
    fault: Fault | None = None
    k = 0
    while True:
        due = begin + k / RATE
        if due >= stop:
            break
        if fault is None and due >= fault_at:
            name = _chosen(outcomes, time.monotonic())
            if name is None:
                raise RuntimeError(f"no request succeeded in the first {PRE_S:g} s")
            if before_fault is not None:
                before_fault()
            fault = _inject(d, kind, name)
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        outcome = Outcome(start=time.monotonic())
        outcomes.append(outcome)
        t = threading.Thread(target=send, args=(outcome, cutoff), daemon=True)
        t.start()
        threads.append(t)
        k += 1
    for t in threads:
        t.join(max(0.0, cutoff - time.monotonic()) + 0.5)
    assert fault is not None
    return outcomes, fault, stop, cutoff


def _healthy_again(d: BenchDaemon, fault: Fault) -> float | None:
    """When a killed server was ready again (monotonic), from the daemon's events."""
    if fault.kind != "kill":
        return None
    rows = d.query(
        "select ts from events where server = ? and new_state = 'ready' order by id", fault.name
    )
    for (ts,) in rows:
        wall = parse_iso(ts)
        if wall > fault.at_wall:
            return fault.at + (wall - fault.at_wall)
    return None


def _phase_ours(d: BenchDaemon, kind: str) -> Phase:
    tap = TapTransport()
    llm = ModelServer("8B", config=str(d.harness.config_path), transport=tap)
    try:
        for _ in range(5):
            llm.get_completion(PROMPT, max_tokens=MAX_TOKENS)

        def send(o: Outcome, cutoff: float) -> None:
            try:
                c = llm.get_completion(PROMPT, max_tokens=MAX_TOKENS)
                o.ok, o.server = True, c.server
            except Exception as exc:  # counted, then reported
                o.error = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                o.end = time.monotonic()

        outcomes, fault, stop, cutoff = _stream(d, kind, send)
        fault.healthy_again = _healthy_again(d, fault)
        until = fault.healthy_again or cutoff
        to_faulty = [t for t, port in tap.attempts if port == fault.port and fault.at <= t < until]
        return Phase(outcomes, fault, to_faulty, cutoff, stop)
    finally:
        llm.close()
        tap.close()


def _phase_router(d: BenchDaemon, kind: str, folder: Path) -> Phase:
    names = Names(d)
    model = d.all_servers()[0]["model_path"]
    payload = json.dumps(
        _chat_body(model, [{"role": "user", "content": PROMPT}], stream=False)
    ).encode()
    with Router(folder, _urls(d)) as router:
        router.start()
        client = BareClient(router.port)
        url_of = {s["name"]: f"http://127.0.0.1:{s['port']}" for s in d.servers}

        send = router_sender(client, payload, names)

        for _ in range(5):
            client.post("/v1/chat/completions", payload, 10)

        # The router's attempt counters, sampled until the cutoff.
        samples: list[tuple[float, dict[str, float]]] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                with contextlib.suppress(Exception):
                    samples.append((time.monotonic(), router.dispatches()))
                sampling.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        baseline: dict[str, dict[str, float]] = {}

        def before_fault() -> None:
            baseline["counts"] = router.dispatches()

        sampler.start()
        try:
            outcomes, fault, stop, cutoff = _stream(d, kind, send, before_fault)
        finally:
            sampling.set()
            sampler.join(5)
        fault.healthy_again = _healthy_again(d, fault)
        until = fault.healthy_again or cutoff
        url = url_of[fault.name]
        # A rise of the faulty worker's count between two samples: a request went there,
        # at the earliest at the earlier sample (the time in the peer's favour).
        to_faulty: list[float] = []
        previous_t, previous = fault.at, baseline["counts"].get(url, 0.0)
        for t, counts in samples:
            if t <= fault.at:
                continue
            now = counts.get(url, 0.0)
            if now > previous and previous_t < until:
                to_faulty.append(max(previous_t, fault.at))
            previous_t, previous = t, now
        final = samples[-1][1] if samples else {}
        opened: dict[str, float] = {}
        with contextlib.suppress(Exception):
            opened = router_peer.parse_breaker_opened(router.metrics())
        extra = {
            "router_breaker_opened": opened.get(url, 0.0),
            "router_attempts_to_faulty": final.get(url, 0.0) - baseline["counts"].get(url, 0.0),
            "router_attempts_by_worker_after": {
                u: final.get(u, 0.0) - baseline["counts"].get(u, 0.0) for u in url_of.values()
            },
            "router_log_tail": router.log_tail(5),
        }
        return Phase(outcomes, fault, to_faulty, cutoff, stop, extra)


@dataclass
class Figures:
    failed: int
    sent_in_window: int
    p50_s: float
    p99_s: float
    stopped_after_s: float
    never_stopped: bool
    errors: list[str]
    detail: dict[str, Any]


def _figures(p: Phase) -> Figures:
    f = p.fault
    affected = [o for o in p.outcomes if o.start <= p.stop and (o.end or p.cutoff) >= f.at]
    failed = [o for o in affected if not o.ok]
    in_window = [o for o in p.outcomes if f.at <= o.start <= p.stop]
    latencies = [(o.end if o.end is not None else p.cutoff) - o.start for o in in_window]
    last = max(p.to_faulty, default=f.at)
    open_until = min(f.healthy_again or p.stop, p.stop)
    never = bool(p.to_faulty) and f.healthy_again is None and last >= p.stop - 1.0
    stopped = WINDOW_S if never else max(0.0, last - f.at)
    served_by = Counter(o.server for o in in_window if o.ok)
    errors = Counter(
        (o.error or ("no answer by the cutoff" if o.end is None else "no error text"))[:120]
        for o in failed
    )
    detail = {
        "faulty_server": f.name,
        "sent_in_window": len(in_window),
        "failed": len(failed),
        "failed_before_fault": sum(1 for o in p.outcomes if not o.ok and o.start < f.at - 0.5),
        "unanswered_at_cutoff": sum(1 for o in affected if o.end is None),
        "unanswered_started_s": [round(o.start - f.at, 3) for o in affected if o.end is None][:10],
        "errors": dict(errors.most_common(3)),
        "served_in_window_by": dict(sorted((k or "?", v) for k, v in served_by.items())),
        "requests_to_faulty_server": len(p.to_faulty),
        "last_to_faulty_after_s": round(last - f.at, 3) if p.to_faulty else None,
        "faulty_until_s": round(open_until - f.at, 3),
        "p50_s": round(percentile(latencies, 50), 4) if latencies else None,
        **p.extra,
    }
    if f.healthy_again is not None:
        detail["relaunched_ready_after_s"] = round(f.healthy_again - f.at, 3)
    return Figures(
        failed=len(failed),
        sent_in_window=len(in_window),
        p50_s=round(percentile(latencies, 50), 3) if latencies else 0.0,
        p99_s=round(percentile(latencies, 99), 3) if latencies else 0.0,
        stopped_after_s=round(stopped, 3),
        never_stopped=never,
        errors=[e for e, _ in errors.most_common(2)],
        detail=detail,
    )


FAULT_WORDS = {
    "kill": "SIGKILL of the chosen server",
    "hang": "the chosen server hangs (port open, no answer)",
    "errors": "the chosen server answers 500",
    "slow": "the chosen server becomes 5x slower",
}


def _failover_notes(
    kind: str, ours: Figures, peer: Figures | None, defaults: dict[str, Any]
) -> dict[str, str | None]:
    """Per metric: why ours is behind the router where it is (None where it is not)."""
    notes: dict[str, str | None] = {"failed": None, "p99": None, "stopped": None}
    if peer is None:
        return notes
    if ours.failed > peer.failed:
        notes["failed"] = (
            f"ours lost {ours.failed} request(s) ({'; '.join(ours.errors) or 'no error text'})"
            f" where the router lost {peer.failed}"
        )
    if ours.p99_s > peer.p99_s:
        why = {
            "hang": "a request sent to the hung server waits for the client's first-token "
            "deadline (4x the server's usual time to first token, at least 0.5 s) before "
            "it moves on",
            "slow": "the client moves only after repeated slowness (3 of the last 5 "
            "requests over 2x the expected latency), so a few requests are served slowly "
            "first",
            "kill": "requests in flight on the killed server are retried elsewhere, which "
            "costs them a second attempt",
            "errors": "a request that got a 500 is retried on the next server, which costs "
            "it a second attempt",
        }[kind]
        notes["p99"] = f"p99 {ours.p99_s:g} s against the router's {peer.p99_s:g} s: {why}"
    if ours.stopped_after_s > peer.stopped_after_s:
        notes["stopped"] = (
            f"ours sent its last request to the faulty server {ours.stopped_after_s:g} s "
            f"after the fault, the router {peer.stopped_after_s:g} s: "
            + {
                "hang": "requests already on their way when the first one missed its "
                "first-token deadline still went there",
                "slow": "the client needs 3 slow answers out of 5 before it moves, and the "
                "daemon's probes (every 5 s) confirm it afterwards",
                "kill": "requests that had already chosen the server when it died still "
                "tried it once",
                "errors": "requests that had already chosen the server still tried it once",
            }[kind]
        )
    return notes


def _failover_remark(
    kind: str, ours: Figures, peer: Figures | None, error: str | None, defaults: dict
) -> str:
    """What happened, for the README: the router's behaviour at its defaults, and what
    ours lost if anything (all from the run's own records)."""
    text = f"{FAULT_WORDS[kind]}. "
    if ours.failed:
        text += f"Ours lost {ours.failed} request(s) ({'; '.join(ours.errors)}). "
        started = ours.detail.get("unanswered_started_s") or []
        if kind == "hang" and started and max(started) < 0:
            text += (
                f"Unanswered at the cutoff: sent {-max(started):g} s before the fault, so "
                f"already answering when the server hung (first token after "
                f"{FAILOVER_TTFT_S:g} s); once an answer has started, a whole-answer "
                f"request waits {MID_ANSWER_FLOOR_S:g} s (or 100 tokens' usual time, if "
                "longer) for the next chunk before it retries the request elsewhere, longer "
                "than this window. "
            )
    if peer is None:
        return text + f"sglang-router not measured: {error}"
    d = defaults
    attempts = peer.detail.get("router_attempts_to_faulty", 0.0)
    opened = peer.detail.get("router_breaker_opened", 0.0)
    breaker = (
        f"its circuit breaker for that worker opened ({d.get('cb_failure_threshold', '?')} "
        f"failures in a row; open for {d.get('cb_timeout_duration_secs', '?')} s)"
        if opened
        else f"its circuit breaker ({d.get('cb_failure_threshold', '?')} failures in a row) "
        "did not open"
    )
    text += (
        f"The router lost {peer.failed} of {peer.sent_in_window} requests and sent "
        f"{attempts:g} attempt(s) to the faulty worker"
    )
    if kind in ("kill", "errors"):
        text += (
            f"; a failed attempt is retried (up to {d.get('retry_max_retries', '?')} attempts, "
            f"backoff from {d.get('retry_initial_backoff_ms', '?')} ms, the policy choosing "
            f"the worker again each time), and {breaker}"
        )
        if peer.detail.get("relaunched_ready_after_s") is not None:
            text += (
                f"; the daemon had the server back {peer.detail['relaunched_ready_after_s']:g} "
                "s after the kill"
            )
    elif kind == "hang":
        text += (
            "; a hung worker accepts connections and never answers, so nothing failed fast: "
            f"the request timeout is {d.get('request_timeout_secs', '?')} s, the /health check "
            f"runs every {d.get('health_check_interval_secs', '?')} s (ejecting after "
            f"{d.get('health_failure_threshold', '?')} failures), and {breaker}. cache_aware "
            f"left that worker once it had {attempts:g} requests in flight (its load-balance "
            f"threshold: {d.get('balance_abs_threshold', '?')} more than the idlest and "
            f"{d.get('balance_rel_threshold', '?')}x as many); every one of them waited until "
            "its caller gave up"
        )
    else:
        text += (
            "; the router does not measure latency: cache_aware kept the requests on the "
            "worker whose cache tree matches their prompt, and the slower worker never had "
            f"the {d.get('balance_abs_threshold', '?')} extra requests in flight that trigger "
            "its load balancing"
        )
    if peer.never_stopped:
        text += (
            f"; it was still sending requests there at the end of the {WINDOW_S:g} s window "
            "(the row shows the window, a lower bound)"
        )
    return text + "."


def bench_failover(kind: str) -> None:
    peer_error = router_peer.unavailable_reason()
    defaults = router_peer.router_defaults() if peer_error is None else {}
    sim = _sim(FAILOVER_TTFT_S, 0.005)
    with work_dir(f"failover_{kind}_ours") as folder, fleet(folder, 3, sim) as d:
        ours = _figures(_phase_ours(d, kind))
    peer: Figures | None = None
    if peer_error is None:
        try:
            with (
                work_dir(f"failover_{kind}_router") as folder,
                fleet(folder, 3, sim, estimates=False) as d,
            ):
                peer = _figures(_phase_router(d, kind, folder))
        except RouterUnavailable as exc:
            peer_error = str(exc)
    scenario = f"failover_{kind}"
    notes = _failover_notes(kind, ours, peer, defaults)
    detail = {
        "ours": ours.detail,
        "sglang_router": peer.detail if peer else None,
        "sglang_router_error": peer_error,
        "sglang_router_defaults": defaults,
        "stream": {
            "rate_per_s": RATE,
            "fault_after_s": PRE_S,
            "window_s": WINDOW_S,
            "grace_s": GRACE_S,
            "servers": 3,
            "request": f"chat completion, {MAX_TOKENS} tokens, about 60 ms",
        },
    }
    remark = _failover_remark(kind, ours, peer, peer_error, defaults)
    emit(
        {
            **row(
                scenario,
                f"requests failed ({FAULT_WORDS[kind]}; 20 requests/s, {WINDOW_S:g} s window)",
                "requests",
                ours.failed,
                better="lower",
                sglang_router=peer.failed if peer else None,
                note=notes["failed"],
            ),
            "remark": remark,
            "detail": detail,
        }
    )
    emit(
        {
            **row(
                scenario,
                "p99 latency of requests sent in the fault window (failures: until the "
                "caller gave up)",
                "s",
                ours.p99_s,
                better="lower",
                sglang_router=peer.p99_s if peer else None,
                note=notes["p99"],
            ),
            "detail": detail,
        }
    )
    if kind == "slow":
        p50_note = None
        if peer is not None and ours.p50_s > peer.p50_s:
            p50_note = f"ours {ours.p50_s:g} s against the router's {peer.p50_s:g} s"
        emit(
            {
                **row(
                    scenario,
                    "median latency of requests sent in the fault window",
                    "s",
                    ours.p50_s,
                    better="lower",
                    sglang_router=peer.p50_s if peer else None,
                    note=p50_note,
                ),
                "detail": detail,
            }
        )
    emit(
        {
            **row(
                scenario,
                f"time until no request goes to the faulty server (the window, "
                f"{WINDOW_S:g} s, if it never stopped)",
                "s",
                ours.stopped_after_s,
                better="lower",
                sglang_router=peer.stopped_after_s if peer else None,
                note=notes["stopped"],
            ),
            "detail": detail,
        }
    )


# --- affinity --------------------------------------------------------------------------------

AFFINITY_SEED = 20261125
SYSTEM = "You are a helpful assistant. Answer briefly."
TOPICS = (
    "tides", "volcanoes", "bread", "chess", "comets", "bees", "glaciers", "jazz", "maps",
    "owls", "rust", "sails", "tea", "trains", "violins", "whales", "wheat", "wind",
)  # fmt: skip


def _conversations(count: int, turns: int) -> tuple[list[int], dict[int, list[str]]]:
    rng = random.Random(AFFINITY_SEED)
    order = [c for c in range(count) for _ in range(turns)]
    rng.shuffle(order)
    questions = {}
    for c in range(count):
        a, b = rng.sample(TOPICS, 2)
        questions[c] = [
            f"Conversation {c}, question {k + 1}: what links {a} and {b}, part {k + 1}?"
            for k in range(turns)
        ]
    return order, questions


@dataclass
class Placement:
    same: int = 0
    repeats: int = 0
    load: Counter = field(default_factory=Counter)
    unknown: int = 0
    moves: Counter = field(default_factory=Counter)  # why a turn left its server

    def share(self) -> float:
        return round(100 * self.same / self.repeats, 1) if self.repeats else 0.0

    def busiest(self, names: list[str]) -> float:
        total = sum(self.load.values())
        return round(100 * max(self.load.get(n, 0) for n in names) / total, 1) if total else 0.0


Send = Callable[[int, list[dict[str, str]], str | None], tuple[str | None, str, str | None]]


def _place(
    order: list[int], questions: dict[int, list[str]], send: Send, concurrency: int
) -> Placement:
    """Play the conversations: ``concurrency`` callers take the next turn in ``order``;
    a conversation's turns run one after the other. ``send(conv, messages, previous)``
    returns the server that answered, the answer, and why it moved (if it did)."""
    history: dict[int, list[dict[str, str]]] = {}
    previous: dict[int, str | None] = {}
    turn: Counter[int] = Counter()
    locks = {conv: threading.Lock() for conv in set(order)}
    out = Placement()
    out_lock = threading.Lock()
    pending = iter(order)
    pending_lock = threading.Lock()
    failures: list[BaseException] = []

    def caller() -> None:
        while not failures:
            with pending_lock:
                conv = next(pending, None)
            if conv is None:
                return
            with locks[conv]:
                messages = history.setdefault(conv, [{"role": "system", "content": SYSTEM}])
                messages.append({"role": "user", "content": questions[conv][turn[conv]]})
                turn[conv] += 1
                before = previous.get(conv)
                try:
                    server, text, why = send(conv, list(messages), before)
                except BaseException as exc:
                    failures.append(exc)
                    return
                messages.append({"role": "assistant", "content": text})
                previous[conv] = server
                with out_lock:
                    out.unknown += server is None
                    out.load[server] += 1
                    if conv in turn and turn[conv] > 1:
                        out.repeats += 1
                        out.same += before == server
                        if before != server:
                            out.moves[why or "unknown"] += 1

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if failures:
        raise failures[0]
    return out


def bench_affinity(
    conversations: int = 100, turns: int = 5, servers: int = 4, concurrency: int = 8
) -> None:
    peer_error = router_peer.unavailable_reason()
    order, questions = _conversations(conversations, turns)
    results: dict[str, Placement] = {}
    sim = _sim(0.01, 0.001, MAX_TOKENS)
    with work_dir("affinity_router") as folder, fleet(folder, servers, sim) as d:
        names = [s["name"] for s in d.servers]
        config = str(d.harness.config_path)
        clients: dict[int, ModelServer] = {}
        try:

            def ours(
                conv: int, messages: list[dict[str, str]], before: str | None
            ) -> tuple[str | None, str, str | None]:
                llm = clients.get(conv)
                if llm is None:
                    llm = clients[conv] = ModelServer("8B", config=config, session_key=f"c{conv}")
                c = llm.get_completion(messages=messages, max_tokens=MAX_TOKENS)
                why = None
                if before is not None and c.server != before:
                    if c.attempts > 1:
                        why = "its server failed the first attempt"
                    elif before in llm._excluded:
                        why = "the client had excluded its server after repeated slowness"
                    else:
                        why = "the daemon no longer offered its server first"
                return c.server, c.text, why

            results["ours"] = _place(order, questions, ours, concurrency)
        finally:
            for llm in clients.values():
                llm.close()
        if peer_error is None:
            who = Names(d)
            model = d.all_servers()[0]["model_path"]
            for policy in ("cache_aware", "round_robin"):
                try:
                    with Router(folder, _urls(d), policy=policy) as router:
                        router.start()
                        client = BareClient(router.port)

                        def via_router(
                            conv: int,
                            messages: list[dict[str, str]],
                            before: str | None,
                            client: BareClient = client,
                        ) -> tuple[str | None, str, str | None]:
                            payload = json.dumps(_chat_body(model, messages, stream=False))
                            status, data = client.post("/v1/chat/completions", payload.encode(), 10)
                            if status != 200:
                                raise RuntimeError(f"the router answered {status}: {data[:200]!r}")
                            answer = json.loads(data)
                            text = answer["choices"][0]["message"]["content"]
                            server = who.name(_pid_of(str(answer.get("id", ""))))
                            return server, text, "the router's choice"

                        results[policy] = _place(order, questions, via_router, concurrency)
                except RouterUnavailable as exc:
                    peer_error = str(exc)
                    break
    ours_r = results["ours"]
    cache = results.get("cache_aware")
    rr = results.get("round_robin")
    detail = {
        "conversations": conversations,
        "turns": turns,
        "servers": servers,
        "concurrent_callers": concurrency,
        "load": {
            k: dict(sorted((str(s), n) for s, n in v.load.items())) for k, v in results.items()
        },
        "ours_moves": dict(ours_r.moves),
        "unidentified_answers": {k: v.unknown for k, v in results.items()},
        "sglang_router_error": peer_error,
    }
    share_note = None
    if cache is not None and ours_r.share() < cache.share():
        moved = ours_r.repeats - ours_r.same
        why = "; ".join(f"{n} because {reason}" for reason, n in ours_r.moves.most_common())
        share_note = (
            f"{ours_r.share():g} % of turns stayed on their server against the router's "
            f"{cache.share():g} %: {moved} turn(s) moved ({why})"
        )
    remark = _peer_remark(peer_error)
    if cache is not None and remark is None:
        counts = sorted((n for s, n in cache.load.items()), reverse=True)
        first = len(SYSTEM) + statistics.fmean(len(q[0]) for q in questions.values())
        defaults = router_peer.router_defaults()
        remark = (
            f"the router's cache_aware kept {cache.share():g} % of turns on their worker and "
            f"put {cache.busiest(names):g} % of all requests on its busiest worker "
            f"(requests per worker: {', '.join(str(n) for n in counts)}). Every conversation "
            f"opens with the same system prompt, {100 * len(SYSTEM) / first:.0f} % of a first "
            "turn's text: above cache_threshold "
            f"({defaults.get('cache_threshold', '?')}), so a new conversation joins the worker "
            "that served the earlier ones (by design: they share that prefix in its cache), "
            "and cache_aware turns to the least loaded worker only when the busiest has "
            f"{defaults.get('balance_abs_threshold', '?')} more requests in flight than the "
            f"idlest, which {concurrency} callers never reach"
        )
    emit(
        {
            **row(
                "affinity",
                f"turns on the previous turn's server, live ({conversations} conversations x "
                f"{turns} turns, {concurrency} callers, {servers} simulated servers; ours with "
                "a session key, sglang-router: cache_aware, round robin: the router's "
                "round_robin)",
                "%",
                ours_r.share(),
                better="higher",
                sglang_router=cache.share() if cache else None,
                round_robin=rr.share() if rr else None,
                note=share_note,
            ),
            "remark": remark,
            "detail": detail,
        }
    )
    spread_note = None
    ours_busiest = ours_r.busiest(names)
    behind = [
        (label, p.busiest(names))
        for label, p in (("the router's cache_aware", cache), ("round robin", rr))
        if p is not None and ours_busiest > p.busiest(names)
    ]
    if behind:
        counts = sorted(ours_r.load.get(n, 0) for n in names)
        others = ", ".join(f"{label} {value:g} %" for label, value in behind)
        why = {
            "round robin": "round robin deals requests in turn (and scatters conversations)",
            "the router's cache_aware": "cache_aware sends a first turn that matches no "
            "worker's cache to the worker with the fewest requests in flight",
        }
        spread_note = (
            f"ours {ours_busiest:g} % against {others}: rendezvous hashing places each "
            f"conversation by its key alone, so {conversations} conversations over {servers} "
            f"servers landed {counts[-1] // turns} on the busiest and {counts[0] // turns} on "
            "the quietest server (a binomial draw that evens out as conversations grow in "
            "number), whatever the servers' load; " + "; ".join(why[label] for label, _ in behind)
        )
    emit(
        {
            **row(
                "affinity",
                f"load spread, live: the busiest server's share of requests ({100 / servers:g} % "
                "is even)",
                "%",
                ours_busiest,
                better="lower",
                sglang_router=cache.busiest(names) if cache else None,
                round_robin=rr.busiest(names) if rr else None,
                note=spread_note,
            ),
            "detail": detail,
        }
    )


SCENARIOS: dict[str, Callable[[], None]] = {
    "overhead": bench_overhead,
    "failover_kill": lambda: bench_failover("kill"),
    "failover_hang": lambda: bench_failover("hang"),
    "failover_errors": lambda: bench_failover("errors"),
    "failover_slow": lambda: bench_failover("slow"),
    "affinity": bench_affinity,
}


def main() -> int:
    return run_scenarios(SCENARIOS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
