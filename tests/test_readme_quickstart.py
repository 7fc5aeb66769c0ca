"""The README's quick start works as printed, in a fresh shell, from the repository's
folder: no PATH to guess, no variable to know beforehand. `make test` itself is left
out (it is what runs this)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in the README's quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_runs_as_printed() -> None:
    lines = quick_start_block()
    assert lines[0].startswith("make test")
    script = "set -e\n" + "\n".join(lines[1:])
    env = {k: v for k, v in os.environ.items() if k not in ("MODELSERVERD_CONFIG", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    try:
        out = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=420, env=env
        )
    finally:
        subprocess.run(["make", "-s", "demo-down"], cwd=ROOT, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Demo complete." in out.stdout
    assert re.search(r"sim-8b-a +8B .* ready", out.stdout), out.stdout[-3000:]
