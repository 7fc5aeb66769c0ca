"""What the daemon reads without generating: model info, server info, health, load,
metrics (docs/sglang.md sections 1, 6, 7, 8 and 9)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from supervisord_ms.sglang_api import LOAD_PATHS, PARSERS, parse_get_load, parse_server_info

from .sglang_http import SGLang, health_check_timeout_s

# The front answers by itself; the daemon's liveness check (sglang_api.front_answers)
# waits a few seconds at most.
FRONT_ANSWER_S = 5.0


def _gauge(text: str, name: str) -> bool:
    """Whether ``text`` has a sample (not only HELP/TYPE) of ``name``."""
    return re.search(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+\S+", text, re.MULTILINE) is not None


def test_get_model_info_answers_at_once_with_the_model_path(sglang: SGLang, report) -> None:
    """``/get_model_info`` is built by the HTTP front alone (``model_path``,
    ``tokenizer_path``, ``is_generation``): entrypoints/http_server.py, docs/sglang.md
    section 7. The daemon's proof that the front lives (``sglang_api.front_answers``)."""
    answer = sglang.get("/get_model_info", timeout_s=FRONT_ANSWER_S)
    report(seconds=answer.seconds)
    assert answer.status == 200, answer.describe()
    body = answer.json()
    assert isinstance(body, dict), answer.describe()
    assert isinstance(body.get("model_path"), str) and body["model_path"], answer.describe()


def test_get_server_info_has_the_version_and_the_server_args(
    server_info: dict[str, Any], report
) -> None:
    """``/get_server_info`` is ``dataclasses.asdict(server_args)`` plus ``version``
    (``sglang.version.__version__``): entrypoints/http_server.py, docs/sglang.md
    section 7. ``--incremental-streaming-output`` was ``--stream-output`` before its
    rename (reported as PR #20614; server_args.py, docs/sglang.md section 9). Read by
    ``sglang_api.parse_server_info``."""
    incremental = server_info.get("incremental_streaming_output", server_info.get("stream_output"))
    report(
        version=server_info.get("version"),
        tp_size=server_info.get("tp_size"),
        incremental_streaming_output=incremental,
        field=(
            "incremental_streaming_output"
            if "incremental_streaming_output" in server_info
            else "stream_output"
        ),
        enable_metrics=server_info.get("enable_metrics"),
    )
    version = server_info.get("version")
    assert isinstance(version, str) and version, f"version: {version!r}"
    tp = server_info.get("tp_size")
    assert isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1, f"tp_size: {tp!r}"
    assert isinstance(incremental, bool), (
        "neither incremental_streaming_output nor stream_output is a boolean: "
        f"{server_info.get('incremental_streaming_output')!r}, "
        f"{server_info.get('stream_output')!r}"
    )
    assert isinstance(server_info.get("enable_metrics"), bool), "enable_metrics is not a boolean"
    parsed = parse_server_info(server_info)
    assert parsed.version == version
    assert parsed.incremental_streaming_output is incremental


def test_get_server_info_says_whether_prefill_is_chunked(server_info: dict[str, Any], report):
    """``chunked_prefill_size`` (server_args.py; set from the GPU's memory when not
    given, -1 when chunking is off) tells the daemon's scheduler watch how long one
    batch can take (liveness.hang_silence_s, docs/sglang.md sections 6 and 9)."""
    size = server_info.get("chunked_prefill_size")
    report(chunked_prefill_size=size)
    assert isinstance(size, int) and not isinstance(size, bool), (
        f"chunked_prefill_size is not an integer: {size!r}"
    )
    assert size == -1 or size > 0, f"chunked_prefill_size: {size!r}"
    assert parse_server_info(server_info).chunked_prefill_size == (size if size > 0 else None)


@pytest.mark.parametrize("path", ["/health", "/health_generate"])
def test_health_answers_200_within_sglangs_own_timeout(
    sglang: SGLang, server_info: dict[str, Any], path: str, report
) -> None:
    """``/health`` (what the supervisor polls) and ``/health_generate`` answer 200 on a
    ready server. Since SGLang PR #8444 (2025-07) both share ``health_generate`` in
    entrypoints/http_server.py: it submits a one-token request and looks for output
    once a second, so the answer takes about 1 s or more, but never more than
    ``SGLANG_HEALTH_CHECK_TIMEOUT`` (unless it fails); before, ``/health`` was a plain
    200 at once, as it still is where ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION`` is
    false (PR #13320; environ.py): docs/sglang.md section 1. The first release with
    #8444 is not confirmed, so the duration is reported, not compared with the
    version."""
    limit = health_check_timeout_s()
    answer = sglang.get(path, timeout_s=limit + 10.0)
    report(
        seconds=answer.seconds,
        looked_for_output=answer.seconds >= 0.95,
        version=server_info.get("version"),
    )
    assert answer.status == 200, answer.describe()
    assert answer.seconds < limit, (
        f"{path} took {answer.seconds:.1f} s, not under SGLANG_HEALTH_CHECK_TIMEOUT={limit:g}"
    )


