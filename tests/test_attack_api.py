"""Attacks on the API by an unprivileged local user (issue 12, items 1, 2, 5, 6, 8, 11).

The attacker is who ``socket_group`` lets in: uid 65534 (nobody), reached by
forking a child that drops to it before it connects (``SO_PEERCRED`` is taken at
connect time). Each test plays one attack from the security review and checks
that the daemon keeps serving everyone else, that the attacker gets a clean error
saying what to do, and that nothing it sent stops, ejects or steers a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import socket
import stat
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_api import (
    NOBODY,
    RESTART_A,
    ApiServer,
    _UnixHTTPConnection,
    call,
    start_api,
    stop_api,
)

from supervisord_ms import api as api_module
from supervisord_ms.api import (
    CTX_KEY,
    KEEPALIVE_TIMEOUT_S,
    LIVE_CHECK_DEADLINE_S,
    MAX_CONNECTIONS_PER_UID,
    MAX_HISTORY_READS,
    MAX_HISTORY_ROWS,
    MAX_HISTORY_WAITERS,
    SAMPLE_BURST_PER_UID,
    SAMPLE_RATE_PER_UID,
    ConnectionGate,
    RateLimiter,
    SocketError,
    SocketInUse,
    connection_limits,
    serve_unix,
)
from supervisord_ms.apiclient import DaemonUnreachable
from supervisord_ms.apiclient import call as api_call

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")

OTHER = 65533  # a second unprivileged user
USERS_GID = 100  # the "users" group, the admin_group of these tests


# --- an attacker in a child process -------------------------------------------------------


class AsUser:
    """A forked child that becomes another user and runs ``fn``; ``fn``'s result
    (JSON) comes back through a pipe. The child then holds whatever it opened until
    :meth:`release`. ``become`` replaces the plain drop to ``uid`` (for the tests that
    change identity after connecting)."""

    def __init__(
        self,
        fn: Callable[[], Any],
        *,
        uid: int = NOBODY,
        gid: int | None = None,
        groups: tuple[int, ...] = (),
        become: Callable[[], None] | None = None,
    ):
        result_r, result_w = os.pipe()
        release_r, release_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no pytest, no logging, just the attack
            code = 0
            try:
                os.close(result_r)
                os.close(release_w)
                if become is not None:
                    become()
                else:
                    os.setgroups(list(groups))
                    os.setgid(uid if gid is None else gid)
                    os.setuid(uid)
                out = json.dumps({"ok": fn()})
            except BaseException:  # noqa: BLE001 - report anything to the parent
                out = json.dumps({"error": traceback.format_exc()})
                code = 1
            try:
                os.write(result_w, out.encode() + b"\n")
                os.close(result_w)
                os.read(release_r, 1)
            finally:
                os._exit(code)
        os.close(result_w)
        os.close(release_r)
        self.pid = pid
        self._result_r = result_r
        self._release_w = release_w
        self._result: Any = None
        self._done = False

    def result(self, timeout: float = 30) -> Any:
        if not self._done:
            data = b""
            deadline = time.monotonic() + timeout
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._result_r], [], [], max(0.0, left))
                if not ready:
                    self.release()
                    raise AssertionError(f"the child did not answer within {timeout} s")
                chunk = os.read(self._result_r, 1 << 20)
                if not chunk:
                    break
                data += chunk
            os.close(self._result_r)
            self._done = True
            answer = json.loads(data)
            if "error" in answer:
                self.release()
                raise AssertionError(f"the child failed:\n{answer['error']}")
            self._result = answer["ok"]
        return self._result

    def release(self) -> None:
        if self._release_w is not None:
            with contextlib.suppress(OSError):
                os.close(self._release_w)
            self._release_w = None
            os.waitpid(self.pid, 0)


def as_user(fn: Callable[[], Any], **kwargs: Any) -> Any:
    child = AsUser(fn, **kwargs)
    try:
        return child.result()
    finally:
        child.release()


def request(path: str, method: str, url: str, body: Any = None, timeout: float = 10) -> dict:
    """One request as whoever runs it; (status, json, headers) as a dict."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, url, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return {
            "status": resp.status,
            "json": json.loads(raw) if raw else None,
            "headers": {k.lower(): v for k, v in resp.getheaders()},
        }
    finally:
        conn.close()


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A folder every user may enter but only root may write (as /run/modelserverd)."""
    path = tempfile.mkdtemp(prefix="msd-attack-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared_api(open_dir: str) -> Iterator[ApiServer]:
    """The API on a socket every user may connect to, admin_group = users."""
    server = start_api(Path(open_dir), sock=f"{open_dir}/api.sock", mode=0o666, admin_group="users")
    yield server
    stop_api(server)


def _ready(api: ApiServer, **latencies: float) -> None:
    for name, latency in latencies.items():
        api.set_ready(name, latency)


def _best(api: ApiServer, size: str = "8B") -> list[str]:
    r = api.get(f"/v1/best?model_size={size}&n=8")
    return [c["name"] for c in r.json["candidates"]] if r.status == 200 else []


# --- item 1: connections ---------------------------------------------------------------------


def test_one_user_cannot_hold_more_than_its_share_of_connections(shared_api: ApiServer) -> None:
    """Holding hundreds of connections took every descriptor; now one uid gets
    MAX_CONNECTIONS_PER_UID and the rest a 503 at once, and others are served."""
    path = shared_api.sock

    def hog() -> dict:
        held = []
        for _ in range(MAX_CONNECTIONS_PER_UID + 172):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            held.append(s)
        time.sleep(0.5)
        refused, open_, answer = 0, 0, b""
        for s in held:
            s.setblocking(False)
            try:
                data = s.recv(4096)
            except BlockingIOError:
                open_ += 1
                continue
            refused += 1
            answer = answer or data
        return {"open": open_, "refused": refused, "answer": answer.decode()}

    child = AsUser(hog)
    try:
        got = child.result()
        assert got["open"] == MAX_CONNECTIONS_PER_UID, got
        assert got["refused"] == 172
        head, _, body = got["answer"].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 503"), head
        err = json.loads(body)["error"]
        assert err["code"] == "too_many_connections"
        assert f"uid {NOBODY}" in err["message"] and "close idle ones" in err["message"]
        # While the attacker holds its share: root, and another user, are served.
        status = shared_api.get("/v1/status")
        assert status.status == 200
        assert status.json["api"]["connections_refused"] >= 172
        other = as_user(lambda: request(path, "GET", "/v1/servers")["status"], uid=OTHER)
        assert other == 200
    finally:
        child.release()
    # Its connections closed, the attacker is served again.
    deadline = time.monotonic() + 5
    while as_user(lambda: request(path, "GET", "/v1/status")["status"]) != 200:
        assert time.monotonic() < deadline, "the attacker's closed connections still count"
        time.sleep(0.1)


def test_idle_keepalive_connections_are_closed(shared_api: ApiServer) -> None:
    """A connection idle after its answer is closed within KEEPALIVE_TIMEOUT_S."""
    path = shared_api.sock

    def idle() -> float | None:
        socks = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /v1/sizes HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
            assert s.recv(12) == b"HTTP/1.1 200"
            socks.append(s)
        began = time.monotonic()
        open_ = set(socks)
        while open_ and time.monotonic() - began < 3 * KEEPALIVE_TIMEOUT_S:
            ready, _, _ = select.select(list(open_), [], [], 0.5)
            for s in ready:
                with contextlib.suppress(OSError):
                    while s.recv(65536):
                        pass
                open_.discard(s)
        return None if open_ else time.monotonic() - began

    took = as_user(idle)
    assert took is not None, "idle keep-alive connections were never closed"
    assert took <= KEEPALIVE_TIMEOUT_S + 2


def test_connection_limits_leave_a_descriptor_reserve() -> None:
    # (open-files limit) -> (total, per uid, admin reserve)
    table = {
        300: (44, 16, 11),
        1024: (768, 128, 16),
        65536: (4096, 128, 16),
        None: (4096, 128, 16),
        100: (16, 6, 4),
    }
    for nofile, expected in table.items():
        lim = connection_limits(nofile)
        assert (lim.total, lim.per_uid, lim.admin_reserve) == expected, nofile
        if nofile is not None and nofile > 300:
            assert nofile - lim.total >= api_module.DESCRIPTOR_RESERVE


def test_connection_gate_keeps_room_for_admins() -> None:
    gate = ConnectionGate(connection_limits(300))  # 44 in all, 11 for admins, 16 per uid
    n = 0
    for uid in (1000, 1001, 1002):
        while gate.refusal(uid, False) is None:
            gate.opened(("h", n), uid)
            n += 1
    assert gate.by_uid == {1000: 16, 1001: 16, 1002: 1}
    assert "as many as it takes" in (gate.refusal(1003, False) or "")
    while gate.refusal(0, True) is None:
        gate.opened(("h", n), 0)
        n += 1
    assert gate.total == 44
    gate.closed(("h", 0))
    assert gate.by_uid[1000] == 15 and gate.refusal(1000, False) is not None
    assert gate.refusal(0, True) is None


# --- item 2: samples --------------------------------------------------------------------------


def _post_as(uid: int, path: str, samples: list[dict]) -> dict:
    return as_user(lambda: request(path, "POST", "/v1/samples", {"samples": samples}), uid=uid)


def test_one_user_cannot_eject_servers_by_reporting_failures(shared_api: ApiServer) -> None:
    """Three ok:false samples per server made /v1/best answer 503 for every size."""
    _ready(shared_api, a=0.4, b=0.5, c=2.0)
    failures = [
        {"server": name, "ok": False, "latency_s": None, "error": "first token deadline"}
        for name in ("a", "b", "c")
        for _ in range(30)
    ]
    # From two processes of the same user: still one user.
    for _ in range(2):
        assert _post_as(NOBODY, shared_api.sock, failures)["status"] == 202
    assert _best(shared_api, "8B") == ["a", "b"]
    assert _best(shared_api, "70B") == ["c"]
    for name in ("a", "b", "c"):
        assert not shared_api.get(f"/v1/servers/{name}").json["ejected"], name


def test_failures_eject_when_a_second_user_or_a_probe_agrees(shared_api: ApiServer) -> None:
    _ready(shared_api, a=0.4, b=0.5, c=2.0)
    fail = {"ok": False, "latency_s": None, "error": "connection refused"}
    # Two users see b fail: b is out.
    _post_as(NOBODY, shared_api.sock, [{"server": "b", **fail}] * 2)
    assert _best(shared_api) == ["a", "b"]
    _post_as(OTHER, shared_api.sock, [{"server": "b", **fail}])
    assert _best(shared_api) == ["a"]
    # One user sees a fail, and the daemon's next probe fails too: a is out.
    _post_as(NOBODY, shared_api.sock, [{"server": "a", **fail}] * 3)
    assert "a" in _best(shared_api)

    def probe_fails() -> None:
        shared_api.registry.record_sample("a", ok=False, latency_s=None, source="probe")

    shared_api.loop.call(probe_fails)
    assert _best(shared_api) == []
    # Client reports never eject the last server of a size, whoever sends them.
    _post_as(NOBODY, shared_api.sock, [{"server": "c", **fail}] * 3)
    _post_as(OTHER, shared_api.sock, [{"server": "c", **fail}] * 3)
    assert _best(shared_api, "70B") == ["c"]


def test_fake_latencies_cannot_put_a_chosen_server_first(shared_api: ApiServer) -> None:
    """Fake latencies put a chosen server first; now a client's latency counts only
    within CLIENT_SAMPLE_BAND of what the probes measure, once per interval."""
    from supervisord_ms.registry import CLIENT_SAMPLE_BAND

    _ready(shared_api, a=0.4, b=0.9)

    def lies(n: int) -> list[dict]:
        return [{"server": "b", "ok": True, "latency_s": 0.001}] * n + [
            {"server": "a", "ok": True, "latency_s": 900.0}
        ] * n

    assert _post_as(NOBODY, shared_api.sock, lies(500))["status"] == 202
    for _ in range(2):
        time.sleep(1.05)  # the test config probes every 1 s: one more count each
        assert _post_as(NOBODY, shared_api.sock, lies(40))["status"] == 202
    assert _best(shared_api)[0] == "a"
    servers = {s["name"]: s for s in shared_api.get("/v1/servers").json["servers"]}
    assert servers["b"]["latency_s"] >= 0.9 / CLIENT_SAMPLE_BAND - 1e-9
    assert servers["a"]["latency_s"] <= 0.4 * CLIENT_SAMPLE_BAND + 1e-9
    # The samples are still recorded as sent: the history is the clients' word.
    assert len(shared_api.db_samples(server="b")) == 580


def test_a_sample_flood_is_rate_limited_per_user(shared_api: ApiServer) -> None:
    """One process sent 33,000 samples/s; now each uid gets SAMPLE_RATE_PER_UID/s."""
    _ready(shared_api, c=2.0)
    path = shared_api.sock

    def flood() -> dict:
        body = {"samples": [{"server": "c", "ok": True, "latency_s": 1.0}] * 1000}
        accepted, refused, first_refusal = 0, 0, None
        began = time.monotonic()
        while time.monotonic() - began < 1.5:
            r = request(path, "POST", "/v1/samples", body)
            if r["status"] == 202:
                accepted += r["json"]["accepted"]
            else:
                refused += 1
                first_refusal = first_refusal or r
        return {
            "accepted": accepted,
            "refused": refused,
            "refusal": first_refusal,
            "s": time.monotonic() - began,
        }

    got = as_user(flood)
    bound = SAMPLE_BURST_PER_UID + SAMPLE_RATE_PER_UID * got["s"] + 1000
    assert got["accepted"] <= bound, got
    assert got["refused"] >= 1
    refusal = got["refusal"]
    assert refusal["status"] == 429
    assert refusal["json"]["error"]["code"] == "rate_limited"
    assert "per second" in refusal["json"]["error"]["message"]
    assert int(refusal["headers"]["retry-after"]) >= 1
    assert len(shared_api.db_samples(server="c")) <= bound
    # Another user's bucket is its own.
    assert _post_as(OTHER, path, [{"server": "c", "ok": True, "latency_s": 1.0}])["status"] == 202


def test_rate_limiter_table() -> None:
    lim = RateLimiter(rate=10.0, burst=100.0)
    assert lim.take(1, 100, now=0.0) == 0.0
    assert lim.take(1, 1, now=0.0) == pytest.approx(0.1)
    assert lim.take(2, 50, now=0.0) == 0.0  # another key, its own bucket
    assert lim.take(1, 10, now=1.0) == 0.0  # refilled 10 in a second
    assert lim.take(1, 100, now=2.0) == pytest.approx(9.0)  # nothing taken on refusal
    assert lim.take(1, 10, now=2.0) == 0.0


# --- item 5: history reads ---------------------------------------------------------------------


def test_history_answers_at_most_a_thousand_rows(shared_api: ApiServer) -> None:
    """One GET /v1/latency?limit=10000 returned 241 MB."""
    for i in range(MAX_HISTORY_ROWS + 500):
        shared_api.writer.add_sample(server="c", source="probe", ok=True, latency_s=i / 1000)
    assert shared_api.writer.flush(20)
    got = as_user(lambda: request(shared_api.sock, "GET", "/v1/latency?limit=10000"))
    assert got["status"] == 200
    assert len(got["json"]["samples"]) == MAX_HISTORY_ROWS
    assert got["json"]["limit"] == MAX_HISTORY_ROWS
    assert shared_api.get("/v1/latency?limit=10001").status == 400


def test_events_read_by_another_user_are_capped_too(shared_api: ApiServer) -> None:
    for i in range(MAX_HISTORY_ROWS + 10):
        shared_api.writer.add_event(server="c", kind="state", message=f"change {i}")
    assert shared_api.writer.flush(20)
    got = as_user(lambda: request(shared_api.sock, "GET", "/v1/events?limit=10000"))
    assert got["status"] == 200
    assert len(got["json"]["events"]) == MAX_HISTORY_ROWS
    assert shared_api.get("/v1/events?limit=10001").status == 400


class GatedStore:
    """The real store, with history reads held until :attr:`go` is set."""

    def __init__(self, real: Any):
        self.real = real
        self.go = threading.Event()
        self.lock = threading.Lock()
        self.started = 0
        self.running = 0
        self.most = 0

    def latency_samples(self, **kw: Any) -> list[dict]:
        with self.lock:
            self.started += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.go.wait(20)
            return self.real.latency_samples(**kw)
        finally:
            with self.lock:
                self.running -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _gate_store(api: ApiServer) -> GatedStore:
    ctx = api.runner.app[CTX_KEY]
    gated = GatedStore(ctx.store)
    ctx.store = gated
    return gated


def _send_and_wait(path: str, payload: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    s.sendall(payload)
    return s


HISTORY = b"GET /v1/latency?limit=1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_history_reads_are_bounded_and_dropped_when_the_client_leaves(
    shared_api: ApiServer,
) -> None:
    """Reads of a client that left ran on; now reads run MAX_HISTORY_READS at a
    time, a read whose client left while waiting never starts, and a read beyond
    the waiting room is refused at once."""
    gated = _gate_store(shared_api)
    path = shared_api.sock
    running = [_send_and_wait(path, HISTORY) for _ in range(MAX_HISTORY_READS + 2)]
    try:
        _wait_for(lambda: gated.started >= MAX_HISTORY_READS, 5, "reads to start")
        time.sleep(0.3)
        assert gated.started == MAX_HISTORY_READS  # the other two wait
        # Clients that ask and leave at once: their reads never run.
        for _ in range(8):
            _send_and_wait(path, HISTORY).close()
        # The waiting room fills up (2 + 8 left + these), then refusals come at once.
        waiting = [_send_and_wait(path, HISTORY) for _ in range(MAX_HISTORY_WAITERS - 2)]
        running += waiting
        refused = request(path, "GET", "/v1/latency", timeout=5)
        assert refused["status"] == 503, refused
        assert refused["json"]["error"]["code"] == "busy"
        assert refused["headers"]["retry-after"] == "1"
    finally:
        gated.go.set()
    for s in running:
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
        s.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert gated.most <= MAX_HISTORY_READS
    # Every client that stayed was answered; the 8 that left were never read for.
    assert gated.started == len(running)
    assert shared_api.get("/v1/latency").status == 200


# --- item 6: admin rights ------------------------------------------------------------------------


def _gain_groups_after_connecting(path: str, *, become_root: bool) -> Callable[[], str]:
    """The child connects as nobody with no groups (saved uid 0 kept), then gains
    the admin group: the same pid, other rights, as when a pid is reused."""

    def become() -> None:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, 0)
        os.setresuid(NOBODY, NOBODY, 0)

    def attack() -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        os.seteuid(0)
        os.setgroups([USERS_GID])
        if become_root:
            os.setresgid(USERS_GID, USERS_GID, USERS_GID)
            os.setresuid(0, 0, 0)
        else:
            os.seteuid(NOBODY)
        s.sendall(RESTART_A)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data.decode()

    return lambda: as_user(attack, become=become)


def test_groups_gained_after_connecting_do_not_make_an_admin(shared_api: ApiServer) -> None:
    out = _gain_groups_after_connecting(shared_api.sock, become_root=False)()
    assert out.startswith("HTTP/1.1 403"), out[:300]
    assert shared_api.actions.calls == []


def test_a_reused_pid_is_not_taken_for_the_peer(
    shared_api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without SO_PEERGROUPS the groups come from /proc/<pid>/status, and count only
    while that process is still the peer that connected (same uid and gid)."""
    monkeypatch.setattr(api_module, "_SO_PEERGROUPS", None, raising=False)
    out = _gain_groups_after_connecting(shared_api.sock, become_root=True)()
    assert out.startswith("HTTP/1.1 403"), out[:300]
    assert shared_api.actions.calls == []
    # A member that connected with the group is still an admin on the fallback.
    member = as_user(
        lambda: request(shared_api.sock, "POST", "/v1/servers/a/restart")["status"],
        groups=(USERS_GID,),
    )
    assert member == 200
    assert shared_api.actions.calls == [("restart", "a")]


