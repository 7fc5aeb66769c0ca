"""The daemon's in-memory picture of every configured server.

The supervisor writes process facts (state, pid, restarts), the prober and the
clients' reports write latency facts, and the API reads both. Everything runs on
the daemon's one event loop, so no locks: a record is only touched between awaits.
Selection itself is delegated to the pure functions of :mod:`selector`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import selector, states
from .config import Config, ServerConfig

# How fast an estimate forgets: long enough to average probe noise, short enough
# that a server that became slow loses its place within a few probe rounds.
ESTIMATE_HALF_LIFE_PROBES = 3.0
# A challenger must beat the incumbent by this fraction for this many probe rounds.
HYSTERESIS_MARGIN = 0.2
HYSTERESIS_HOLD_PROBES = 2.0
EJECTION_THRESHOLD = 3
# A conversation stays on its server while that server is healthy (ready, not
# ejected), not overloaded (bounded loads) and no more than this many times slower
# than the best: probe noise and load move equal servers' estimates by a few tens
# of percent (1.4-1.5x max over min on average in the fleet bench's equal fleet),
# while a server 3x slower per token shows about 2.4-2.7x, its batch being
# emptier, and would hold its callers' requests for that much longer (every
# ModelServer caller has a key, so this decides most traffic). Such a server still
# takes a key's request when every faster one is overloaded.
AFFINITY_MAX_RATIO = 2.0
AFFINITY_CACHE_KEYS = 10_000
# Client reports come from anyone who can reach the socket, and nothing one of
# them sends may eject or steer a server for everyone (DESIGN.md, "Who may do
# what"). So:
# - a client latency moves the estimate only within this factor of what the
#   daemon's own probes measure, and each reporter's samples count at most once per
#   server per probe interval (a flood weighs as much as one probe);
CLIENT_SAMPLE_BAND = 1.5
# - failures reported by others than admins eject only when reports come from this
#   many uids, or when a probe fails too (it confirms them); reports older than
#   this many probe intervals are forgotten, and such reports never eject the last
#   serving server of a size;
CLIENT_EJECTION_REPORTERS = 2
CLIENT_FAILURE_WINDOW_PROBES = 3.0
# - a reported request spares the server's next probe (the server was just
#   measured), but probes still run at least once per this many probe intervals.
CLIENT_SPARES_PROBES_FOR = 3.0


# Bumped whenever a field that selection reads changes, so rankings are cached
# between changes instead of recomputed for every /v1/best.
_GENERATION = [0]
_RANKING_FIELDS = frozenset({"config", "state", "estimate", "ejection"})


@dataclass
class ServerRecord:
    config: ServerConfig
    state: str
    pid: int | None = None
    pgid: int | None = None
    started_at: float | None = None  # wall clock, when the current process was launched
    ready_since: float | None = None
    restarts: int = 0
    consecutive_failures: int = 0  # failures counted by the restart policy
    last_error: str | None = None
    estimate: selector.LatencyEstimate = field(default_factory=selector.LatencyEstimate)
    ejection: selector.Ejection = field(default_factory=selector.Ejection)
    last_sample_at: float | None = None
    last_client_request_at: float | None = None  # monotonic; a recent request spares a probe
    # The daemon's own measurements only (client reports are checked against them),
    # when the last probe answered or failed, and the start of the current run of
    # spared probes when there was none yet (all monotonic).
    probe_estimate: selector.LatencyEstimate = field(default_factory=selector.LatencyEstimate)
    last_probe_at: float | None = None
    spared_since: float | None = None
    # Per reporter (peer uid): when its latency last counted, and its recent
    # failures (count, last at) awaiting a second uid or a probe to agree.
    client_counted_at: dict[object, float] = field(default_factory=dict)
    client_failures: dict[object, tuple[int, float]] = field(default_factory=dict)
    samples_total: int = 0
    probe_failures_total: int = 0
    probe_slow_total: int = 0
    # What the server says about itself (SGLang's /get_server_info): its release,
    # and whether its /generate streams send only each chunk's new text (SGLang's
    # --incremental-streaming-output) rather than the whole text so far.
    sglang_version: str | None = None
    incremental_streaming_output: bool | None = None
    # Its load without generating (SGLang's /v1/loads or /get_load): requests
    # running, requests waiting, at most this many at once; when last read (wall clock).
    running: int | None = None
    queued: int | None = None
    capacity: int | None = None
    load_checked_at: float | None = None

    def __setattr__(self, name: str, value: object) -> None:
        if name in _RANKING_FIELDS:
            _GENERATION[0] += 1
        object.__setattr__(self, name, value)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def load(self) -> selector.Load:
        """The load selection reads; the config's max_running_requests stands in for a
        capacity the server has not reported."""
        return selector.Load(
            running=self.running or 0,
            queued=self.queued or 0,
            capacity=self.capacity or self.config.max_running_requests,
        )

    def serving(self, mono: float) -> bool:
        """Ready and not ejected (ejections are timed on the monotonic clock)."""
        return self.state in states.SERVING_STATES and not selector.is_ejected(self.ejection, mono)

    def to_json(self, now: float | None = None) -> dict:
        c = self.config
        now = time.time() if now is None else now
        est = self.estimate
        return {
            "name": c.name,
            "ip": c.ip,
            "port": c.port,
            "url": c.url,
            "model_size": c.model_size,
            "model_path": c.model_path,
            "gpus": list(c.gpus),
            "local": c.local,
            "managed": c.is_managed,
            "state": self.state,
            "pid": self.pid,
            "started_at": self.started_at,
            "uptime_s": round(now - self.started_at, 3)
            if self.started_at and self.state in states.RUNNING_STATES
            else None,
            "restarts": self.restarts,
            "consecutive_failures": self.consecutive_failures,
            "latency_s": est.value_s,
            "latency_per_token_s": est.per_token_s,
            "ttft_s": est.ttft_s,
            "last_sample_at": self.last_sample_at,
            "last_error": self.last_error,
            "ejected": selector.is_ejected(self.ejection, time.monotonic()),
        }


def _within(value: float, reference: float) -> float:
    """``value`` held within ``CLIENT_SAMPLE_BAND`` of ``reference`` (either way)."""
    return min(max(value, reference / CLIENT_SAMPLE_BAND), reference * CLIENT_SAMPLE_BAND)


@dataclass
class _Ranking:
    """One model size's ranking at one generation of the records."""

    generation: int
    valid_until: float  # monotonic time at which a timed decision falls due
    incumbent: selector.Incumbent
    ranked: list[str]  # eligible names, the incumbent first, then fastest first
    latencies: dict[str, float | None]
    _order_by_key: dict[str, list[str]] = field(default_factory=dict)
    _pool: list[str] | None = None
    _speed_order: list[str] | None = None

    def for_key(self, key: str, loads: Mapping[str, selector.Load]) -> list[str]:
        """The key's server first, then the rest fastest first.

        The key's server is its rendezvous choice among the servers fast enough to
        own keys (:func:`selector.affinity_pool`), passed over while it is
        overloaded (:func:`selector.bounded_load_pick`, on the live ``loads``); the
        slower servers come after the pool, fastest first, so they take a request
        only while every server of the pool is overloaded. The key's order is
        remembered for as long as this ranking lives."""
        order = self._order_by_key.get(key)
        if order is None:
            if self._speed_order is None:
                self._speed_order = selector.speed_order(self.ranked, self.latencies)
            if self._pool is None:
                self._pool = selector.affinity_pool(
                    self.ranked, self.latencies, max_ratio=AFFINITY_MAX_RATIO
                )
            pool = set(self._pool)
            order = [
                *selector.rendezvous_order(key, self._pool),
                *(name for name in self._speed_order if name not in pool),
            ]
            if len(self._order_by_key) >= AFFINITY_CACHE_KEYS:
                self._order_by_key.clear()
            self._order_by_key[key] = order
        first = selector.bounded_load_pick(order, loads)
        if first is None:
            return []
        return [first, *(name for name in self._speed_order if name != first)]


