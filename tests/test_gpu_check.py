"""scripts/gpu-check says clearly that there is no GPU here, and exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


def test_gpu_check_without_a_gpu_exits_2_with_a_clear_message():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    if out.returncode == 0:  # a host with a GPU: the check itself must have passed
        assert "gpu-check: OK" in out.stdout
        return
    assert out.returncode == 2, out.stderr
    assert "no usable NVIDIA GPU" in out.stderr
