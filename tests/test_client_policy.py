"""Tables of cases for the client's pure decisions (ms_client._policy)."""

from __future__ import annotations

import pytest
from ms_client._policy import (
    DEFAULT_FIRST_TOKEN_S,
    PREFILL_ALLOWANCE_S_PER_CHAR,
    Expectation,
    demote,
    early_skip_until,
    expected_latency,
    expected_per_token,
    first_token_timeout,
    is_slow,
    rendezvous_order,
    should_reselect,
    status_is_callers_fault,
)

E = Expectation


@pytest.mark.parametrize(
    "exp, benchmark, want",
    [
        (E(), 16, None),  # nothing known
        (E(latency_per_token_s=0.02), 16, 0.02),  # the daemon's own figure wins
        (E(latency_s=0.5, latency_per_token_s=0.02), 16, 0.02),
        (E(latency_s=0.32), 16, 0.02),  # whole benchmark / its tokens
        (E(latency_s=0.42, ttft_s=0.1), 16, 0.02),  # decode part only
        (E(latency_s=0.1, ttft_s=0.2), 10, 0.01),  # inconsistent ttft: ignored
        (E(latency_s=0.0, latency_per_token_s=0.0), 16, None),
    ],
)
def test_expected_per_token(exp: Expectation, benchmark: int, want: float | None) -> None:
    got = expected_per_token(exp, benchmark)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize(
    "exp, tokens, want",
    [
        (E(), 10, None),
        (E(latency_s=0.32), 16, 0.32),  # a benchmark-sized answer takes the benchmark time
        (E(latency_s=0.32), 160, 3.2),  # ten times the tokens, ten times the time
        (E(latency_s=0.32), None, 0.32),  # unknown count: like the benchmark
        (E(latency_s=0.42, ttft_s=0.1), 32, 0.1 + 0.02 * 32),
        (E(ttft_s=0.1, latency_per_token_s=0.01), 100, 1.1),
    ],
)
def test_expected_latency(exp: Expectation, tokens: int | None, want: float | None) -> None:
    got = expected_latency(exp, tokens, 16)
    assert got == pytest.approx(want) if want is not None else got is None


SERVER = E(latency_s=0.42, ttft_s=0.1, latency_per_token_s=0.02)


@pytest.mark.parametrize(
    "latency, ttft, tokens, exp, want",
    [
        # short answers: the whole latency against 2 x (ttft + tokens x per-token)
        (0.25, 0.1, 4, SERVER, False),  # expected 0.18, limit 0.36
        (0.40, 0.1, 4, SERVER, True),
        (0.40, None, None, SERVER, False),  # unknown count: benchmark-sized, 0.42 expected
        # long answers: the decode rate, whatever the prompt cost
        (2.0 + 99 * 0.03, 2.0, 100, SERVER, False),  # huge prompt, normal decode
        (0.1 + 99 * 0.05, 0.1, 100, SERVER, True),  # 0.05 s/token > 2 x 0.02
        (0.1 + 99 * 0.039, 0.1, 100, SERVER, False),
        # nothing known about the server: no verdict
        (9.0, 1.0, 100, E(), None),
        # only the benchmark latency is known
        (0.5, 0.05, 16, E(latency_s=0.3), False),
        (0.7, 0.05, 16, E(latency_s=0.3), True),
    ],
)
def test_is_slow(
    latency: float, ttft: float | None, tokens: int | None, exp: Expectation, want: bool | None
) -> None:
    got = is_slow(
        latency_s=latency,
        ttft_s=ttft,
        completion_tokens=tokens,
        expected=exp,
        growing_rate=2.0,
        benchmark_tokens=16,
    )
    assert got is want


@pytest.mark.parametrize(
    "recent, want",
    [
        ([], False),
        ([True], False),  # one outlier does not re-select
        ([True, True], False),
        ([True, False, True, False, True], True),  # 3 of the last 5
        ([True, True, True], True),
        ([True, True, False, False, False, False, True], False),  # the old ones fell out
        ([False, False, True, True, True], True),
    ],
)
def test_should_reselect(recent: list[bool], want: bool) -> None:
    assert should_reselect(recent) is want


