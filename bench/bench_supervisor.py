"""The supervisor against simulated SGLang servers: restart, hang detection, stop, scale.

Each scenario starts the real daemon (``modelserverd run``) on a generated config whose
servers are simulators (``python -m supervisord_ms.sim``, labelled as a simulation) on a
``file:`` GPU view, measures from outside (the API, the state database, psutil), stops
the daemon and kills anything left. Prints one JSON row per metric (see bench/common.py).

* ``restart``: SIGKILL a ready server; seconds until the API shows a new pid
  (relaunch) and until it is ready again. Default ``[restart]`` settings (first
  backoff 0.8-1.0 s), each kill the server's first failure (five servers, one kill
  each); the simulators start at once, so "ready" is the supervisor's part only.
* ``hang``: ``POST /sim/fault {"mode": "scheduler_hang"}`` (SGLang's usual hang: the
  scheduler is stuck, the HTTP front answers) on six servers, staggered over one probe
  interval, at the contract's defaults (probe 5 s, hang_timeout 10 s, health_timeout
  30 s, SGLang's own /health timeout 20 s, drain poll 5 s, profile current); seconds
  until each server leaves ``ready`` (median and max; each restart row's reason must be
  ``hang``). In the same run a second daemon with the scheduler watch off
  (``hang_timeout_s = 3600``) shows what SGLang's /health alone gives.
* ``stop``: eight chat streams of about 5 s (100 tokens at 0.05 s) in flight on a
  simulator with two scheduler children, then a stop: ``modelserverd stop`` (SIGTERM to
  the main process, which drains) against SIGTERM to the whole process group (the stop
  before it), same flags, same run; streams cut, and /health while draining.
* ``scale``: 64 simulated servers on 64 simulated GPUs, default probing (every 5 s);
  once all are ready and measured, the daemon's CPU (% of one core, over 20 s) and RSS.

Run: .venv/bin/python bench/bench_supervisor.py restart|hang|stop|scale [...]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_DAEMON,
    BenchDaemon,
    emit,
    free_ports,
    median,
    meets,
    row,
    run_scenarios,
    sim_fault,
    to_unix,
    wait_for,
    work_dir,
)

from supervisord_ms.config import SGLANG_HEALTH_TIMEOUT_DEFAULT as SGLANG_HEALTH_DEFAULT_S  # noqa: E402
from supervisord_ms.sim.options import DEFAULT_DRAIN_POLL_S  # noqa: E402
from supervisord_ms.supervisor import IDLE_LOAD_INTERVAL_S, LOAD_INTERVAL_S  # noqa: E402

PY = sys.executable
# Simulators that are ready at once and hold little simulated GPU memory.
QUICK_SIM = ["--sim-startup-s", "0", "--sim-warmup-s", "0", "--sim-gpu-mib", "1024"]


# --- restart ---------------------------------------------------------------------------


def bench_restart(kills: int = 9) -> None:
    ports = free_ports(kills)
    servers = [{"name": f"r{i}", "port": ports[i], "gpus": [i]} for i in range(kills)]
    relaunch: list[float] = []
    ready: list[float] = []
    relaunch_db: list[float] = []
    to_backoff: list[float] = []
    backoffs: list[float] = []
    with (
        work_dir("restart") as folder,
        BenchDaemon(folder, servers, sim_args=QUICK_SIM, gpus=kills) as d,
    ):
        d.start()
        d.wait_all_ready(120)
        time.sleep(1.0)
        for s in servers:
            name = s["name"]
            old = d.wait_state(name, "ready")["pid"]
            killed_at = time.time()
            os.kill(old, signal.SIGKILL)

            def relaunched(name: str = name, old: int = old) -> dict | None:
                info = d.server(name)
                return info if info["pid"] not in (None, old) else None

            wait_for(relaunched, 30, f"{name} relaunched", 0.005)
            relaunch.append(time.time() - killed_at)
            d.wait_state(name, "ready", 60)
            ready.append(time.time() - killed_at)
            relaunch_db.append(d.event_time(name, "starting", killed_at) - killed_at)
            to_backoff.append(d.event_time(name, "backoff", killed_at) - killed_at)
            rows = wait_for(
                lambda name=name: d.query(
                    "select reason, attempt, backoff_s from restarts where server = ?", name
                ),
                15,
                f"restart row of {name}",
                0.1,
            )
            reason, attempt, backoff_s = rows[-1]
            if reason != "crash" or attempt != 1:
                raise RuntimeError(f"{name}: expected a first crash, got {rows}")
            backoffs.append(float(backoff_s))
            time.sleep(0.5)
    detail = {
        "relaunch_s": [round(x, 3) for x in relaunch],
        "relaunch_recorded_s": [round(x, 3) for x in relaunch_db],
        "ready_s": [round(x, 3) for x in ready],
        "kill_to_backoff_state_s": [round(x, 3) for x in to_backoff],
        "backoff_s": [round(x, 3) for x in backoffs],
    }
    med_relaunch = round(median(relaunch), 3)
    target = "<= 1"
    note = None
    if not meets(med_relaunch, target):
        b = median(backoffs)
        before = median(to_backoff)
        recorded = median(relaunch_db)
        spawn = max(recorded - before - b, 0.0)
        note = (
            f"the backoff itself stays within 1 s (drawn {min(backoffs):.2f}-"
            f"{max(backoffs):.2f} s, median {b:.2f}), but it starts only after the dead "
            f"server's cleanup ({before:.2f} s from the kill to the backoff state: exit "
            "noticed, leftovers killed, port and GPU memory checked free), and the relaunch "
            f"(GPU and port checks, then the spawn) takes about {spawn:.2f} s more; the API "
            f"shows the new pid {max(med_relaunch - recorded, 0.0):.3f} s after the daemon "
            "records it"
        )
    emit(
        {
            **row(
                "restart",
                f"SIGKILL -> relaunch (new pid), median of {kills}",
                "s",
                med_relaunch,
                better="lower",
                target=target,
                note=note,
            ),
            "detail": detail,
        }
    )
    emit(
        {
            **row(
                "restart",
                f"SIGKILL -> ready again (simulator ready at once), median of {kills}",
                "s",
                round(median(ready), 3),
                better="lower",
            ),
            "detail": detail,
        }
    )


# --- hang ----------------------------------------------------------------------------------


def _left_ready(d: BenchDaemon, name: str, after: float, timeout: float) -> tuple[float, str, str]:
    """Unix time, new state and message of the first change of ``name`` out of
    ``ready`` after ``after``."""

    def find() -> tuple[float, str, str] | None:
        for ts, new_state, message in d.query(
            "select ts, new_state, message from events "
            "where server = ? and old_state = 'ready' order by id",
            name,
        ):
            t = to_unix(ts)
            if t >= after - 0.001:
                return t, new_state, message or ""
        return None

    return wait_for(find, timeout, f"{name} out of ready\n{d.log()}", 0.1)


def _hang_run(folder: Path, hang_timeout_s: float, count: int) -> dict:
    """One daemon at the contract's defaults but ``hang_timeout_s``, SGLang's own
    /health timeout (SGLANG_HEALTH_CHECK_TIMEOUT unset: 20 s) and drain poll (5 s);
    ``count`` servers, each hung once (scheduler hung, front alive), staggered over
    one probe interval so the hangs meet the watches at different points of their cycle."""
    probe_interval = DEFAULT_DAEMON["probe_interval_s"]
    ports = free_ports(count)
    servers = [{"name": f"h{i}", "port": ports[i], "gpus": [i]} for i in range(count)]
    out: dict[str, Any] = {"out_of_ready_s": [], "restart_s": [], "relaunch_s": []}
    out["reasons"], out["left_ready_as"], out["messages"] = [], [], []
    with BenchDaemon(
        folder,
        servers,
        daemon={"hang_timeout_s": hang_timeout_s},
        sim_args=[*QUICK_SIM, "--sim-drain-poll-s", str(DEFAULT_DRAIN_POLL_S)],
        gpus=count,
        profile="current",
        sglang_env={},
    ) as d:
        d.start()
        d.wait_all_ready(120)
        # Steady state: every server has answered a load query and a health check.
        time.sleep(probe_interval + 1.0)
        hung_at: dict[str, float] = {}
        for i, s in enumerate(servers):
            time.sleep(probe_interval / count if i else 0.0)
            hung_at[s["name"]] = time.time()
            answer = sim_fault(s["port"], "scheduler_hang")
            if answer.get("mode") != "scheduler_hang":
                raise RuntimeError(f"{s['name']}: /sim/fault answered {answer}")
        for s in servers:
            name, t0 = s["name"], hung_at[s["name"]]
            left_at, new_state, message = _left_ready(d, name, t0, 120)
            rows = wait_for(
                lambda name=name, t0=t0: [
                    (reason, ts)
                    for reason, ts in d.query(
                        "select reason, ts from restarts where server = ? order by id", name
                    )
                    if to_unix(ts) >= t0 - 0.001
                ],
                120,
                f"restart of hung {name}\n{d.log()}",
                0.2,
            )
            reason, ts = rows[-1]
            out["out_of_ready_s"].append(round(left_at - t0, 3))
            out["left_ready_as"].append(new_state)
            out["messages"].append(message)
            out["reasons"].append(reason)
            out["restart_s"].append(round(to_unix(ts) - t0, 3))
            out["relaunch_s"].append(round(d.event_time(name, "starting", t0, 60) - t0, 3))
    return out


def bench_hang(count: int = 6) -> None:
    d = DEFAULT_DAEMON
    settings = {
        "probe_interval_s": d["probe_interval_s"],
        "hang_timeout_s": d["hang_timeout_s"],
        "health_timeout_s": d["health_timeout_s"],
        "health_failures": d["health_failures"],
        "stop_timeout_s": d["stop_timeout_s"],
        "SGLANG_HEALTH_CHECK_TIMEOUT": f"unset (SGLang's default, {SGLANG_HEALTH_DEFAULT_S} s)",
        "sim": f"profile current, --sim-drain-poll-s {DEFAULT_DRAIN_POLL_S:g}",
    }
    health_only_timeout = 3600.0
    with work_dir("hang") as folder:
        ours = _hang_run(folder / "watch", d["hang_timeout_s"], count)
        health = _hang_run(folder / "health-only", health_only_timeout, count)
    bad = [r for r in ours["reasons"] if r != "hang"]
    if bad:
        raise RuntimeError(f"expected every restart for a hang, got {ours['reasons']}")
    detail = {
        "settings": settings,
        "scheduler_watch": ours,
        "health_only": {**health, "hang_timeout_s": health_only_timeout},
    }
    target = "<= 15"
    med, top = median(ours["out_of_ready_s"]), max(ours["out_of_ready_s"])
    h_med, h_top = median(health["out_of_ready_s"]), max(health["out_of_ready_s"])
    note = None
    if not meets(top, target):
        # The daemon's message says how long the silence was ("... for 15.0 s ...").
        silences = [
            float(m) for m in re.findall(r"for (\d+(?:\.\d+)?) s", " ".join(ours["messages"]))
        ]
        late = sum(x >= d["hang_timeout_s"] + d["probe_interval_s"] / 2 for x in silences)
        note = (
            f"measured {min(ours['out_of_ready_s']):.1f}-{top:.1f} s: the scheduler watch calls "
            f"a hang once no load query has been answered for hang_timeout_s "
            f"({d['hang_timeout_s']:g} s), but it looks only when a probe interval "
            f"({d['probe_interval_s']:g} s) ticks or a query ends; at the tick hang_timeout_s "
            "after the last answer the silence is short by that answer's own latency, so "
            f"{late} of {count} hangs were called one tick later, "
            f"{d['hang_timeout_s'] + d['probe_interval_s']:g} s after the last answer"
        )
    defaults = (
        f"probe {d['probe_interval_s']:g} s, hang_timeout {d['hang_timeout_s']:g} s, "
        f"health_timeout {d['health_timeout_s']:g} s, SGLang's /health "
        f"{SGLANG_HEALTH_DEFAULT_S} s"
    )
    for what, value in (("median", med), ("max", top)):
        emit(
            {
                **row(
                    "hang",
                    f"hung scheduler (live front) -> out of ready, defaults ({defaults}): "
                    f"{what} of {count}",
                    "s",
                    round(value, 2),
                    better="lower",
                    target=target,
                    note=note,
                ),
                "detail": detail,
            }
        )
    reasons = ", ".join(sorted(set(health["reasons"])))
    for what, value in (("median", h_med), ("max", h_top)):
        emit(
            {
                **row(
                    "hang",
                    f"the same with /health alone (scheduler watch off: hang_timeout_s "
                    f"{health_only_timeout:g}; {d['health_failures']} failed checks, "
                    f"restart reason {reasons}): {what} of {count}",
                    "s",
                    round(value, 2),
                    better="lower",
                ),
                "detail": detail,
            }
        )


# --- stop with streams in flight -------------------------------------------------------------

STREAM_TOKENS = 100
STREAM_TOKEN_LATENCY_S = 0.05
STREAM_SIM = [
    *QUICK_SIM,
    "--sim-children",
    "2",
    "--sim-token-latency-s",
    str(STREAM_TOKEN_LATENCY_S),
    "--sim-output-tokens",
    str(STREAM_TOKENS),
    "--sim-drain-poll-s",
    str(DEFAULT_DRAIN_POLL_S),
]


async def _chat_stream(session: Any, url: str, progress: list[int], i: int) -> dict[str, Any]:
    """One streamed chat completion; whether it ended as SGLang ends a finished one
    (a finish_reason, then ``data: [DONE]``)."""
    began = time.monotonic()
    result: dict[str, Any] = {"tokens": 0, "finish_reason": None, "done": False, "error": None}
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Tell a long story, number {i}."}],
        "max_tokens": STREAM_TOKENS,
        "stream": True,
    }
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                result["error"] = f"HTTP {resp.status}"
                return result
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result["done"] = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    result["error"] = str(event["error"])[:200]
                    continue
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        result["tokens"] += 1
                        progress[i] += 1
                    if choice.get("finish_reason"):
                        result["finish_reason"] = choice["finish_reason"]
    except Exception as exc:  # noqa: BLE001 - a cut stream is what is measured
        result["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        result["ended_at"] = time.monotonic()
        result["ended_s"] = round(result["ended_at"] - began, 3)
    result["complete"] = (
        result["done"] and result["finish_reason"] in ("stop", "length") and not result["error"]
    )
    return result


async def _health_status(session: Any, url: str) -> str:
    try:
        async with session.get(url + "/health", timeout=_client_timeout(2.0)) as resp:
            await resp.read()
            return str(resp.status)
    except Exception as exc:  # noqa: BLE001 - refused, reset, timed out: all recorded
        return type(exc).__name__


def _client_timeout(total: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=total)


async def _streams_through_stop(port: int, pid: int, stop: Callable[[], None], n: int) -> dict:
    """Start ``n`` chat streams, stop the server with ``stop`` once every stream has
    tokens, and watch: the streams, /health every 0.2 s, the scheduler children, and
    the main process until it exits."""
    import aiohttp

    url = f"http://127.0.0.1:{port}"
    main = psutil.Process(pid)
    children = main.children(recursive=True)
    progress = [0] * n
    async with aiohttp.ClientSession(timeout=_client_timeout(120.0)) as session:
        streams = [asyncio.create_task(_chat_stream(session, url, progress, i)) for i in range(n)]
        deadline = time.monotonic() + 20
        while min(progress) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tokens_at_stop = list(progress)
        stopped_at = time.monotonic()
        await asyncio.to_thread(stop)
        health: list[tuple[float, str]] = []
        children_gone_s: float | None = None
        exit_s: float | None = None
        while time.monotonic() - stopped_at < 90:
            now = time.monotonic() - stopped_at
            if children_gone_s is None and not any(c.is_running() for c in children):
                children_gone_s = round(now, 3)
            if not main.is_running():
                exit_s = round(now, 3)
                break
            health.append((round(now, 2), await _health_status(session, url)))
            await asyncio.sleep(0.2)
        results = await asyncio.gather(*streams)
    drain = [status for _, status in health]
    return {
        "streams": n,
        "cut": sum(not r["complete"] for r in results),
        "tokens_at_stop": tokens_at_stop,
        "tokens": [r["tokens"] for r in results],
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "stream_ended_s": [r["ended_s"] for r in results],
        "streams_done_s": round(max(r["ended_at"] for r in results) - stopped_at, 3),
        "exit_s": exit_s,
        "children": len(children),
        "children_gone_s": children_gone_s,
        "health_polls": len(drain),
        "health_503": drain.count("503"),
        "health_answers": {s: drain.count(s) for s in sorted(set(drain))},
        "health_timeline": health,
    }


def bench_stop(streams: int = 8) -> None:
    ports = free_ports(2)
    servers = [
        {"name": "drain", "port": ports[0], "gpus": [0]},
        {"name": "group", "port": ports[1], "gpus": [1]},
    ]
    with (
        work_dir("stop") as folder,
        BenchDaemon(folder, servers, sim_args=STREAM_SIM, gpus=2, sglang_env={}) as d,
    ):
        d.start()
        d.wait_all_ready(120)
        time.sleep(1.0)

        def modelserverd_stop() -> None:
            subprocess.run(
                [
                    PY,
                    "-m",
                    "supervisord_ms.cli",
                    "stop",
                    "drain",
                    "--config",
                    str(d.harness.config_path),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )

        ours_pid = d.wait_state("drain", "ready")["pid"]
        ours = asyncio.run(_streams_through_stop(ports[0], ours_pid, modelserverd_stop, streams))
        d.wait_state("drain", "stopped", 60)

        group_pid = d.wait_state("group", "ready")["pid"]
        pgid = os.getpgid(group_pid)

        def group_sigterm() -> None:
            os.killpg(pgid, signal.SIGTERM)  # the stop before this change

        group = asyncio.run(_streams_through_stop(ports[1], group_pid, group_sigterm, streams))
        group["pgid_is_pid"] = pgid == group_pid
    detail = {
        "sim": " ".join(STREAM_SIM),
        "stream": f"chat, {STREAM_TOKENS} tokens at {STREAM_TOKEN_LATENCY_S:g} s a token",
        "modelserverd_stop": ours,
        "group_sigterm": group,
    }

    def share_503(run: dict) -> float:
        return (
            round(100.0 * run["health_503"] / run["health_polls"], 1)
            if run["health_polls"]
            else 0.0
        )

    def account(run: dict) -> str:
        gone = run["children_gone_s"]
        health = ", ".join(f"{count} x {status}" for status, count in run["health_answers"].items())
        return (
            f"{run['cut']} of {run['streams']} streams cut"
            + (f" ({'; '.join(run['errors'])})" if run["errors"] else "")
            + f", its {run['children']} scheduler children "
            + ("lived until the exit" if gone is None else f"were gone {gone} s after the signal")
            + f", /health while it drained: {health or 'not polled'}"
        )

    remark = (
        f"`modelserverd stop`: {account(ours)}; the streams ended "
        f"{ours['streams_done_s']} s after the stop and the server exited at "
        f"{ours['exit_s']} s (SGLang's drain looks every {DEFAULT_DRAIN_POLL_S:g} s). "
        f"SIGTERM to the whole group: {account(group)}."
    )
    if group["cut"] == 0 and group["children_gone_s"] is not None:
        remark += (
            " That group SIGTERM cut nothing only because the simulator makes every token in "
            "its main process, and its children end with status 0 on SIGTERM, which its "
            "child watch (it acts on a non-zero status) lets pass; in SGLang the scheduler "
            "children make the tokens, so with them gone no stream gets another token"
        )
    note_ours = None
    if ours["cut"]:
        note_ours = account(ours)
    emit(
        {
            **row(
                "stop",
                f"in-flight chat streams cut by `modelserverd stop` (SIGTERM to SGLang's main "
                f"process, drain, then SIGKILL of the tree), of {streams}",
                "streams",
                ours["cut"],
                better="lower",
                target="<= 0",
                note=note_ours,
            ),
            "remark": remark,
            "detail": detail,
        }
    )
    emit(
        {
            **row(
                "stop",
                f"in-flight chat streams cut by SIGTERM to the whole process group (the stop "
                f"before this change), of {streams}",
                "streams",
                group["cut"],
                better="lower",
            ),
            "detail": detail,
        }
    )
    emit(
        {
            **row(
                "stop",
                "/health polls answered 503 from the stop to the exit, `modelserverd stop` "
                "(every 0.2 s)",
                "%",
                share_503(ours),
                better="higher",
            ),
            "detail": detail,
        }
    )
    emit(
        {
            **row(
                "stop",
                "/health polls answered 503 from the stop to the exit, SIGTERM to the group "
                "(every 0.2 s)",
                "%",
                share_503(group),
                better="higher",
            ),
            "detail": detail,
        }
    )


# --- scale --------------------------------------------------------------------------------


def _descendant_scan_ms(pids: list[int], rounds: int = 3) -> float:
    """Median milliseconds of ``launcher.descendants(pid)``, the call the supervisor
    makes before every health check."""
    from supervisord_ms import launcher

    times = []
    for _ in range(rounds):
        for pid in pids:
            began = time.perf_counter()
            launcher.descendants(pid)
            times.append((time.perf_counter() - began) * 1e3)
    return median(times) if times else 0.0


def bench_scale(count: int = 64, window_s: float = 20.0) -> None:
    probe_interval = 5.0
    ports = free_ports(count)
    servers = [{"name": f"s{i:02d}", "port": ports[i], "gpus": [i]} for i in range(count)]
    sim = ["--sim-startup-s", "0", "--sim-warmup-s", "0", "--sim-gpu-mib", "256"]
    with (
        work_dir("scale") as folder,
        BenchDaemon(
            folder,
            servers,
            daemon={
                "probe_interval_s": probe_interval,
                "stop_timeout_s": 10.0,
                "startup_timeout_s": 600.0,
            },
            sim_args=sim,
            gpus=count,
            stop_timeout=180.0,
        ) as d,
    ):
        d.start()
        began = time.monotonic()
        d.wait_all_ready(300)
        all_ready_s = time.monotonic() - began
        wait_for(
            lambda: all(s["latency_s"] is not None for s in d.all_servers()),
            60,
            "a latency estimate for every server",
            1.0,
        )
        time.sleep(5.0)  # one more probe round, so the window sees steady state
        proc = psutil.Process(d.pid())
        rss: list[int] = []
        t0 = proc.cpu_times()
        w0 = time.monotonic()
        while time.monotonic() - w0 < window_s:
            rss.append(proc.memory_info().rss)
            time.sleep(1.0)
        t1 = proc.cpu_times()
        wall = time.monotonic() - w0
        listing = d.all_servers()
        states = {s["state"] for s in listing}
        if states != {"ready"}:
            raise RuntimeError(f"servers left ready during the window: {states}")
        # After the window: the cost, on this host right now, of the descendant scan the
        # supervisor runs before each health check of each server.
        scan_ms = _descendant_scan_ms([s["pid"] for s in listing if s["pid"]][:10])
        host_processes = len(psutil.pids())
    cpu = 100.0 * ((t1.user - t0.user) + (t1.system - t0.system)) / wall
    rss_mb = max(rss) / 1e6
    detail = {
        "servers": count,
        "window_s": round(wall, 1),
        "all_ready_after_s": round(all_ready_s, 1),
    }
    cpu_target, rss_target = "< 5", "< 100"
    cpu_note = rss_note = None
    detail["descendant_scan_ms"] = round(scan_ms, 2)
    detail["host_processes"] = host_processes
    if not meets(cpu, cpu_target):
        idle_every = min(IDLE_LOAD_INTERVAL_S, probe_interval)
        cpu_note = (
            f"the scheduler watch asks each of the {count} idle servers for its load every "
            f"{idle_every:g} s ({count / idle_every:.0f} HTTP requests/s, on kept-alive "
            f"connections; every {min(LOAD_INTERVAL_S, probe_interval):g} s while a server "
            "has requests), which is what finds a hung scheduler within seconds; the health "
            "checks and benchmark probes add "
            f"{2 * count / probe_interval:.0f} requests/s and their database rows. "
            f"Each health check also reads who listens on the port (one reading of "
            f"/proc/net/tcp shared by all servers each second) and lists the server's "
            f"descendants ({scan_ms:.1f} ms a call here, {host_processes} processes on the "
            "host)"
        )
    if not meets(rss_mb, rss_target):
        rss_note = f"{rss_mb:.0f} MB resident with {count} servers (Python, aiohttp, SQLite)"
    emit(
        {
            **row(
                "scale",
                f"daemon CPU, {count} servers idle (probe every {probe_interval:g} s), "
                f"over {window_s:g} s",
                "% of a core",
                round(cpu, 2),
                better="lower",
                target=cpu_target,
                note=cpu_note,
            ),
            "detail": detail,
        }
    )
    emit(
        {
            **row(
                "scale",
                f"daemon RSS, {count} servers",
                "MB",
                round(rss_mb, 1),
                better="lower",
                target=rss_target,
                note=rss_note,
            ),
            "detail": detail,
        }
    )


SCENARIOS = {
    "restart": bench_restart,
    "hang": bench_hang,
    "stop": bench_stop,
    "scale": bench_scale,
}


def main() -> int:
    return run_scenarios(SCENARIOS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
