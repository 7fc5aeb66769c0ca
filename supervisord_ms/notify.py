"""sd_notify for ``modelserverd run`` under systemd, with the standard library only.

The unit is ``Type=notify`` with ``WatchdogSec=30``: systemd waits for ``READY=1``
before it calls the service started, and restarts it when ``WATCHDOG=1`` stops
arriving. libsystemd's protocol is one datagram of newline-separated
``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``, so
a few lines of ``socket`` do what a binding package would.

How the daemon uses it::

    notifier = Notifier.from_env()
    ...                                  # open the state db, bind the API socket
    notifier.ready("3 servers configured, 0 ready")
    # in the main loop, every notifier.watchdog_interval_s (when not None):
    notifier.watchdog()
    # on SIGHUP: notifier.reloading(); reload; notifier.ready()
    # on SIGTERM: notifier.stopping(); stop all servers; notifier.close()

Nothing here raises into the daemon: without ``$NOTIFY_SOCKET`` (a foreground
run, the tests) every call is a no-op, and a failed send is logged once at debug
level, because a supervisor of GPU servers must never die over a status line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from types import TracebackType

log = logging.getLogger("modelserverd.notify")

# The environment systemd gives the main process for this protocol. Children (the
# SGLang servers) must not inherit it: see strip_notify_env().
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# A blocking send would stall the event loop if systemd stopped reading; a
# datagram that cannot leave in this time is dropped (and logged) instead.
SEND_TIMEOUT_S = 1.0


def strip_notify_env(env: MutableMapping[str, str]) -> None:
    """Remove the notify variables from a child's environment, in place.

    An SGLang server that saw ``NOTIFY_SOCKET`` (gunicorn-style servers do
    sd_notify) would only fill the journal with "reception only permitted for
    main PID" lines, since the unit has ``NotifyAccess=main``.
    """
    for name in NOTIFY_ENV_VARS:
        env.pop(name, None)


def _socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` for
    Linux's abstract namespace (a leading NUL byte). Other forms (``vsock:``, used
    only by virtual machine managers) are not for this daemon: None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8")
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds (systemd's advice: ping at twice the
    rate it checks), or None when the watchdog is off or meant for another process."""
    usec_text = environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None:
        # Set by systemd to the main pid; a different value means this process
        # inherited the variables and is not the one systemd watches.
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends service state to systemd; every method is safe to call anywhere.

    ``enabled`` says whether there is a socket to send to; ``watchdog_interval_s``
    is how often the main loop should call :meth:`watchdog` (None: never).
    """

    def __init__(self, address: str | None = None, watchdog_interval_s: float | None = None):
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s
        self._target = _socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self._failed = False  # a failure was logged and no send has worked since
        if address and self._target is None:
            log.debug("NOTIFY_SOCKET=%r is not a path or @name; not notifying systemd", address)
        if self._target is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(SEND_TIMEOUT_S)
            except OSError as exc:
                log.debug("cannot create the sd_notify socket (%s); not notifying systemd", exc)
                self._sock = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from the environment systemd set up (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, _watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    # --- the messages ---------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is finished: ``systemctl start`` returns."""
        self.send({"READY": "1", **({"STATUS": status} if status is not None else {})})

    def status(self, text: str) -> None:
        """One line shown by ``systemctl status modelserverd``."""
        self.send({"STATUS": text})

    def watchdog(self) -> None:
        """Proof of life; a no-op when the watchdog is off for this process."""
        if self.watchdog_interval_s is not None:
            self.send({"WATCHDOG": "1"})

    def stopping(self) -> None:
        """The daemon has begun stopping its servers (the unit shows deactivating)."""
        self.send({"STOPPING": "1"})

    def reloading(self) -> None:
        """A reload has begun; :meth:`ready` ends it. ``MONOTONIC_USEC`` is what
        systemd >= 253 wants with ``RELOADING=1`` (``Type=notify-reload``); older
        versions ignore it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send({"RELOADING": "1", "MONOTONIC_USEC": str(usec)})

    # --- plumbing -------------------------------------------------------------

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it left.

        Newlines inside a value would start a bogus new field, so they become
        spaces.
        """
        if self._sock is None or self._target is None or not fields:
            return False
        lines = [f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items()]
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            self._sock.sendto(payload, self._target)
        except OSError as exc:  # includes the timeout
            if not self._failed:
                self._failed = True
                log.debug("sd_notify to %s failed (%s); will keep trying", self.address, exc)
            return False
        self._failed = False
        return True

    def close(self) -> None:
        """Release the socket; later calls are no-ops."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Notifier(address={self.address!r}, enabled={self.enabled}, "
            f"watchdog_interval_s={self.watchdog_interval_s!r})"
        )
