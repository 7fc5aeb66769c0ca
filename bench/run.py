"""Run every benchmark, collect the rows into bench/results.json, print them, and
rewrite the README's performance table and docs/performance.md (via bench/report.py).

Each scenario runs as its own subprocess with a time limit, so one crash or hang
loses only its own rows (it becomes a "no result" row saying why). On a timeout the
benchmark gets SIGTERM (it then stops the daemons and simulators it started), and
whatever of its process tree is still alive a minute later is killed.

    .venv/bin/python bench/run.py                       # everything (`make bench`)
    .venv/bin/python bench/run.py --only restart,scale  # a subset; other rows are kept

Scenarios: store, sim, overhead, decision, failover_kill, failover_hang, failover_errors,
failover_slow, restart, hang, stop, stability, affinity, affinity_router, scale, fleet,
gateway.

The scenarios compared with the SGLang router need ``sglang-router`` (a benchmark
dependency, never the product's): when it is missing from this interpreter's
environment, it is installed first with ``python -m pip install sglang-router==VERSION``
(see bench/router_peer.py). If that fails, those scenarios still measure ours, and their
rows say why the router column is empty.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import router_peer  # noqa: E402
from common import WORK_ENV, kill_processes_naming, machine, row  # noqa: E402

PY = sys.executable
RESULTS = BENCH / "results.json"
# How long a benchmark may run, and how long it gets to clean up after SIGTERM.
CLEANUP_S = 60


# --- adapters for the benchmarks that print their own JSON ---------------------------------


def _store_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    rate = out["inserts_per_s"]
    target = f">= {out.get('target_per_s', 10000)}"
    note = None
    if rate < out.get("target_per_s", 10000):
        note = (
            f"{out['rows']:,} samples took {out['seconds']} s to reach the disk, "
            f"{out.get('enqueue_s', '?')} s of it to queue them"
        )
    return [
        {
            **row(
                "store",
                f"latency samples written through StoreWriter ({out['rows']:,}, one thread)",
                "inserts/s",
                rate,
                better="higher",
                target=target,
                note=note,
            ),
            "detail": out,
        }
    ]


def _sim_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    rate = out["requests_per_s"]
    cpu = out.get("sim_cpu_percent")
    note = None
    if rate < 2000:
        note = (
            f"the simulator (one process, so at most one core) used {cpu} % of a core while "
            f"the load generator shared the machine's {os.cpu_count()} cores"
        )
    rows = [
        {
            **row(
                "sim",
                f"small /generate answered by one simulator "
                f"({out.get('connections', '?')} keep-alive connections)",
                "requests/s",
                rate,
                better="higher",
                target=">= 2000",
                note=note,
            ),
            "detail": out,
        }
    ]
    if out.get("requests_per_sim_cpu_s") is not None:
        rows.append(
            {
                **row(
                    "sim",
                    "small /generate per CPU-second of the simulator",
                    "requests/s",
                    out["requests_per_sim_cpu_s"],
                    better="higher",
                ),
                "detail": out,
            }
        )
    return rows


@dataclass(frozen=True)
class Job:
    name: str
    argv: list[str]
    timeout_s: float
    adapt: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    needs_router: bool = False


def _router_job(name: str, scenario: str, timeout_s: float) -> Job:
    return Job(name, [PY, str(BENCH / "bench_router.py"), scenario], timeout_s, needs_router=True)


JOBS = [
    Job("store", [PY, str(BENCH / "bench_store.py")], 180, _store_rows),
    Job("sim", [PY, str(BENCH / "bench_sim.py")], 120, _sim_rows),
    _router_job("overhead", "overhead", 180),
    Job("decision", [PY, str(BENCH / "bench_selection.py"), "decision"], 240),
    _router_job("failover_kill", "failover_kill", 180),
    _router_job("failover_hang", "failover_hang", 180),
    _router_job("failover_errors", "failover_errors", 180),
    _router_job("failover_slow", "failover_slow", 180),
    Job("restart", [PY, str(BENCH / "bench_supervisor.py"), "restart"], 240),
    Job("hang", [PY, str(BENCH / "bench_supervisor.py"), "hang"], 420),
    Job("stop", [PY, str(BENCH / "bench_supervisor.py"), "stop"], 240),
    Job("stability", [PY, str(BENCH / "bench_selection.py"), "stability"], 120),
    Job("affinity", [PY, str(BENCH / "bench_selection.py"), "affinity"], 120),
    _router_job("affinity_router", "affinity", 180),
    Job("scale", [PY, str(BENCH / "bench_supervisor.py"), "scale"], 480),
    Job("fleet", [PY, str(BENCH / "bench_fleet.py"), "fleet"], 420, needs_router=True),
    Job("gateway", [PY, str(BENCH / "bench_gateway.py"), "gateway"], 360, needs_router=True),
]


# --- running one job --------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM the benchmark (it cleans up), then kill what is left of its tree."""
    tree = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=CLEANUP_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()  # psutil checks the start time: a reused pid is left alone
    return out, err


