"""Probe rounds: the latency every configured server shows for the benchmark request.

Every ``probe_interval_s`` all servers get ``benchmark_message`` at once, streamed
(so time to first token and token counts are measured as well as the whole
latency). What each round does, and why:

* Local servers are probed only while READY or UNHEALTHY: a starting server
  refuses connections for minutes, and the supervisor's own health checks decide
  its fate. Servers this host does not manage are always probed: the probe is
  the only thing that tells whether they are reachable.
* A server that served a client request within the interval is skipped: the
  client's report already measured it, and a probe is load on a busy GPU.
* The seed's early skip (:func:`selector.probe_deadline`): once the fastest server
  has answered in ``b`` seconds, a probe still running after ``latency_growing_rate
  x b`` cannot win the round; it is cancelled (its connection closed, so SGLang
  aborts the generation) and counted "slow", not failed. Its sample is the time it
  had run, a lower bound, so its estimate rises without the server being ejected.
  Before anyone answered, the limit is ``health_timeout_s``; past it the probe fails.
* Servers not managed here change between READY and UNREACHABLE on the probes'
  evidence: a success, or a slow answer that had started to stream, makes them
  ready; ``health_failures`` rounds in a row with evidence of a fault make them
  unreachable. Evidence is a refused or reset connection, an error answer, or a
  liveness check that failed. A probe that proved nothing (cut off by the early skip
  before its headers, which a chat stream sends only with its first token since
  SGLang PR #21900, or timed out) is followed by a load query to the server's
  scheduler: an answer means slower, not gone. Only a change is reported, through
  ``on_reachability``; the daemon writes the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from . import selector, sglang_api, states
from .registry import Registry, ServerRecord
from .store import StoreWriter

log = logging.getLogger("modelserverd.prober")

OK = "ok"
SLOW = "slow"
FAILED = "failed"
SKIPPED = "skipped"

# Local servers in these states get probes; others are starting, stopped or waiting.
PROBED_LOCAL_STATES = (states.READY, states.UNHEALTHY)
# Enough connections for 256 servers probed at once, plus headroom for a round
# that overlaps the cancellation of the last one's slow probes.
CONNECTION_LIMIT = 1024
MAX_ERROR_CHARS = 300
# The smallest pause between two rounds, so a round that outlasts the interval
# (a 20 s timeout with a 5 s interval) does not start the next one back to back.
MIN_PAUSE_S = 0.1

OnReachability = Callable[[ServerRecord, str, str], None]
# How often, and how patiently, the load of servers not managed here is read.
LOAD_INTERVAL_S = 1.0
LOAD_TIMEOUT_S = 2.0
# serving_chat.py: the keys a chat stream's delta can carry.
PROGRESS_KEYS = ("role", "content", "reasoning_content", "tool_calls")


@dataclass
class ProbeResult:
    status: str  # OK, SLOW or FAILED
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # The model produced output (a delta, or a whole answer). Response headers are no
    # proof of life: legacy SGLang sends them at once, hung scheduler or not.
    responded: bool = False
    timed_out: bool = False  # no answer in time: no proof of a fault by itself


@dataclass
class _Progress:
    """What a running probe has reached, read when the round abandons it."""

    started: float
    responded: bool = False  # the first delta arrived


class _ProbeFailed(Exception):
    """A probe got an answer that is not a good benchmark answer (never escapes)."""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _describe(exc: BaseException) -> str:
    """An error line an operator understands, without aiohttp's class names."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the answer was cut off: {exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, _ProbeFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Prober:
    def __init__(
        self,
        registry: Registry,
        writer: StoreWriter,
        *,
        on_reachability: OnReachability,
        session: aiohttp.ClientSession | None = None,
    ):
        self.registry = registry
        self.writer = writer
        self.on_reachability = on_reachability
        self._session = session
        self._own_session = session is None
        # Rounds in a row without an answer, per server not managed here.
        self._misses: dict[str, int] = {}
        self.rounds = 0

    # --- session ------------------------------------------------------------------
    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # force_close: SGLang (uvicorn) drops idle connections after 5 s, the
            # default probe interval; reusing one would race that close and turn a
            # healthy server's probe into a spurious failure.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    # --- one probe ----------------------------------------------------------------
    def _request_body(self, record: ServerRecord) -> dict:
        client = self.registry.config.client
        return {
            "model": record.config.model_path,
            "messages": [{"role": "user", "content": client.benchmark_message}],
            "max_tokens": client.benchmark_max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def _probe(
        self, session: aiohttp.ClientSession, record: ServerRecord, progress: _Progress
    ) -> ProbeResult:
        loop = asyncio.get_running_loop()
        url = f"{record.config.url}/v1/chat/completions"
        timeout_s = self.registry.config.daemon.health_timeout_s
        resp: aiohttp.ClientResponse | None = None
        try:
            resp = await session.post(
                url,
                json=self._request_body(record),
                timeout=aiohttp.ClientTimeout(total=timeout_s + 5.0),
            )
            if resp.status != 200:
                body = await resp.content.read(MAX_ERROR_CHARS)
                detail = body.decode("utf-8", "replace")
                raise _ProbeFailed(f"HTTP {resp.status} from {url}: {_short(detail)}")
            if resp.content_type == "application/json":
                # A server that ignores stream=true answers whole: still a measurement.
                answer = self._whole_answer(url, await resp.json(), loop.time() - progress.started)
                progress.responded = True
                return answer
            ttft = None
            prompt_tokens = completion_tokens = None
            content_chunks = 0
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise _ProbeFailed(f"not an SSE JSON chunk: {_short(repr(data))}") from None
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise _ProbeFailed(f"error from {url}: {_short(str(chunk['error']))}")
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if not isinstance(delta, dict) or not any(
                        delta.get(k) is not None for k in PROGRESS_KEYS
                    ):
                        continue
                    # Any delta is the model's output: the role chunk that opens an
                    # answer, reasoning, tool calls, text.
                    content_chunks += 1
                    if ttft is None:
                        ttft = loop.time() - progress.started
                        progress.responded = True
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    prompt_tokens = _count(usage.get("prompt_tokens"))
                    completion_tokens = _count(usage.get("completion_tokens"))
            latency = loop.time() - progress.started
            if not done and content_chunks == 0:
                raise _ProbeFailed(f"{url} ended the stream without an answer")
            if completion_tokens is None and content_chunks:
                completion_tokens = content_chunks
            return ProbeResult(
                OK,
                latency_s=latency,
                ttft_s=ttft,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                responded=True,
            )
        except asyncio.CancelledError:
            if resp is not None:
                resp.close()  # closes the connection: SGLang aborts the generation
            raise
        except Exception as exc:
            if resp is not None:
                resp.close()
            return ProbeResult(
                FAILED,
                latency_s=loop.time() - progress.started,
                error=_describe(exc),
                responded=progress.responded,
                timed_out=isinstance(exc, asyncio.TimeoutError),
            )
        finally:
            if resp is not None:
                resp.release()

    @staticmethod
    def _whole_answer(url: str, body: object, latency: float) -> ProbeResult:
        if not isinstance(body, dict) or not body.get("choices"):
            raise _ProbeFailed(f"{url} answered without choices: {_short(repr(body))}")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return ProbeResult(
            OK,
            latency_s=latency,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            responded=True,
        )

    # --- a round ------------------------------------------------------------------
    def _targets(self, mono: float) -> tuple[list[ServerRecord], list[ServerRecord]]:
        """(to probe, skipped because a client request measured them recently)."""
        interval = self.registry.config.daemon.probe_interval_s
        probe, skipped = [], []
        for record in list(self.registry.servers.values()):
            if record.config.is_managed and record.state not in PROBED_LOCAL_STATES:
                continue
            last = record.last_client_request_at
            if last is not None and 0 <= mono - last < interval:
                skipped.append(record)
            else:
                probe.append(record)
        return probe, skipped

    async def run_round(self) -> dict[str, str]:
        """Probe every eligible server once, concurrently; record what was measured.

        Returns ``name -> "ok" | "slow" | "failed" | "skipped"``; local servers not
        probed because of their state (starting, stopped, ...) are absent.
        """
        loop = asyncio.get_running_loop()
        for gone in set(self._misses) - set(self.registry.servers):
            del self._misses[gone]
        targets, skipped = self._targets(time.monotonic())
        outcome: dict[str, str] = {r.name: SKIPPED for r in skipped}
        results: dict[str, ProbeResult] = {}
        if targets:
            results = await self._race(targets, loop)
        alive = await self._liveness([r for r in targets if self._needs_liveness(r, results)])
        now = time.time()
        mono = time.monotonic()
        for record in targets:
            result = results[record.name]
            outcome[record.name] = result.status
            self._record(record, result, now, mono, alive.get(record.name))
        for size in sorted(self.registry.known_sizes()):
            self.registry.update_incumbent(size, mono)
        self.rounds += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("probe round %d: %s", self.rounds, outcome)
        return outcome

    async def _race(
        self, targets: list[ServerRecord], loop: asyncio.AbstractEventLoop
    ) -> dict[str, ProbeResult]:
        """Run the probes together with the early skip; every target gets a result."""
        config = self.registry.config
        rate = config.client.latency_growing_rate
        timeout_s = config.daemon.health_timeout_s
        session = self._get_session()
        start = loop.time()
        progress = {r.name: _Progress(started=start) for r in targets}
        tasks = {
            asyncio.create_task(
                self._probe(session, r, progress[r.name]), name=f"probe-{r.name}"
            ): r
            for r in targets
        }
        results: dict[str, ProbeResult] = {}
        # The early skip compares a server with the others of its model size only: a
        # 70B is not slow for answering slower than an 8B.
        best: dict[str, float] = {}

        def deadline(task: asyncio.Task[ProbeResult]) -> float:
            size = tasks[task].config.model_size
            return start + selector.probe_deadline(best.get(size), rate, timeout_s)

        pending = set(tasks)
        cut: set[asyncio.Task[ProbeResult]] = set()
        try:
            while pending:
                now = loop.time()
                expired = {t for t in pending if deadline(t) <= now}
                cut |= expired
                pending -= expired
                if not pending:
                    break
                remaining = min(deadline(t) for t in pending) - now
                done, pending = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    result = task.result()
                    record = tasks[task]
                    results[record.name] = result
                    if result.status == OK and result.latency_s is not None:
                        size = record.config.model_size
                        best[size] = min(best.get(size, result.latency_s), result.latency_s)
        finally:
            pending |= cut
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        elapsed_end = loop.time()
        for task in pending:
            record = tasks[task]
            if not task.cancelled() and task.exception() is None:
                # It finished in the instant between the deadline and the cancel.
                results[record.name] = task.result()
                continue
            ran = elapsed_end - progress[record.name].started
            if record.config.model_size not in best:
                results[record.name] = ProbeResult(
                    FAILED,
                    latency_s=ran,
                    error=f"no answer within {timeout_s:g} s (daemon.health_timeout_s)",
                    responded=progress[record.name].responded,
                    timed_out=True,
                )
            else:
                results[record.name] = ProbeResult(
                    SLOW,
                    latency_s=ran,
                    error=None,
                    responded=progress[record.name].responded,
                )
        return results

    # --- bookkeeping --------------------------------------------------------------
    @staticmethod
    def _needs_liveness(record: ServerRecord, results: dict[str, ProbeResult]) -> bool:
        """A server not managed here whose probe proved nothing either way: cut off
        by the early skip before its first delta (headers prove nothing: legacy
        SGLang sends them at once, hung or not, and since PR #21900 they come with
        the first token), or timed out."""
        if record.config.is_managed:
            return False
        result = results[record.name]
        if result.status == SLOW:
            return not result.responded
        return result.status == FAILED and result.timed_out

    async def _liveness(self, records: list[ServerRecord]) -> dict[str, str | None]:
        """Ask each server's scheduler for its load (never generates): ``None`` when
        it answered, else why it is taken for faulty."""
        if not records:
            return {}
        d = self.registry.config.daemon
        timeout_s = min(d.health_timeout_s, d.hang_timeout_s)
        session = self._get_session()

        async def check(record: ServerRecord) -> str | None:
            url = record.config.url
            try:
                await sglang_api.read_load(session, url, timeout_s)
            except sglang_api.NoLoadEndpoint:
                if await sglang_api.front_answers(session, url, timeout_s):
                    return None
                return f"no answer from {url}/get_model_info within {timeout_s:g} s"
            except sglang_api.NoAnswer as exc:
                return exc.reason
            return None

        answers = await asyncio.gather(*(check(r) for r in records))
        return {r.name: a for r, a in zip(records, answers, strict=True)}

    def _record(
        self,
        record: ServerRecord,
        result: ProbeResult,
        now: float,
        mono: float,
        liveness: str | None = None,
    ) -> None:
        ok = result.status == OK
        # A probe cut by the early skip measured a lower bound, not a latency: it may
        # raise the estimate, never count as an answer, never eject.
        cut = result.status == SLOW
        self.registry.record_sample(
            record.name,
            ok=ok or cut,
            latency_s=result.latency_s if (ok or cut) else None,
            source="probe",
            ttft_s=result.ttft_s,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            now=now,
            mono=mono,
            lower_bound=cut,
        )
        if result.status == FAILED:
            record.probe_failures_total += 1
        elif result.status == SLOW:
            record.probe_slow_total += 1
        try:
            error = result.error
            if cut and result.latency_s is not None:
                error = f"cut by the early skip after {result.latency_s:.3f} s (a lower bound)"
            self.writer.add_sample(
                server=record.name,
                source="probe",
                ok=ok,
                latency_s=result.latency_s,
                ttft_s=result.ttft_s,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                error=error,
                ts=now,
            )
        except Exception as exc:  # a closed or failing writer must not stop the probes
            log.warning("probe of %s not written to the state database: %s", record.name, exc)
        if not record.config.is_managed:
            self._reachability(record, result, liveness)

    def _reachability(
        self, record: ServerRecord, result: ProbeResult, liveness: str | None
    ) -> None:
        """``unreachable`` needs evidence of a fault: a refused or reset connection,
        an error answer, or a liveness check that failed. A probe cut off by the early
        skip while the server's scheduler answers is neutral: the server is slower,
        not gone, and stays a candidate ranked by its estimate."""
        checked = self._needs_liveness(record, {record.name: result})
        fault = result.status == FAILED and not result.timed_out
        if checked:
            fault = liveness is not None
        if not fault:
            if result.status == OK or (result.status == SLOW and result.responded) or checked:
                self._misses[record.name] = 0
                if record.state != states.READY:
                    self._change(record, states.READY, "answered a probe")
            return
        misses = self._misses.get(record.name, 0) + 1
        self._misses[record.name] = misses
        why = liveness if checked else result.error
        record.last_error = why
        limit = self.registry.config.daemon.health_failures
        if misses >= limit and record.state != states.UNREACHABLE:
            self._change(record, states.UNREACHABLE, f"{misses} probes in a row failed: {why}")

    def _change(self, record: ServerRecord, new_state: str, message: str) -> None:
        try:
            self.on_reachability(record, new_state, message)
        except Exception:
            log.exception("reachability callback failed for %s", record.name)
        # The callback sees the old state (for its event row); make sure of the new one.
        record.state = new_state

    # --- load of the servers not managed here ------------------------------------------
    async def read_loads(self) -> None:
        """Ask every ready server not managed here for its load, once (the supervisor
        reads its own servers'). A server that does not answer keeps its last figures:
        the probes decide reachability."""
        targets = [
            r
            for r in list(self.registry.servers.values())
            if not r.config.is_managed and r.state == states.READY
        ]
        if not targets:
            return
        session = self._get_session()

        async def one(record: ServerRecord) -> None:
            try:
                load, _ = await sglang_api.read_load(session, record.config.url, LOAD_TIMEOUT_S)
            except (sglang_api.NoAnswer, sglang_api.NoLoadEndpoint):
                return
            record.running, record.queued = load.running, load.queued
            record.load_checked_at = time.time()
            if load.capacity:
                record.capacity = load.capacity

        await asyncio.gather(*(one(r) for r in targets))

    async def _load_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            began = loop.time()
            try:
                await self.read_loads()
            except Exception:  # a bug here must not end the probes
                log.exception("reading the load of probed-only servers failed")
            every = min(LOAD_INTERVAL_S, self.registry.config.daemon.probe_interval_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.05, every - (loop.time() - began)))

    # --- the loop -----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """A round every ``probe_interval_s`` (start to start) until ``stop`` is set,
        and the load of servers not managed here every LOAD_INTERVAL_S."""
        loop = asyncio.get_running_loop()
        stopper = asyncio.ensure_future(stop.wait())
        loads = asyncio.ensure_future(self._load_loop(stop))
        try:
            while not stop.is_set():
                began = loop.time()
                round_task = asyncio.ensure_future(self.run_round())
                await asyncio.wait({round_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not round_task.done():
                    round_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await round_task
                    break
                exc = round_task.exception()
                if exc is not None:
                    log.error("probe round failed: %s", exc, exc_info=exc)
                interval = self.registry.config.daemon.probe_interval_s
                pause = max(MIN_PAUSE_S, interval - (loop.time() - began))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopper), pause)
        finally:
            stopper.cancel()
            loads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loads
            await self.close()


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