# --- item 8: the socket's folder ----------------------------------------------------------


async def _serve_once_async(path: str, **kw: Any) -> None:
    """serve_unix, cleaned up at once when it succeeds."""
    runner = await serve_unix(web.Application(), path, mode=0o660, **kw)
    await runner.cleanup()


def _serve_once(path: str, **kw: Any) -> None:
    asyncio.run(_serve_once_async(path, **kw))


@pytest.mark.parametrize(
    ("mode", "why"),
    [(0o777, "others"), (0o1777, "others"), (0o775, "its group"), (0o757, "others")],
)
def test_a_socket_folder_others_can_write_is_refused(open_dir: str, mode: int, why: str) -> None:
    folder = Path(open_dir) / "run"
    folder.mkdir()
    os.chown(folder, 0, USERS_GID)  # a group with other members
    os.chmod(folder, mode)
    with pytest.raises(SocketError, match="refusing to create the API socket") as info:
        _serve_once(str(folder / "api.sock"))
    assert why in str(info.value) and "chmod go-w" in str(info.value)
    assert not (folder / "api.sock").exists()


def test_a_folder_writable_by_the_owners_private_group_is_accepted(open_dir: str) -> None:
    """umask 002 (user private groups) makes folders group-writable: only the owner
    is in that group, so the folder is still the owner's alone."""
    import grp

    if grp.getgrgid(0).gr_mem not in ([], ["root"]):
        pytest.skip("the root group has other members here")
    folder = Path(open_dir) / "run"
    folder.mkdir()
    os.chmod(folder, 0o775)  # root:root
    _serve_once(str(folder / "api.sock"))


