"""How many latency samples per second the state database writer takes.

The prober and every client report go through ``StoreWriter``; a daemon probing
hundreds of servers while clients report thousands of requests must never fall
behind. This pushes ``--rows`` samples from one thread as fast as it can and
times from the first ``add_sample`` until ``flush()`` confirms all of them are
on disk (WAL, one transaction per batch). Target: at least 10,000 per second.

    .venv/bin/python bench/bench_store.py [--rows 100000] [--keep DIR]

Prints one JSON line: {"scenario": "store_inserts", "inserts_per_s": ..., "rows": ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from supervisord_ms.store import StoreWriter

TARGET_PER_S = 10_000


def run(path: Path, rows: int) -> dict[str, object]:
    """Write ``rows`` samples through a fresh writer and time it."""
    writer = StoreWriter(path)
    writer.start()
    servers = [f"bench-{i}" for i in range(16)]
    add = writer.add_sample
    started = time.perf_counter()
    for i in range(rows):
        add(
            server=servers[i % 16],
            source="client" if i % 3 else "probe",
            ok=True,
            latency_s=0.05 + (i % 100) / 1000,
            ttft_s=0.01,
            prompt_tokens=20,
            completion_tokens=16,
        )
    queued = time.perf_counter()
    if not writer.flush(timeout=600):
        raise SystemExit(f"flush did not complete: {writer.error}")
    finished = time.perf_counter()
    writer.close()
    conn = sqlite3.connect(path)
    try:
        on_disk = conn.execute("SELECT count(*) FROM latency_samples").fetchone()[0]
    finally:
        conn.close()
    if on_disk != rows:
        raise SystemExit(f"expected {rows} rows on disk, found {on_disk}")
    elapsed = finished - started
    return {
        "scenario": "store_inserts",
        "inserts_per_s": round(rows / elapsed),
        "rows": rows,
        "seconds": round(elapsed, 3),
        "enqueue_s": round(queued - started, 3),
        "target_per_s": TARGET_PER_S,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="write the database here and keep it")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        path = args.keep / "bench-store.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        result = run(path, args.rows)
    else:
        folder = tempfile.mkdtemp(prefix="bench-store-")
        try:
            result = run(Path(folder) / "state.db", args.rows)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result["inserts_per_s"] >= TARGET_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
