"""The SGLang gateway alone against the gateway with the daemon keeping its worker list,
in the same run, on the same kind of fleet and fault as ``failover_hang``.

The gateway is ``sglang-router`` (see ``bench/router_peer.py``), launched on loopback
with its default settings and the ``cache_aware`` policy. The fleet is the real daemon
(``modelserverd run`` at the contract's defaults, the ``stop_timeout_s`` of
``bench_router.py``) supervising three simulated SGLang servers; every request goes
through the gateway (a non-streamed chat completion, 8 tokens, about 60 ms). Two runs:

* **the gateway alone** (the ``sglang-router`` column): its workers on its command line
  (``--worker-urls``), as ``failover_hang`` runs it; the daemon supervises the servers
  but does not talk to the gateway. For the hang's "requests failed" this run is made
  with the daemon's scheduler watch off too (``hang_unwatched``), so that nothing but the
  gateway acts on the hang, as for a gateway in front of servers without the daemon;
  the run with the watch on (``hang_alone``) has its own row and is the peer of the
  other hang rows;
* **the gateway with the daemon** (the ``ours`` column): the gateway started with no
  workers; the daemon's ``[gateway] url`` points at it, so the daemon registers its
  ready servers, removes a server the moment it leaves ready (a stop: before the
  SIGTERM) and reconciles every ``sync_interval_s`` (default 5 s).

Each run has two phases, each on a fresh fleet and a fresh gateway:

* ``hang``: the stream of ``failover_hang`` (20 requests a second, each on its own
  thread; after 2 s the server that answered most requests in the last second gets
  ``/sim/fault {"mode": "hang"}``: the port stays open, nothing answers; the fault
  window is the 8 s after it; requests still unanswered 2 s after the window are
  failed). The stream then goes on at the same rate until 3 s after the daemon took
  the hung server out of ready (at most 20 s after the fault), so that what the
  gateway does after the hang is detected is seen; those later requests count only
  in the row "after the daemon took it out of ready" (and the detail), every other row
  counts the fault window as ``failover_hang`` does.
* ``stop``: the same stream; after 2 s the chosen server is stopped gracefully: with
  the daemon, ``modelserverd stop NAME``; the gateway alone, SIGTERM to the server's
  main process (SGLang then answers /health with 503 but keeps accepting requests, and
  exits once none is left; the daemon relaunches it after its backoff).

Which requests reached the faulty server: its own counter of generation requests
(``/sim/state``), read every 0.05 s from just before the fault. The daemon's latency
probes (every ``probe_interval_s``, streamed chat requests) count there too; each one
(from the daemon's ``latency_samples``: start = time - latency) is taken off. A rise
between two readings is dated at the earlier one. Only the faulty process counts: a
relaunched server has a new pid. "After the stop" starts at the daemon's
``ready -> stopping`` with the daemon, at the SIGTERM for the gateway alone. The
gateway's own per-worker attempt counters are kept in the detail as a cross-check
(they start again from zero when a removed worker is registered again).

Run: .venv/bin/python bench/bench_gateway.py gateway
"""

from __future__ import annotations

import contextlib
import http.client
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_peer  # noqa: E402
from bench_router import (  # noqa: E402
    DAEMON,
    FAILOVER_TTFT_S,
    GRACE_S,
    MAX_TOKENS,
    PRE_S,
    PROMPT,
    RATE,
    WINDOW_S,
    BareClient,
    Names,
    Outcome,
    _chat_body,
    _chosen,
    _sim,
    router_sender,
)
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
from router_peer import Router, RouterUnavailable  # noqa: E402

from supervisord_ms.store import parse_iso  # noqa: E402

SERVERS = 3
COUNTER_EVERY_S = 0.05  # how often the faulty server's request counter is read
TAIL_AFTER_S = 3.0  # the hang stream goes on this long after the server left ready
TAIL_MAX_S = 20.0  # ... but no longer than this after the fault
DETECT_POLL_S = 0.1  # how often the daemon's view of the faulty server is read
# The gateway truly alone: the daemon's scheduler watch off. Its /health checks stay
# on, but SGLang's /health fails a hung scheduler only after 20 s (then three checks).
UNWATCHED_HANG_TIMEOUT_S = 3600.0
PROBE_MATCH_S = 0.3  # how far from a probe's start its arrival may be dated
MODELSERVERD = Path(sys.executable).parent / "modelserverd"
# The scenario's detail (every run, every phase) goes with its first row only.
SEE_FIRST = {"see": "the detail of the first gateway row"}
SEE_FIRST_ROW = {"detail": SEE_FIRST}


