"""The hang policy and the parsers of SGLang's load and server-info answers."""

from __future__ import annotations

import pytest

from supervisord_ms.liveness import hang_silence_s, scheduler_hung
from supervisord_ms.sglang_api import (
    Load,
    ServerInfo,
    parse_get_load,
    parse_server_info,
    parse_v1_loads,
)

# (last answer at, outstanding query since, now, silence_s) -> hung?
CASES = [
    # answered recently: never hung
    (100.0, 105.0, 106.0, 10.0, False),
    # no query outstanding: silence is ours, not the server's
    (100.0, None, 200.0, 10.0, False),
    # silent for the timeout, the query out for half of it: hung
    (100.0, 105.0, 110.0, 10.0, True),
    # silent long enough, but the query was only just sent (the daemon paused)
    (100.0, 108.0, 110.0, 10.0, False),
    # one query timed out and another went out: the silence counts from the first
    (100.0, 101.0, 111.0, 10.0, True),
    # just below the timeout
    (100.0, 101.0, 109.99, 10.0, False),
    # the test harness's short timeout
    (0.0, 0.3, 3.0, 3.0, True),
]


@pytest.mark.parametrize(("last", "pending", "now", "timeout", "hung"), CASES)
def test_scheduler_hung(last, pending, now, timeout, hung):
    verdict = scheduler_hung(last_answer_at=last, pending_since=pending, now=now, silence_s=timeout)
    assert verdict is hung


# (hang_timeout_s, slowest load answer seen, chunked prefill on) -> silence allowed
SILENCES = [
    # short steps (chunked prefill), every answer quick: half of hang_timeout_s
    (10.0, 0.01, True, 5.0),
    (10.0, 0.0, True, 5.0),
    # a slow step was seen: four times it
    (10.0, 1.5, True, 6.0),
    # ... never more than hang_timeout_s
    (10.0, 4.0, True, 10.0),
    (10.0, 60.0, True, 10.0),
    # chunked prefill off, or unknown: one long prompt is one step, the whole timeout
    (10.0, 0.01, False, 10.0),
    # an operator's longer timeout moves the floor with it
    (60.0, 0.01, True, 30.0),
    # the test harness's short timeout
    (6.0, 0.01, True, 3.0),
]


@pytest.mark.parametrize(("timeout", "slowest", "bounded", "silence"), SILENCES)
def test_hang_silence(timeout, slowest, bounded, silence):
    allowed = hang_silence_s(
        hang_timeout_s=timeout, slowest_answer_s=slowest, steps_bounded=bounded
    )
    assert allowed == pytest.approx(silence)


def test_v1_loads_adds_up_the_data_parallel_ranks():
    body = {
        "timestamp": "2026-12-01T10:00:00Z",
        "version": "0.5.9",
        "loads": [
            {
                "dp_rank": 0,
                "num_running_reqs": 3,
                "num_waiting_reqs": 1,
                "token_usage": 0.25,
                "max_running_requests": 48,
            },
            {
                "dp_rank": 1,
                "num_running_reqs": 5,
                "num_waiting_reqs": 0,
                "token_usage": 0.5,
                "max_running_requests": 48,
            },
        ],
    }
    assert parse_v1_loads(body) == Load(running=8, queued=1, token_usage=0.5, capacity=96)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        {"loads": "x"},
        {"loads": [{"num_running_reqs": 1}]},
        {"loads": [{"num_running_reqs": -1, "num_waiting_reqs": 0}]},
        {"loads": [3]},
    ],
)
def test_v1_loads_refuses_what_is_not_a_load(body):
    assert parse_v1_loads(body) is None


def test_get_load_counts_waiting_requests_inside_num_reqs():
    body = [{"dp_rank": 0, "num_reqs": 7, "num_waiting_reqs": 2, "num_tokens": 900}]
    assert parse_get_load(body) == Load(running=5, queued=2)
    # one object instead of a list (a single-rank answer)
    assert parse_get_load(body[0]) == Load(running=5, queued=2)
    assert parse_get_load([{"num_reqs": "x", "num_waiting_reqs": 0}]) is None
    assert parse_get_load("busy") is None


def test_server_info_version_and_streaming_setting():
    info = parse_server_info(
        {"version": "0.5.9", "incremental_streaming_output": True, "max_running_requests": 64}
    )
    assert info == ServerInfo("0.5.9", True, 64)
    # the flag's name before its rename
    assert parse_server_info({"version": "0.4.6", "stream_output": False}) == ServerInfo(
        "0.4.6", False, None
    )
    assert parse_server_info({"version": "", "max_running_requests": None}) == ServerInfo(
        None, None, None
    )
    assert parse_server_info([1, 2]) == ServerInfo(None, None, None)


def test_server_info_chunked_prefill():
    """-1 turns chunked prefill off in server_args.py: then a step has no bound."""
    assert parse_server_info({"chunked_prefill_size": 8192}).chunked_prefill_size == 8192
    assert parse_server_info({"chunked_prefill_size": -1}).chunked_prefill_size is None
    assert parse_server_info({"chunked_prefill_size": None}).chunked_prefill_size is None
    assert parse_server_info({}).chunked_prefill_size is None
