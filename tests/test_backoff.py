"""Restart policy: backoff delays, the failure window, fatal, stability reset.

Tables of cases pin the numbers an operator sees; hypothesis checks the bounds that must
hold for every input (never above the cap, never negative, first relaunch fast).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_ms.backoff import (
    FATAL,
    RESTART,
    FailureHistory,
    RestartDecision,
    backoff_delay,
    decide_restart,
    is_stable,
)

# The [restart] defaults of the design contract.
RESTART_DEFAULTS = {
    "max_failures": 5,
    "window_s": 600.0,
    "initial_s": 1.0,
    "max_s": 300.0,
}

# --- backoff_delay ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rand", "jitter", "expected"),
    [
        # attempt 1: only the bottom of the jitter range, leaving time to launch
        (1, 0.0, 0.2, 0.8),
        (1, 0.5, 0.2, 0.85),
        (1, 1.0, 0.2, 0.9),
        # doubling, jitter symmetric around the nominal value
        (2, 0.0, 0.2, 1.6),
        (2, 0.5, 0.2, 2.0),
        (2, 1.0, 0.2, 2.4),
        (3, 0.5, 0.2, 4.0),
        (4, 0.5, 0.0, 8.0),
        (8, 0.5, 0.0, 128.0),
        # near the cap: the top of the range is cut at max_s
        (9, 0.0, 0.2, 204.8),
        (9, 1.0, 0.2, 300.0),
        (9, 0.5, 0.2, 252.4),
        # capped: nominal 300, range 240..300
        (10, 0.0, 0.2, 240.0),
        (10, 0.5, 0.2, 270.0),
        (10, 1.0, 0.2, 300.0),
        (50, 1.0, 0.2, 300.0),
        (100_000, 1.0, 0.2, 300.0),
        # jitter wider than the delay itself never goes below 0
        (2, 0.0, 1.5, 0.0),
    ],
)
def test_backoff_delay_table(attempt: int, rand: float, jitter: float, expected: float) -> None:
    delay = backoff_delay(attempt, initial_s=1.0, max_s=300.0, jitter=jitter, rand=rand)
    assert delay == pytest.approx(expected)


def test_first_relaunch_is_within_one_second_with_defaults() -> None:
    # The contract: the first relaunch after a crash comes within 1 s of the exit;
    # the wait leaves at least 0.1 s for the checks and the spawn.
    for i in range(101):
        assert backoff_delay(1, initial_s=1.0, max_s=300.0, rand=i / 100) <= 0.9


def test_zero_initial_delay_relaunches_at_once() -> None:
    assert backoff_delay(1, initial_s=0.0, max_s=300.0, rand=1.0) == 0.0
    assert backoff_delay(7, initial_s=0.0, max_s=300.0, rand=1.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempt": 0},
        {"attempt": -1},
        {"rand": -0.1},
        {"rand": 1.1},
        {"jitter": -0.1},
        {"initial_s": -1.0},
        {"max_s": -1.0},
    ],
)
def test_backoff_delay_rejects_bad_input(kwargs: dict) -> None:
    args = {"attempt": 1, "initial_s": 1.0, "max_s": 300.0, "jitter": 0.2, "rand": 0.5}
    args.update(kwargs)
    attempt = args.pop("attempt")
    with pytest.raises(ValueError):
        backoff_delay(attempt, **args)


delays = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=5000),
    initial=delays,
    extra=delays,
    jitter=st.floats(min_value=0.0, max_value=1.0),
    rand=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_delay_bounds(
    attempt: int, initial: float, extra: float, jitter: float, rand: float
) -> None:
    max_s = initial + extra
    delay = backoff_delay(attempt, initial_s=initial, max_s=max_s, jitter=jitter, rand=rand)
    assert 0.0 <= delay <= max_s
    nominal = min(initial * 2.0 ** min(attempt - 1, 1000), max_s)
    assert nominal * (1 - jitter) * (1 - 1e-12) <= delay <= nominal * (1 + jitter) * (1 + 1e-12)
    if attempt == 1:
        assert delay <= initial


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=60),
    initial=st.floats(min_value=0.0, max_value=100.0),
    rand=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_delay_never_shrinks_with_more_attempts(
    attempt: int, initial: float, rand: float
) -> None:
    kwargs = {"initial_s": initial, "max_s": 300.0 + initial, "rand": rand}
    assert backoff_delay(attempt + 1, **kwargs) >= backoff_delay(attempt, **kwargs) * (1 - 1e-12)


# --- FailureHistory -----------------------------------------------------------------------


def history_of(*times: float, window_s: float = 600.0) -> FailureHistory:
    history = FailureHistory()
    for t in times:
        history = history.record(t, window_s)
    return history


@pytest.mark.parametrize(
    ("times", "now", "expected"),
    [
        ((), 0.0, 0),
        ((0.0,), 0.0, 1),
        ((0.0, 10.0, 20.0), 20.0, 3),
        # a failure exactly window_s ago still counts; one just older does not
        ((0.0, 100.0), 600.0, 2),
        ((0.0, 100.0), 600.001, 1),
        ((0.0, 100.0), 5000.0, 0),
    ],
)
def test_failure_count_table(times: tuple[float, ...], now: float, expected: int) -> None:
    assert history_of(*times).count(now, 600.0) == expected


def test_record_drops_failures_older_than_the_window() -> None:
    history = history_of(0.0, 100.0, 700.0)
    assert history.failures == (100.0, 700.0)  # 100.0 is exactly window_s old: kept
    assert history.record(701.0, 600.0).failures == (700.0, 701.0)
    assert history.record(2000.0, 600.0).failures == (2000.0,)


def test_history_is_immutable_and_reset_is_empty() -> None:
    before = history_of(1.0, 2.0)
    after = before.record(3.0, 600.0)
    assert before.failures == (1.0, 2.0)
    assert after.failures == (1.0, 2.0, 3.0)
    assert after.reset() == FailureHistory()
    with pytest.raises(AttributeError):
        after.failures = ()  # type: ignore[misc]


# --- decide_restart -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "action", "attempt", "delay"),
    [
        ((0.0,), RESTART, 1, 0.85),
        ((0.0, 5.0), RESTART, 2, 2.0),
        ((0.0, 5.0, 10.0, 15.0), RESTART, 4, 8.0),
        ((0.0, 5.0, 10.0, 15.0, 20.0), FATAL, 5, 0.0),
        # five failures, but spread wider than the window: never fatal
        ((0.0, 200.0, 400.0, 600.0, 800.0), RESTART, 4, 8.0),
        ((0.0, 700.0, 1400.0, 2100.0, 2800.0), RESTART, 1, 0.85),
        # a sixth failure inside the window is fatal too
        ((0.0, 1.0, 2.0, 3.0, 4.0, 5.0), FATAL, 6, 0.0),
    ],
)
def test_decide_restart_table(
    times: tuple[float, ...], action: str, attempt: int, delay: float
) -> None:
    history = history_of(*times)
    decision = decide_restart(history, times[-1], **RESTART_DEFAULTS)
    assert decision.action == action
    assert decision.attempt == attempt
    assert decision.delay_s == pytest.approx(delay)


def test_fatal_message_tells_the_operator_what_to_do() -> None:
    history = history_of(0.0, 1.0, 2.0, 3.0, 4.0)
    decision = decide_restart(history, 4.0, name="llama8b-a", **RESTART_DEFAULTS)
    assert decision == RestartDecision(
        action=FATAL,
        delay_s=0.0,
        attempt=5,
        reason_text=(
            "5 failures within 600 s; fix the cause and run `modelserverd start llama8b-a`"
        ),
    )
    unnamed = decide_restart(history, 4.0, **RESTART_DEFAULTS)
    assert unnamed.reason_text.endswith("`modelserverd start NAME`")


def test_restart_message_says_how_far_from_fatal() -> None:
    decision = decide_restart(history_of(0.0, 5.0), 5.0, **RESTART_DEFAULTS)
    assert decision.reason_text == "failure 2 within 600 s (fatal at 5); restarting in 2.0 s"


def test_crash_loop_replay_backs_off_then_goes_fatal() -> None:
    """A server that dies right after every launch: the supervisor's loop, replayed."""
    history = FailureHistory()
    now = 0.0
    delays = []
    while True:
        history = history.record(now, 600.0)
        decision = decide_restart(history, now, **RESTART_DEFAULTS)
        if decision.action == FATAL:
            break
        delays.append(decision.delay_s)
        now += decision.delay_s + 30.0  # relaunch, load weights for 30 s, crash
    assert delays == pytest.approx([0.85, 2.0, 4.0, 8.0])
    assert decision.attempt == 5


