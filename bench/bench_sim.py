"""Throughput of the simulator: how many small /generate requests one sim answers.

The simulator stands in for many SGLang servers in end-to-end tests and demos, so
its own cost must stay far below the daemon's and the client's. This starts one
sim with zero latency, drives it from a separate client process over many
keep-alive connections (a minimal HTTP/1.1 client, so the load generator is not
the bottleneck) and prints one JSON line:

    {"scenario": "sim_throughput", "requests_per_s": ..., "sim_cpu_percent": ..., ...}

Run: .venv/bin/python bench/bench_sim.py [--duration 5] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil

BODY = json.dumps({"text": "hello simulated world", "sampling_params": {"max_new_tokens": 8}})


def _request(port: int) -> bytes:
    return (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n{BODY}"
    ).encode()


async def _connection(port: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _request(port)
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                counts[0] += 1
            else:
                counts[1] += 1
    finally:
        writer.close()


async def _drive(port: int, connections: int, duration: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    counts = [0, 0]
    began = loop.time()
    stop_at = began + duration
    await asyncio.gather(*(_connection(port, stop_at, counts) for _ in range(connections)))
    elapsed = loop.time() - began
    return {"ok": counts[0], "errors": counts[1], "seconds": elapsed}


def client_main(port: int, connections: int, duration: float) -> None:
    result = asyncio.run(_drive(port, connections, duration))
    print(json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"simulator on port {port} did not become ready in {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        client_main(args.client, args.connections, args.duration)
        return

    port = _free_port()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisord_ms.sim",
            "--model-path",
            "/tmp/sim-model",
            "--port",
            str(port),
            "--sim-ttft-s",
            "0",
            "--sim-token-latency-s",
            "0",
            "--sim-output-tokens",
            "8",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_ready(port, 30)
        proc = psutil.Process(sim.pid)
        cpu_before = sum(proc.cpu_times()[:2])
        wall_before = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--client",
                str(port),
                "--connections",
                str(args.connections),
                "--duration",
                str(args.duration),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.monotonic() - wall_before
        cpu = sum(proc.cpu_times()[:2]) - cpu_before
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.killpg(sim.pid, signal.SIGTERM)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(sim.pid, signal.SIGKILL)
            sim.wait()
    rate = result["ok"] / result["seconds"]
    print(
        json.dumps(
            {
                "scenario": "sim_throughput",
                "requests_per_s": round(rate, 1),
                "sim_cpu_percent": round(100.0 * cpu / wall, 1),
                # capacity of one fully used core; steadier than requests_per_s on a
                # machine whose other work competes for the cores
                "requests_per_sim_cpu_s": round(result["ok"] / cpu, 1) if cpu else None,
                "errors": result["errors"],
                "connections": args.connections,
                "duration_s": round(result["seconds"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
