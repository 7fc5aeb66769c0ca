"""Selection policy: latency estimates, probe deadlines, outlier ejection, the best server.

Everything here is a pure function of its inputs and of the time passed in (``now``,
monotonic seconds): no clock, no global random generator, no I/O. State lives in
frozen dataclasses that each function returns anew, so the prober, the API and the
client keep them in their registries and the tests replay recorded traces.

How the pieces fit (see "Choosing the best server" in the design contract):

* :func:`update_estimate` keeps a time-decayed average per server of the seconds one
  benchmark request takes; :func:`normalise_client_latency` turns a client request of
  any length into that unit first, and :func:`expected_latency` goes back the other way.
* :func:`probe_deadline` is the seed's early skip for probe rounds.
* :func:`record_outcome` ejects a server after consecutive failures, for longer each time.
* :func:`choose_best` keeps the current best until a challenger is clearly faster for a
  while (hysteresis: a switch throws away SGLang's prefix cache); :func:`rank` orders the
  candidates; :func:`affinity_rank` keeps a conversation (``key``) on one server.
* :func:`bounded_load_choice` keeps a key on its server unless that server is
  overloaded (consistent hashing with bounded loads); the client gives every caller
  without a session key a key of its own, so callers spread over the fleet.
* :func:`should_reselect` is the client's rule: re-select on repeated slowness, not on one
  outlier. :func:`seed_policy_reselect` and :func:`seed_policy_best` are the seed's rules,
  kept so the benchmarks can compare.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

__all__ = [
    "Candidate",
    "Ejection",
    "Incumbent",
    "LatencyEstimate",
    "Load",
    "affinity_pool",
    "affinity_rank",
    "bounded_load_choice",
    "bounded_load_pick",
    "choose_best",
    "expected_latency",
    "first_token_deadline",
    "is_ejected",
    "is_slow",
    "normalise_client_latency",
    "probe_deadline",
    "rank",
    "record_outcome",
    "rendezvous_order",
    "seed_policy_best",
    "seed_policy_reselect",
    "should_reselect",
    "speed_order",
    "update_estimate",
]

# ---------------------------------------------------------------------------
# Latency estimate
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyEstimate:
    """A server's latency, as time-decayed averages of what was measured.

    ``value_s`` is in seconds per benchmark request (``benchmark_max_tokens`` completion
    tokens), the unit the API reports as ``latency_s`` and the selection compares.
    ``per_token_s`` (decode seconds per completion token) and ``ttft_s`` (time to first
    token) come from requests that reported them; they let :func:`expected_latency` and
    :func:`first_token_deadline` judge requests of other sizes.

    The ``*_weight`` fields are the decayed number of samples behind each average (each
    sample counts 1 when new and half as much every half-life). They are what lets a
    burst of samples reported together average out instead of all but the first being
    ignored. An estimate built by hand with a value and no weight (restored from the
    database, say) counts as one sample.
    """

    value_s: float | None = None
    per_token_s: float | None = None
    ttft_s: float | None = None
    updated_at: float | None = None
    samples: int = 0
    weight: float = 0.0
    per_token_weight: float = 0.0
    ttft_weight: float = 0.0


def _check_duration(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _blend(
    old: float | None, old_weight: float, decay: float, new: float | None
) -> tuple[float | None, float]:
    """Fold ``new`` into the decayed average ``old``; return (average, weight)."""
    if old is not None and old_weight <= 0:
        old_weight = 1.0
    weight = old_weight * decay
    if new is None:
        return old, weight
    if old is None or weight <= 0:
        return new, 1.0
    # The new sample's share: the EWMA's (1 - decay), or its share by decayed count if
    # that is larger (the first samples, samples sharing a timestamp).
    share = max(1.0 - decay, 1.0 / (weight + 1.0))
    return old + (new - old) * share, weight + 1.0


def update_estimate(
    est: LatencyEstimate,
    latency_s: float,
    now: float,
    *,
    half_life_s: float = 30.0,
    ttft_s: float | None = None,
    per_token_s: float | None = None,
) -> LatencyEstimate:
    """Fold one sample (already in benchmark-request units) into a server's estimate.

    Why time-decayed: a server's speed changes (another tenant on the GPU, a long batch)
    and the estimate must follow within seconds, yet one noisy probe must not swing it.
    The rule is an EWMA whose old value keeps weight ``d = 0.5 ** ((now - updated_at) /
    half_life_s)`` and the new sample ``1 - d``: an estimate that has not been updated for
    a while yields quickly to new evidence (after one half-life a new sample counts half,
    after ten nearly all), while many samples close together each count little and so
    average out their noise. The first sample ever sets the estimate.

    One amendment: the new sample never counts less than its share by number, ``1 / (n
    + 1)``, where ``n`` is the decayed count of the samples behind the old value
    (``weight``). With regular probes that share equals ``1 - d`` and changes nothing.
    It matters where a plain EWMA misbehaves: the first few samples average evenly
    instead of the first one dominating, and samples that share a timestamp (a batch of
    client reports, for which ``d = 1``) are averaged instead of all but one ignored.

    ``ttft_s`` and ``per_token_s`` are averaged the same way when given; a sample
    without them leaves those averages as they are (their weight still decays).
    ``now`` earlier than the last update (a late report) counts as the same instant.
    """
    if not half_life_s > 0:
        raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
    _check_duration("latency_s", latency_s)
    _check_duration("ttft_s", ttft_s)
    _check_duration("per_token_s", per_token_s)
    if est.updated_at is None:
        decay = 0.0
        updated_at = now
    else:
        decay = 0.5 ** (max(now - est.updated_at, 0.0) / half_life_s)
        updated_at = max(now, est.updated_at)
    value, weight = _blend(est.value_s, est.weight, decay, latency_s)
    ttft, ttft_weight = _blend(est.ttft_s, est.ttft_weight, decay, ttft_s)
    per_token, per_token_weight = _blend(est.per_token_s, est.per_token_weight, decay, per_token_s)
    return LatencyEstimate(
        value_s=value,
        per_token_s=per_token,
        ttft_s=ttft,
        updated_at=updated_at,
        samples=est.samples + 1,
        weight=weight,
        per_token_weight=per_token_weight,
        ttft_weight=ttft_weight,
    )


# ---------------------------------------------------------------------------
# Request size: client samples <-> benchmark requests
# ---------------------------------------------------------------------------
#
# The model: a request that produced n completion tokens took
#
#     latency = fixed + per_token * n
#
# where `fixed` is the time to first token (queueing, prefill, the first step) and
# `per_token` the decode time of each token. Counting the first token's step in both
# terms is a small overcount that cancels out, because the same model is used in both
# directions. A benchmark request is the same with n = benchmark_max_tokens (the
# "reference"). Prefill time grows with the prompt, but how much depends on SGLang's
# prefix-cache hits, which a client cannot see, so the prompt length is not modelled:
# the measured time to first token is taken as it is.


def normalise_client_latency(
    latency_s: float,
    *,
    ttft_s: float | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    reference_completion_tokens: int,
    per_token_s_hint: float | None = None,
) -> float:
    """The latency a benchmark request would have had, given one client request.

    Why: a 500-token answer takes 30x longer than a 16-token probe on the same server;
    fed to the estimate as is, it would make a busy, healthy server look slow.

    * ``ttft_s`` known (streamed requests): ``fixed = ttft``, ``per_token = (latency -
      ttft) / completion_tokens``; the result is ``fixed + per_token * reference``.
    * no ``ttft_s`` but ``per_token_s_hint`` (the server's estimate): the decode part is
      ``hint * completion_tokens`` (at most the whole latency) and the rest is fixed.
    * neither: decode is assumed to dominate, and the latency is scaled by
      ``reference / completion_tokens`` when that shrinks it, never when it grows it. A
      short answer then stays as measured: without a split, a guess could only make the
      server look slower than it is.
    * ``completion_tokens`` missing or 0: ``latency_s`` unchanged (nothing to scale by).

    ``prompt_tokens`` is accepted so callers pass what SGLang reported; it does not
    enter the model (see the note above).
    """
    del prompt_tokens  # not modelled: prefill cost depends on prefix-cache hits
    _check_duration("latency_s", latency_s)
    if reference_completion_tokens < 1:
        raise ValueError(
            f"reference_completion_tokens must be >= 1, got {reference_completion_tokens}"
        )
    if completion_tokens is None or completion_tokens <= 0:
        return latency_s
    n = completion_tokens
    ref = reference_completion_tokens
    if ttft_s is not None:
        fixed = min(max(ttft_s, 0.0), latency_s)
        return fixed + (latency_s - fixed) / n * ref
    if per_token_s_hint is not None and per_token_s_hint >= 0:
        decode = min(per_token_s_hint * n, latency_s)
        return (latency_s - decode) + decode / n * ref
    return latency_s * ref / n if n > ref else latency_s


def expected_latency(
    est: LatencyEstimate, completion_tokens: int | None, reference_completion_tokens: int
) -> float | None:
    """What a request with ``completion_tokens`` tokens should take on this server.

    The inverse of :func:`normalise_client_latency`, anchored on ``est.value_s`` (the
    benchmark latency, which probes keep fresh): ``value = fixed + per_token *
    reference``, so a request of n tokens should take ``fixed + per_token * n``.
    ``per_token`` is the server's own estimate when it has one (at most ``value /
    reference``, so ``fixed`` stays >= 0), else it is derived from ``est.ttft_s``; with
    neither, the value is scaled up for longer requests and kept for shorter ones,
    mirroring the normalisation. None when the server has not been measured yet.
    """
    if reference_completion_tokens < 1:
        raise ValueError(
            f"reference_completion_tokens must be >= 1, got {reference_completion_tokens}"
        )
    value = est.value_s
    if value is None:
        return None
    if completion_tokens is None or completion_tokens <= 0:
        return value
    n = completion_tokens
    ref = reference_completion_tokens
    per_token = est.per_token_s
    if per_token is None and est.ttft_s is not None:
        per_token = max(value - est.ttft_s, 0.0) / ref
    if per_token is None:
        return value * n / ref if n > ref else value
    decode = min(per_token * ref, value)
    return (value - decode) + decode / ref * n


def first_token_deadline(
    est: LatencyEstimate,
    *,
    multiple: float = 4.0,
    floor_s: float = 0.5,
    default_s: float = 10.0,
) -> float:
    """Seconds a streaming request may wait for its first token before the client
    gives up on this server and moves to the next.

    Why: a hung SGLang server keeps its port open and never answers, and a whole-request
    timeout cannot be short because a legitimate long answer takes minutes. The first
    token, though, comes within a small multiple of the usual time to first token on a
    live server. ``multiple * ttft_s``, never below ``floor_s`` (network jitter, a
    scheduler step). Without a ttft estimate the benchmark latency stands in (it is an
    upper bound of ttft, so the deadline errs long); with nothing measured, ``default_s``.
    """
    if est.ttft_s is not None:
        return max(floor_s, multiple * est.ttft_s)
    if est.value_s is not None:
        return max(floor_s, multiple * est.value_s)
    return default_s


def probe_deadline(best_so_far_s: float | None, growing_rate: float, timeout_s: float) -> float:
    """Seconds after a probe round started at which a still-running probe is abandoned.

    The seed's early skip: all probes of a round start together, and once the fastest
    server has answered in ``b`` seconds, a server still silent after ``growing_rate *
    b`` cannot be the best, so waiting on it only delays the round. Such a probe counts
    as slow, not failed (it is not evidence of a fault). Before any server answered,
    the deadline is ``timeout_s``; it never exceeds it.
    """
    if best_so_far_s is None:
        return timeout_s
    return min(growing_rate * best_so_far_s, timeout_s)


# ---------------------------------------------------------------------------
# Outlier ejection
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ejection:
    """A server's record of failures, for outlier ejection.

    ``consecutive_failures`` counts failures since the last success or ejection.
    ``ejections`` is the escalation level: the next ejection lasts ``base_s * 2 **
    ejections`` seconds (capped at ``max_s``); it stops growing at the level where that
    reaches the cap, so a long outage does not leave a debt that takes days to decay.
    ``ejected_until`` is when the current (or last) ejection ends. ``healthy_since`` is
    the start of the current run without failures: the clock that decays ``ejections``.
    """

    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    healthy_since: float | None = None


def _ejection_length(level: int, base_s: float, max_s: float) -> float:
    return min(base_s * 2.0 ** min(level, 1000), max_s)


def record_outcome(
    ej: Ejection,
    ok: bool,
    now: float,
    *,
    threshold: int = 3,
    base_s: float = 5.0,
    max_s: float = 300.0,
    decay_after_s: float | None = None,
) -> Ejection:
    """Fold one request or probe outcome into a server's ejection record.

    Envoy-style consecutive-failure ejection. ``threshold`` failures in a row (no
    success between) eject the server for ``base_s * 2 ** ejections`` seconds, capped at
    ``max_s``, and raise the level, so a server that keeps failing is tried less and less
    often instead of costing every client a failed attempt each round. The counter
    restarts at 0 on ejection. Failures while ejected (probes still run) are counted but
    do not extend the ejection; if they reach ``threshold``, the first failure after the
    ejection ends ejects again at once.

    A success resets ``consecutive_failures``. The level decays by one for each
    ``decay_after_s`` (default ``max_s``: as long as the longest ejection) of failure-free
    running outside an ejection: a success that finds the current failure-free run at
    least that long lowers the level and restarts the run's clock. Any failure restarts
    it too, so a flaky server keeps its long ejections.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if not ok:
        failures = ej.consecutive_failures + 1
        if failures >= threshold and not is_ejected(ej, now):
            level = ej.ejections
            length = _ejection_length(level, base_s, max_s)
            if 0 < base_s * 2.0 ** min(level, 1000) < max_s:
                level += 1
            return Ejection(
                consecutive_failures=0,
                ejections=level,
                ejected_until=now + length,
                healthy_since=None,
            )
        return replace(ej, consecutive_failures=failures, healthy_since=None)
    decay_after = max_s if decay_after_s is None else decay_after_s
    healthy_since = ej.healthy_since
    if healthy_since is None:
        # Successes during an ejection count, but the clock starts when it ends.
        healthy_since = ej.ejected_until if is_ejected(ej, now) else now
    level = ej.ejections
    if level > 0 and not is_ejected(ej, now) and now - healthy_since >= decay_after:
        level -= 1
        healthy_since = now
    return Ejection(
        consecutive_failures=0,
        ejections=level,
        ejected_until=ej.ejected_until,
        healthy_since=healthy_since,
    )


