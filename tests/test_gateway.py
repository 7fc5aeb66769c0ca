"""Keeping an SGLang gateway's worker list true (issue 14): the pure policy as tables,
GatewaySync against the in-process stand-in (tests/gateway_fake.py), and, when the
``sglang-router`` release the bench pins is installed, against the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import pytest
from gateway_fake import FakeGateway, free_port

from supervisord_ms import gateway as gw_mod
from supervisord_ms.gateway import (
    ERROR,
    EVENT_DOWN,
    EVENT_ERROR,
    EVENT_REGISTER,
    EVENT_REMOVE,
    EVENT_UP,
    PENDING,
    REGISTERED,
    REMOVED,
    GatewayError,
    GatewaySync,
    Listed,
    WorkerSpec,
    normalize_url,
    parse_listing,
    plan_reconcile,
    plan_updates,
    retry_delay,
    summarize,
)

T = TypeVar("T")

URL_A = "http://10.0.0.5:30000"
URL_B = "http://10.0.0.5:30001"
URL_C = "http://10.0.0.5:30002"
FOREIGN = "http://10.0.0.9:30000"


# --- pure policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://10.0.0.5:30000", "http://10.0.0.5:30000"),
        ("http://10.0.0.5:30000/", "http://10.0.0.5:30000"),
        ("  HTTP://Host.Example:30000// ", "http://host.example:30000"),
        ("http://[::1]:30000/", "http://[::1]:30000"),
        ("https://gw.internal:443/prefix/", "https://gw.internal:443/prefix"),
        ("not a url/", "not a url"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def L(wid: str, url: str, **kw: Any) -> Listed:  # noqa: N802 - a table helper
    return Listed(id=wid, url=url, **kw)


@pytest.mark.parametrize(
    "desired, listed, ours, pending, to_add, to_remove",
    [
        pytest.param({}, [], [], [], [], [], id="nothing"),
        pytest.param({"a": URL_A}, [], [], [], [("a", URL_A)], [], id="missing is added"),
        pytest.param({"a": URL_A}, [L("1", URL_A)], [], [], [], [], id="listed stays"),
        pytest.param(
            {"b": URL_B, "a": URL_A}, [], [], [], [("a", URL_A), ("b", URL_B)], [], id="sorted"
        ),
        pytest.param({}, [L("1", URL_A)], [URL_A], [], [], ["1"], id="ours, not ready: removed"),
        pytest.param({}, [L("9", FOREIGN)], [URL_A], [], [], [], id="foreign never touched"),
        pytest.param(
            {"a": URL_A},
            [L("9", FOREIGN), L("1", URL_A), L("2", URL_B)],
            [URL_A, URL_B],
            [],
            [],
            ["2"],
            id="mixed fleet: only our stale entry goes",
        ),
        pytest.param({"a": URL_A}, [], [], [URL_A], [], [], id="pending add not posted again"),
        pytest.param(
            {"a": URL_A + "/"}, [L("1", "HTTP://10.0.0.5:30000")], [], [], [], [], id="normalized"
        ),
        pytest.param(
            {"a": URL_A},
            [L("1", "HTTP://10.0.0.5:30000"), L("2", URL_A)],
            [],
            [],
            [],
            ["1"],
            id="duplicate: the exact spelling is kept",
        ),
        pytest.param(
            {"a": WorkerSpec(URL_A, priority=80)}, [], [], [], [("a", URL_A)], [], id="spec"
        ),
        pytest.param({}, [L("1", URL_A + "/")], [URL_A], [], [], ["1"], id="ours match normalized"),
    ],
)
def test_plan_reconcile(
    desired: dict[str, Any],
    listed: list[Listed],
    ours: list[str],
    pending: list[str],
    to_add: list[tuple[str, str]],
    to_remove: list[str],
) -> None:
    add, remove = plan_reconcile(desired, listed, ours, pending=pending)
    assert add == to_add
    assert [e.id for e in remove] == to_remove


@pytest.mark.parametrize(
    "desired, listed, expected",
    [
        pytest.param({"a": URL_A}, [L("1", URL_A, priority=50, cost=1.0)], [], id="not configured"),
        pytest.param(
            {"a": WorkerSpec(URL_A, priority=80)},
            [L("1", URL_A, priority=50, cost=1.0)],
            [("1", {"priority": 80})],
            id="priority changed",
        ),
        pytest.param(
            {"a": WorkerSpec(URL_A, priority=80, cost=0.1)},
            [L("1", URL_A, priority=80, cost=0.10000000149011612)],
            [],
            id="f32 cost is equal",
        ),
        pytest.param(
            {"a": WorkerSpec(URL_A, cost=2.5)},
            [L("1", URL_A, priority=50, cost=1.0)],
            [("1", {"cost": 2.5})],
            id="cost changed",
        ),
        pytest.param({"a": WorkerSpec(URL_A, priority=80)}, [], [], id="not listed: no update"),
        pytest.param(
            {"a": WorkerSpec(URL_A, priority=80)},
            [L("9", FOREIGN, priority=1)],
            [],
            id="foreign untouched",
        ),
    ],
)
def test_plan_updates(desired: dict[str, Any], listed: list[Listed], expected: list) -> None:
    assert [(e.id, body) for e, body in plan_updates(desired, listed)] == expected


@pytest.mark.parametrize(
    "failures, kwargs, expected",
    [
        (1, {"initial_s": 1.0, "max_s": 60.0}, 1.0),
        (2, {"initial_s": 1.0, "max_s": 60.0}, 2.0),
        (3, {"initial_s": 1.0, "max_s": 60.0}, 4.0),
        # At the cap the jitter spreads below it: 48 .. 60 s, 54 s in the middle.
        (7, {"initial_s": 1.0, "max_s": 60.0}, 54.0),
        (10_000, {"initial_s": 1.0, "max_s": 60.0}, 54.0),
        (1, {"initial_s": 1.0, "max_s": 60.0, "rand": 0.0}, 0.8),
        (1, {"initial_s": 1.0, "max_s": 60.0, "rand": 1.0}, 1.2),
        (7, {"initial_s": 1.0, "max_s": 60.0, "rand": 1.0}, 60.0),  # jitter never passes max
        (7, {"initial_s": 1.0, "max_s": 60.0, "rand": 0.0}, 48.0),
        (3, {"initial_s": 0.5, "max_s": 60.0, "jitter": 0.0, "rand": 1.0}, 2.0),
        (1, {"initial_s": 0.0, "max_s": 60.0}, 0.0),
    ],
)
def test_retry_delay(failures: int, kwargs: dict[str, float], expected: float) -> None:
    assert retry_delay(failures, **kwargs) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures": 0},
        {"failures": 1, "initial_s": -1.0},
        {"failures": 1, "jitter": -0.1},
        {"failures": 1, "rand": 1.5},
    ],
)
def test_retry_delay_refuses_bad_input(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        retry_delay(**kwargs)


@pytest.mark.parametrize(
    "states, expected",
    [
        ([], REMOVED),
        ([REGISTERED], REGISTERED),
        ([REGISTERED, REGISTERED], REGISTERED),
        ([REGISTERED, PENDING], PENDING),
        ([REGISTERED, ERROR], ERROR),
        ([PENDING, ERROR], ERROR),
        ([REMOVED, REMOVED], REMOVED),
        ([REGISTERED, REMOVED], PENDING),
    ],
)
def test_summarize(states: list[str], expected: str) -> None:
    assert summarize(states) == expected


def test_parse_listing_reads_the_gateway_answer() -> None:
    # The shape 0.3.2 answers (recorded on loopback; see docs/fleet.md).
    answer = {
        "workers": [
            {
                "id": "3b911809-1da7-42d7-a627-b924a18660bd",
                "url": "http://127.0.0.1:41001",
                "model_id": "/m",
                "priority": 50,
                "cost": 1.0,
                "worker_type": "regular",
                "is_healthy": True,
                "load": 0,
                "connection_mode": "HTTP",
                "metadata": {"tp_size": "1"},
                "disable_health_check": False,
            }
        ],
        "total": 1,
        "stats": {"prefill_count": 0, "decode_count": 0, "regular_count": 1},
    }
    assert parse_listing(answer) == [
        Listed(
            id="3b911809-1da7-42d7-a627-b924a18660bd",
            url="http://127.0.0.1:41001",
            priority=50,
            cost=1.0,
            healthy=True,
        )
    ]


@pytest.mark.parametrize(
    "answer",
    [None, [], {"workers": "x"}, {"workers": [1]}, {"workers": [{"id": 1, "url": "u"}]}],
)
def test_parse_listing_refuses_other_shapes(answer: Any) -> None:
    with pytest.raises(GatewayError):
        parse_listing(answer)


def test_bad_gateway_urls_are_refused() -> None:
    for bad in ([], ["gw:30000"], ["ftp://gw:1"]):
        with pytest.raises(ValueError):
            GatewaySync(bad)


# --- against the stand-in ---------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.rows: list[tuple[str | None, str, str]] = []

    def __call__(self, server: str | None, kind: str, message: str) -> None:
        self.rows.append((server, kind, message))

    def kinds(self, server: str | None = "*") -> list[str]:
        return [k for s, k, _ in self.rows if server == "*" or s == server]

    def of(self, kind: str) -> list[tuple[str | None, str, str]]:
        return [row for row in self.rows if row[1] == kind]


class MidRandom:
    """rand.random() always 0.5: backoff delays are exactly their nominal value."""

    def random(self) -> float:
        return 0.5


def make_sync(urls: Any, events: Events, **kw: Any) -> GatewaySync:
    kw.setdefault("request_timeout_s", 1.0)
    kw.setdefault("confirm_timeout_s", 2.0)
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 0.4)
    return GatewaySync(urls, on_event=events, **kw)


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False


def test_registers_on_ready_without_blocking_the_caller() -> None:
    async def go() -> None:
        fake = await FakeGateway(add_delay_s=0.1, answer_delay_s=0.05).start()
        events = Events()
        sync = make_sync(fake.url, events)
        try:
            began = time.monotonic()
            sync.set_ready("a", URL_A + "/", True, "became ready")
            assert time.monotonic() - began < 0.05, "set_ready must not wait for the gateway"
            assert sync.server_state("a") == PENDING
            assert await sync.settled("a", 3.0)
            assert fake.listed_urls() == [URL_A]
            (post,) = fake.calls_to("POST")
            assert post.body == {"url": URL_A}  # normalized: no trailing slash
            wid = fake.id_of(URL_A)
            status = sync.status()
            assert status["servers"]["a"]["state"] == REGISTERED
            assert status["servers"]["a"]["gateways"][fake.url]["worker_id"] == wid
            assert status["servers"]["a"]["gateways"][fake.url]["healthy"] is True
            assert status["gateways"][0]["reachable"] is True
            (row,) = events.of(EVENT_REGISTER)
            assert row[0] == "a"
            assert "became ready" in row[2] and "202" in row[2] and wid in row[2]
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_removes_by_uuid_the_moment_a_server_leaves_ready() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        events = Events()
        sync = make_sync(fake.url, events)
        try:
            sync.set_ready("a", URL_A, True)
            assert await sync.settled("a", 3.0)
            wid = fake.id_of(URL_A)
            began = time.monotonic()
            sync.set_ready("a", URL_A, False, "unhealthy: scheduler hung")
            # What a stop does before SIGTERM: wait until the gateway has dropped it.
            assert await sync.settled("a", 2.0)
            assert time.monotonic() - began < 1.0
            assert fake.listed_urls() == []
            (delete,) = fake.calls_to("DELETE")
            assert delete.path == f"/workers/{wid}" and is_uuid(delete.path.rsplit("/", 1)[1])
            assert sync.server_state("a") == REMOVED
            (row,) = events.of(EVENT_REMOVE)
            assert row[0] == "a" and "scheduler hung" in row[2] and "202" in row[2]
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_registers_again_on_recovery() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        sync = make_sync(fake.url, Events())
        try:
            sync.set_ready("a", URL_A, True)
            assert await sync.settled("a", 3.0)
            first = fake.id_of(URL_A)
            sync.set_ready("a", URL_A, False, "backoff")
            assert await sync.settled("a", 3.0)
            sync.set_ready("a", URL_A, True, "recovered")
            assert await sync.settled("a", 3.0)
            assert fake.listed_urls() == [URL_A]
            assert fake.id_of(URL_A) != first  # a new registration, a new id
            assert [c.method for c in fake.calls if c.method != "GET"] == [
                "POST",
                "DELETE",
                "POST",
            ]
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_leaving_ready_during_a_slow_add_removes_at_once() -> None:
    async def go() -> None:
        fake = await FakeGateway(add_delay_s=1.0).start()
        sync = make_sync(fake.url, Events(), confirm_timeout_s=5.0)
        try:
            sync.set_ready("a", URL_A, True)
            await until(lambda: fake.calls_to("POST"), 2.0, "the POST")
            left = time.monotonic()
            sync.set_ready("a", URL_A, False, "hang suspected")
            await until(lambda: fake.calls_to("DELETE"), 2.0, "the DELETE")
            assert fake.calls_to("DELETE")[0].at - left < 0.5, "the removal waited for the add"
            assert await sync.settled("a", 3.0)
            await asyncio.sleep(1.2)  # the add job would have finished by now
            assert fake.listed_urls() == []
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_a_server_that_leaves_ready_during_a_sync_is_not_registered_by_it() -> None:
    async def go() -> None:
        fake = await FakeGateway(answer_delay_s=0.3).start()
        sync = make_sync(fake.url, Events())
        try:
            syncing = asyncio.ensure_future(sync.reconcile({"a": URL_A}))
            await asyncio.sleep(0.1)  # GET /workers is on its way with "a" ready
            sync.set_ready("a", URL_A, False, "hang suspected")
            assert await syncing
            await sync.settled("a", 2.0)
            assert fake.calls_to("POST") == [] and fake.listed_urls() == []
            assert sync.server_state("a") == REMOVED
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_stopping_run_does_not_wait_for_a_slow_gateway() -> None:
    async def go() -> None:
        fake = await FakeGateway(answer_delay_s=2.0).start()
        sync = make_sync(fake.url, Events(), request_timeout_s=3.0)
        stop = asyncio.Event()
        task = asyncio.ensure_future(sync.run(stop, dict, 5.0))
        await until(lambda: sync.status()["gateways"][0]["last_attempt_at"], 2.0, "a sync")
        began = time.monotonic()
        stop.set()
        await task
        assert time.monotonic() - began < 0.5
        await fake.close()

    run(go())


def test_a_gateway_that_restarts_empty_is_refilled_within_one_interval() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        events = Events()
        sync = make_sync(fake.url, events)
        stop = asyncio.Event()
        interval = 0.5
        desired = {"a": URL_A, "b": URL_B}
        task = asyncio.ensure_future(sync.run(stop, lambda: dict(desired), interval))
        try:
            await until(lambda: fake.listed_urls() == [URL_A, URL_B], 3.0, "the first sync")
            await fake.restart(empty=True)
            restarted = time.monotonic()
            await until(lambda: fake.listed_urls() == [URL_A, URL_B], 3.0, "the refill")
            assert time.monotonic() - restarted <= interval + 0.4
            adds = [r for r in events.of(EVENT_REGISTER) if "missing" in r[2]]
            assert {r[0] for r in adds} == {"a", "b"}
        finally:
            stop.set()
            await task
            await fake.close()

    run(go())


def test_other_hosts_workers_are_never_touched() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        foreign = fake.add_foreign(FOREIGN)
        # Registered by an earlier run of this daemon; the server is not ready now.
        stale = fake.add_foreign(URL_B)
        sync = make_sync(fake.url, Events())
        sync.set_managed([URL_A, URL_B, URL_C])
        try:
            assert await sync.reconcile({"a": URL_A})
            await until(lambda: URL_A in fake.listed_urls(), 2.0, "a registered")
            assert fake.listed_urls() == [URL_A, FOREIGN]
            deleted = {c.path.rsplit("/", 1)[1] for c in fake.calls_to("DELETE")}
            assert deleted == {stale}
            assert foreign not in deleted
            posted = [c.body["url"] for c in fake.calls_to("POST")]
            assert posted == [URL_A]
            # Not even a lost foreign worker is re-added, nor one this host stopped.
            assert await sync.reconcile({})
            await until(lambda: fake.listed_urls() == [FOREIGN], 2.0, "a removed")
            assert fake.workers[foreign].url == FOREIGN
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_unreachable_gateway_is_retried_with_backoff_and_reported() -> None:
    async def go() -> None:
        fake = FakeGateway()  # not listening: connection refused
        events = Events()
        sync = make_sync(fake.url, events, rand=MidRandom())
        stop = asyncio.Event()
        attempts: list[float] = []

        def attempt_seen() -> bool:
            at = sync.status()["gateways"][0]["last_attempt_at"]
            if at and (not attempts or attempts[-1] != at):
                attempts.append(at)
            return len(attempts) >= 5

        task = asyncio.ensure_future(sync.run(stop, lambda: {"a": URL_A}, 0.2))
        try:
            began = time.monotonic()
            sync.set_ready("a", URL_A, True, "ready")
            assert time.monotonic() - began < 0.05
            await until(attempt_seen, 5.0, "five attempts")
            took = time.monotonic() - began
            # 0.05 + 0.1 + 0.2 + 0.4 s of backoff between five attempts (not 4 x 0.2 s
            # of the interval, and certainly not a tight loop).
            assert took >= 0.6, took
            status = sync.status()
            g = status["gateways"][0]
            assert g["reachable"] is False and g["ok"] is False
            assert "cannot connect" in g["last_error"]
            assert g["consecutive_failures"] >= 4
            assert g["next_sync_in_s"] is not None and g["next_sync_in_s"] <= 0.4
            assert status["servers"]["a"]["state"] == ERROR
            assert len(events.of(EVENT_DOWN)) == 1  # reported once, not per attempt
            assert len(events.of(EVENT_ERROR)) == 1

            await fake.start()
            await until(lambda: fake.listed_urls() == [URL_A], 3.0, "registration on return")
            await until(lambda: sync.server_state("a") == REGISTERED, 2.0, "state registered")
            g = sync.status()["gateways"][0]
            assert g["reachable"] is True and g["ok"] is True and g["last_error"] is None
            assert g["consecutive_failures"] == 0 and g["last_sync_at"].endswith("Z")
            (up,) = events.of(EVENT_UP)
            assert "failed attempts" in up[2]
        finally:
            stop.set()
            await task
            await fake.close()

    run(go())


def test_5xx_answers_fail_the_sync_and_change_nothing() -> None:
    async def go() -> None:
        fake = await FakeGateway(error_status=503).start()
        events = Events()
        sync = make_sync(fake.url, events)
        sync.set_managed([URL_A])
        try:
            assert not await sync.reconcile({})
            g = sync.status()["gateways"][0]
            assert g["reachable"] is True and g["ok"] is False
            assert "503" in g["last_error"]
            assert [c.method for c in fake.calls] == ["GET"]
            assert len(events.of(EVENT_DOWN)) == 1
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_api_key_is_sent_as_a_bearer_token_and_never_reported() -> None:
    async def go() -> None:
        fake = await FakeGateway(api_key="s3cret-key").start()
        events = Events()
        good = make_sync(fake.url, events, api_key="s3cret-key", worker_api_key="w0rker-key")
        bad = make_sync(fake.url, events, api_key="wrong-key")
        try:
            good.set_ready("a", URL_A, True)
            assert await good.settled("a", 3.0)
            assert fake.listed_urls() == [URL_A]
            assert {c.authorization for c in fake.calls} == {"Bearer s3cret-key"}
            assert fake.calls_to("POST")[0].body == {"url": URL_A, "api_key": "w0rker-key"}

            assert not await bad.reconcile({"a": URL_A})
            g = bad.status()["gateways"][0]
            assert "401" in g["last_error"] and "api_key" in g["last_error"]
            text = json.dumps([good.status(), bad.status(), events.rows])
            for secret in ("s3cret-key", "wrong-key", "w0rker-key"):
                assert secret not in text
        finally:
            await good.close()
            await bad.close()
            await fake.close()

    run(go())


def test_a_gateway_that_does_not_answer_times_out() -> None:
    async def go() -> None:
        fake = await FakeGateway(answer_delay_s=1.5).start()
        events = Events()
        sync = make_sync(fake.url, events, request_timeout_s=0.3)
        try:
            began = time.monotonic()
            sync.set_ready("a", URL_A, True)
            assert time.monotonic() - began < 0.05
            assert not await sync.settled("a", 2.0)
            assert time.monotonic() - began < 1.0
            entry = sync.status()["servers"]["a"]["gateways"][fake.url]
            assert entry["state"] == ERROR and "within 0.3 s" in entry["error"]
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_a_failed_add_job_is_reported_and_retried() -> None:
    async def go() -> None:
        reason = "Both HTTP and gRPC health checks failed for " + URL_A
        fake = await FakeGateway(add_delay_s=0.05, fail_adds={URL_A: reason}).start()
        events = Events()
        sync = make_sync(fake.url, events)
        try:
            sync.set_ready("a", URL_A, True)
            assert not await sync.settled("a", 3.0)
            entry = sync.status()["servers"]["a"]["gateways"][fake.url]
            assert entry["state"] == ERROR and "health checks failed" in entry["error"]
            assert any("health checks failed" in m for _, _, m in events.of(EVENT_ERROR))
            fake.fail_adds.clear()  # the gateway can reach the worker now
            assert await sync.reconcile({"a": URL_A})
            assert fake.listed_urls() == [URL_A]
            assert len(fake.calls_to("POST")) == 2
            assert sync.server_state("a") == REGISTERED
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_priority_and_cost_are_sent_and_updated() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        sync = make_sync(fake.url, Events())
        try:
            sync.set_ready("a", URL_A, True, priority=80, cost=2.5)
            assert await sync.settled("a", 3.0)
            assert fake.calls_to("POST")[0].body == {"url": URL_A, "priority": 80, "cost": 2.5}
            wid = fake.id_of(URL_A)
            assert wid is not None and fake.workers[wid].priority == 80
            assert await sync.reconcile({"a": WorkerSpec(URL_A, priority=90, cost=2.5)})
            (put,) = fake.calls_to("PUT")
            assert put.path == f"/workers/{wid}" and put.body == {"priority": 90}
            assert fake.workers[wid].priority == 90
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_several_gateways_are_kept_independently() -> None:
    async def go() -> None:
        up = await FakeGateway().start()
        down = FakeGateway()
        sync = make_sync([up.url, down.url, up.url + "/"], Events())
        assert sync.gateway_urls == [up.url, down.url]
        try:
            sync.set_ready("a", URL_A, True)
            assert not await sync.settled("a", 3.0)
            assert up.listed_urls() == [URL_A]
            per = sync.status()["servers"]["a"]["gateways"]
            assert per[up.url]["state"] == REGISTERED and per[down.url]["state"] == ERROR
            assert sync.server_state("a") == ERROR
            await down.start()
            assert await sync.reconcile({"a": URL_A})
            assert down.listed_urls() == [URL_A]
            assert sync.server_state("a") == REGISTERED
        finally:
            await sync.close()
            await up.close()
            await down.close()

    run(go())


def test_a_registration_left_by_an_earlier_run_is_adopted() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        wid = fake.add_foreign(URL_A)  # the previous daemon run registered it
        sync = make_sync(fake.url, Events())
        try:
            # The start-up sync adopts it: nothing is posted, its id is known.
            assert await sync.reconcile({"a": URL_A})
            assert fake.calls_to("POST") == []
            assert sync.status()["servers"]["a"]["gateways"][fake.url]["worker_id"] == wid
            # The supervisor then reports the adopted server ready: nothing to do.
            sync.set_ready("a", URL_A, True, "adopted")
            assert await sync.settled("a", 1.0)
            assert fake.calls_to("POST") == []
        finally:
            await sync.close()
        # A daemon that reports ready before its first sync posts the URL again; the
        # gateway answers the same id and its second add job fails "already exists".
        again = make_sync(fake.url, Events())
        try:
            again.set_ready("a", URL_A, True, "adopted")
            assert await again.settled("a", 3.0)
            assert again.server_state("a") == REGISTERED
            assert fake.listed_urls() == [URL_A] and fake.id_of(URL_A) == wid
        finally:
            await again.close()
            await fake.close()

    run(go())


def test_set_state_can_record_the_intent_synchronously() -> None:
    async def go() -> None:
        fake = await FakeGateway(remove_delay_s=0.2).start()
        sync = make_sync(fake.url, Events())
        try:
            sync.set_ready("a", URL_A, True, "ready")
            assert await sync.settled("a", 3.0)
            # What ServerSupervisor does: set_state(STOPPING) then, before SIGTERM,
            # wait for the removal; settled() must see the change already.
            sync.set_ready("a", URL_A, False, "stopping: manual stop")
            assert await sync.settled("a", 3.0)
            assert fake.listed_urls() == []
        finally:
            await sync.close()
            await fake.close()

    run(go())


def test_the_session_comes_from_the_factory_and_is_closed() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()
        made: list[aiohttp.ClientSession] = []

        def factory() -> aiohttp.ClientSession:
            made.append(aiohttp.ClientSession())
            return made[-1]

        sync = make_sync(fake.url, Events(), session_factory=factory)
        assert await sync.reconcile({})
        assert len(made) == 1
        await sync.close()
        assert made[0].closed
        await fake.close()

    run(go())


def test_a_failing_event_callback_does_not_stop_the_sync() -> None:
    async def go() -> None:
        fake = await FakeGateway().start()

        def broken(server: str | None, kind: str, message: str) -> None:
            raise RuntimeError("store is gone")

        sync = GatewaySync(fake.url, on_event=broken, request_timeout_s=1.0)
        try:
            sync.set_ready("a", URL_A, True)
            assert await sync.settled("a", 3.0)
        finally:
            await sync.close()
            await fake.close()

    run(go())


# --- against the real gateway --------------------------------------------------------------------

ROUTER_VERSION = "0.3.2"  # bench/router_peer.py pins it


def _router_version() -> str | None:
    if importlib.util.find_spec("sglang_router") is None:
        return None
    try:
        return importlib.metadata.version("sglang-router")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(
    _router_version() != ROUTER_VERSION,
    reason=f"sglang-router {ROUTER_VERSION} is not installed (bench/run.py installs it)",
)
def test_against_the_real_gateway(sim_factory: Any, tmp_path: Path) -> None:
    """The facts docs/fleet.md states, checked on the release itself: 202 with a UUID,
    the list, DELETE by UUID, and the Bearer key."""
    model = tmp_path / "model"
    model.mkdir()
    sim = sim_factory(None, "--model-path", str(model), "--sim-startup-s", "0")
    sim.wait_ready()
    port = free_port()
    key = "test-key"
    nowhere = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(
        HTTP_PROXY=nowhere,
        HTTPS_PROXY=nowhere,
        ALL_PROXY=nowhere,
        NO_PROXY="127.0.0.1,localhost",
        HF_HUB_OFFLINE="1",
    )
    log_path = tmp_path / "router.log"
    with open(log_path, "wb") as log:
        router = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sglang_router.launch_router",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-key",
                key,
                "--log-level",
                "warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    gateway = f"http://127.0.0.1:{port}"

    async def go() -> None:
        events = Events()
        sync = GatewaySync(gateway, api_key=key, on_event=events, confirm_timeout_s=20.0)
        try:
            deadline = time.monotonic() + 30
            while not await sync.reconcile({}):
                assert router.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, "the gateway did not start"
                await asyncio.sleep(0.2)
            sync.set_ready("sim", sim.url, True, "ready")
            assert await sync.settled("sim", 25.0), (sync.status(), events.rows)
            async with aiohttp.ClientSession() as s:
                headers = {"Authorization": f"Bearer {key}"}
                async with s.get(gateway + "/workers", headers=headers) as r:
                    listing = await r.json()
                async with s.get(gateway + "/workers") as r:
                    assert r.status == 401
                by_url = gateway + "/workers/" + quote(sim.url, safe="")
                async with s.delete(by_url, headers=headers) as r:
                    assert r.status == 400  # a URL is not an id: "expected UUID"
                    assert "UUID" in await r.text()
            (listed,) = listing["workers"]
            assert listed["url"] == sim.url and is_uuid(listed["id"])
            register = events.of(EVENT_REGISTER)[0][2]
            assert listed["id"] in register and "202" in register
            sync.set_ready("sim", sim.url, False, "stopping")
            assert await sync.settled("sim", 10.0)
            assert await sync.reconcile({})
            assert sync.status()["gateways"][0]["registered"] == 0
        finally:
            await sync.close()

    try:
        run(go(), timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(router.pid, signal.SIGTERM)
        try:
            router.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(router.pid, signal.SIGKILL)
            router.wait(5)


def test_module_exports() -> None:
    for name in gw_mod.__all__:
        assert hasattr(gw_mod, name), name