def _failed(job: Job, why: str) -> dict[str, Any]:
    return row(job.name, "no result (the benchmark failed)", "", None, better="higher", note=why)


def run_job(job: Job, work_root: Path, extra_env: dict[str, str] | None = None) -> list[dict]:
    work = work_root / job.name
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, WORK_ENV: str(work), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    began = time.monotonic()
    proc = subprocess.Popen(
        job.argv,
        cwd=BENCH.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=job.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        out, err = _stop(proc)
    except BaseException:
        _stop(proc)
        raise
    finally:
        kill_processes_naming(work)
    elapsed = time.monotonic() - began
    lines = []
    for text in out.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(text)
            if isinstance(obj, dict):
                lines.append(obj)
    rows: list[dict[str, Any]] = []
    for obj in lines:
        if job.adapt is not None:
            with contextlib.suppress(KeyError, TypeError):
                rows.extend(job.adapt(obj))
        elif "metric" in obj and "scenario" in obj:
            rows.append(obj)
    tail = " / ".join(line for line in err.strip().splitlines()[-3:]) or "no output"
    print(
        f"  {job.name}: {len(rows)} row(s) in {elapsed:.0f} s"
        + (f" (exit {proc.returncode})" if proc.returncode else ""),
        flush=True,
    )
    if timed_out:
        rows.append(_failed(job, f"timed out after {job.timeout_s:g} s; last output: {tail}"))
    elif not rows:
        rows.append(_failed(job, f"exit status {proc.returncode}; last output: {tail}"))
    elif proc.returncode and job.adapt is None:
        rows.append(_failed(job, f"exit status {proc.returncode} after some rows: {tail}"))
    for r in rows:
        r["job"] = job.name  # which job's rerun replaces the row (see --only)
    return rows


def _job_of(r: dict[str, Any]) -> str:
    return r.get("job") or r.get("scenario", "")


def _peer_info(install_error: str | None) -> dict[str, Any]:
    """What the README says about the SGLang router: version, launch line, defaults."""
    return {
        "package": router_peer.ROUTER_PACKAGE,
        "version": router_peer.installed_version(),
        "launch": router_peer.launch_line(),
        "defaults": router_peer.router_defaults(),
        "install_error": install_error,
    }


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated scenarios (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="do not rewrite the README table or docs/performance.md",
    )
    args = parser.parse_args(argv)
    names = [j.name for j in JOBS]
    chosen = names
    if args.only:
        chosen = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}")
    jobs = [j for j in JOBS if j.name in chosen]

    started = time.monotonic()
    peer: dict[str, Any] | None = None
    router_env: dict[str, str] = {}
    if any(j.needs_router for j in jobs):
        install_error = router_peer.ensure_installed(lambda line: print(line, flush=True))
        if install_error:
            print(f"sglang-router unavailable, ours is still measured: {install_error}")
            router_env[router_peer.INSTALL_ERROR_ENV] = install_error
        peer = _peer_info(install_error)
    work_root = Path(tempfile.mkdtemp(prefix="msbench-"))
    fresh: dict[str, list[dict[str, Any]]] = {}
    try:
        print(f"running {len(jobs)} benchmark(s) in {work_root}", flush=True)
        for job in jobs:
            fresh[job.name] = run_job(job, work_root, router_env if job.needs_router else None)
    finally:
        kill_processes_naming(work_root)
        shutil.rmtree(work_root, ignore_errors=True)

    # A subset keeps the other scenarios' rows from the last full run.
    previous: dict[str, Any] = {}
    if args.only and args.results.exists():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(args.results.read_text(encoding="utf-8"))
    rows: list[dict[str, Any]] = []
    for name in names:
        if name in fresh:
            rows.extend(fresh[name])
        else:
            rows.extend(r for r in previous.get("rows", []) if _job_of(r) == name)
    results: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": rows,
    }
    if peer is None:
        peer = previous.get("sglang_router")
    if peer is not None:
        results["sglang_router"] = peer
    args.results.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print()
    print(report.render_text(rows))
    print(f"\n{results['machine']}\nwrote {args.results} in {time.monotonic() - started:.0f} s")
    if not args.no_readme:
        report.main(["--results", str(args.results)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
