"""Issue 12, item 1 (the process side): descriptor exhaustion must not stop
supervision.

The attack: a local user in the socket group held 400 keep-alive connections to a
daemon at ``LimitNOFILE=300``. Every health check then failed with EMFILE, all
servers went ``unhealthy``, then "supervisor task failed", then ``fatal``; after the
attacker left, start, restart and reload answered 200 and did nothing, and SIGTERM
left the servers running.

Capping connections is the API's part. Here the daemon's descriptors run out
however that happens: the test lowers the running daemon's RLIMIT_NOFILE below the
descriptors it already holds (``prlimit``), which is what the held connections did,
then gives them back, as the attacker leaving does. A check the daemon cannot make
for want of a descriptor says nothing about the server: it is skipped, logged, and
the server stays as it was.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
from conftest import free_port
from daemon_harness import FAST_DAEMON, DaemonUnderTest, wait_until

# Longer than the scheduler watch's hang_timeout_s and several health checks: the
# old daemon had failed the server well before.
HOLD_S = FAST_DAEMON["hang_timeout_s"] + 1.0
FAILED = ("-> unhealthy", "-> backoff", "-> fatal", "supervisor task failed")


@contextmanager
def out_of_descriptors(d: DaemonUnderTest) -> Iterator[None]:
    """No new descriptor for the daemon while inside: its soft limit drops to 3, below
    stdin, stdout and stderr plus everything it holds open."""
    assert d.proc is not None
    daemon = psutil.Process(d.proc.pid)
    soft, hard = daemon.rlimit(psutil.RLIMIT_NOFILE)
    daemon.rlimit(psutil.RLIMIT_NOFILE, (3, hard))
    try:
        yield
    finally:
        if d.proc.poll() is None:
            daemon.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))


def _log_since(d: DaemonUnderTest, offset: int) -> str:
    return d.log_path.read_text(errors="replace")[offset:]


def test_running_out_of_descriptors_is_waited_out_not_a_server_failure(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}]).start()
    pid = d.wait_state("a", "ready")["pid"]
    offset = len(d.log_path.read_text(errors="replace"))
    began = time.monotonic()

    def held_long_enough() -> bool:
        new = _log_since(d, offset)
        failed = [line for line in new.splitlines() if any(f in line for f in FAILED)]
        assert not failed, f"the server was failed for the daemon's own shortage:\n{new}"
        return "server a: cannot check now" in new and time.monotonic() - began > HOLD_S

    with out_of_descriptors(d):
        wait_until(held_long_enough, 30, "checks skipped for HOLD_S")

    # The attacker left: the same server, never restarted, checked again.
    wait_until(d._answers, 15, "the API answers again")
    assert d.wait_state("a", "ready")["pid"] == pid

    def resumed() -> bool:
        rows = d.query("select kind from events where server = 'a' and kind like 'check_%'")
        return [r[0] for r in rows][-2:] == ["check_skipped", "check_resumed"]

    wait_until(resumed, 10, "check_skipped, then check_resumed events")
    assert d.query("select count(*) from restarts")[0][0] == 0
    # Requests still act, and SIGTERM still stops everything.
    d.api("POST", "/v1/servers/a/restart")
    wait_until(lambda: d.server("a")["pid"] not in (None, pid), 15, "a restarted")
    d.wait_state("a", "ready")
    assert d.stop() == 0
    assert not d.leftover_processes()


def test_sigterm_while_out_of_descriptors_stops_every_server_once_they_are_back(
    daemon_factory,
):
    d = daemon_factory(
        [
            {"name": "a", "port": free_port(), "gpus": [0]},
            {"name": "b", "port": free_port(), "gpus": [1]},
        ]
    ).start()
    d.wait_all_ready()
    offset = len(d.log_path.read_text(errors="replace"))
    with out_of_descriptors(d):
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        # The stop cannot even look at the processes now; it must wait, not give up.
        wait_until(
            lambda: "cannot check now" in _log_since(d, offset), 15, "the stop waiting it out"
        )
        assert d.proc.poll() is None
    assert d.proc.wait(30) == 0
    left = d.leftover_processes()
    assert not left, [p.cmdline() for p in left]
