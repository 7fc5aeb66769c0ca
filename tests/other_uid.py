"""Programs run as another user (uid 65534), for the tests of what a local user can
do to the daemon's servers or ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

NOBODY = 65534


def python_for_nobody() -> str:
    """An interpreter another user can run: the distribution's, else this one's base."""
    for candidate in ("/usr/bin/python3", sys._base_executable, sys.executable):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("no python interpreter found")


def programs_as_nobody(first_line: bytes) -> Iterator:
    """A fixture body: ``start(code, *args)`` runs ``python -c code args`` as uid 65534
    (``setpriv``), leading a session of its own, and returns once it printed
    ``first_line``; every one is killed at teardown."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("acting as another user needs root and setpriv")
    started: list[subprocess.Popen] = []

    def start(code: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                python_for_nobody(),
                "-I",
                "-c",
                code,
                *args,
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == first_line, f"the program as uid {NOBODY} did not start: {line!r}"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)
