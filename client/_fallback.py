"""Choosing servers without the daemon, from the config file, like the seed did.

When the daemon is down (or its socket is missing, or not ours to use) the client must
still work. It sends the benchmark message to every server of the size at once, each
on its own thread; once one answered in ``b`` seconds it stops waiting for the others
after ``latency_growing_rate`` x ``b`` (the seed's early skip: in a round with one
very slow server, waiting for it would only delay the choice). The answers rank the
servers, fastest first; their measured latencies become the expectations that the
slowness check and the first-token deadline use afterwards.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from supervisord_ms.config import ClientConfig, Config

from ._exceptions import Attempt, DaemonUnavailable, NoServerAvailable, RequestRejected
from ._models import ServerInfo
from ._policy import DEFAULT_FIRST_TOKEN_S, early_skip_until, rendezvous_order
from ._sglang import AttemptFailed, Cancel, ChatApi, GenerateApi, Request, stream_attempt
from ._transport import SglangTransport

PROBE_TIMEOUT_S = 30.0
PROBE_IDLE_S = 5.0

T = TypeVar("T")

_noted = False
_note_lock = threading.Lock()


def note_daemon_down(exc: DaemonUnavailable, config_path: str) -> None:
    """Say once per process, on stderr, that servers are chosen without the daemon:
    an operator should know, but a program calling in a loop must not flood its log."""
    global _noted
    with _note_lock:
        if _noted:
            return
        _noted = True
    sys.stderr.write(
        f"ms-client: daemon not reachable at {exc.socket_path} ({exc.reason}); "
        f"choosing servers from {config_path} without it\n"
    )
    sys.stderr.flush()


def drain(gen: Generator[Any, None, T]) -> T:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@dataclass(frozen=True)
class ProbeResult:
    """One server's answer to the benchmark message (or why there was none)."""

    server: ServerInfo
    ok: bool
    latency_s: float | None = None
    ttft_s: float | None = None
    completion_tokens: int | None = None
    error: str | None = None
    skipped: bool = False

    @property
    def state(self) -> str:
        """``ready`` answered, ``slow`` was skipped (still up, probably), else ``unreachable``."""
        if self.ok:
            return "ready"
        return "slow" if self.skipped else "unreachable"

    @property
    def measured(self) -> ServerInfo:
        """The server with this probe's measurements as its expectations."""
        if not self.ok or self.latency_s is None:
            return replace(self.server, state=self.state)
        per = None
        n = self.completion_tokens or 0
        if n >= 2 and self.ttft_s is not None:
            per = max(self.latency_s - self.ttft_s, 0.0) / (n - 1) or None
        return replace(
            self.server,
            latency_s=self.latency_s,
            ttft_s=self.ttft_s,
            latency_per_token_s=per,
            state="ready",
        )


def servers_from_config(config: Config, model_size: str | None = None) -> list[ServerInfo]:
    return [
        ServerInfo(
            name=s.name,
            ip=s.ip,
            port=s.port,
            model_size=s.model_size,
            model_path=s.model_path,
            state="unknown",
        )
        for s in config.servers
        if model_size is None or s.model_size == model_size
    ]


