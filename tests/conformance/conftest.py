"""Conformance checks: the SGLang facts modelserverd relies on, checked against a live
server given by URL, so the same checks run against a real SGLang on a GPU host and
against the simulator (tests/test_sim_conformance.py).

    make conformance SGLANG_URL=http://127.0.0.1:30000

Environment:

* ``SGLANG_URL``: the server; without it every check is skipped.
* ``SGLANG_API_KEY``: sent as a bearer token, for servers started with ``--api-key``.
* ``SGLANG_HEALTH_CHECK_TIMEOUT``: the server's own (SGLang reads the same variable;
  default 20 s): ``/health`` must answer within it.
* ``CONFORMANCE_OUT``: a folder; the measurements are written there as
  ``conformance.json``. They are also printed at the end of the run.

Each check's docstring names the SGLang source (paths under ``python/sglang/srt/``
in sgl-project/sglang) and the section of docs/sglang.md it rests on. Timings are
reported, not asserted, except where SGLang's source makes them certain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from .sglang_http import SGLang, health_check_timeout_s

SKIP_MESSAGE = (
    "set SGLANG_URL=http://host:port to check a running SGLang server; see README, Conformance"
)
HERE = Path(__file__).resolve().parent
REPORT_NAME = "conformance.json"

# What the run measured, for the summary and $CONFORMANCE_OUT/conformance.json.
REPORT: dict[str, Any] = {"url": None, "version": None, "checks": {}}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every check needs a server; without one the whole suite is skipped."""
    if os.environ.get("SGLANG_URL", "").strip():
        return
    skip = pytest.mark.skip(reason=SKIP_MESSAGE)
    for item in items:  # the whole session's items: only this folder's are ours
        if HERE in item.path.resolve().parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Point every "no SGLANG_URL" skip at this file, without a line, so that ``-ra``
    folds them into one line instead of one per test file."""
    outcome = yield
    rep = outcome.get_result()
    longrepr = rep.longrepr
    if rep.skipped and isinstance(longrepr, tuple) and str(longrepr[2]).endswith(SKIP_MESSAGE):
        rep.longrepr = (str(Path(__file__)), None, longrepr[2])


@pytest.fixture(scope="session")
def sglang_url() -> str:
    url = os.environ.get("SGLANG_URL", "").strip()
    if not url:
        pytest.skip(SKIP_MESSAGE)
    return url


@pytest.fixture(scope="session")
def sglang(sglang_url: str) -> SGLang:
    try:
        server = SGLang(
            sglang_url,
            api_key=os.environ.get("SGLANG_API_KEY", ""),
            # Long enough for a /health that waits SGLANG_HEALTH_CHECK_TIMEOUT.
            timeout_s=max(60.0, health_check_timeout_s() + 10.0),
        )
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.get("/get_model_info", timeout_s=10.0)
    except OSError as exc:
        pytest.fail(
            f"cannot reach the SGLang server at {server.url}: {exc!r}; is it running, "
            "and ready (/health 200)?",
            pytrace=False,
        )
    REPORT["url"] = server.url
    return server


@pytest.fixture(scope="session")
def server_info(sglang: SGLang) -> dict[str, Any]:
    """``/get_server_info``, read once (entrypoints/http_server.py)."""
    answer = sglang.get("/get_server_info")
    body = answer.json()
    if answer.status != 200 or not isinstance(body, dict):
        pytest.fail(f"/get_server_info: {answer.describe()}", pytrace=False)
    version = body.get("version")
    REPORT["version"] = version if isinstance(version, str) else None
    return body


@pytest.fixture(scope="session")
def model_path(sglang: SGLang) -> str:
    """What the client sends as ``model`` (client/_sglang.py: the server's model path)."""
    body = sglang.get("/get_model_info").json()
    path = body.get("model_path") if isinstance(body, dict) else None
    return path if isinstance(path, str) and path else "default"


@pytest.fixture
def report(request: pytest.FixtureRequest):
    """``report(**values)``: measurements of this check, kept under its name."""
    name = request.node.name.removeprefix("test_")

    def record(**values: Any) -> None:
        REPORT["checks"].setdefault(name, {}).update(values)

    return record


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return json.dumps(value) if not isinstance(value, str) else value


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT["checks"]:
        return
    tr = terminalreporter
    tr.section("SGLang conformance: measurements (reported, not asserted)")
    tr.write_line(f"server {REPORT['url']}, SGLang version {REPORT['version']}")
    for name, values in sorted(REPORT["checks"].items()):
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        tr.write_line(f"  {name}: {shown}")
    out = os.environ.get("CONFORMANCE_OUT", "").strip()
    if out:
        tr.write_line(f"written to {Path(out) / REPORT_NAME}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("CONFORMANCE_OUT", "").strip()
    if not out or not REPORT["checks"]:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_NAME).write_text(json.dumps(REPORT, indent=2, sort_keys=True) + "\n")