def test_a_socket_folder_of_another_user_is_refused(open_dir: str) -> None:
    folder = Path(open_dir) / "run"
    folder.mkdir(mode=0o755)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(SocketError, match="belongs to nobody"):
        _serve_once(str(folder / "api.sock"))


def test_a_folder_above_that_others_may_rename_is_refused(open_dir: str) -> None:
    above = Path(open_dir) / "shared"
    above.mkdir()
    os.chmod(above, 0o777)  # no sticky bit: anyone may rename what is inside
    folder = above / "run"
    folder.mkdir(mode=0o755)
    with pytest.raises(SocketError, match="may be written by .*others"):
        _serve_once(str(folder / "api.sock"))


def test_a_symbolic_link_of_another_user_on_the_way_is_refused(open_dir: str) -> None:
    sticky = Path(open_dir) / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    real = Path(open_dir) / "real"
    real.mkdir(mode=0o755)
    link = sticky / "run"
    os.symlink(real, link)
    os.lchown(link, NOBODY, NOBODY)  # nobody could point it elsewhere at any time
    with pytest.raises(SocketError, match="symbolic link"):
        _serve_once(str(link / "api.sock"))
    # The same link owned by root is fine: only root could change it.
    os.lchown(link, 0, 0)
    _serve_once(str(link / "api.sock"))


