"""The client stays light: a program pays milliseconds, not an event loop, to use it."""

from __future__ import annotations

import json
import subprocess
import sys

import ms_client

HEAVY = ["aiohttp", "sqlite_utils", "pynvml", "psutil", "prometheus_client", "asyncio"]


def loaded_after(statement: str) -> list[str]:
    code = f"{statement}; import sys, json; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(proc.stdout)


def test_importing_ms_client_loads_only_the_standard_library() -> None:
    modules = loaded_after("import ms_client")
    assert [m for m in HEAVY + ["click"] if m in modules] == []
    ours = sorted(m for m in modules if m.split(".")[0] == "supervisord_ms")
    assert ours == ["supervisord_ms", "supervisord_ms.config", "supervisord_ms.errors"]


def test_the_cli_adds_click_and_nothing_heavy() -> None:
    modules = loaded_after("import ms_client.cli")
    assert "click" in modules
    assert [m for m in HEAVY if m in modules] == []


def test_the_public_api() -> None:
    for name in ms_client.__all__:
        assert hasattr(ms_client, name), name
    assert issubclass(ms_client.NoServerAvailable, ms_client.ClientError)
    assert issubclass(ms_client.RequestRejected, ms_client.ClientError)
    assert issubclass(ms_client.ConfigProblem, ms_client.ClientError)
    assert ms_client.__version__
