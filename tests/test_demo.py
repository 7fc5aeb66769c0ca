"""`modelserverd demo`: never deletes what it did not make, picks free ports, and can be
continued by hand with the commands it prints."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supervisord_ms.demo import MARKER, DemoError, demo_config, prepare_workdir

ME = [sys.executable, "-m", "supervisord_ms.cli"]


def test_a_folder_the_demo_did_not_make_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    out = subprocess.run(
        [*ME, "demo", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "not made by `modelserverd demo`; nothing was deleted" in out.stderr
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / MARKER).exists()


def test_a_folder_an_earlier_demo_made_is_emptied(tmp_path: Path) -> None:
    work = tmp_path / "run"
    prepare_workdir(work)
    (work / "state.db").write_text("old")
    (work / "logs" / "a.log").write_text("old")
    prepare_workdir(work)
    assert sorted(p.name for p in work.iterdir()) == [MARKER, "logs"]
    assert list((work / "logs").iterdir()) == []


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(DemoError, match="is a file"):
        prepare_workdir(target)


def test_ports_are_free_ones(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = [int(p) for p in re.findall(r"^port = (\d+)$", demo_config(tmp_path), re.M)]
    assert len(set(ports)) == 3 and taken not in ports


def test_keep_running_prints_commands_that_work_as_printed(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    out = subprocess.run(
        [*ME, "demo", "--dir", str(work), "--keep-running"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert out.stdout.rstrip().endswith("Demo complete.")
        block = out.stdout.split("Go on by hand:")[1].split("Demo complete.")[0]
        lines = [line.strip() for line in block.strip().splitlines()]
        assert lines[0].startswith("export MODELSERVERD_CONFIG=")
        # The printed lines, pasted into a fresh shell, up to the stop command.
        script = "set -e\n" + "\n".join(line for line in lines if "--stop" not in line)
        env = {k: v for k, v in os.environ.items() if k != "MODELSERVERD_CONFIG"}
        env["PATH"] = "/usr/bin:/bin"
        ran = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env
        )
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
        assert "sim-8b-a" in ran.stdout and "ready" in ran.stdout
    finally:
        stopped = subprocess.run(
            [*ME, "demo", "--stop", "--dir", str(work)], capture_output=True, text=True, timeout=90
        )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not (work / "daemon.pid").exists()
