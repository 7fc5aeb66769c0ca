"""The supervisor against simulated SGLang servers: restart, hang detection, scale.

Each scenario starts the real daemon (``modelserverd run``) on a generated config whose
servers are simulators (``python -m supervisord_ms.sim``, labelled as a simulation) on a
``file:`` GPU view, measures from outside (the API, the state database, psutil), stops
the daemon and kills anything left. Prints one JSON row per metric (see bench/common.py).

* ``restart``: SIGKILL a ready server; seconds until the API shows a new pid
  (relaunch) and until it is ready again. Default ``[restart]`` settings (first
  backoff 0.8-1.0 s), each kill the server's first failure (five servers, one kill
  each); the simulators start at once, so "ready" is the supervisor's part only.
* ``hang``: ``POST /sim/fault {"mode": "hang"}`` (the port stays open, nothing
  answers) with ``probe_interval_s = 1``, ``health_timeout_s = 2``,
  ``health_failures = 3``; seconds until the supervisor decides to restart (the
  ``restarts`` row's time, reason ``hang``).
* ``scale``: 64 simulated servers on 64 simulated GPUs, default probing (every 5 s);
  once all are ready and measured, the daemon's CPU (% of one core, over 20 s) and RSS.

Run: .venv/bin/python bench/bench_supervisor.py restart|hang|scale [...]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BenchDaemon,
    emit,
    free_ports,
    median,
    meets,
    row,
    run_scenarios,
    to_unix,
    wait_for,
    work_dir,
)

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


def _fault(port: int, mode: str) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/sim/fault",
        data=json.dumps({"mode": mode}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


def bench_hang(count: int = 6) -> None:
    probe_interval, health_timeout, failures = 1.0, 2.0, 3
    bound = failures * probe_interval + health_timeout
    ports = free_ports(count)
    servers = [{"name": f"h{i}", "port": ports[i], "gpus": [i]} for i in range(count)]
    detect: list[float] = []
    relaunch: list[float] = []
    with (
        work_dir("hang") as folder,
        BenchDaemon(
            folder,
            servers,
            daemon={
                "probe_interval_s": probe_interval,
                "health_timeout_s": health_timeout,
                "health_failures": failures,
                "stop_timeout_s": 5.0,
            },
            sim_args=QUICK_SIM,
            gpus=count,
        ) as d,
    ):
        d.start()
        d.wait_all_ready(120)
        time.sleep(2.0)
        hung_at: dict[str, float] = {}
        # Staggered by a fraction of the probe interval, so the hangs meet the health
        # loop at different points of its cycle.
        for i, s in enumerate(servers):
            time.sleep(probe_interval / count if i else 0.0)
            hung_at[s["name"]] = time.time()
            _fault(s["port"], "hang")
        for s in servers:
            name = s["name"]
            rows = wait_for(
                lambda name=name: d.query("select reason, ts from restarts where server = ?", name),
                60,
                f"restart of hung {name}\n{d.log()}",
                0.1,
            )
            reason, ts = rows[-1]
            if reason != "hang":
                raise RuntimeError(f"{name}: expected a restart for a hang, got {rows}")
            detect.append(to_unix(ts) - hung_at[name])
            relaunch.append(d.event_time(name, "starting", hung_at[name]) - hung_at[name])
    detail = {
        "detect_s": [round(x, 3) for x in detect],
        "relaunch_s": [round(x, 3) for x in relaunch],
        "settings": {
            "probe_interval_s": probe_interval,
            "health_timeout_s": health_timeout,
            "health_failures": failures,
        },
    }
    med = round(median(detect), 3)
    target = f"<= {bound:g}"
    note = None
    if not meets(med, target):
        serial = failures * (probe_interval + health_timeout)
        note = (
            f"the bound {failures} x {probe_interval:g} s + {health_timeout:g} s = {bound:g} s "
            "assumes the checks go on every probe_interval_s while one is timing out; the "
            "health loop instead waits probe_interval_s after each timed-out check, so "
            f"detection takes up to {failures} x ({probe_interval:g} + {health_timeout:g}) s "
            f"= {serial:g} s (measured {min(detect):.2f}-{max(detect):.2f} s)"
        )
    emit(
        {
            **row(
                "hang",
                f"hang -> restart started (probe 1 s, timeout 2 s, 3 failures), median of {count}",
                "s",
                med,
                better="lower",
                target=target,
                note=note,
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
        scan_share = scan_ms / 1000 * count / probe_interval * 100
        cpu_note = (
            f"before each health check (each of the {count} servers every "
            f"{probe_interval:g} s) the supervisor lists the server's descendants, and "
            f"psutil's children(recursive=True) reads /proc/<pid>/stat of all "
            f"{host_processes} processes on the host: {scan_ms:.1f} ms a call here, about "
            f"{scan_share:.1f} % of a core by itself; the health checks and benchmark probes "
            f"({2 * count / probe_interval:.0f} HTTP requests/s) and their database rows "
            "take most of the rest"
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


SCENARIOS = {"restart": bench_restart, "hang": bench_hang, "scale": bench_scale}


def main() -> int:
    return run_scenarios(SCENARIOS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
