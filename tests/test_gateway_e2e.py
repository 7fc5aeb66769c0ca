"""The real daemon keeps a gateway's worker list true: registered when ready, removed
the moment a server leaves ready (a stop, a hang), refilled after the gateway
restarts empty, another host's workers never touched, every change an events row."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import free_port
from daemon_harness import sim_fault, wait_until
from gateway_fake import FakeGateway

FOREIGN = "http://10.9.9.9:30000"  # another host's worker: never touched


class ThreadedGateway:
    """The gateway stand-in on its own event loop, for a daemon in another process."""

    def __init__(self, api_key: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeGateway(api_key=api_key)
        self.call(self.fake.start())

    def call(self, coro: Any) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(15)

    def listed(self) -> set[str]:
        return set(self.call(_listed(self.fake)))

    def close(self) -> None:
        self.call(self.fake.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _listed(fake: FakeGateway) -> list[str]:
    return fake.listed_urls()


@pytest.fixture
def gateway() -> Iterator[ThreadedGateway]:
    gw = ThreadedGateway(api_key="gw-secret")
    try:
        yield gw
    finally:
        gw.close()


def test_the_daemon_keeps_the_gateway_list_true(daemon_factory, gateway) -> None:
    ports = {"a": free_port(), "b": free_port()}
    d = daemon_factory(
        [{"name": n, "port": p, "gpus": [i]} for i, (n, p) in enumerate(ports.items())]
    )
    with d.config_path.open("a") as f:
        f.write(
            f'\n[gateway]\nurl = "{gateway.fake.url}"\napi_key = "gw-secret"\n'
            "sync_interval_s = 0.5\nrequest_timeout_s = 2.0\n"
        )
    gateway.call(_add_foreign(gateway.fake))
    d.start()
    d.wait_all_ready()
    urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    wait_until(lambda: gateway.listed() == {*urls.values(), FOREIGN}, 10, "both registered")

    # A stop takes the server off before its SIGTERM; the other host's worker stays.
    d.api("POST", "/v1/servers/a/stop")
    d.wait_state("a", "stopped")
    assert gateway.listed() == {urls["b"], FOREIGN}

    # A hung scheduler: off the gateway once the daemon sees it, back after relaunch.
    sim_fault(ports["b"], "scheduler_hang")
    wait_until(lambda: urls["b"] not in gateway.listed(), 15, "hung server removed")
    wait_until(
        lambda: d.server("b")["state"] == "ready" and urls["b"] in gateway.listed(), 30, "b back"
    )

    # A gateway that restarts empty is refilled within a sync interval or two.
    gateway.call(gateway.fake.restart(empty=True))
    wait_until(lambda: gateway.listed() == {urls["b"]}, 10, "refilled")
    assert all(c.authorization == "Bearer gw-secret" for c in gateway.fake.calls)

    kinds = {r[0] for r in d.query("select kind from events where kind like 'gateway%'")}
    assert {"gateway_register", "gateway_remove"} <= kinds, kinds
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisord_ms.cli",
            "status",
            "--json",
            "--config",
            str(d.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    status = json.loads(out.stdout)
    assert status["daemon"]["gateway"]["gateways"][0]["url"] == gateway.fake.url
    assert {s["name"]: s["gateway"] for s in status["servers"]}["b"] == "registered"
    assert "gw-secret" not in out.stdout


async def _add_foreign(fake: FakeGateway) -> None:
    fake.add_foreign(FOREIGN)