def probe(
    servers: Sequence[ServerInfo],
    *,
    transport: SglangTransport,
    api: ChatApi | GenerateApi,
    client: ClientConfig,
    early_skip: bool = True,
) -> list[ProbeResult]:
    """Benchmark every server concurrently; results in the order of ``servers``.

    Threads are daemons and abandoned probes are cancelled (their connection closed),
    so a hung server delays neither the choice nor the program's exit.
    """
    if not servers:
        return []
    req = Request(
        prompt=client.benchmark_message, max_tokens=client.benchmark_max_tokens, temperature=0.0
    )
    total_s = min(client.request_timeout_s, PROBE_TIMEOUT_S)
    first_s = min(DEFAULT_FIRST_TOKEN_S, total_s)
    answers: queue.Queue[tuple[int, ProbeResult]] = queue.Queue()
    cancels = [Cancel() for _ in servers]

    def run(i: int, server: ServerInfo) -> None:
        try:
            outcome = drain(
                stream_attempt(
                    transport,
                    server,
                    api,
                    req,
                    first_token_s=first_s,
                    idle_s=PROBE_IDLE_S,
                    total_s=total_s,
                    cancel=cancels[i],
                )
            )
            result = ProbeResult(
                server,
                ok=True,
                latency_s=outcome.latency_s,
                ttft_s=outcome.ttft_s,
                completion_tokens=outcome.completion_tokens or outcome.chunks,
            )
        except AttemptFailed as exc:
            result = ProbeResult(server, ok=False, error=exc.reason)
        except RequestRejected as exc:
            result = ProbeResult(
                server, ok=False, error=f"refused the benchmark: HTTP {exc.status}: {exc.message}"
            )
        except Exception as exc:  # a probe thread must always answer
            result = ProbeResult(server, ok=False, error=str(exc) or type(exc).__name__)
        answers.put((i, result))

    started = time.monotonic()
    for i, server in enumerate(servers):
        threading.Thread(target=run, args=(i, server), name="ms-client-probe", daemon=True).start()

    results: dict[int, ProbeResult] = {}
    hard_limit = started + total_s + 1.0
    best: float | None = None
    while len(results) < len(servers):
        limit = hard_limit
        if early_skip and best is not None:
            limit = min(limit, early_skip_until(started, best, client.latency_growing_rate))
        remaining = limit - time.monotonic()
        if remaining <= 0:
            break
        try:
            i, result = answers.get(timeout=remaining)
        except queue.Empty:
            break
        results[i] = result
        if result.ok and result.latency_s is not None:
            best = result.latency_s if best is None else min(best, result.latency_s)
    waited = time.monotonic() - started
    for i, server in enumerate(servers):
        if i not in results:
            cancels[i].cancel()
            results[i] = ProbeResult(
                server,
                ok=False,
                skipped=True,
                error=f"no answer after {waited:.2f} s, slower than "
                f"{client.latency_growing_rate:g} x the fastest; skipped",
            )
    return [results[i] for i in range(len(servers))]


def rank(results: Iterable[ProbeResult], *, key: str | None = None) -> list[ServerInfo]:
    """Servers that answered (fastest first, or by ``key`` affinity), then skipped ones.

    Servers that failed are left out: they just refused or broke. With a key, every
    answering server is a fair choice (early skip already dropped the slow), and
    rendezvous hashing keeps the key's conversation on one of them.
    """
    results = list(results)
    answered = sorted((r for r in results if r.ok), key=lambda r: r.latency_s or 0.0)
    if key:
        by_name = {r.server.name: r for r in answered}
        answered = [by_name[n] for n in rendezvous_order(key, by_name)]
    skipped = [r for r in results if r.skipped]
    return [r.measured for r in answered + skipped]


def choose(
    config: Config,
    model_size: str,
    *,
    transport: SglangTransport,
    api: ChatApi | GenerateApi,
    key: str | None = None,
    exclude: Iterable[str] = (),
) -> list[ServerInfo]:
    """The config's servers of ``model_size`` in the order to try them.

    ``exclude`` (servers found slow) are probed only when nothing else is configured.
    Raises :class:`NoServerAvailable` listing each server's failure when none answered.
    """
    servers = servers_from_config(config, model_size)
    if not servers:
        sizes = sorted({s.model_size for s in config.servers})
        raise NoServerAvailable(
            model_size,
            detail=f"the config {config.path} has no {model_size} server "
            f"(sizes there: {', '.join(sizes) or 'none'}); add one under [[servers]]",
        )
    excluded = set(exclude)
    wanted = [s for s in servers if s.name not in excluded] or servers
    results = probe(wanted, transport=transport, api=api, client=config.client)
    ranked = rank(results, key=key)
    if not ranked:
        raise NoServerAvailable(
            model_size,
            [Attempt(r.server.name, r.server.address, r.error or "failed") for r in results],
        )
    return ranked