def test_max_failures_one_makes_the_first_failure_fatal() -> None:
    settings_ = dict(RESTART_DEFAULTS, max_failures=1)
    assert decide_restart(history_of(0.0), 0.0, **settings_).action == FATAL


def test_decide_restart_without_a_recorded_failure_is_attempt_one() -> None:
    decision = decide_restart(FailureHistory(), 0.0, **RESTART_DEFAULTS)
    assert (decision.action, decision.attempt) == (RESTART, 1)


# --- is_stable ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ready_since", "now", "expected"),
    [
        (None, 1000.0, False),
        (0.0, 0.0, False),
        (0.0, 299.9, False),
        (0.0, 300.0, True),
        (100.0, 1000.0, True),
    ],
)
def test_is_stable_table(ready_since: float | None, now: float, expected: bool) -> None:
    assert is_stable(ready_since, now, 300.0) is expected


def test_stable_server_starts_again_from_the_short_delay() -> None:
    history = history_of(0.0, 10.0, 20.0, 30.0)
    ready_since = 40.0
    now = ready_since + 300.0
    if is_stable(ready_since, now, 300.0):
        history = history.reset()
    history = history.record(now + 1.0, 600.0)
    decision = decide_restart(history, now + 1.0, **RESTART_DEFAULTS)
    assert (decision.action, decision.attempt) == (RESTART, 1)
    assert decision.delay_s <= 1.0
