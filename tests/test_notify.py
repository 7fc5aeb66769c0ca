"""sd_notify: the exact datagrams systemd would receive.

Each test owns the receiving datagram socket (a path, or an abstract ``@name``,
which sd_notify(3) accepts too), builds the Notifier from a fake environment,
and reads what arrived. A message that must not be sent is checked by sending a
marker right after it: datagrams on one socket keep their order, so the marker
arriving first proves nothing came before it, without sleeping. The last test
runs the real daemon the way systemd starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import free_port

from supervisord_ms.notify import NOTIFY_ENV_VARS, Notifier, strip_notify_env


class Receiver:
    """The systemd side: a bound datagram socket and what was sent to it."""

    def __init__(self, sock: socket.socket, env_value: str):
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET would hold
        sock.settimeout(2.0)

    def next(self) -> bytes:
        return self.sock.recv(65536)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(65536)
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # A short directory of our own: AF_UNIX paths are limited to 107 bytes and
    # pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="ms-notify-") as folder:
        path = os.path.join(folder, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield Receiver(sock, path)
        finally:
            sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"modelserverd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert notifier.enabled is False
    assert notifier.watchdog_interval_s is None
    notifier.ready("up")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.reloading()
    notifier.close()


def test_ready_status_watchdog_stopping_exact_messages(receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "30000000"}
    with Notifier.from_env(env) as notifier:
        assert notifier.enabled is True
        assert notifier.watchdog_interval_s == 15.0
        notifier.ready()
        assert receiver.next() == b"READY=1"
        notifier.ready("2 of 3 servers ready")
        assert receiver.next() == b"READY=1\nSTATUS=2 of 3 servers ready"
        notifier.status("llama8b-a starting")
        assert receiver.next() == b"STATUS=llama8b-a starting"
        notifier.watchdog()
        assert receiver.next() == b"WATCHDOG=1"
        notifier.stopping()
        assert receiver.next() == b"STOPPING=1"
    receiver.assert_empty()


def test_reloading_carries_the_monotonic_clock(receiver: Receiver) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value}) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver.next())
    assert match, "expected RELOADING=1 then MONOTONIC_USEC=<microseconds>"
    assert before <= int(match.group(1)) <= after


def test_abstract_socket_name(abstract_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": abstract_receiver.env_value, "WATCHDOG_USEC": "2000000"}
    with Notifier.from_env(env) as notifier:
        assert notifier.enabled is True
        assert notifier.watchdog_interval_s == 1.0
        notifier.ready("up")
        notifier.watchdog()
    assert abstract_receiver.next() == b"READY=1\nSTATUS=up"
    assert abstract_receiver.next() == b"WATCHDOG=1"


def test_watchdog_pid_of_this_process_keeps_the_watchdog(receiver: Receiver) -> None:
    env = {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    with Notifier.from_env(env) as notifier:
        assert notifier.watchdog_interval_s == 15.0
        notifier.watchdog()
    assert receiver.next() == b"WATCHDOG=1"


def test_watchdog_pid_mismatch_disables_only_the_watchdog(receiver: Receiver) -> None:
    env = {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    with Notifier.from_env(env) as notifier:
        assert notifier.watchdog_interval_s is None
        notifier.watchdog()  # must send nothing
        notifier.status("marker")
    assert receiver.next() == b"STATUS=marker"
    receiver.assert_empty()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "thirty"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"},
    ],
)
def test_watchdog_off_for_missing_or_bad_values(receiver: Receiver, extra: dict) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value, **extra}) as notifier:
        assert notifier.watchdog_interval_s is None
        notifier.watchdog()
        notifier.status("marker")
    assert receiver.next() == b"STATUS=marker"


def test_newlines_in_a_status_cannot_forge_fields(receiver: Receiver) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value}) as notifier:
        notifier.status("bad model\nREADY=1")
    assert receiver.next() == b"STATUS=bad model READY=1"


def test_failed_send_never_raises_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with tempfile.TemporaryDirectory(prefix="ms-notify-") as folder:
        missing = os.path.join(folder, "nobody-listens.sock")
        caplog.set_level(logging.DEBUG, logger="modelserverd.notify")
        with Notifier.from_env({"NOTIFY_SOCKET": missing, "WATCHDOG_USEC": "1000000"}) as n:
            assert n.enabled is True
            n.ready("up")
            n.watchdog()
            n.status("still no systemd")
            assert n.send({"STATUS": "x"}) is False
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG


def test_unsupported_address_disables_notification() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert notifier.enabled is False
    notifier.ready()


def test_calls_after_close_are_no_ops(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    notifier.close()
    notifier.close()
    notifier.ready()
    assert notifier.enabled is False
    receiver.assert_empty()


def test_strip_notify_env_keeps_children_away_from_systemd() -> None:
    env = {name: "x" for name in NOTIFY_ENV_VARS} | {"PATH": "/usr/bin"}
    strip_notify_env(env)
    assert env == {"PATH": "/usr/bin"}


# --- the real daemon ----------------------------------------------------------------


def test_real_daemon_tells_systemd_ready_watchdog_and_stopping(
    daemon_factory, receiver: Receiver
) -> None:
    """``modelserverd run`` as systemd starts it (NOTIFY_SOCKET, WATCHDOG_USEC), with
    one simulated server: READY=1 first, then WATCHDOG=1 at the requested rate and a
    STATUS that follows the server to ready, then STOPPING=1 on SIGTERM."""
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    env = dict(os.environ, NOTIFY_SOCKET=receiver.env_value, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    d.start(env=env)

    first = receiver.next().decode()
    assert first.startswith("READY=1\nSTATUS=1 servers: "), first

    pings = 0
    statuses: list[str] = []
    deadline = time.monotonic() + 20
    while (pings < 3 or not any("1 ready" in s for s in statuses)) and time.monotonic() < deadline:
        message = receiver.next().decode()
        if message == "WATCHDOG=1":
            pings += 1
        else:
            assert message.startswith("STATUS="), message
            statuses.append(message)
    assert pings >= 3, f"{pings} watchdog pings; daemon log:\n{d.log()}"
    assert any("1 ready" in s for s in statuses), f"{statuses}\n{d.log()}"

    assert d.stop() == 0
    rest = []
    receiver.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            rest.append(receiver.sock.recv(65536).decode())
    assert "STOPPING=1" in rest, rest