class Registry:
    def __init__(self, config: Config):
        self.config = config
        self.servers: dict[str, ServerRecord] = {}
        self.incumbents: dict[str, selector.Incumbent] = {}
        self._rankings: dict[str, _Ranking] = {}
        self.apply_config(config)

    # --- config -------------------------------------------------------------------
    def apply_config(self, config: Config) -> None:
        """Keep the records (and their latency history) of servers that stay."""
        self.config = config
        kept: dict[str, ServerRecord] = {}
        for server in config.servers:
            record = self.servers.get(server.name)
            if record is None:
                initial = states.STOPPED if server.is_managed else states.UNREACHABLE
                record = ServerRecord(config=server, state=initial)
            else:
                if record.config.is_managed != server.is_managed:
                    record.state = states.STOPPED if server.is_managed else states.UNREACHABLE
                record.config = server
            kept[server.name] = record
        self.servers = kept

    @property
    def probe_interval_s(self) -> float:
        return self.config.daemon.probe_interval_s

    # --- latency ------------------------------------------------------------------
    def record_sample(
        self,
        name: str,
        *,
        ok: bool,
        latency_s: float | None,
        source: str,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        now: float | None = None,
        mono: float | None = None,
        lower_bound: bool = False,
        reporter: object = None,
        trusted: bool = False,
    ) -> None:
        """Fold one probe or client outcome into the server's estimate and ejection.

        ``lower_bound``: ``latency_s`` is only how long a request had run when it was
        cut (the early skip); it raises an estimate that is below it and is otherwise
        ignored: no sample of a latency, no verdict on health.

        Client samples (``source="client"``) name their ``reporter`` (the peer's
        uid); ``trusted`` reporters (admins, who may stop the server anyway) eject
        by their failures as probes do. Everyone else's reports are bounded: see
        ``CLIENT_*`` above."""
        record = self.servers.get(name)
        if record is None:
            return
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        record.samples_total += 1
        record.last_sample_at = now
        if source == "client":
            self._client_outcome(record, ok, mono, reporter=reporter, trusted=trusted)
        else:
            record.last_probe_at = mono
            record.spared_since = None
            self._probe_outcome(record, ok, mono, lower_bound=lower_bound)
        if lower_bound:
            current = record.estimate.value_s
            if latency_s is not None and (current is None or latency_s > current):
                record.estimate = selector.update_estimate(
                    record.estimate, latency_s, mono, half_life_s=self._half_life_s
                )
            probed = record.probe_estimate.value_s
            if latency_s is not None and (probed is None or latency_s > probed):
                record.probe_estimate = selector.update_estimate(
                    record.probe_estimate, latency_s, mono, half_life_s=self._half_life_s
                )
            return
        if not ok or latency_s is None:
            return
        per_token = None
        if ttft_s is not None and completion_tokens and completion_tokens > 1:
            per_token = max(0.0, latency_s - ttft_s) / (completion_tokens - 1)
        if source == "client":
            counted = self._client_latency(
                record,
                latency_s,
                ttft_s=ttft_s,
                per_token_s=per_token,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                reporter=reporter,
                mono=mono,
            )
            if counted is None:
                return
            latency_s, ttft_s, per_token = counted
        else:
            record.probe_estimate = selector.update_estimate(
                record.probe_estimate,
                latency_s,
                mono,
                half_life_s=self._half_life_s,
                ttft_s=ttft_s,
                per_token_s=per_token,
            )
        record.estimate = selector.update_estimate(
            record.estimate,
            latency_s,
            mono,
            half_life_s=self._half_life_s,
            ttft_s=ttft_s,
            per_token_s=per_token,
        )

    @property
    def _half_life_s(self) -> float:
        return ESTIMATE_HALF_LIFE_PROBES * self.probe_interval_s

    def _eject_after(self, record: ServerRecord, ok: bool, mono: float, threshold: int) -> None:
        record.ejection = selector.record_outcome(
            record.ejection,
            ok,
            mono,
            threshold=threshold,
            base_s=max(5.0, 2 * self.probe_interval_s),
        )

    def _recent_client_failures(self, record: ServerRecord, mono: float) -> dict:
        window = CLIENT_FAILURE_WINDOW_PROBES * self.probe_interval_s
        recent = {k: v for k, v in record.client_failures.items() if 0 <= mono - v[1] < window}
        record.client_failures = recent
        return recent

    def _probe_outcome(
        self, record: ServerRecord, ok: bool, mono: float, lower_bound: bool
    ) -> None:
        """The daemon's own verdict: successes clear pending client reports, and a
        failure that follows them confirms them (the server is ejected at once when
        they and the probe together reach the threshold)."""
        if lower_bound:
            return  # a slow answer, not a failure, and no proof of health either
        if ok:
            record.client_failures = {}
            self._eject_after(record, True, mono, EJECTION_THRESHOLD)
            return
        pending = sum(count for count, _at in self._recent_client_failures(record, mono).values())
        record.client_failures = {}
        failures = record.ejection.consecutive_failures + 1 + pending
        threshold = 1 if pending and failures >= EJECTION_THRESHOLD else EJECTION_THRESHOLD
        self._eject_after(record, False, mono, threshold)

    def _client_outcome(
        self, record: ServerRecord, ok: bool, mono: float, *, reporter: object, trusted: bool
    ) -> None:
        if ok:
            record.client_failures.pop(reporter, None)
            self._spare_probe(record, mono)
        if trusted:
            self._eject_after(record, ok, mono, EJECTION_THRESHOLD)
            return
        if ok:
            # An untrusted success never cancels failures the probes have seen.
            return
        recent = self._recent_client_failures(record, mono)
        count = recent.get(reporter, (0, mono))[0] + 1
        recent[reporter] = (count, mono)
        total = sum(c for c, _at in recent.values())
        if (
            len(recent) >= CLIENT_EJECTION_REPORTERS
            and total >= EJECTION_THRESHOLD
            and self._another_serves(record, mono)
        ):
            record.client_failures = {}
            self._eject_after(record, False, mono, 1)

    def _another_serves(self, record: ServerRecord, mono: float) -> bool:
        size = record.config.model_size
        return any(
            r is not record and r.config.model_size == size and r.serving(mono)
            for r in self.servers.values()
        )

    def _spare_probe(self, record: ServerRecord, mono: float) -> None:
        """A client just measured the server: its next probe may be spared, but not
        every probe: the probes are what client reports are checked against."""
        anchor = record.last_probe_at
        if anchor is None:
            if record.spared_since is None:
                record.spared_since = mono
            anchor = record.spared_since
        if mono - anchor < CLIENT_SPARES_PROBES_FOR * self.probe_interval_s:
            record.last_client_request_at = mono

    def _client_latency(
        self,
        record: ServerRecord,
        latency_s: float,
        *,
        ttft_s: float | None,
        per_token_s: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        reporter: object,
        mono: float,
    ) -> tuple[float, float | None, float | None] | None:
        """A client's latency in benchmark units, held within ``CLIENT_SAMPLE_BAND``
        of the probes' own estimate; None when it does not count (no probe has
        measured the server yet, or this reporter already counted this interval)."""
        probed = record.probe_estimate
        if probed.value_s is None:
            return None
        last = record.client_counted_at.get(reporter)
        if last is not None and 0 <= mono - last < self.probe_interval_s:
            return None
        if len(record.client_counted_at) > 4096:
            record.client_counted_at.clear()
        record.client_counted_at[reporter] = mono
        normalised = selector.normalise_client_latency(
            latency_s,
            ttft_s=ttft_s,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            reference_completion_tokens=self.config.client.benchmark_max_tokens,
            per_token_s_hint=record.estimate.per_token_s,
        )
        value = _within(normalised, probed.value_s)
        if ttft_s is not None:
            known = probed.ttft_s
            ttft_s = min(_within(ttft_s, known), value) if known is not None else None
        if per_token_s is not None:
            known = probed.per_token_s
            per_token_s = _within(per_token_s, known) if known is not None else None
        return value, ttft_s, per_token_s

    # --- selection ----------------------------------------------------------------
    def sizes(self, now: float | None = None) -> list[str]:
        mono = time.monotonic() if now is None else now
        return sorted({r.config.model_size for r in self.servers.values() if r.serving(mono)})

    def known_sizes(self) -> set[str]:
        return {s.model_size for s in self.config.servers}

    def _ranking(self, model_size: str, mono: float) -> _Ranking:
        """The size's ranking, recomputed only when a record changed or a timed
        decision (an ejection's end, a challenger's hold) falls due."""
        cached = self._rankings.get(model_size)
        if cached is not None and cached.generation == _GENERATION[0] and mono < cached.valid_until:
            return cached
        records = [r for r in self.servers.values() if r.config.model_size == model_size]
        candidates = [
            selector.Candidate(name=r.name, latency_s=r.estimate.value_s, eligible=r.serving(mono))
            for r in records
        ]
        hold_s = HYSTERESIS_HOLD_PROBES * self.probe_interval_s
        incumbent = selector.choose_best(
            candidates,
            self.incumbents.get(model_size, selector.Incumbent()),
            mono,
            margin=HYSTERESIS_MARGIN,
            hold_s=hold_s,
        )
        self.incumbents[model_size] = incumbent
        due = [
            r.ejection.ejected_until
            for r in records
            if r.ejection.ejected_until is not None and r.ejection.ejected_until > mono
        ]
        if incumbent.challenger_since is not None:
            due.append(incumbent.challenger_since + hold_s)
        ranked = selector.rank(candidates, incumbent)
        latencies = {c.name: c.latency_s for c in candidates}
        ranking = _Ranking(
            generation=_GENERATION[0],
            valid_until=min(due, default=float("inf")),
            incumbent=incumbent,
            ranked=ranked,
            latencies=latencies,
        )
        self._rankings[model_size] = ranking
        return ranking

    def update_incumbent(self, model_size: str, mono: float | None = None) -> selector.Incumbent:
        mono = time.monotonic() if mono is None else mono
        return self._ranking(model_size, mono).incumbent

    def best(
        self,
        model_size: str,
        *,
        n: int = 3,
        key: str | None = None,
        exclude: Sequence[str] = (),
        mono: float | None = None,
    ) -> list[ServerRecord]:
        """Candidates best first. Excluding the incumbent (the caller saw it fail or
        crawl) leaves the rest in speed order; ``key`` puts the key's own server first."""
        mono = time.monotonic() if mono is None else mono
        ranking = self._ranking(model_size, mono)
        count = max(1, n)
        if exclude:
            skip = set(exclude)
            names = [name for name in ranking.ranked if name not in skip]
            if key:
                names = selector.affinity_rank(
                    key, names, ranking.latencies, max_ratio=AFFINITY_MAX_RATIO
                )
        elif key:
            names = ranking.for_key(key, self.loads(ranking.ranked))
        else:
            names = ranking.ranked
        return [self.servers[name] for name in names[:count]]

    def loads(self, names: Sequence[str]) -> dict[str, selector.Load]:
        return {name: self.servers[name].load for name in names}

    def counts_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.servers.values():
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts
