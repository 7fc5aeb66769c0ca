"""Fixtures shared by the test files: free ports and a fresh working folder."""

from __future__ import annotations

import os
import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


pytest_plugins = ["daemon_harness", "simtools"]


@pytest.fixture(autouse=True)
def _tables_without_a_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables fit ``$COLUMNS`` (supervisord_ms/display.py). GNU readline, once loaded,
    writes the terminal's width into the process environment behind ``os.environ``'s
    back, where every subprocess would inherit it; a test that wants a width sets it."""
    os.unsetenv("COLUMNS")
    monkeypatch.delenv("COLUMNS", raising=False)
