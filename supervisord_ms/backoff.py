"""Restart policy: how long to wait before relaunching a crashed server, and when to give up.

Pure functions of their inputs: no clock, no random generator, no I/O. The supervisor
passes ``now`` (monotonic seconds) and a random number in ``[0, 1]`` and keeps the
returned immutable values in its registry, so a recorded trace of crashes replays to
the same decisions in the tests.

The shape follows supervisord: a crash is followed by a relaunch after a delay that
doubles with each failure (``[restart] backoff_initial_s`` .. ``backoff_max_s``); too
many failures within ``failure_window_s`` make the server ``fatal``, and only an
operator's ``modelserverd start NAME`` brings it back. A server that has stayed ready
for ``stable_after_s`` has its failure history cleared (see :func:`is_stable`), so a
crash next week starts again from the short first delay.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FATAL",
    "RESTART",
    "FailureHistory",
    "RestartDecision",
    "backoff_delay",
    "decide_restart",
    "is_stable",
]

RESTART = "restart"
FATAL = "fatal"

# 2.0 ** 1000 is still a finite float; beyond it the delay is pinned at max_s anyway.
_MAX_EXPONENT = 1000


def backoff_delay(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    jitter: float = 0.2,
    rand: float = 0.5,
    quick_first: bool = True,
) -> float:
    """Seconds to wait before relaunch number ``attempt`` (1 = the first after a crash).

    The nominal delay is ``initial_s * 2 ** (attempt - 1)``, capped at ``max_s``. Jitter
    spreads servers that crashed together (a shared model disk that went away) so they
    do not all relaunch, load weights and contend for the disk in the same second. The
    delay is picked by ``rand`` within a range around the nominal value:

    * attempt >= 2: ``nominal * (1 - jitter)`` .. ``nominal * (1 + jitter)``, with the
      top cut at ``max_s``: the cap is a promise, jitter never exceeds it.
    * attempt 1: ``initial_s * (1 - jitter)`` .. ``initial_s * (1 - jitter / 2)``: the
      bottom of the range only. Most crashes are one-offs, and the first relaunch must
      come quickly: with the default ``initial_s = 1.0`` the wait is at most 0.9 s,
      which leaves a tenth of a second to check the GPUs and port and spawn, so the
      relaunch comes within 1 s of the exit.

    ``quick_first=False`` gives attempt 1 the whole range too (retries of a call to
    another service, where there is no relaunch to hurry). ``rand = 0`` gives the
    bottom of the range, ``rand = 1`` the top. The result is never below 0 and never
    above ``max_s``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if initial_s < 0 or max_s < 0:
        raise ValueError(f"delays must be >= 0, got initial_s={initial_s}, max_s={max_s}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    nominal = min(initial_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT), max_s)
    low = max(nominal * (1.0 - jitter), 0.0)
    quick = quick_first and attempt == 1
    high = nominal * (1.0 - jitter / 2) if quick else nominal * (1.0 + jitter)
    high = min(high, max_s)
    low = min(low, high)
    # min(): rounding must not lift rand = 1 a hair above the cap.
    return min(low + rand * (high - low), high)


@dataclass(frozen=True)
class FailureHistory:
    """Times (monotonic seconds) of a server's recent failures, oldest first.

    Immutable: :meth:`record` and :meth:`reset` return a new history, so the supervisor
    swaps it in its registry and tests can keep every intermediate value.
    """

    failures: tuple[float, ...] = ()

    def record(self, now: float, window_s: float) -> FailureHistory:
        """Add a failure at ``now``; drop those that have left the window, so the
        tuple stays as short as the window allows however long the daemon runs."""
        kept = tuple(t for t in self.failures if _within(t, now, window_s))
        return FailureHistory(tuple(sorted((*kept, now))))

    def count(self, now: float, window_s: float) -> int:
        """Failures at most ``window_s`` seconds before ``now`` (both ends included)."""
        return sum(1 for t in self.failures if _within(t, now, window_s))

    def reset(self) -> FailureHistory:
        """An empty history: the server proved stable, or an operator started it by hand."""
        return FailureHistory()


def _within(t: float, now: float, window_s: float) -> bool:
    # A failure exactly window_s ago still counts: "5 failures within 600 s" reads as
    # inclusive to an operator. Times after now (not expected from a monotonic clock)
    # are kept rather than silently forgotten.
    return now - t <= window_s


@dataclass(frozen=True)
class RestartDecision:
    """What the supervisor does after a failure.

    ``action`` is :data:`RESTART` (relaunch after ``delay_s``) or :data:`FATAL` (stay
    down until an operator starts it; ``delay_s`` is 0). ``attempt`` is the number of
    failures in the window, recorded in the ``restarts`` table. ``reason_text`` is the
    sentence an operator reads in events, logs and ``modelserverd status``.
    """

    action: str
    delay_s: float
    attempt: int
    reason_text: str


def decide_restart(
    history: FailureHistory,
    now: float,
    *,
    max_failures: int,
    window_s: float,
    initial_s: float,
    max_s: float,
    rand: float = 0.5,
    jitter: float = 0.2,
    name: str | None = None,
) -> RestartDecision:
    """Restart with backoff, or give up, after a failure.

    Call it AFTER ``history.record(now, window_s)``, so the failure that just happened
    is counted. ``max_failures`` failures within ``window_s`` make the server fatal:
    relaunching a server that cannot start only burns GPU time and fills the log, and
    the cause (a bad model path, a broken driver) needs a person. Otherwise the delay is
    :func:`backoff_delay` with ``attempt`` = failures in the window, so failures spread
    more thinly than the window keep the delay short. ``name`` (the server's) makes
    the fatal message a command the operator can paste.
    """
    if max_failures < 1:
        raise ValueError(f"max_failures must be >= 1, got {max_failures}")
    count = history.count(now, window_s)
    window_text = f"{window_s:g} s"
    if count >= max_failures:
        server = name if name else "NAME"
        return RestartDecision(
            action=FATAL,
            delay_s=0.0,
            attempt=count,
            reason_text=(
                f"{count} failures within {window_text}; fix the cause and run "
                f"`modelserverd start {server}`"
            ),
        )
    attempt = max(count, 1)
    delay = backoff_delay(attempt, initial_s=initial_s, max_s=max_s, jitter=jitter, rand=rand)
    return RestartDecision(
        action=RESTART,
        delay_s=delay,
        attempt=attempt,
        reason_text=(
            f"failure {attempt} within {window_text} (fatal at {max_failures}); "
            f"restarting in {delay:.1f} s"
        ),
    )


def is_stable(ready_since: float | None, now: float, stable_after_s: float) -> bool:
    """True once a server has been ready for ``stable_after_s``: the supervisor then
    resets its failure history, so old crashes stop shortening the road to fatal and
    stop lengthening the next backoff. ``ready_since`` is None while not ready."""
    return ready_since is not None and now - ready_since >= stable_after_s
