"""How long the scheduler watch lets a silent scheduler be, end to end: a server
whose steps have been quick is called hung after half of hang_timeout_s, one that
has shown a long step gets four times that step, and one without chunked prefill
gets the whole hang_timeout_s (liveness.hang_silence_s). The simulator's
``long_step`` fault is one forward step of that length: SGLang's scheduler reads no
input, load queries included, until it ends (scheduler.py event loop)."""

from __future__ import annotations

import time

from conftest import free_port
from daemon_harness import FAST_DAEMON, make_daemon, sim_fault, wait_until

from supervisord_ms.liveness import hang_silence_s

HANG_TIMEOUT_S = FAST_DAEMON["hang_timeout_s"]
FLOOR_S = hang_silence_s(hang_timeout_s=HANG_TIMEOUT_S, slowest_answer_s=0.0, steps_bounded=True)
# Longer than the floor, shorter than hang_timeout_s.
LONG_STEP_S = (FLOOR_S + HANG_TIMEOUT_S) / 2
# One step of this length teaches the watch that steps can be long: four times it
# reaches hang_timeout_s.
TEACHING_STEP_S = HANG_TIMEOUT_S / 4


def _step(d, name: str, seconds: float) -> None:
    """A long step on ``name``; returns once it is over and answers come again."""
    pid = d.server(name)["pid"]
    sim_fault(d.server(name)["port"], "long_step", seconds=seconds)
    time.sleep(seconds + 1.5)  # the step itself: nothing to poll for while it lasts
    s = d.server(name)
    assert s["state"] == "ready" and s["pid"] == pid, (name, s)


def _no_restarts(d, name: str) -> None:
    rows = d.query("select reason from restarts where server = ?", name)
    assert rows == [], rows
    changes = d.query(
        "select new_state, message from events where server = ? and kind = 'state' "
        "and new_state != 'ready' and new_state != 'starting'",
        name,
    )
    assert changes == [], changes


def test_long_steps_are_learned_and_chunkless_servers_get_the_whole_timeout(tmp_path):
    servers = [
        {"name": "learns", "port": free_port(), "gpus": [0]},
        {
            "name": "chunkless",
            "port": free_port(),
            "gpus": [1],
            "extra_args": ["--chunked-prefill-size", "-1"],
        },
        {"name": "quick", "port": free_port(), "gpus": [2]},
    ]
    d = make_daemon(tmp_path, servers, gpus=3)
    try:
        d.start()
        d.wait_all_ready(30)
        # Chunked prefill on, quick steps so far: a step longer than the floor would be
        # called a hang, so the watch first sees a shorter slow one and learns.
        _step(d, "learns", TEACHING_STEP_S)
        _step(d, "learns", LONG_STEP_S)
        # Chunked prefill off: one step can be a whole long prompt.
        _step(d, "chunkless", LONG_STEP_S)
        _no_restarts(d, "learns")
        _no_restarts(d, "chunkless")

        # Quick steps only: the same long step is taken for a hang, after the floor.
        quick = d.server("quick")
        sim_fault(quick["port"], "long_step", seconds=HANG_TIMEOUT_S * 3)
        wait_until(
            lambda: d.query("select reason from restarts where server = 'quick'"),
            HANG_TIMEOUT_S + 10,
            "the quick server's hang restart",
        )
        (message,) = d.query(
            "select message from events where server = 'quick' and new_state = 'unhealthy'"
        )[0]
        assert f"limit {FLOOR_S:g} s: chunked prefill on" in message, message
    finally:
        d.stop()
