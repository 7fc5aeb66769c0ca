"""Random bytes, random requests and random JSON thrown at the API socket.

Whatever a peer sends, the daemon answers with a 4xx (or closes that connection)
and never a 5xx, and keeps serving normal requests afterwards.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import ApiServer, call, raw_exchange, start_api, stop_api

from supervisord_ms import states

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ENDPOINTS = [
    "/v1/status",
    "/v1/servers",
    "/v1/servers/a",
    "/v1/servers/b",
    "/v1/best",
    "/v1/sizes",
    "/v1/samples",
    "/v1/latency",
    "/v1/restarts",
    "/v1/events",
    "/v1/servers/a/restart",
    "/v1/servers/a/stop",
    "/v1/servers/b/start",
    "/v1/reload",
    "/metrics",
]
PARAMS = ["model_size", "n", "key", "exclude", "server", "limit"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(Path(tmp_path_factory.mktemp("fuzz")))

    def ready() -> None:
        for name in ("a", "b", "c"):
            server.registry.servers[name].state = states.READY

    server.loop.call(ready)
    yield server
    stop_api(server)


def _status_of(raw: bytes) -> int | None:
    if not raw:
        return None  # closed without an answer: allowed for garbage
    assert raw.startswith(b"HTTP/1."), raw[:80]
    return int(raw.split(b" ", 2)[1])


def _still_serving(api: ApiServer) -> None:
    assert api.get("/v1/status").status == 200
    assert len(api.get("/v1/servers").json["servers"]) == 3
    # Fuzzed failure reports may have ejected servers: 503 is a normal answer then.
    assert api.get("/v1/best?model_size=8B").status in (200, 503)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=10,
)

sample_like = st.fixed_dictionaries(
    {},
    optional={
        "server": st.sampled_from(["a", "b", "c", "", "zz"]) | json_values,
        "ok": st.booleans() | json_values,
        "latency_s": st.floats(min_value=-1, max_value=1e8) | json_values,
        "ttft_s": st.floats(min_value=-1, max_value=10) | json_values,
        "prompt_tokens": st.integers(min_value=-5, max_value=2**64) | json_values,
        "completion_tokens": st.integers(min_value=-5, max_value=2**64) | json_values,
        # Lone surrogates too ("\\ud800" in JSON): refused with a 400, never stored.
        "error": st.text(max_size=50)
        | st.text(st.characters(categories=["Cs", "L"]), max_size=10)
        | json_values,
    },
)


@SETTINGS
@given(payload=st.binary(max_size=3000))
def test_random_bytes_on_the_socket(api: ApiServer, payload: bytes) -> None:
    status = _status_of(raw_exchange(api.sock, payload, timeout=10))
    assert status is None or status < 500, payload[:60]


@SETTINGS
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(ENDPOINTS) | st.text(max_size=40).map(lambda t: "/" + t),
    params=st.dictionaries(
        st.sampled_from(PARAMS) | st.text(max_size=8), st.text(max_size=20), max_size=4
    ),
    body=st.none() | st.binary(max_size=500) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_random_requests(
    api: ApiServer, method: str, path: str, params: dict, body: bytes | None
) -> None:
    url = urllib.parse.quote(path, safe="/")
    if params:
        url += "?" + urllib.parse.urlencode(params)
    r = call(api.sock, method, url, body, timeout=10)
    assert r.status < 500, (method, url, r.status, r.body[:200])
    if method != "HEAD" and r.status >= 400:
        err = json.loads(r.body)["error"]
        assert err["code"] and err["message"]


@SETTINGS
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries({"samples": st.lists(sample_like, max_size=5)}),
        st.fixed_dictionaries({"samples": json_values}),
    )
)
def test_random_json_samples(api: ApiServer, body: object) -> None:
    data = json.dumps(body).encode()
    r = call(api.sock, "POST", "/v1/samples", data, timeout=10)
    # 429: the fuzzing may outrun the per-user rate of samples.
    assert r.status in (202, 400, 413, 429), (r.status, r.body[:300])
    if r.status == 202:
        assert r.json["accepted"] == len(body["samples"])  # type: ignore[index]
    else:
        assert r.json["error"]["message"]


@SETTINGS
@given(
    size=st.sampled_from(["8B", "70B", "", "13B"]) | st.text(max_size=10),
    n=st.integers(min_value=-5, max_value=100).map(str) | st.text(max_size=5),
    key=st.text(max_size=20),
    exclude=st.lists(st.sampled_from(["a", "b", "c"]) | st.text(max_size=5), max_size=4),
)
def test_random_best_queries(api: ApiServer, size: str, n: str, key: str, exclude: list) -> None:
    query = urllib.parse.urlencode(
        {"model_size": size, "n": n, "key": key, "exclude": ",".join(exclude)}
    )
    r = call(api.sock, "GET", "/v1/best?" + query, timeout=10)
    assert r.status in (200, 400, 404, 503), (query, r.status, r.body[:200])


def test_still_serving_after_the_fuzzing(api: ApiServer) -> None:
    _still_serving(api)