def test_a_load_endpoint_answers_in_the_shape_the_daemon_parses(sglang: SGLang, report) -> None:
    """``/v1/loads`` (entrypoints/v1_loads.py, SGLang PR #16976, 2026-01:
    ``loads[*].num_running_reqs/num_waiting_reqs``) or, on older servers,
    ``/get_load`` (``num_reqs/num_waiting_reqs`` per DP rank): docs/sglang.md section
    6. Asked in ``sglang_api.read_load``'s order and parsed by the daemon's parser."""
    tried = {}
    for path in LOAD_PATHS:
        answer = sglang.get(path)
        tried[path] = answer.status
        if answer.status == 404:
            continue
        assert answer.status == 200, f"{path}: {answer.describe()}"
        load = PARSERS[path](answer.json())
        report(
            path=path,
            running=load and load.running,
            queued=load and load.queued,
            seconds=answer.seconds,
        )
        assert load is not None, f"{path}: the daemon's parser cannot read {answer.describe()}"
        return
    pytest.fail(f"no load endpoint: {tried}")


def test_v1_loads_when_present(sglang: SGLang, report) -> None:
    """``/v1/loads`` (entrypoints/v1_loads.py, SGLang PR #16976): ``{"timestamp",
    "version", ..., "loads": [{"dp_rank", "num_running_reqs", "num_waiting_reqs",
    "token_usage", "max_running_requests", ...}]}``, docs/sglang.md section 6. Parsed
    by ``sglang_api.parse_v1_loads``."""
    answer = sglang.get("/v1/loads")
    if answer.status == 404:
        pytest.skip("/v1/loads: 404 (an SGLang before PR #16976)")
    assert answer.status == 200, answer.describe()
    body = answer.json()
    load = PARSERS["/v1/loads"](body)
    assert load is not None, answer.describe()
    loads = body["loads"]
    assert loads, "/v1/loads answered an empty list of loads"
    report(
        ranks=len(loads),
        keys=sorted(k for k in body if k != "loads"),
        token_usage=load.token_usage,
        capacity=load.capacity,
    )


def test_get_load_when_present(sglang: SGLang, report) -> None:
    """``/get_load`` (entrypoints/http_server.py → ``TokenizerManager.get_load``): one
    ``GetLoadReqOutput`` per DP rank, ``num_reqs`` / ``num_waiting_reqs`` /
    ``num_tokens`` (managers/io_struct.py), docs/sglang.md section 6. Since SGLang PR
    #23010 (2026-04) it is a deprecated shim over ``/v1/loads`` whose output is not
    confirmed: where ``/v1/loads`` exists (the daemon then never asks ``/get_load``),
    either shape is accepted and the one seen is reported."""
    answer = sglang.get("/get_load")
    if answer.status == 404:
        pytest.skip("/get_load: 404")
    assert answer.status == 200, answer.describe()
    body = answer.json()
    if parse_get_load(body) is not None:
        report(shape="get_load")
        return
    has_v1 = sglang.get("/v1/loads").status != 404
    shape = "v1_loads" if PARSERS["/v1/loads"](body) is not None else None
    report(shape=shape, v1_loads_present=has_v1)
    assert has_v1 and shape is not None, (
        f"/get_load is neither the old shape nor /v1/loads': {answer.describe()}"
    )


def test_metrics_exist_exactly_with_enable_metrics(
    sglang: SGLang, server_info: dict[str, Any], report
) -> None:
    """``/metrics`` is mounted by ``add_prometheus_middleware`` only when
    ``server_args.enable_metrics`` is set (entrypoints/http_server.py), so it is 404
    without ``--enable-metrics``; with it the scheduler's gauges include
    ``sglang:num_running_reqs`` (metrics/collector.py): docs/sglang.md section 8. One
    generation first, so that the scheduler has written its gauges."""
    enabled = server_info.get("enable_metrics")
    warm = sglang.post(
        "/generate",
        {"text": "Hello", "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
    )
    assert warm.status == 200, f"/generate: {warm.describe()}"
    answer = sglang.get("/metrics")
    text = answer.body.decode("utf-8", "replace")
    report(
        enable_metrics=enabled,
        status=answer.status,
        num_queue_reqs=_gauge(text, "sglang:num_queue_reqs"),
        token_usage=_gauge(text, "sglang:token_usage"),
    )
    if enabled:
        assert answer.status == 200, answer.describe()
        assert _gauge(text, "sglang:num_running_reqs"), (
            f"no sglang:num_running_reqs sample in /metrics: {answer.describe()}"
        )
    else:
        assert answer.status == 404, (
            f"/metrics without --enable-metrics (get_server_info enable_metrics="
            f"{enabled!r}): {answer.describe()}"
        )
