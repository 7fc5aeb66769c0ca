"""Run every benchmark, collect the rows into bench/results.json, print them, and
rewrite the README's performance section (via bench/report.py).

Each scenario runs as its own subprocess with a time limit, so one crash or hang
loses only its own rows (it becomes a "no result" row saying why). On a timeout the
benchmark gets SIGTERM (it then stops the daemons and simulators it started), and
whatever of its process tree is still alive a minute later is killed.

    .venv/bin/python bench/run.py                       # everything (`make bench`)
    .venv/bin/python bench/run.py --only restart,scale  # a subset; other rows are kept

Scenarios: store, sim, restart, hang, scale, decision, stability, affinity.
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


JOBS = [
    Job("store", [PY, str(BENCH / "bench_store.py")], 180, _store_rows),
    Job("sim", [PY, str(BENCH / "bench_sim.py")], 120, _sim_rows),
    Job("restart", [PY, str(BENCH / "bench_supervisor.py"), "restart"], 240),
    Job("hang", [PY, str(BENCH / "bench_supervisor.py"), "hang"], 180),
    Job("scale", [PY, str(BENCH / "bench_supervisor.py"), "scale"], 480),
    Job("decision", [PY, str(BENCH / "bench_selection.py"), "decision"], 240),
    Job("stability", [PY, str(BENCH / "bench_selection.py"), "stability"], 120),
    Job("affinity", [PY, str(BENCH / "bench_selection.py"), "affinity"], 120),
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


def run_job(job: Job, work_root: Path) -> list[dict[str, Any]]:
    work = work_root / job.name
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, WORK_ENV: str(work), "PYTHONUNBUFFERED": "1"}
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
    return rows


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated scenarios (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the README section"
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
    work_root = Path(tempfile.mkdtemp(prefix="msbench-"))
    fresh: dict[str, list[dict[str, Any]]] = {}
    try:
        print(f"running {len(jobs)} benchmark(s) in {work_root}", flush=True)
        for job in jobs:
            fresh[job.name] = run_job(job, work_root)
    finally:
        kill_processes_naming(work_root)
        shutil.rmtree(work_root, ignore_errors=True)

    # A subset keeps the other scenarios' rows from the last full run.
    previous: list[dict[str, Any]] = []
    if args.only and args.results.exists():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(args.results.read_text(encoding="utf-8")).get("rows", [])
    rows: list[dict[str, Any]] = []
    for name in names:
        if name in fresh:
            rows.extend(fresh[name])
        else:
            rows.extend(r for r in previous if r.get("scenario") == name)
    results = {
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": rows,
    }
    args.results.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print()
    print(report.render_text(rows))
    print(f"\n{results['machine']}\nwrote {args.results} in {time.monotonic() - started:.0f} s")
    if not args.no_readme:
        report.main(["--results", str(args.results)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