class Gateway(Router):
    """The router as a gateway: with no workers, it is launched without
    ``--worker-urls`` at all (the daemons add them)."""

    def argv(self) -> list[str]:
        argv = super().argv()
        if not self.worker_urls:
            i = argv.index("--worker-urls")
            del argv[i]
        return argv

    def listed_healthy(self) -> set[str]:
        status, body = self._get(self.port, "/workers", timeout=2.0)
        if status != 200:
            return set()
        return {w.get("url") for w in json.loads(body).get("workers", []) if w.get("is_healthy")}


@contextlib.contextmanager
def gateway_fleet(
    folder: Path, *, managed: bool, daemon: dict[str, Any] | None = None
) -> Iterator[tuple[BenchDaemon, Gateway]]:
    """Three simulated servers under the daemon, and a gateway in front of them: its
    workers on its command line (``managed=False``) or kept by the daemon."""
    ports = free_ports(SERVERS)
    servers = [{"name": f"s{i}", "port": ports[i], "gpus": [i]} for i in range(SERVERS)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    sim = _sim(FAILOVER_TTFT_S, 0.005)
    d = BenchDaemon(folder, servers, daemon=daemon or DAEMON, sim_args=sim, gpus=SERVERS)
    gw = Gateway(folder, [] if managed else urls)
    with gw, d:  # the daemon stops first: its removals still reach the gateway
        if managed:
            gw.start()
            with d.harness.config_path.open("a") as f:
                f.write(f'\n[gateway]\nurl = "{gw.url}"\n')
            d.start()
            d.wait_all_ready(120)

            def listed() -> bool:
                with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                    return set(urls) <= gw.listed_healthy()
                return False

            wait_for(listed, 60, f"the daemon registered {urls} on the gateway", 0.1)
        else:
            d.start()
            d.wait_all_ready(120)
            gw.start()
        yield d, gw


# --- the faulty server, seen from its own counter ----------------------------------------


def _get_json(port: int, path: str, timeout: float = 1.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise OSError(f"{path} answered {resp.status}")
        return json.loads(data)
    finally:
        conn.close()


class CounterWatch:
    """Reads one simulator's ``/sim/state`` every ``COUNTER_EVERY_S`` on its own thread:
    (monotonic time, pid, generation requests so far); None pid when it did not answer."""

    def __init__(self, port: int, pid: int, count: int, at: float):
        self.port = port
        self.pid = pid
        self.base = (at, count)
        self.samples: list[tuple[float, int | None, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                state = _get_json(self.port, "/sim/state", timeout=1.0)
                self.samples.append((t, int(state["pid"]), int(state["requests"]["generation"])))
            except Exception:
                self.samples.append((t, None, None))
            self._stop.wait(COUNTER_EVERY_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def arrivals(self) -> list[tuple[float, float]]:
        """Every request the faulty process received after the base reading, as the
        interval between two readings it arrived in."""
        out: list[tuple[float, float]] = []
        prev_t, prev = self.base
        for t, pid, count in self.samples:
            if pid != self.pid or count is None:
                continue  # no answer, or a relaunched process
            if count > prev:
                out.extend([(prev_t, t)] * (count - prev))
            prev_t, prev = t, count
        return out

    def gone_at(self) -> float | None:
        """When the faulty process stopped answering for good (monotonic), if it did."""
        last_seen = None
        for t, pid, _ in self.samples:
            if pid == self.pid:
                last_seen = t
        if last_seen is None:
            return None
        later = [t for t, pid, _ in self.samples if t > last_seen]
        return later[0] if later else None


def _probe_starts(d: BenchDaemon, name: str, since_wall: float, offset: float) -> list[float]:
    """Monotonic start times of the daemon's probes of ``name`` since ``since_wall``."""
    found = []
    for ts, latency in d.query(
        "select ts, latency_s from latency_samples where server = ? and source = 'probe'",
        name,
    ):
        start_wall = parse_iso(ts) - float(latency or 0.0)
        if start_wall >= since_wall - 1.0:
            found.append(start_wall - offset)
    return sorted(found)


def _without_probes(
    arrivals: list[tuple[float, float]], probes: list[float]
) -> tuple[list[tuple[float, float]], int]:
    """The arrivals less one per daemon probe (the interval nearest its start)."""
    left = sorted(arrivals)
    taken = 0
    for p in probes:
        best, best_gap = None, None
        for i, (a, b) in enumerate(left):
            gap = 0.0 if a - PROBE_MATCH_S <= p <= b else min(abs(p - a), abs(p - b))
            if gap <= PROBE_MATCH_S and (best_gap is None or gap < best_gap):
                best, best_gap = i, gap
        if best is not None:
            del left[best]
            taken += 1
    return left, taken


# --- one phase ----------------------------------------------------------------------------


@dataclass
class Result:
    """One phase of one run, reduced to what the rows and the detail need."""

    failed: int
    sent_in_window: int
    sent_to_faulty: int
    until_none_s: float
    never_stopped: bool
    after_detection: int | None
    detail: dict[str, Any] = field(default_factory=dict)


def _event_after(d: BenchDaemon, name: str, new_state: str, after_wall: float) -> float | None:
    for (ts,) in d.query(
        "select ts from events where server = ? and new_state = ? order by id", name, new_state
    ):
        t = parse_iso(ts)
        if t >= after_wall - 0.001:
            return t
    return None


def _events_since(d: BenchDaemon, name: str, since_wall: float) -> list[tuple[float, str, str]]:
    out = []
    for ts, kind, new_state, message in d.query(
        "select ts, kind, new_state, message from events where server = ? order by id", name
    ):
        t = parse_iso(ts)
        if t >= since_wall - 0.001:
            out.append((t, kind, new_state or message or ""))
    return out


def run_phase(d: BenchDaemon, gw: Gateway, fault: str, managed: bool) -> Result:
    """The stream through the gateway with the fault (``hang`` or ``stop``) 2 s in."""
    offset = time.time() - time.monotonic()  # wall = monotonic + offset
    names = Names(d)
    model = d.all_servers()[0]["model_path"]
    payload = json.dumps(
        _chat_body(model, [{"role": "user", "content": PROMPT}], stream=False)
    ).encode()
    client = BareClient(gw.port)
    url_of = {s["name"]: f"http://127.0.0.1:{s['port']}" for s in d.servers}

    send = router_sender(client, payload, names)

    for _ in range(5):
        client.post("/v1/chat/completions", payload, 10)

    outcomes: list[Outcome] = []
    threads: list[threading.Thread] = []
    begin = time.monotonic()
    fault_at = begin + PRE_S
    stop = fault_at + WINDOW_S
    cutoff = stop + GRACE_S
    state: dict[str, Any] = {}
    left_ready = threading.Event()
    watching = threading.Event()

    def watch(name: str) -> None:
        """Notes when the daemon took the faulty server out of ready."""
        while not watching.is_set():
            with contextlib.suppress(Exception):
                if d.server(name)["state"] != "ready":
                    state["left_ready_seen"] = time.monotonic()
                    left_ready.set()
                    return
            watching.wait(DETECT_POLL_S)

    def inject(name: str) -> None:
        info = d.server(name)
        port, pid = info["port"], info["pid"]
        state["name"], state["port"], state["pid"] = name, port, pid
        state["gateway_before"] = _dispatches(gw)
        if fault == "hang":
            at = time.monotonic()
            answer = sim_fault(port, "hang")
            count = int(answer["requests"]["generation"])
        else:
            count = int(_get_json(port, "/sim/state")["requests"]["generation"])
            at = time.monotonic()
            if managed:
                argv = (
                    [str(MODELSERVERD)]
                    if MODELSERVERD.exists()
                    else [sys.executable, "-m", "supervisord_ms.cli"]
                )
                state["cli"] = subprocess.Popen(
                    [*argv, "stop", name, "--config", str(d.harness.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            else:
                os.kill(pid, signal.SIGTERM)
        state["at"] = at
        state["counter"] = CounterWatch(port, pid, count, at)
        threading.Thread(target=watch, args=(name,), daemon=True).start()

    k = 0
    try:
        while True:
            due = begin + k / RATE
            if "at" in state:
                if due >= stop:
                    if fault != "hang":
                        break
                    # The hang's tail: until the daemon's verdict is seen, plus a while.
                    seen = state.get("left_ready_seen")
                    end = state["at"] + TAIL_MAX_S
                    if seen is not None:
                        end = min(end, seen + TAIL_AFTER_S)
                    if due >= end:
                        break
            elif due >= fault_at:
                name = _chosen(outcomes, time.monotonic())
                if name is None:
                    raise RuntimeError(f"no request succeeded in the first {PRE_S:g} s")
                inject(name)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            outcome = Outcome(start=time.monotonic())
            outcomes.append(outcome)
            # A request of the window waits until the window's cutoff; one of the tail
            # gets the same grace after its own start.
            mine = cutoff if outcome.start <= stop else outcome.start + GRACE_S
            t = threading.Thread(target=send, args=(outcome, mine), daemon=True)
            t.start()
            threads.append(t)
            k += 1
        traffic_end = time.monotonic()
        for t in threads:
            t.join(max(0.0, max(cutoff, traffic_end + GRACE_S) - time.monotonic()) + 0.5)
    finally:
        watching.set()
        if "counter" in state:
            state["counter"].close()
    cli = state.get("cli")
    cli_out = None
    if cli is not None:
        try:
            cli_out, _ = cli.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli_out, _ = cli.communicate()
    gateway_after = _dispatches(gw)
    name, at = state["name"], state["at"]
    at_wall = at + offset
    counter: CounterWatch = state["counter"]

    # The daemon's view: when the server left ready (hang: the verdict; stop: stopping),
    # when the gateway was told; the probes it sent.
    new_state = "unhealthy" if fault == "hang" else "stopping"
    left_wall = None
    if fault == "hang" or managed:
        with contextlib.suppress(AssertionError):
            left_wall = wait_for(
                lambda: _event_after(d, name, new_state, at_wall),
                15 if fault == "hang" else 5,
                f"{name} -> {new_state}",
                0.2,
            )
    time.sleep(1.0)  # the daemon writes its rows in batches
    probes = [p for p in _probe_starts(d, name, at_wall, offset) if p >= at - PROBE_MATCH_S]
    raw = counter.arrivals()
    arrivals, probes_taken = _without_probes(raw, probes)
    gone = counter.gone_at()

    # "After the fault" starts at the fault; for the daemon's stop, at ready -> stopping.
    anchor = at
    if fault == "stop" and managed and left_wall is not None:
        anchor = left_wall - offset
    # Dated at the earlier reading (never before the anchor). The rows count the fault
    # window, as failover_hang does; the hang's tail is kept apart.
    dated = sorted(max(a, anchor) for a, b in arrivals if b > anchor)
    sent = [t for t in dated if t <= stop]
    later = [t for t in dated if t > stop]
    last = max(sent, default=anchor)
    alive_at_stop = gone is None or gone > stop
    never = bool(sent) and alive_at_stop and last >= stop - 1.0
    until_none = (stop - anchor) if never else max(0.0, last - anchor)
    after_detection = None
    straddling = None
    if fault == "hang" and left_wall is not None:
        detected = left_wall - offset
        after_detection = sum(1 for a, _ in arrivals if a >= detected)
        straddling = sum(1 for a, b in arrivals if a < detected < b)

    window = [o for o in outcomes if o.start <= stop]
    affected = [o for o in window if (o.end or cutoff) >= at]
    failed = [o for o in affected if not o.ok]
    in_window = [o for o in window if o.start >= at]
    latencies = [(o.end if o.end is not None else cutoff) - o.start for o in in_window]
    tail = [o for o in outcomes if o.start > stop]
    errors = Counter(
        (o.error or ("no answer by the cutoff" if o.end is None else "no error text"))[:120]
        for o in failed
    )
    url = url_of[name]
    before = state["gateway_before"]
    changes = [(t, k, w) for t, k, w in _events_since(d, name, at_wall) if k == "state"]
    events = [
        {"after_s": round(t - at_wall, 3), "kind": kind, "what": what[:160]}
        for t, kind, what in _events_since(d, name, at_wall - 0.5)
    ][:12]
    detail: dict[str, Any] = {
        "faulty_server": name,
        "sent_in_window": len(in_window),
        "failed": len(failed),
        "errors": dict(errors.most_common(3)),
        "unanswered_at_cutoff": sum(1 for o in affected if o.end is None),
        "served_in_window_by": dict(
            sorted((k or "?", v) for k, v in Counter(o.server for o in in_window if o.ok).items())
        ),
        "p50_s": round(percentile(latencies, 50), 4) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 4) if latencies else None,
        "traffic_s_after_fault": round(traffic_end - at, 3),
        "tail_requests": len(tail),
        "tail_failed": sum(1 for o in tail if not o.ok),
        "requests_to_faulty_server": len(sent),
        "first_arrivals_s": [round(t - at, 3) for t in sent[:3]],
        "last_arrivals_s": [round(t - at, 3) for t in sent[-8:]],
        "arrivals_after_window_s": [round(t - at, 3) for t in later][:40],
        "answered_after_faulty_process_gone": sum(
            1
            for o in in_window
            if o.ok
            and gone is not None
            and o.end is not None
            and o.end >= gone
            and o.end - o.start > 1.0
        ),
        "daemon_probes_taken_off": probes_taken,
        "daemon_probes_to_faulty": len(probes),
        "faulty_process_gone_after_s": round(gone - at, 3) if gone is not None else None,
        "left_ready_after_s": round(left_wall - at_wall, 3) if left_wall is not None else None,
        "first_state_change": next(
            ({"after_s": round(t - at_wall, 3), "state": what} for t, kind, what in changes),
            None,
        ),
        "gateway_attempts_to_faulty": _delta(before, gateway_after, url),
        "gateway_attempts_by_worker": {
            u: _delta(before, gateway_after, u) for u in url_of.values()
        },
        "daemon_events": events,
    }
    if fault == "hang":
        detail["sent_after_detection"] = after_detection
        detail["arrived_around_detection"] = straddling
    if fault == "stop" and managed:
        detail["stop_command"] = (cli_out or "").strip()[-300:]
        detail["stopping_after_command_s"] = round(anchor - at, 3)
    detail["gateway_log_tail"] = gw.log_tail(1)[:300]
    return Result(
        failed=len(failed),
        sent_in_window=len(in_window),
        sent_to_faulty=len(sent),
        until_none_s=round(until_none, 3),
        never_stopped=never,
        after_detection=after_detection,
        detail=detail,
    )


def _dispatches(gw: Gateway) -> dict[str, float]:
    with contextlib.suppress(Exception):
        return gw.dispatches()
    return {}


def _delta(before: dict[str, float], after: dict[str, float], url: str) -> float | None:
    if url not in after and url not in before:
        return None
    return after.get(url, 0.0) - before.get(url, 0.0)


# --- the scenario ----------------------------------------------------------------------------


def _phase(fault: str, managed: bool, watched: bool = True) -> Result:
    """One run. ``watched=False``: the daemon's scheduler watch is off, so within the
    window nothing but the gateway itself acts on a hang (the gateway alone)."""
    label = "daemon" if managed else "alone" if watched else "unwatched"
    daemon = DAEMON if watched else {**DAEMON, "hang_timeout_s": UNWATCHED_HANG_TIMEOUT_S}
    with (
        work_dir(f"gateway_{fault}_{label}") as folder,
        gateway_fleet(folder, managed=managed, daemon=daemon) as (d, gw),
    ):
        return run_phase(d, gw, fault, managed)


def bench_gateway() -> None:
    peer_error = router_peer.unavailable_reason()
    if peer_error is not None:
        emit(
            row(
                "gateway",
                "no result: the gateway (sglang-router) is needed on both sides",
                "",
                None,
                better="lower",
                note=peer_error,
            )
        )
        return
    defaults = router_peer.router_defaults()
    results: dict[str, Result] = {}
    errors: dict[str, str] = {}
    runs = [
        ("hang_unwatched", "hang", False, False),
        ("hang_alone", "hang", False, True),
        ("hang_daemon", "hang", True, True),
        ("stop_alone", "stop", False, True),
        ("stop_daemon", "stop", True, True),
    ]
    for key, fault, managed, watched in runs:
        try:
            results[key] = _phase(fault, managed, watched)
        except (RouterUnavailable, RuntimeError, AssertionError, OSError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"[:400]
        print(f"{key}: {'done' if key in results else errors[key]}", file=sys.stderr)
    detail = {
        "runs": {k: v.detail for k, v in results.items()},
        "errors": errors,
        "sglang_router_defaults": defaults,
        "stream": {
            "rate_per_s": RATE,
            "fault_after_s": PRE_S,
            "window_s": WINDOW_S,
            "grace_s": GRACE_S,
            "hang_tail_after_left_ready_s": TAIL_AFTER_S,
            "hang_tail_max_s": TAIL_MAX_S,
            "servers": SERVERS,
            "request": f"chat completion through the gateway, {MAX_TOKENS} tokens, about 60 ms",
            "gateway": "sglang-router, policy cache_aware, other settings at their defaults",
            "daemon": "contract defaults (probe 5 s, hang_timeout 10 s: 5 s of scheduler "
            "silence for a server with chunked prefill and quick steps), stop_timeout_s 5; "
            "[gateway] url only (sync_interval_s 5, request_timeout_s 5)",
            "runs": {
                "hang_unwatched": "the gateway alone, its workers on its command line; the "
                f"daemon's scheduler watch off (hang_timeout_s {UNWATCHED_HANG_TIMEOUT_S:g}), "
                "so nothing but the gateway acts on the hang in the window",
                "hang_alone / stop_alone": "the gateway with its workers on its command "
                "line; the daemon supervising the servers (kills and relaunches a hung one) "
                "without keeping the gateway's list",
                "hang_daemon / stop_daemon": "the gateway started empty; the daemon "
                "keeping its list",
            },
        },
    }
    hu = results.get("hang_unwatched")
    ha, hd = results.get("hang_alone"), results.get("hang_daemon")
    sa, sd = results.get("stop_alone"), results.get("stop_daemon")

    def val(r: Result | None, attr: str) -> Any:
        return getattr(r, attr) if r is not None else None

    def missing(key: str) -> str | None:
        return f"not measured: {errors[key]}" if key in errors else None

    def compare(
        metric: str,
        unit: str,
        ours: Result | None,
        peer: Result | None,
        attr: str,
        *,
        target: str | None = None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """One row: ``attr`` of our run against the peer's, lower is better."""
        measured = row(
            "gateway",
            metric,
            unit,
            val(ours, attr),
            better="lower",
            target=target,
            sglang_router=val(peer, attr),
            note=note,
        )
        emit({**measured, **(extra or SEE_FIRST_ROW)})

    hang_words = "the chosen server hangs (port open, no answer)"
    both = (
        "ours: the gateway with the daemon keeping its list; sglang-router: the gateway "
        "alone, nothing else acting on the hang (the daemon's scheduler watch off)"
    )
    # Requests failed under the hang: target <= 0.2x the gateway alone, same run.
    target_failed = f"<= {round(0.2 * hu.failed, 1):g}" if hu is not None else None
    note = missing("hang_daemon") or missing("hang_unwatched")
    if hd is not None and hu is not None and hd.failed > 0.2 * hu.failed:
        note = _hang_failed_note(hd, hu, defaults)
    compare(
        f"hang: requests failed through the gateway ({hang_words}; 20 requests/s, "
        f"{WINDOW_S:g} s window; {both})",
        "requests",
        hd,
        hu,
        "failed",
        target=target_failed,
        note=note,
        extra={"remark": _remark(hu, ha, hd, sa, sd, defaults), "detail": detail},
    )
    compare(
        "hang: requests failed through the gateway with the daemon killing and "
        "relaunching the hung server but not keeping the gateway's list (ours); "
        "sglang-router: the gateway alone, as above",
        "requests",
        ha,
        hu,
        "failed",
        note=missing("hang_alone"),
    )
    # The rows below compare the daemon keeping the list with the gateway keeping its
    # own (the daemon supervising the servers in both).
    compare(
        "hang: requests that reached the hung server in the fault window (its own "
        "counter, less the daemon's probes)",
        "requests",
        hd,
        ha,
        "sent_to_faulty",
        note=missing("hang_daemon") or _behind(hd, ha, "sent_to_faulty", "requests"),
    )
    compare(
        f"hang: time until no request reaches the hung server (the window, "
        f"{WINDOW_S:g} s, if it never stopped)",
        "s",
        hd,
        ha,
        "until_none_s",
        note=missing("hang_daemon") or _behind(hd, ha, "until_none_s", "s"),
    )
    after_note = missing("hang_daemon")
    if hd is not None and hd.after_detection is None:
        after_note = "the daemon did not take the hung server out of ready within 15 s"
    elif hd is not None and hd.after_detection:
        after_note = (
            f"{hd.after_detection} request(s) reached the hung server after the daemon "
            f"took it out of ready ({hd.detail.get('left_ready_after_s')} s after the fault)"
        )
    compare(
        f"hang: requests that reached the hung server after the daemon took it out "
        f"of ready (the stream goes on until {TAIL_AFTER_S:g} s after that)",
        "requests",
        hd,
        ha,
        "after_detection",
        target="<= 0",
        note=after_note,
    )
    stop_note = missing("stop_daemon")
    if sd is not None and sd.failed:
        stop_note = (
            f"{sd.failed} request(s) failed during `modelserverd stop` "
            f"({'; '.join(sd.detail['errors']) or 'no error text'})"
        )
    compare(
        "graceful stop under traffic: requests failed (ours: `modelserverd stop`; "
        "the gateway alone: SIGTERM to the server's main process)",
        "requests",
        sd,
        sa,
        "failed",
        target="<= 0",
        note=stop_note,
    )
    compare(
        "graceful stop: requests that reached the server after the stop began, in "
        "the window (ours: from the daemon's ready -> stopping; alone: from the "
        "SIGTERM)",
        "requests",
        sd,
        sa,
        "sent_to_faulty",
        note=missing("stop_daemon") or _behind(sd, sa, "sent_to_faulty", "requests"),
    )
    compare(
        "graceful stop: time until no request reaches the server (the rest of the "
        "window if it never stopped)",
        "s",
        sd,
        sa,
        "until_none_s",
        note=missing("stop_daemon") or _behind(sd, sa, "until_none_s", "s"),
    )


def _behind(ours: Result | None, peer: Result | None, attr: str, unit: str) -> str | None:
    if ours is None or peer is None:
        return None
    a, b = getattr(ours, attr), getattr(peer, attr)
    if a <= b:
        return None
    d = ours.detail
    times = ", ".join(f"{t:g}" for t in d.get("last_arrivals_s", []))
    return (
        f"ours {a:g} {unit} against the gateway alone's {b:g} {unit}; with the daemon the "
        f"server left ready {d.get('left_ready_after_s')} s after the fault; the last "
        f"requests reached it at {times} s"
    )


def _gap(detail: dict[str, Any]) -> str:
    """From the hung server leaving ready to its process being gone."""
    left, gone = detail.get("left_ready_after_s"), detail.get("faulty_process_gone_after_s")
    if left is None or gone is None:
        return "—"
    return f"{max(0.0, gone - left):.2f} s"


def _s(value: Any) -> str:
    return "—" if value is None else f"{value:g} s"


def _kill_words(hd: Result, ha: Result) -> str:
    """What the SIGKILL of the hung process did for the requests stuck on it."""
    d, a = hd.detail, ha.detail
    saved_d = d.get("answered_after_faulty_process_gone", 0)
    saved_a = a.get("answered_after_faulty_process_gone", 0)
    killed = (
        f"the daemon killed the hung process {_s(a.get('faulty_process_gone_after_s'))} "
        f"(alone) and {_s(d.get('faulty_process_gone_after_s'))} (with the daemon) after "
        f"the fault; the callers gave up {WINDOW_S + GRACE_S:g} s after the fault"
    )
    if saved_d or saved_a:
        return (
            f"{killed}, and the gateway retried the requests the kill reset on the other "
            f"workers: {saved_a} (alone) and {saved_d} (with the daemon) were answered "
            "after the kill"
        )
    return f"{killed}, so no stuck request was answered after the kill"


def _hang_failed_note(hd: Result, hu: Result, defaults: dict[str, Any]) -> str:
    d = hd.detail
    left = d.get("left_ready_after_s")
    late = left is not None and left > hd.until_none_s
    return (
        f"{hd.failed} failed against the gateway alone's {hu.failed} (target at most "
        f"{0.2 * hu.failed:g}). The daemon found the hang {_s(left)} after the fault (its "
        "scheduler watch, a load query asked every 1 s); the gateway's cache_aware had "
        f"sent its last request of the window to the hung worker {hd.until_none_s:g} s "
        f"after the fault, stopping on its own once that worker had "
        f"{defaults.get('balance_abs_threshold', '?')} more requests in flight than the "
        "idlest"
        + (", so the removal came after every stuck request was already there" if late else "")
        + ". A removal does not move a request already on the hung server; only the kill "
        f"does, and the daemon killed it {_s(d.get('faulty_process_gone_after_s'))} after "
        f"the fault, while the callers gave up {WINDOW_S + GRACE_S:g} s after it"
    )


def _remark(
    hu: Result | None,
    ha: Result | None,
    hd: Result | None,
    sa: Result | None,
    sd: Result | None,
    defaults: dict[str, Any],
) -> str:
    """What happened, from the run's own records."""
    parts = [
        "The SGLang gateway (sglang-router 0.3.2, cache_aware, defaults) in front of three "
        "simulated servers under the daemon, on fresh fleets: alone, its workers on its "
        "command line; and started with no workers, the daemon's [gateway] url keeping its "
        "list."
    ]
    if hu is not None:
        parts.append(
            f"Hang, the gateway truly alone (the daemon's scheduler watch off): it lost "
            f"{hu.failed} of {hu.sent_in_window} requests; the hung server received "
            f"{hu.sent_to_faulty}, the last {hu.until_none_s:g} s after the fault, and "
            "every one of them waited until its caller gave up (the gateway's request "
            f"timeout is {defaults.get('request_timeout_secs', '?')} s, its /health check "
            f"every {defaults.get('health_check_interval_secs', '?')} s)."
        )
    if ha is not None and hd is not None:
        d, a = hd.detail, ha.detail
        text = (
            f"Hang, the daemon supervising: with the gateway keeping its own list "
            f"(alone) {ha.failed} of {ha.sent_in_window} requests failed, with the daemon "
            f"keeping it {hd.failed} of {hd.sent_in_window}. The hung server received "
            f"{ha.sent_to_faulty} and {hd.sent_to_faulty} requests, the last "
            f"{ha.until_none_s:g} s and {hd.until_none_s:g} s after the fault: cache_aware "
            "leaves a worker once it has "
            f"{defaults.get('balance_abs_threshold', '?')} more requests in flight than the "
            "idlest. The daemon took the hung server out of ready "
            f"{_s(a.get('left_ready_after_s'))} and {_s(d.get('left_ready_after_s'))} after "
            "the fault (its scheduler watch: 5 s of silence at the defaults for a server "
            "with chunked prefill and quick steps); " + _kill_words(hd, ha) + "."
        )
        tail_d = d.get("arrivals_after_window_s") or []
        tail_a = a.get("arrivals_after_window_s") or []
        if tail_d or tail_a:
            text += (
                " After the window, once callers had given up on the stuck requests, the "
                "gateway sent the hung server more: "
                f"{len(tail_a)} alone, {len(tail_d)} with the daemon (until the kill)."
            )
        if hd.after_detection is not None:
            text += (
                f" After the daemon took the hung server out of ready, {hd.after_detection} "
                f"request(s) reached it with the daemon and "
                f"{'—' if ha.after_detection is None else ha.after_detection} alone "
                f"({d.get('arrived_around_detection', 0)} and "
                f"{a.get('arrived_around_detection', 0)} more in the reading around that "
                "moment); the daemon killed it "
                f"{_gap(d)} and {_gap(a)} after that moment."
            )
        parts.append(text)
    if sa is not None and sd is not None:
        d, a = sd.detail, sa.detail
        first = a.get("first_state_change") or {}
        gone = (
            f"the daemon saw the process exit {first['after_s']:g} s after the signal, once "
            "the stream had ended"
            if first.get("after_s") is not None and first["after_s"] > WINDOW_S - 0.5
            else f"the process was gone {_s(a.get('faulty_process_gone_after_s'))} after it"
        )
        parts.append(
            f"Graceful stop: `modelserverd stop` lost {sd.failed} request(s); the daemon "
            f"began the stop {_s(d.get('stopping_after_command_s'))} after the command, and "
            f"the server received {sd.sent_to_faulty} request(s) after that"
            + (f", the last {sd.until_none_s:g} s after it" if sd.sent_to_faulty else "")
            + "; it exited "
            f"{_s(d.get('faulty_process_gone_after_s'))} after the command. SIGTERM with the "
            f"gateway alone lost {sa.failed}, but the gateway went on sending to the draining "
            f"server ({sa.sent_to_faulty} requests in the window, the last "
            f"{sa.until_none_s:g} s after the signal; SGLang accepts requests while it drains "
            f"and exits only when none is left): {gone}."
        )
    return " ".join(parts)


SCENARIOS: dict[str, Callable[[], None]] = {"gateway": bench_gateway}


def main() -> int:
    return run_scenarios(SCENARIOS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
