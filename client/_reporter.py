"""Send what the client measured to the daemon without ever slowing the caller.

A request's latency is the daemon's best evidence about a server, but the caller must
not wait for the daemon, nor fail when it is down. So samples go into a small
bounded queue (a full queue drops the sample), and one background thread per socket
posts them in batches to ``POST /v1/samples``. While the daemon is unreachable,
batches are dropped for a short while instead of retried.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from ._transport import DaemonClient

QUEUE_SIZE = 1000
BATCH_SIZE = 100
DOWN_PAUSE_S = 5.0


class SampleReporter:
    """A daemon thread posting samples; :meth:`report` never blocks."""

    def __init__(self, daemon: DaemonClient, *, maxsize: int = QUEUE_SIZE):
        self._daemon = daemon
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=maxsize)
        self._cond = threading.Condition()
        self._pending = 0
        self._down_until = 0.0
        self.dropped = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="ms-client-reporter", daemon=True)
        self._thread.start()

    def report(self, sample: dict[str, Any]) -> None:
        with self._cond:
            self._pending += 1
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            with self._cond:
                self._pending -= 1
                self.dropped += 1
                self._cond.notify_all()

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait (bounded) until queued samples were sent or dropped; True when done.

        For short-lived programs such as the CLI, which exit right after one request.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH_SIZE:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            sent = False
            if time.monotonic() >= self._down_until:
                try:
                    self._daemon.post_samples(batch)
                    sent = True
                except Exception:  # daemon down or broken; a reporter must never die
                    self._down_until = time.monotonic() + DOWN_PAUSE_S
            with self._cond:
                self._pending -= len(batch)
                if sent:
                    self.sent += len(batch)
                else:
                    self.dropped += len(batch)
                self._cond.notify_all()


_reporters: dict[str, SampleReporter] = {}
_reporters_lock = threading.Lock()


def reporter_for(daemon: DaemonClient) -> SampleReporter:
    """One reporter (one thread) per daemon socket in a process, however many
    ``ModelServer`` objects the program makes."""
    with _reporters_lock:
        reporter = _reporters.get(daemon.socket_path)
        if reporter is None:
            reporter = SampleReporter(daemon)
            _reporters[daemon.socket_path] = reporter
        return reporter
