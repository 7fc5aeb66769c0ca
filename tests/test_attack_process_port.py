"""Issue 12, item 3: a local user must not serve a server's traffic.

The attack: while SGLang loads its weights (minutes, its port closed), an
unprivileged user (uid 65534) bound the server's port and answered ``/health``.
The daemon marked the server ``ready`` with root's pid, and ``ms-client complete
"my secret prompt"`` was answered by the attacker's process.

Now, before ``ready`` and at every health check, the listener on ip:port must be
held by the server's own process tree; another listener makes the server
``port_busy``, naming its pid and uid, and no traffic is sent to it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from conftest import free_port
from daemon_harness import wait_until
from other_uid import NOBODY, programs_as_nobody

from supervisord_ms import launcher

# The attacker: an HTTP server that answers 200 to everything (SGLang's /health,
# /v1/models, completions), as an unprivileged user.
SQUATTER = """
import http.server, sys
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"object": "list", "data": [], "text": "served by the attacker"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Answer)
print("listening", flush=True)
server.serve_forever()
"""


@pytest.fixture
def as_nobody() -> Iterator:
    """Start a program as uid 65534; it prints "listening" once it does."""
    yield from programs_as_nobody(b"listening\n")


def test_a_listener_of_another_user_is_foreign_and_named(as_nobody, port: int):
    squatter = as_nobody(SQUATTER, "0.0.0.0", str(port))
    # 0.0.0.0 takes the connections to 127.0.0.1 too.
    check = launcher.check_listeners("127.0.0.1", port, lambda: [os.getpid()])
    assert check.ours == frozenset()
    assert check.foreign == (launcher.PortHolder(squatter.pid, NOBODY),)
    assert check.foreign[0].describe() == f"pid {squatter.pid} (uid {NOBODY})"
    holder = launcher.port_holder("127.0.0.1", port)
    assert holder == launcher.PortHolder(squatter.pid, NOBODY)


def test_a_listener_of_the_servers_own_tree_is_its_own():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        check = launcher.check_listeners("127.0.0.1", port, lambda: [os.getpid()])
        assert len(check.ours) == 1 and check.foreign == ()
        # Known from before: no process tree is read again.
        again = launcher.check_listeners("127.0.0.1", port, lambda: [], known=check.ours)
        assert again == check


def test_one_reading_of_the_listening_sockets_serves_the_periodic_checks():
    """Health checks share a reading up to LISTEN_TABLE_MAX_AGE_S old; a check that
    must be current (the default) reads again."""
    launcher.listeners(1, max_age_s=60.0)  # a reading from before the socket exists
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert launcher.listeners(port, max_age_s=60.0) == []
        fresh = launcher.listeners(port)
        assert [(e.address, e.port) for e in fresh] == [("127.0.0.1", port)]
        assert launcher.listeners(port, max_age_s=1e-9) == fresh  # too old: read again


@pytest.mark.parametrize(
    ("listener", "ip", "takes"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),
        ("::", "127.0.0.1", True),  # unless IPV6_V6ONLY: counted, to be safe
        ("::", "::1", True),
        ("0.0.0.0", "::1", False),
        ("127.0.0.2", "127.0.0.1", False),
        ("::1", "127.0.0.1", False),
        ("127.0.0.1", "localhost", True),
    ],
)
def test_which_listeners_take_a_servers_connections(listener: str, ip: str, takes: bool):
    assert launcher.catches(listener, ip) is takes


def test_a_local_user_on_the_port_while_weights_load_gets_no_traffic(daemon_factory, as_nobody):
    port = free_port()
    d = daemon_factory(
        [{"name": "a", "port": port, "gpus": [0], "extra_args": ["--sim-startup-s", "3"]}]
    ).start()
    ours = d.wait_state("a", "starting")["pid"]
    squatter = as_nobody(SQUATTER, "127.0.0.1", str(port))

    s = d.wait_state("a", "port_busy", 10)
    assert f"pid {squatter.pid} (uid {NOBODY})" in s["last_error"], s["last_error"]
    assert s["pid"] == ours
    states = [r[0] for r in d.query("select new_state from events where server = 'a'")]
    assert "ready" not in states, "the attacker's /health made the server ready"

    squatter.kill()
    squatter.wait(10)
    # Either SGLang binds once the port is free, or it failed to bind and is launched
    # again (not counted as a failure): the server ends up ready on its own listener.
    s = d.wait_state("a", "ready", 30)
    assert launcher.port_listener("127.0.0.1", port) == s["pid"]
    assert s["consecutive_failures"] == 0
    busy = d.query("select message from events where server = 'a' and new_state = 'port_busy'")
    assert busy and f"uid {NOBODY}" in busy[0][0]


def test_a_local_user_holding_the_port_before_launch_is_named(daemon_factory, as_nobody):
    port = free_port()
    squatter = as_nobody(SQUATTER, "127.0.0.1", str(port))
    d = daemon_factory([{"name": "a", "port": port, "gpus": [0]}]).start()
    s = d.wait_state("a", "port_busy", 10)
    assert f"pid {squatter.pid} (uid {NOBODY})" in s["last_error"], s["last_error"]
    assert s["pid"] is None  # nothing launched onto a taken port
    squatter.kill()
    squatter.wait(10)
    wait_until(lambda: d.server("a")["state"] == "ready", 20, "ready once the port is free")


def test_a_launch_that_loses_its_port_to_a_local_user_is_not_counted(daemon_factory, as_nobody):
    # With max_failures = 1 a counted failure would make the server fatal at once.
    port = free_port()
    d = daemon_factory(
        [{"name": "a", "port": port, "gpus": [0], "extra_args": ["--sim-startup-s", "1.5"]}],
        restart={"max_failures": 1},
    ).start()
    d.wait_state("a", "starting")
    squatter = as_nobody(SQUATTER, "127.0.0.1", str(port))
    d.wait_state("a", "port_busy", 10)

    def not_counted() -> bool:
        rows = d.query("select message from events where server = 'a' and new_state = 'backoff'")
        return any("not counted" in r[0] for r in rows)

    # The simulated SGLang finds its port taken when its weights are loaded, and exits.
    wait_until(not_counted, 15, "a backoff that is not counted")
    squatter.kill()
    squatter.wait(10)
    s = d.wait_state("a", "ready", 30)
    assert s["consecutive_failures"] == 0
    rows = d.query("select reason, message from restarts where server = 'a'")
    assert len(rows) == 1 and rows[0][0] == "crash"
    assert f"uid {NOBODY}" in rows[0][1]
    states = [r[0] for r in d.query("select new_state from events where server = 'a'")]
    assert "fatal" not in states