def test_a_folder_the_daemon_creates_is_its_own_whatever_the_umask(open_dir: str) -> None:
    folder = Path(open_dir) / "new" / "run"
    old = os.umask(0o002)
    try:
        _serve_once(str(folder / "api.sock"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(folder.parent).st_mode) == 0o755


def test_owner_and_mode_are_never_set_through_a_symbolic_link(
    open_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chown/chmod of the socket followed symlinks: whoever swapped the socket for a
    link made the daemon chmod the file it names."""
    victim = Path(open_dir) / "victim"
    victim.write_text("secret")
    os.chmod(victim, 0o600)
    real_socket = socket.socket

    class SwappedAfterBind(real_socket):  # type: ignore[misc,valid-type]
        def bind(self, address: Any) -> None:
            super().bind(address)
            os.unlink(address)
            os.symlink(victim, address)

    monkeypatch.setattr(socket, "socket", SwappedAfterBind)
    try:
        with pytest.raises(SocketError, match="replaced"):
            _serve_once(f"{open_dir}/api.sock", group="nogroup")
    finally:
        monkeypatch.setattr(socket, "socket", real_socket)
    st = os.stat(victim)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == 0
    assert victim.read_text() == "secret"


def test_the_live_daemon_check_has_an_overall_deadline(open_dir: str) -> None:
    """Something that answers one byte at a time held the check for hours."""
    path = f"{open_dir}/api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    stop = threading.Event()

    def trickle() -> None:
        listener.settimeout(0.2)
        conns = []
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, socket.timeout):
                conns.append(listener.accept()[0])
            for c in conns:
                with contextlib.suppress(OSError):
                    c.send(b"H")
        for c in conns:
            c.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    began = time.monotonic()
    try:
        with pytest.raises(SocketInUse, match="pid unknown"):

            async def go() -> None:
                await asyncio.wait_for(_serve_once_async(path), LIVE_CHECK_DEADLINE_S + 10)

            asyncio.run(go())
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert time.monotonic() - began < LIVE_CHECK_DEADLINE_S + 3


def _serve_canned_answer(path: str) -> Callable[[], str]:
    """Another user's program posing as the daemon: it binds ``path`` and answers
    the first request with a made-up status."""

    def pose() -> str:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(4)
        threading.Thread(target=_answer_forever, args=(listener,), daemon=True).start()
        return "listening"

    return pose


def _answer_forever(listener: socket.socket) -> None:
    body = b'{"version": "fake", "pid": 1}'
    while True:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
        conn.close()


def test_commands_send_nothing_to_a_socket_another_user_serves(open_dir: str) -> None:
    """In a shared folder another user bound the socket first; root's
    `modelserverd restart` then talked to the attacker."""
    shared = Path(open_dir) / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path = str(shared / "api.sock")
    poser = AsUser(_serve_canned_answer(path))
    try:
        assert poser.result() == "listening"
        with pytest.raises(DaemonUnreachable, match=f"served by nobody \\(uid {NOBODY}\\)"):
            api_call(path, "POST", "/v1/servers/a/restart")
    finally:
        poser.release()


def test_commands_trust_the_owner_of_a_folder_of_its_own(open_dir: str) -> None:
    """The systemd layout: /run (root, 0755) / modelserverd (the daemon's user)."""
    folder = Path(open_dir) / "modelserverd"
    folder.mkdir(mode=0o755)
    os.chown(folder, NOBODY, NOBODY)
    path = str(folder / "api.sock")
    daemon = AsUser(_serve_canned_answer(path))
    try:
        assert daemon.result() == "listening"
        assert api_call(path, "GET", "/v1/status") == {"version": "fake", "pid": 1}
    finally:
        daemon.release()


def test_commands_read_a_refusal_sent_before_the_request(open_dir: str) -> None:
    """The daemon answers 503 before reading when a user holds too many
    connections; the command shows that answer, not a broken pipe."""
    from supervisord_ms.apiclient import ApiError

    path = f"{open_dir}/api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def refuse() -> None:
        conn, _ = listener.accept()
        conn.send(api_module._refusal_bytes("uid 0 already holds 128 connections"))
        conn.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        with pytest.raises(ApiError, match="already holds") as info:
            api_call(path, "POST", "/v1/samples", {"samples": ["x" * 300000]})
        assert info.value.status == 503 and info.value.code == "too_many_connections"
    finally:
        thread.join(5)
        listener.close()


# --- item 11: a lone surrogate ------------------------------------------------------------


def test_a_lone_surrogate_in_error_is_refused_at_once(shared_api: ApiServer) -> None:
    """It was accepted (202), then dropped by the writer with an ERROR per row."""
    body = b'{"samples": [{"server": "c", "ok": false, "error": "bad \\ud800 text"}]}'

    def post() -> dict:
        conn = _UnixHTTPConnection(shared_api.sock, 10)
        try:
            conn.request("POST", "/v1/samples", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return {"status": resp.status, "json": json.loads(resp.read())}
        finally:
            conn.close()

    got = as_user(post)
    assert got["status"] == 400, got
    err = got["json"]["error"]
    assert err["code"] == "bad_sample" and err["field"] == "error"
    assert "lone surrogate at position 4" in err["message"]
    assert shared_api.db_samples() == []
    assert call(shared_api.sock, "GET", "/v1/status").status == 200


def test_error_text_is_cut_to_200_characters(shared_api: ApiServer) -> None:
    r = shared_api.post(
        "/v1/samples", {"samples": [{"server": "c", "ok": True, "error": "x" * 5000}]}
    )
    assert r.status == 202
    (row,) = shared_api.db_samples()
    assert row["error"] == "x" * api_module.MAX_ERROR_CHARS
