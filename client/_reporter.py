"""Send what the client measured to the daemon without ever slowing the caller.

A request's latency is the daemon's best evidence about a server, but the caller must
not wait for the daemon, nor fail when it is down. So samples go into a small
bounded queue (a full queue drops the sample), and one background thread per socket
posts them in batches to ``POST /v1/samples``. While the daemon is unreachable,
batches are dropped for a short while instead of retried.

Successes gather for up to ``GATHER_S`` before a post (issue 11): a post per request
put a thread's wake-up and an HTTP exchange beside every request of a busy caller,
and the daemon's estimates move over seconds anyway. A failure goes at once, with
whatever gathered: the daemon may eject a server on it. ``flush``
(``ModelServer.close``, and once more when the program exits) posts at once too.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque
from typing import Any

from ._transport import DaemonClient

QUEUE_SIZE = 1000
BATCH_SIZE = 100
DOWN_PAUSE_S = 5.0
GATHER_S = 0.5  # how long samples wait for company before a post
EXIT_FLUSH_S = 0.5  # how long a program's exit waits for its last samples


class SampleReporter:
    """A daemon thread posting samples; :meth:`report` never blocks."""

    def __init__(
        self, daemon: DaemonClient, *, maxsize: int = QUEUE_SIZE, gather_s: float = GATHER_S
    ):
        self._daemon = daemon
        self._maxsize = maxsize
        self._batch = max(1, min(BATCH_SIZE, maxsize))  # a post goes at once with this many
        self._gather_s = gather_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the thread waits here
        self._done = threading.Condition(self._lock)  # flush waits here
        self._queue: deque[dict[str, Any]] = deque()
        self._pending = 0  # queued or being posted
        self._idle = False  # the thread waits for a first sample
        self._gathering = False  # the thread waits for more samples
        self._hurry = 0  # flush calls waiting: post without gathering
        self._urgent = False  # a failure is queued: post without gathering
        self._down_until = 0.0
        self.dropped = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="ms-client-reporter", daemon=True)
        self._thread.start()

    def report(self, sample: dict[str, Any]) -> None:
        with self._lock:
            queued = len(self._queue)
            if queued >= self._maxsize:
                self.dropped += 1
                return
            self._queue.append(sample)
            self._pending += 1
            if sample.get("ok") is False:
                self._urgent = True
            # Wake the thread only for a first sample, a failure or a full batch: no
            # system call per request while successes gather.
            if self._idle or (self._gathering and (self._urgent or queued + 1 >= self._batch)):
                self._idle = False
                self._wake.notify()

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Post what is queued now and wait (bounded) until it was sent or dropped;
        True when done.

        For short-lived programs such as the CLI, which exit right after one request.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if not self._pending:
                return True
            self._hurry += 1
            self._wake.notify()
            try:
                while self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._done.wait(remaining)
            finally:
                self._hurry -= 1
        return True

    def _next_batch(self) -> list[dict[str, Any]]:
        """The samples of the next post, once they gathered (called with the lock)."""
        while not self._queue:
            self._idle = True
            self._wake.wait()
        self._idle = False
        until = time.monotonic() + self._gather_s
        while not self._hurry and not self._urgent and len(self._queue) < self._batch:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._gathering = True
            self._wake.wait(remaining)
            self._gathering = False
        self._urgent = False
        count = min(len(self._queue), BATCH_SIZE)
        return [self._queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
            sent = False
            if time.monotonic() >= self._down_until:
                try:
                    self._daemon.post_samples(batch)
                    sent = True
                except Exception:  # daemon down or broken; a reporter must never die
                    self._down_until = time.monotonic() + DOWN_PAUSE_S
            with self._lock:
                self._pending -= len(batch)
                if sent:
                    self.sent += len(batch)
                else:
                    self.dropped += len(batch)
                self._done.notify_all()


_reporters: dict[str, SampleReporter] = {}
_reporters_lock = threading.Lock()


def _flush_at_exit() -> None:
    """The samples still gathering when the program ends are posted, briefly."""
    deadline = time.monotonic() + EXIT_FLUSH_S
    with _reporters_lock:
        reporters = list(_reporters.values())
    for reporter in reporters:
        reporter.flush(max(deadline - time.monotonic(), 0.0))


def reporter_for(daemon: DaemonClient) -> SampleReporter:
    """One reporter (one thread) per daemon socket in a process, however many
    ``ModelServer`` objects the program makes."""
    with _reporters_lock:
        reporter = _reporters.get(daemon.socket_path)
        if reporter is None:
            if not _reporters:
                atexit.register(_flush_at_exit)
            reporter = SampleReporter(daemon)
            _reporters[daemon.socket_path] = reporter
        return reporter
