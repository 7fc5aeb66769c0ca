"""The client's decisions, as pure functions of their inputs (tested by tables of cases).

- How long a server may take to send its first token before it is treated as hung.
- Whether a finished request was slow for the server that answered it, and whether
  the recent history of slow requests justifies choosing another server (one outlier
  must not: every switch throws away SGLang's prefix cache on the old server).
- When a round of benchmark probes stops waiting for stragglers (the seed's early skip).
- Which HTTP statuses are the caller's fault rather than the server's.
- Candidate order: servers that just failed in this process go last; with a session
  key, rendezvous hashing keeps a conversation on one server.

Nothing here does I/O or reads the clock: times are passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

# With nothing known about a server, this long for the first token (seconds).
DEFAULT_FIRST_TOKEN_S = 5.0
# Never less than this: connection set-up and scheduling jitter are not a hang.
FIRST_TOKEN_FLOOR_S = 0.5
# A hung server is told from a busy one by a clear multiple of its usual first token.
FIRST_TOKEN_MULTIPLE = 4.0
# A whole-answer request (nothing handed to the caller yet) whose stream stops
# mid-answer for this long is retried elsewhere: SGLang sends a token every few
# tens of milliseconds, and its own pauses (a long prefill next to it) last seconds.
MID_ANSWER_FLOOR_S = 10.0
MID_ANSWER_MULTIPLE = 100.0
# Prefill time grows with the prompt; the benchmark that measured the usual first token
# used a short one. Allow this much per prompt character (about 4 characters a token,
# prefill at 2000 tokens/s: conservative for any GPU SGLang runs on).
PREFILL_ALLOWANCE_S_PER_CHAR = 0.5 / 4000
# Slowness: "slow" in at least SLOW_NEEDED of the last SLOW_WINDOW requests re-selects.
SLOW_WINDOW = 5
SLOW_NEEDED = 3
# Below this many tokens one inter-token gap is too noisy: compare whole latencies.
DECODE_MIN_TOKENS = 8

T = TypeVar("T")


@dataclass(frozen=True)
class Expectation:
    """What a server usually takes, as the daemon (or a local probe) measured it.

    ``latency_s`` is one benchmark request (``benchmark_max_tokens`` tokens);
    ``latency_per_token_s`` is per completion token; ``ttft_s`` the first token.
    Any of them may be unknown.
    """

    latency_s: float | None = None
    ttft_s: float | None = None
    latency_per_token_s: float | None = None


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def expected_per_token(exp: Expectation, benchmark_tokens: int) -> float | None:
    """Seconds per completion token, from whichever estimates are known."""
    per = _positive(exp.latency_per_token_s)
    if per is not None:
        return per
    latency = _positive(exp.latency_s)
    if latency is None:
        return None
    ttft = _positive(exp.ttft_s) or 0.0
    decode = latency - ttft if latency > ttft else latency
    return decode / max(benchmark_tokens, 1)


def expected_latency(
    exp: Expectation, completion_tokens: int | None, benchmark_tokens: int
) -> float | None:
    """Expected seconds for a whole answer of ``completion_tokens`` tokens.

    Normalising by tokens keeps a long answer from passing for a slow server.
    """
    per = expected_per_token(exp, benchmark_tokens)
    if per is None:
        return None
    tokens = completion_tokens if completion_tokens and completion_tokens > 0 else benchmark_tokens
    ttft = _positive(exp.ttft_s)
    latency = _positive(exp.latency_s)
    if ttft is None and latency is not None:
        # Without a first-token estimate the fixed part of a request is unknown, and
        # scaling a whole benchmark answer down to a 2-token answer would call every
        # short request slow. A short answer may take what a benchmark answer takes.
        return latency * max(1.0, tokens / max(benchmark_tokens, 1))
    return (ttft or 0.0) + per * max(tokens, 1)


def is_slow(
    *,
    latency_s: float,
    ttft_s: float | None,
    completion_tokens: int | None,
    expected: Expectation,
    growing_rate: float,
    benchmark_tokens: int,
) -> bool | None:
    """Was this successful request slower than ``growing_rate`` x expected?

    Long answers are judged by their decode rate (time after the first token per
    further token), which does not depend on the prompt's length; short ones by the
    whole latency against the expected latency for their token count. The first token
    is judged by the first-token deadline instead. None: nothing to compare with.
    """
    per = expected_per_token(expected, benchmark_tokens)
    if per is None or latency_s < 0:
        return None
    if completion_tokens and completion_tokens >= DECODE_MIN_TOKENS and ttft_s is not None:
        observed = max(latency_s - ttft_s, 0.0) / (completion_tokens - 1)
        return observed > growing_rate * per
    whole = expected_latency(expected, completion_tokens, benchmark_tokens)
    if whole is None:
        return None
    return latency_s > growing_rate * whole


def mid_answer_timeout(
    expected: Expectation,
    *,
    benchmark_tokens: int,
    live: bool,
    cap_s: float,
    floor_s: float = MID_ANSWER_FLOOR_S,
    multiple: float = MID_ANSWER_MULTIPLE,
) -> float:
    """Seconds a started answer may pause before the server counts as hung.

    A live stream has handed text to its caller and cannot move without an error, so
    it gets the whole ``cap_s``; a whole-answer request can start again elsewhere
    unseen, so a server that stalls mid-answer costs it ``multiple`` x the usual time
    per token (at least ``floor_s``) instead of ``cap_s``.
    """
    if live:
        return cap_s
    per = expected_per_token(expected, benchmark_tokens)
    stall = floor_s if per is None else max(floor_s, multiple * per)
    return min(stall, cap_s)


def should_reselect(
    recent: Sequence[bool], *, needed: int = SLOW_NEEDED, window: int = SLOW_WINDOW
) -> bool:
    """Repeated slowness (``needed`` of the last ``window``) moves to another server."""
    return sum(1 for slow in list(recent)[-window:] if slow) >= needed


def first_token_timeout(
    expected_ttft_s: float | None,
    *,
    prompt_chars: int = 0,
    misses: int = 0,
    cap_s: float | None = None,
    floor_s: float = FIRST_TOKEN_FLOOR_S,
    multiple: float = FIRST_TOKEN_MULTIPLE,
    default_s: float = DEFAULT_FIRST_TOKEN_S,
) -> float:
    """Seconds a server gets to send the first token before it counts as hung.

    ``misses`` is how many servers already missed their deadline for this request:
    each doubles the allowance, so an underestimate (a huge prompt) costs a retry or
    two rather than failing everywhere. ``cap_s`` is the whole request's limit.
    """
    ttft = _positive(expected_ttft_s)
    base = default_s if ttft is None else max(floor_s, multiple * ttft)
    base += max(prompt_chars, 0) * PREFILL_ALLOWANCE_S_PER_CHAR
    base *= 2 ** max(misses, 0)
    if cap_s is not None and cap_s > 0:
        base = min(base, cap_s)
    return base


def early_skip_until(started: float, best_latency_s: float, growing_rate: float) -> float:
    """When a probe round stops waiting, once one server answered in ``best_latency_s``.

    A server still busy after ``growing_rate`` x the best answer would not be chosen
    anyway; waiting for it would only delay the choice (the seed's early skip).
    """
    return started + growing_rate * max(best_latency_s, 0.0)


def status_is_callers_fault(status: int) -> bool:
    """4xx means the request itself is wrong, except timeouts and overload (408, 429),
    which another server may well answer."""
    return 400 <= status < 500 and status not in (408, 429)


def rendezvous_order(key: str, names: Iterable[str]) -> list[str]:
    """Names ordered by highest-random-weight hashing of ``key``: a key maps to the
    same server while it is present, and only keys on a removed server move."""

    def weight(name: str) -> bytes:
        return hashlib.sha256(f"{key}\x00{name}".encode()).digest()

    return sorted(names, key=weight, reverse=True)


def demote(items: Sequence[T], names: Sequence[str], demoted: Collection[str]) -> list[T]:
    """``items`` (named by ``names``) with those in ``demoted`` moved to the end, order
    otherwise kept: a server that just failed here is a last resort, not a first try."""
    first = [item for item, name in zip(items, names, strict=True) if name not in demoted]
    last = [item for item, name in zip(items, names, strict=True) if name in demoted]
    return first + last