@pytest.mark.parametrize(
    "ttft, kwargs, want",
    [
        (None, {}, DEFAULT_FIRST_TOKEN_S),  # nothing known
        (0.0, {}, DEFAULT_FIRST_TOKEN_S),
        (0.01, {}, 0.5),  # the floor
        (0.5, {}, 2.0),  # 4 x expected
        (0.5, {"misses": 1}, 4.0),  # a server already missed: widen
        (0.5, {"misses": 2}, 8.0),
        (0.5, {"cap_s": 1.5}, 1.5),  # never past the request's own limit
        (None, {"cap_s": 1.0}, 1.0),
        (0.01, {"prompt_chars": 40_000}, 0.5 + 40_000 * PREFILL_ALLOWANCE_S_PER_CHAR),
    ],
)
def test_first_token_timeout(ttft: float | None, kwargs: dict, want: float) -> None:
    assert first_token_timeout(ttft, **kwargs) == pytest.approx(want)


def test_a_long_prompt_gets_seconds_not_the_floor() -> None:
    # 400k characters is about 100k tokens: a real prefill takes tens of seconds.
    assert first_token_timeout(0.05, prompt_chars=400_000) > 30


@pytest.mark.parametrize(
    "started, best, rate, want",
    [(10.0, 0.2, 2.0, 10.4), (0.0, 1.0, 1.5, 1.5), (5.0, 0.0, 2.0, 5.0)],
)
def test_early_skip_until(started: float, best: float, rate: float, want: float) -> None:
    assert early_skip_until(started, best, rate) == pytest.approx(want)


@pytest.mark.parametrize(
    "status, want",
    [
        (400, True),
        (404, True),
        (413, True),
        (422, True),
        (408, False),
        (429, False),
        (500, False),
        (503, False),
        (200, False),
    ],
)
def test_status_is_callers_fault(status: int, want: bool) -> None:
    assert status_is_callers_fault(status) is want


def test_rendezvous_is_stable_and_moves_only_the_removed_servers_keys() -> None:
    names = ["a", "b", "c", "d"]
    keys = [f"session-{i}" for i in range(200)]
    before = {k: rendezvous_order(k, names)[0] for k in keys}
    assert before == {k: rendezvous_order(k, list(reversed(names)))[0] for k in keys}
    assert len(set(before.values())) == 4  # spread over all servers
    after = {k: rendezvous_order(k, ["a", "b", "d"])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "c" for k in moved)


@pytest.mark.parametrize(
    "names, demoted, want",
    [
        (["a", "b", "c"], set(), ["a", "b", "c"]),
        (["a", "b", "c"], {"a"}, ["b", "c", "a"]),
        (["a", "b", "c"], {"a", "b"}, ["c", "a", "b"]),
        (["a", "b", "c"], {"x"}, ["a", "b", "c"]),
    ],
)
def test_demote(names: list[str], demoted: set[str], want: list[str]) -> None:
    assert demote(names, names, demoted) == want


def test_short_answer_is_not_slow_when_the_first_token_estimate_is_unknown():
    # Probes cut short by the early skip leave a latency but no ttft estimate; a
    # 2-token answer taking most of a benchmark answer's time is not slow.
    from ms_client._policy import Expectation, is_slow

    expected = Expectation(latency_s=0.10, ttft_s=None, latency_per_token_s=None)
    assert not is_slow(
        latency_s=0.066,
        ttft_s=0.062,
        completion_tokens=2,
        expected=expected,
        growing_rate=2.0,
        benchmark_tokens=16,
    )
    assert is_slow(
        latency_s=0.25,
        ttft_s=0.24,
        completion_tokens=2,
        expected=expected,
        growing_rate=2.0,
        benchmark_tokens=16,
    )


@pytest.mark.parametrize(
    ("per_token_s", "live", "expected_s"),
    [
        (None, False, 10.0),  # nothing known: the floor
        (0.02, False, 10.0),  # 100 x 20 ms = 2 s is below the floor
        (0.3, False, 30.0),  # a slow server gets 100 tokens' time
        (1.0, False, 60.0),  # never more than the cap
        (0.02, True, 60.0),  # a live stream cannot move unseen: the whole cap
    ],
)
def test_mid_answer_timeout(per_token_s, live, expected_s):
    from ms_client._policy import Expectation, mid_answer_timeout

    exp = Expectation(latency_s=None, ttft_s=None, latency_per_token_s=per_token_s)
    got = mid_answer_timeout(exp, benchmark_tokens=16, live=live, cap_s=60.0)
    assert got == pytest.approx(expected_s)