def is_ejected(ej: Ejection, now: float) -> bool:
    """True while an ejection is in force: the server is out of every candidate list."""
    return ej.ejected_until is not None and now < ej.ejected_until


# ---------------------------------------------------------------------------
# Best server: hysteresis and ranking
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One server as the selection sees it. ``latency_s`` is the current estimate in
    benchmark-request seconds (None = not measured yet); ``eligible`` is computed by the
    caller (ready and not ejected)."""

    name: str
    latency_s: float | None
    eligible: bool


@dataclass(frozen=True)
class Incumbent:
    """The current best server of a model size, and any challenger that is beating it.

    ``challenger`` is the fastest server that is currently faster than the incumbent by
    the margin; ``challenger_since`` is when some server started beating it (continuously
    since then).
    """

    name: str | None = None
    challenger: str | None = None
    challenger_since: float | None = None


def _speed_key(c: Candidate) -> tuple[bool, float, str]:
    # Measured before unmeasured, then faster first, then by name so that equal
    # latencies always rank the same way.
    return (c.latency_s is None, c.latency_s if c.latency_s is not None else 0.0, c.name)


def choose_best(
    candidates: Sequence[Candidate],
    incumbent: Incumbent,
    now: float,
    *,
    margin: float = 0.2,
    hold_s: float = 10.0,
) -> Incumbent:
    """The best server after this round, with hysteresis.

    Why hysteresis: every switch sends a model size's traffic to a server whose prefix
    cache is cold, and two equal servers measured with noise would otherwise trade
    places every few rounds. So:

    * an eligible incumbent stays best until some other eligible server has been faster
      by ``margin`` (``latency < (1 - margin) * incumbent's``) in every call for at least
      ``hold_s`` seconds; then the fastest such server takes over. The hold clock keeps
      running when the fastest challenger changes identity, as long as one beats the
      incumbent all along;
    * an incumbent that is ineligible, or gone from the list, is replaced at once by the
      fastest eligible server; with none eligible the result has no name;
    * unmeasured servers rank after measured ones; an unmeasured incumbent (chosen when
      nothing was measured) yields at once to a measured server.
    """
    eligible = sorted((c for c in candidates if c.eligible), key=_speed_key)
    if not eligible:
        return Incumbent()
    current = next((c for c in eligible if c.name == incumbent.name), None)
    if current is None:
        return Incumbent(name=eligible[0].name)
    if current.latency_s is None:
        fastest = eligible[0]
        return Incumbent(name=fastest.name if fastest.latency_s is not None else current.name)
    bar = (1.0 - margin) * current.latency_s
    beating = [
        c
        for c in eligible
        if c.name != current.name and c.latency_s is not None and c.latency_s < bar
    ]
    if not beating:
        return Incumbent(name=current.name)
    challenger = beating[0]
    since = incumbent.challenger_since
    if incumbent.challenger is None or since is None:
        since = now
    if now - since >= hold_s:
        return Incumbent(name=challenger.name)
    return Incumbent(name=current.name, challenger=challenger.name, challenger_since=since)


def rank(candidates: Sequence[Candidate], incumbent: Incumbent) -> list[str]:
    """Eligible servers in the order a client should try them: the incumbent first (its
    cache is warm and hysteresis chose it), then the others fastest first, unmeasured
    last, ties by name so every caller sees the same order."""
    names = [c.name for c in sorted((c for c in candidates if c.eligible), key=_speed_key)]
    if incumbent.name in names:
        names.remove(incumbent.name)
        names.insert(0, incumbent.name)
    return names


# ---------------------------------------------------------------------------
# Affinity: keep a conversation on one server
# ---------------------------------------------------------------------------


def _rendezvous_score(key: str, name: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and the daemon, every
    # client and every restart must agree on a key's server. The NUL separator keeps
    # ("ab", "c") and ("a", "bc") apart.
    digest = hashlib.blake2b(
        key.encode("utf-8") + b"\x00" + name.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, names: Sequence[str]) -> list[str]:
    """``names`` ordered by highest-random-weight (rendezvous) hashing for ``key``.

    Each (key, server) pair gets a fixed pseudo-random score; the order is by score. A
    key therefore keeps its first server for as long as that server is in the list, and
    removing a server moves only the keys whose first choice it was (to their second
    choice), which keeps prefix caches warm. The result does not depend on the order of
    ``names``, nor on the process; duplicate names appear once.
    """
    unique = dict.fromkeys(names)
    return sorted(unique, key=lambda n: (-_rendezvous_score(key, n), n))


def affinity_rank(
    key: str,
    eligible_ranked: Sequence[str],
    latencies: Mapping[str, float | None],
    *,
    max_ratio: float = 3.0,
) -> list[str]:
    """Servers for a request with affinity ``key``: the key's own server first, the rest
    fastest first.

    The key's server is its rendezvous choice among the servers no slower than
    ``max_ratio`` times the fastest measured one, so a conversation never sticks to a
    crawling server (it moves, and comes back when the server recovers). Unmeasured
    servers are left out of that choice while any is measured (a fresh server might be
    the crawling one); with none measured, all take part. The rest follow in speed
    order (measured first, ties in the order given), for the client's fallback.
    """
    names = list(dict.fromkeys(eligible_ranked))
    if not names:
        return []
    first = rendezvous_order(key, affinity_pool(names, latencies, max_ratio=max_ratio))[0]
    return [first, *speed_order([n for n in names if n != first], latencies)]


def affinity_pool(
    names: Sequence[str], latencies: Mapping[str, float | None], *, max_ratio: float
) -> list[str]:
    """The servers a key may call its own: those no slower than ``max_ratio`` times the
    fastest measured one (all of them while none is measured)."""
    measured = {n: lat for n in names if (lat := latencies.get(n)) is not None}
    if not measured:
        return list(names)
    bound = max_ratio * min(measured.values())
    return [n for n in names if n in measured and measured[n] <= bound]


def speed_order(names: Sequence[str], latencies: Mapping[str, float | None]) -> list[str]:
    """Measured fastest first, unmeasured last, ties in the order given."""
    return sorted(names, key=lambda n: (latencies.get(n) is None, latencies.get(n) or 0.0))


# ---------------------------------------------------------------------------
# Client side: when to re-select
# ---------------------------------------------------------------------------


def is_slow(latency_s: float, expected_s: float | None, growing_rate: float) -> bool:
    """A request is slow when it took more than ``growing_rate`` times what this server
    was expected to take for a request of its size (:func:`expected_latency`). Without
    an expectation nothing is slow: there is nothing to compare with."""
    if expected_s is None:
        return False
    return latency_s > growing_rate * expected_s


def should_reselect(slow_flags: Sequence[bool], *, window: int = 5, threshold: int = 3) -> bool:
    """Re-select when at least ``threshold`` of the last ``window`` requests were slow.

    Why not on the first slow request (the seed's rule): one outlier (a long prefill, a
    big batch arriving at the same moment) says little about the server, and switching
    costs the prefix cache; repeated slowness is a trend. ``slow_flags`` is oldest
    first; only its last ``window`` entries count.
    """
    if window < 1 or threshold < 1:
        raise ValueError(f"window and threshold must be >= 1, got {window}, {threshold}")
    recent = list(slow_flags)[-window:]
    return sum(1 for flag in recent if flag) >= threshold


def seed_policy_reselect(latency_s: float, bound_s: float, growing_rate: float) -> bool:
    """The seed's client rule, kept for the benchmark comparison: re-select as soon as
    one request takes more than ``growing_rate`` times the latency measured when the
    server was chosen."""
    return latency_s > growing_rate * bound_s


def seed_policy_best(candidates: Sequence[Candidate]) -> str | None:
    """The seed's selection, kept for the benchmark comparison: the fastest eligible
    server by the latencies given (the seed used the latest probe round), no memory and
    no margin. None when no eligible server has been measured."""
    measured = [c for c in candidates if c.eligible and c.latency_s is not None]
    if not measured:
        return None
    return min(measured, key=_speed_key).name


# ---------------------------------------------------------------------------
# Load: use the whole fleet without herding
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """A server's load: what its scheduler last reported (``running`` in the batch,
    ``queued`` waiting) and its capacity (``--max-running-requests``; None = unknown)."""

    running: int = 0
    queued: int = 0
    capacity: int | None = None

    @property
    def busy(self) -> int:
        return self.running + self.queued


def _effective_capacity(load: Load) -> int | None:
    if load.capacity:
        return load.capacity
    # A queue means the batch is full: the running count is the capacity.
    return max(1, load.running) if load.queued else None


# How far above its fair share a key's server may go before the key moves: the load
# figures are up to a second old, and a small epsilon moves keys back and forth on
# every stale reading (each move costs the prefix cache twice).
BOUNDED_LOAD_EPSILON = 0.5


def bounded_load_choice(
    key: str,
    names: Sequence[str],
    loads: Mapping[str, Load],
    *,
    epsilon: float = BOUNDED_LOAD_EPSILON,
) -> str | None:
    """The key's server under consistent hashing with bounded loads (Mirrokni, Thorup
    and Zadimoghaddam, 2018): the first server in the key's rendezvous order whose
    load, with this request, stays within ``(1 + epsilon)`` x its fair share of the
    fleet's load (shares by capacity where known, else equal), or that still has a
    free batch slot (a server with room is never overloaded, however small the
    fleet's load).

    A key keeps its server while that server is not overloaded, moves to its next
    rendezvous choice only while it is, and comes back once the overload passes, so
    conversations keep their prefix cache and no server melts under the keys that
    happen to hash to it. None when ``names`` is empty.
    """
    return bounded_load_pick(rendezvous_order(key, names), loads, epsilon=epsilon)


def bounded_load_pick(
    order: Sequence[str], loads: Mapping[str, Load], *, epsilon: float = BOUNDED_LOAD_EPSILON
) -> str | None:
    """:func:`bounded_load_choice` for a key whose rendezvous ``order`` is known."""
    if not order:
        return None
    caps = {n: (loads.get(n) or Load()).capacity for n in order}
    known = [c for c in caps.values() if c]
    default_cap = (sum(known) / len(known)) if known else 1.0
    weights = {n: float(caps[n] or default_cap) for n in order}
    total_weight = sum(weights.values())
    total = sum((loads.get(n) or Load()).busy for n in order) + 1
    for name in order:
        load = loads.get(name) or Load()
        bound = math.ceil((1.0 + epsilon) * total * weights[name] / total_weight)
        room = _effective_capacity(load)
        # Over its share, and out of batch slots: only then is a server overloaded. A
        # probe in flight on an idle fleet must not move anyone's conversation.
        if load.busy + 1 <= bound or room is None or load.busy + 1 <= room:
            return name
    return order[0]
