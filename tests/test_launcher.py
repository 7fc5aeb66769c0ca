"""Launching SGLang: argv and environment, spawning, stopping whole process trees, ports, logs."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from supervisord_ms import launcher
from supervisord_ms.config import ServerConfig, SglangConfig
from supervisord_ms.launcher import (
    LaunchError,
    LaunchSpec,
    OwnedProcess,
    Spawned,
    allocate_nccl_ports,
    build_launch,
    decode_processes,
    descendants,
    free_tcp_port,
    kill_leftovers,
    port_listener,
    rotate_log,
    spawn,
    stop_tree,
)

PY = sys.executable
NO_SUCH_PID = 2**22 + 1  # above Linux's PID_MAX_LIMIT: never a live pid
WEIRD_PATH = '/models/my model "q" it\'s $HOME;rm -rf /nonexistent-ms-test `id` *'

# A stand-in for `python -m sglang.launch_server`: reports what it was given, on
# stdout and stderr, then lives for $FAKE_SLEEP seconds.
FAKE_SGLANG = """
import json, os, sys, time
names = ["CUDA_VISIBLE_DEVICES", "A", "B", "C", "MS_TEST_INHERITED"]
print(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in names}}))
sys.stdout.flush()
print("fake-sglang: to stderr", file=sys.stderr, flush=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""

# A server with a process tree like SGLang's: two children, the second of which
# leaves the process group (as a re-parented scheduler effectively does). It writes
# the children's pids to argv[1] once its signal disposition is in place.
TREE = """
import os, signal, sys, time
pidfile, kids, ignore_term = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "ignore"
pids = []
for i in range(kids):
    pid = os.fork()
    if pid == 0:
        if i == 1:
            os.setsid()
        time.sleep(30)
        os._exit(0)
    pids.append(pid)
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(pidfile + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(pidfile + ".tmp", pidfile)
time.sleep(30)
"""


def make_server(gpus: tuple[int, ...] = (0,), **kw: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "name": "s",
        "ip": "10.0.0.5",
        "port": 30000,
        "model_size": "8B",
        "model_path": "/models/m",
        "gpus": gpus,
    }
    values.update(kw)
    return ServerConfig(**values)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture
def cleanup() -> Iterator[Callable[[Any], Any]]:
    """Register every process right after starting it; all are SIGKILLed at teardown."""
    owned: list[OwnedProcess] = []
    popens: list[subprocess.Popen[bytes]] = []
    groups: list[OwnedProcess] = []

    def register(obj: Any) -> Any:
        if isinstance(obj, Spawned):
            popens.append(obj.popen)
            groups.append(obj.owned)
        elif isinstance(obj, subprocess.Popen):
            popens.append(obj)
        elif isinstance(obj, OwnedProcess):
            owned.append(obj)
        else:
            raise TypeError(obj)
        return obj

    yield register
    for leader in groups:
        if leader.alive():  # while the leader lives, its pid is our group's id
            os.killpg(leader.pid, signal.SIGKILL)
    for proc in owned:
        proc.signal(signal.SIGKILL)
    for popen in popens:
        if popen.poll() is None:
            popen.kill()
        popen.wait(timeout=10)


@pytest.fixture
def fake_sglang(tmp_path: Path) -> SglangConfig:
    (tmp_path / "fake_sglang.py").write_text(FAKE_SGLANG)
    return SglangConfig(
        python=PY,
        module="fake_sglang",
        extra_args=("--log-level", "warning"),
        env={"PYTHONPATH": str(tmp_path), "A": "from-sglang", "B": "from-sglang"},
    )


def fake_report(log: Path) -> dict[str, Any]:
    """The JSON line the fake server printed into its log."""
    text = wait_for(lambda: "to stderr" in log.read_text() and log.read_text(), what="log")
    line = next(ln for ln in text.splitlines() if ln.startswith("{"))
    return json.loads(line)


# --- argv and environment -------------------------------------------------------------


@pytest.mark.parametrize("gpus", [(0,), (0, 1), tuple(range(8)), (3, 1)])
def test_build_launch_argv(gpus: tuple[int, ...]):
    server = make_server(gpus, extra_args=("--mem-fraction-static", "0.85"))
    sglang = SglangConfig(extra_args=("--log-level", "warning"))
    spec = build_launch(server, sglang, nccl_port=41000)
    assert list(spec.argv) == [
        "python3",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "/models/m",
        "--host",
        "10.0.0.5",
        "--port",
        "30000",
        "--tp-size",
        str(len(gpus)),
        "--nccl-port",
        "41000",
        "--enable-metrics",
        "--log-level-http",
        "warning",
        "--log-level",
        "warning",
        "--mem-fraction-static",
        "0.85",
    ]
    assert "--tp" not in spec.argv
    assert spec.env == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}


HEAD = ["--nccl-port", "1"]  # what precedes the default flags


@pytest.mark.parametrize(
    ("sglang_args", "server_args", "after_nccl_port"),
    [
        # Nothing given: both defaults.
        ((), (), ["--enable-metrics", "--log-level-http", "warning"]),
        # The user's own --log-level-http (either spelling, either section) stands alone.
        (
            ("--log-level-http", "info"),
            (),
            ["--enable-metrics", "--log-level-http", "info"],
        ),
        (
            (),
            ("--log-level-http=debug",),
            ["--enable-metrics", "--log-level-http=debug"],
        ),
        # --enable-metrics given by the user is not repeated.
        (
            ("--enable-metrics",),
            ("--log-level-http", "error"),
            ["--enable-metrics", "--log-level-http", "error"],
        ),
        (
            (),
            ("--enable-metrics", "--mem-fraction-static", "0.8"),
            ["--log-level-http", "warning", "--enable-metrics", "--mem-fraction-static", "0.8"],
        ),
        # Flags that only start alike are other flags: the defaults still come.
        (
            ("--log-level", "info", "--enable-metrics-for-all-schedulers"),
            (),
            [
                "--enable-metrics",
                "--log-level-http",
                "warning",
                "--log-level",
                "info",
                "--enable-metrics-for-all-schedulers",
            ],
        ),
    ],
)
def test_default_flags_yield_to_the_users_own(
    sglang_args: tuple[str, ...], server_args: tuple[str, ...], after_nccl_port: list[str]
):
    spec = build_launch(
        make_server(extra_args=server_args), SglangConfig(extra_args=sglang_args), nccl_port=1
    )
    argv = list(spec.argv)
    assert argv[argv.index("--nccl-port") :] == HEAD + after_nccl_port


def test_cuda_visible_devices_joined_by_commas():
    cases = {(0,): "0", (0, 1): "0,1", tuple(range(8)): "0,1,2,3,4,5,6,7", (6, 2): "6,2"}
    for gpus, expected in cases.items():
        spec = build_launch(make_server(gpus), SglangConfig(), nccl_port=1)
        assert spec.env["CUDA_VISIBLE_DEVICES"] == expected


def test_env_merge_order():
    sglang = SglangConfig(env={"A": "sglang", "B": "sglang"})
    server = make_server((2,), env={"B": "server", "C": "server"})
    spec = build_launch(server, sglang, nccl_port=1)
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "2", "A": "sglang", "B": "server", "C": "server"}


def test_interpreter_and_module_come_from_sglang_section():
    sglang = SglangConfig(python="/opt/sglang/bin/python", module="supervisord_ms.sim")
    spec = build_launch(make_server(), sglang, nccl_port=1)
    assert spec.argv[:3] == ("/opt/sglang/bin/python", "-m", "supervisord_ms.sim")


def test_hostile_model_path_stays_one_argv_element():
    sglang = SglangConfig(env={"NOTE": "two words 'and' \"quotes\" $HOME"})
    spec = build_launch(make_server(model_path=WEIRD_PATH), sglang, nccl_port=1)
    assert spec.argv[3:5] == ("--model-path", WEIRD_PATH)
    assert spec.argv.count(WEIRD_PATH) == 1
    expected = [f"{k}={v}" for k, v in spec.env.items()] + list(spec.argv)
    assert shlex.split(spec.shell_line(reveal=True)) == expected


def test_shell_line_run_by_a_shell_gives_the_same_argv(fake_sglang: SglangConfig):
    # The copy-pasteable line, run by a real shell, starts exactly the daemon's argv.
    spec = build_launch(make_server((0, 1), model_path=WEIRD_PATH), fake_sglang, nccl_port=41000)
    done = subprocess.run(
        ["sh", "-c", spec.shell_line(reveal=True)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["argv"] == list(spec.argv[3:])
    assert report["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_shell_line_without_env():
    spec = LaunchSpec(argv=("python3", "-m", "m", "--x", "a b"), env={})
    assert spec.shell_line() == "python3 -m m --x 'a b'"


# --- NCCL ports -----------------------------------------------------------------------


def test_allocate_nccl_ports_are_distinct_and_not_server_ports():
    servers = [make_server(name=f"s{i}", port=30000 + i) for i in range(4)]
    ports = allocate_nccl_ports(servers)
    assert set(ports) == {"s0", "s1", "s2", "s3"}
    assert len(set(ports.values())) == 4
    assert not set(ports.values()) & {s.port for s in servers}
    assert all(1 <= p <= 65535 for p in ports.values())


class _ScriptedSocket:
    """Stands in for socket.socket in launcher: hands out the ports of a script."""

    script: Iterator[int] = iter(())

    def __init__(self, *args: Any) -> None:
        self.port = next(type(self).script)

    def __enter__(self) -> _ScriptedSocket:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def bind(self, address: Any) -> None:
        return None

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def _script_ports(monkeypatch: pytest.MonkeyPatch, ports: Iterator[int]) -> None:
    _ScriptedSocket.script = ports
    fake = SimpleNamespace(
        socket=_ScriptedSocket, AF_INET=socket.AF_INET, SOCK_STREAM=socket.SOCK_STREAM
    )
    monkeypatch.setattr(launcher, "socket", fake)


def test_allocate_nccl_ports_skips_server_ports_and_each_other(monkeypatch: pytest.MonkeyPatch):
    # The kernel may hand out a configured server port or one already given out.
    _script_ports(monkeypatch, iter([30000, 30001, 30000, 45000, 45000, 30001, 45001]))
    servers = [make_server(name="a", port=30000), make_server(name="b", port=30001)]
    assert allocate_nccl_ports(servers) == {"a": 45000, "b": 45001}


def test_free_tcp_port_gives_up_with_launch_error(monkeypatch: pytest.MonkeyPatch):
    _script_ports(monkeypatch, iter([30000] * 1000))
    with pytest.raises(LaunchError, match="no free TCP port"):
        free_tcp_port(exclude=[30000])


# --- spawn ----------------------------------------------------------------------------


def test_spawn_runs_in_own_session_and_logs_everything(
    tmp_path: Path,
    fake_sglang: SglangConfig,
    cleanup: Callable[[Any], Any],
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the daemon's own: must not leak
    monkeypatch.setenv("MS_TEST_INHERITED", "yes")
    monkeypatch.setenv("FAKE_SLEEP", "30")
    server = make_server((0, 1), model_path=WEIRD_PATH, env={"B": "from-server", "C": "c"})
    spec = build_launch(server, fake_sglang, nccl_port=41000)
    log = tmp_path / "logs" / "s.log"  # the folder is created on demand
    spawned = cleanup(spawn(spec, log))

    assert spawned.owned.pid == spawned.pid
    assert spawned.owned.alive()
    assert spawned.cmdline == list(spec.argv)
    assert os.getsid(spawned.pid) == spawned.pid
    assert os.getpgid(spawned.pid) == spawned.pid
    report = fake_report(log)
    assert report["argv"] == list(spec.argv[3:])
    assert report["env"] == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "A": "from-sglang",
        "B": "from-server",
        "C": "c",
        "MS_TEST_INHERITED": "yes",
    }
    text = log.read_text()
    assert f"modelserverd launching: {spec.shell_line()}\n" in text
    launching = next(ln for ln in text.splitlines() if "modelserverd launching" in ln)
    assert "B=*** C=*** CUDA_VISIBLE_DEVICES=0,1 " in launching
    assert "from-server" not in launching  # values of env entries are masked
    assert text.index("modelserverd launching") < text.index("fake-sglang: to stderr")
    assert "fake-sglang: to stderr" in text


def test_spawn_appends_to_the_log(
    tmp_path: Path, fake_sglang: SglangConfig, cleanup: Callable[[Any], Any]
):
    log = tmp_path / "s.log"
    log.write_text("from before\n")
    spec = build_launch(make_server(), fake_sglang, nccl_port=41000)
    for _ in range(2):
        spawned = cleanup(spawn(spec, log))
        assert spawned.popen.wait(timeout=30) == 0
    text = log.read_text()
    assert text.startswith("from before\n")
    assert text.count("modelserverd launching:") == 2
    assert text.count("fake-sglang: to stderr") == 2


@pytest.mark.parametrize(
    ("python", "message"),
    [
        ("no-such-python-3.99", '[sglang].python: "no-such-python-3.99" is not on PATH'),
        ("/nonexistent/bin/python3", "cannot start /nonexistent/bin/python3"),
    ],
)
def test_spawn_missing_interpreter(tmp_path: Path, python: str, message: str):
    spec = build_launch(make_server(), SglangConfig(python=python), nccl_port=1)
    with pytest.raises(LaunchError) as info:
        spawn(spec, tmp_path / "s.log")
    assert message in str(info.value)


def test_spawn_with_unusable_log_folder(tmp_path: Path):
    (tmp_path / "file").write_text("")
    spec = LaunchSpec(argv=(PY, "-c", "pass"), env={})
    with pytest.raises(LaunchError, match="cannot open server log"):
        spawn(spec, tmp_path / "file" / "s.log")


# --- OwnedProcess ---------------------------------------------------------------------


def test_owned_process_alive_then_dead(cleanup: Callable[[Any], Any]):
    popen = cleanup(subprocess.Popen([PY, "-c", "import time; time.sleep(30)"]))
    owned = OwnedProcess.of(popen.pid)
    assert owned is not None and owned.pid == popen.pid
    assert owned.alive()
    assert owned.signal(signal.SIGKILL)
    # Dead but not yet reaped (a zombie) already counts as dead.
    wait_for(lambda: not owned.alive(), what="zombie")
    assert popen.poll() is None or popen.returncode == -signal.SIGKILL
    popen.wait(timeout=10)
    assert not owned.alive()
    assert not owned.signal(signal.SIGTERM)


def test_owned_process_of_missing_pid():
    assert OwnedProcess.of(NO_SUCH_PID) is None
    assert not OwnedProcess(NO_SUCH_PID, 1).alive()
    assert not OwnedProcess(NO_SUCH_PID, 1).signal(signal.SIGTERM)


def test_reused_pid_is_never_signalled(cleanup: Callable[[Any], Any]):
    popen = cleanup(subprocess.Popen([PY, "-c", "import time; time.sleep(30)"]))
    real = OwnedProcess.of(popen.pid)
    assert real is not None
    # The same pid with another start time: what a recorded pid looks like once the
    # process died and the kernel handed the number to someone else.
    stranger = OwnedProcess(popen.pid, real.start_ticks - 1000)
    assert not stranger.alive()
    assert not stranger.signal(signal.SIGKILL)
    time.sleep(0.1)
    assert popen.poll() is None
    assert real.alive()


def test_decode_recorded_processes(cleanup: Callable[[Any], Any]):
    popen = cleanup(subprocess.Popen([PY, "-c", "import time; time.sleep(30)"]))
    live = OwnedProcess.of(popen.pid)
    assert live is not None
    # Start times in clock ticks (this daemon) or psutil's create_time() (older ones).
    legacy = psutil.Process(popen.pid).create_time()
    for start in (live.record_value(), legacy):
        assert decode_processes(json.dumps([[popen.pid, start]])) == [live]
        assert decode_processes([[popen.pid, start]]) == [live]
    # A record of a process that is gone names no live process.
    gone = decode_processes([[NO_SUCH_PID, 12345.0], [NO_SUCH_PID, 1700000000.25]])
    assert gone == [OwnedProcess(NO_SUCH_PID, 12345), OwnedProcess(NO_SUCH_PID, -1)]
    assert not any(p.alive() for p in gone)
    # Another start time for a live pid: someone else.
    assert not decode_processes([[popen.pid, live.record_value() + 1]])[0].alive()
    for junk in (None, "", "[]", [], "not json", "[[1]]", '[["a", "b"]]', "{}", "[1]", [None]):
        assert decode_processes(junk) == []


# --- stopping process trees -----------------------------------------------------------


def start_tree(
    tmp_path: Path, cleanup: Callable[[Any], Any], kids: int = 2, ignore_term: bool = False
) -> tuple[Spawned, list[OwnedProcess]]:
    """Spawn the TREE script; return it and its children once they are in place."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    pidfile = tmp_path / f"kids-{time.monotonic_ns()}"
    mode = "ignore" if ignore_term else "default"
    spec = LaunchSpec(argv=(PY, str(script), str(pidfile), str(kids), mode), env={})
    spawned = cleanup(spawn(spec, tmp_path / "tree.log"))
    wait_for(pidfile.exists, what="tree children")
    pids = [int(p) for p in pidfile.read_text().split()]
    children = []
    for pid in pids:
        child = OwnedProcess.of(pid)
        assert child is not None
        children.append(cleanup(child))
    if kids > 1:
        wait_for(lambda: os.getsid(pids[1]) == pids[1], what="second child to call setsid")
        assert os.getpgid(pids[0]) == spawned.pid
        assert os.getpgid(pids[1]) != spawned.pid
    return spawned, children


def test_stop_tree_stops_group_and_the_child_that_left_it(
    tmp_path: Path, cleanup: Callable[[Any], Any]
):
    spawned, children = start_tree(tmp_path, cleanup)
    assert set(descendants(spawned.pid)) == set(children)
    notes = asyncio.run(stop_tree(spawned.owned, spawned.pid, [], timeout_s=5.0))
    # The main process took the SIGTERM; what its tree left is SIGKILLed at once.
    assert spawned.popen.wait(timeout=5) == -signal.SIGTERM
    assert len(notes) == 1 and f"pid {spawned.pid} exited" in notes[0], notes
    assert not spawned.owned.alive()
    assert not any(c.alive() for c in children)


def test_stop_tree_sends_sigterm_to_the_main_process_only(
    tmp_path: Path, cleanup: Callable[[Any], Any]
):
    # SGLang drains on SIGTERM: its scheduler children must keep running meanwhile,
    # or every in-flight stream is cut.
    spawned, children = start_tree(tmp_path, cleanup, ignore_term=True)

    async def stop_and_look() -> tuple[list[str], bool]:
        stopping = asyncio.ensure_future(stop_tree(spawned.owned, spawned.pid, [], timeout_s=1.0))
        await asyncio.sleep(0.5)
        alive_meanwhile = all(c.alive() for c in children) and spawned.owned.alive()
        return await stopping, alive_meanwhile

    notes, alive_meanwhile = asyncio.run(stop_and_look())
    assert alive_meanwhile, "a child was signalled while the main process drained"
    assert "1 s after SIGTERM" in notes[0] and "SIGKILL" in notes[0]
    assert spawned.popen.wait(timeout=5) == -signal.SIGKILL
    assert not any(c.alive() for c in children)


def test_stop_tree_escalates_to_sigkill(tmp_path: Path, cleanup: Callable[[Any], Any]):
    spawned, _ = start_tree(tmp_path, cleanup, kids=0, ignore_term=True)
    started = time.monotonic()
    notes = asyncio.run(stop_tree(spawned.owned, spawned.pid, [], timeout_s=0.5))
    assert time.monotonic() - started >= 0.5
    assert len(notes) == 1, notes
    assert "0.5 s after SIGTERM" in notes[0]
    assert str(spawned.pid) in notes[0]
    assert "SIGKILL" in notes[0]
    assert spawned.popen.wait(timeout=5) == -signal.SIGKILL
    assert not spawned.owned.alive()


def test_stop_tree_of_a_dead_process_is_a_no_op(tmp_path: Path, cleanup: Callable[[Any], Any]):
    spawned = cleanup(spawn(LaunchSpec(argv=(PY, "-c", "pass"), env={}), tmp_path / "x.log"))
    spawned.popen.wait(timeout=30)
    assert asyncio.run(stop_tree(spawned.owned, spawned.pid, [], timeout_s=1.0)) == []


def test_stop_tree_leaves_a_reused_pid_and_its_children_alone(
    tmp_path: Path, cleanup: Callable[[Any], Any]
):
    # `main` names a pid that now belongs to another process (another start time):
    # neither that process nor its children may be signalled.
    spawned, children = start_tree(tmp_path, cleanup)
    stale = OwnedProcess(spawned.pid, spawned.owned.start_ticks - 1000)
    assert asyncio.run(stop_tree(stale, None, [], timeout_s=0.5)) == []
    time.sleep(0.1)
    assert spawned.owned.alive()
    assert all(c.alive() for c in children)


def test_kill_leftovers_after_parent_was_sigkilled(tmp_path: Path, cleanup: Callable[[Any], Any]):
    spawned, children = start_tree(tmp_path, cleanup)
    recorded = descendants(spawned.pid)
    assert {p.pid for p in recorded} == {c.pid for c in children}
    os.kill(spawned.pid, signal.SIGKILL)
    spawned.popen.wait(timeout=5)
    # The parent is gone; its children live on (re-parented), holding "GPU memory".
    assert all(c.alive() for c in children)
    killed = asyncio.run(kill_leftovers(spawned.pid, recorded))
    assert sorted(killed) == sorted(c.pid for c in children)
    assert not any(c.alive() for c in children)
    assert asyncio.run(kill_leftovers(spawned.pid, recorded)) == []


def test_kill_leftovers_finds_group_members_that_were_not_recorded(
    tmp_path: Path, cleanup: Callable[[Any], Any]
):
    # The dead leader is not reaped yet: its zombie keeps the group's id ours.
    spawned, children = start_tree(tmp_path, cleanup, kids=1)
    os.kill(spawned.pid, signal.SIGKILL)
    wait_for(lambda: launcher.read_stat(spawned.pid).state == "Z", what="zombie leader")
    assert asyncio.run(kill_leftovers(spawned.pid, [], leader=spawned.owned)) == [children[0].pid]
    assert not children[0].alive()
    spawned.popen.wait(timeout=5)


def test_kill_leftovers_leaves_a_group_with_nothing_of_ours_in_it(
    tmp_path: Path, cleanup: Callable[[Any], Any]
):
    # Reaped leader, nothing recorded: the group id proves nothing any more.
    spawned, children = start_tree(tmp_path, cleanup, kids=1)
    os.kill(spawned.pid, signal.SIGKILL)
    spawned.popen.wait(timeout=5)
    assert asyncio.run(kill_leftovers(spawned.pid, [], leader=spawned.owned)) == []
    assert children[0].alive()


# --- logs -----------------------------------------------------------------------------


def test_rotate_log_copy_truncate_keeps_the_writer_working(tmp_path: Path):
    log = tmp_path / "s.log"
    writer = open(log, "ab", buffering=0)  # noqa: SIM115 - kept open like a server's stdout
    try:
        writer.write(b"x" * 100 + b"\n")
        assert not rotate_log(log, max_bytes=1000)
        assert rotate_log(log, max_bytes=50)
        assert (tmp_path / "s.log.1").read_bytes() == b"x" * 100 + b"\n"
        assert log.stat().st_size == 0
        writer.write(b"after rotation\n")
        # O_APPEND: the write lands at the new end, with no hole of zero bytes before it.
        assert log.read_bytes() == b"after rotation\n"
    finally:
        writer.close()


def test_rotate_log_keeps_numbered_copies(tmp_path: Path):
    log = tmp_path / "s.log"
    for generation in range(5):
        log.write_text(f"gen{generation}\n" * 10)
        assert rotate_log(log, max_bytes=10, keep=3)
    assert (tmp_path / "s.log.1").read_text().startswith("gen4")
    assert (tmp_path / "s.log.2").read_text().startswith("gen3")
    assert (tmp_path / "s.log.3").read_text().startswith("gen2")
    assert not (tmp_path / "s.log.4").exists()


def test_rotate_log_missing_file(tmp_path: Path):
    assert not rotate_log(tmp_path / "nope.log", max_bytes=1)


# --- ports ----------------------------------------------------------------------------


def test_port_listener_free_port(port: int):
    assert port_listener("127.0.0.1", port) is None


@pytest.mark.parametrize("bind_ip", ["127.0.0.1", "0.0.0.0"])
def test_port_listener_own_socket(bind_ip: str):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind_ip, 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_listener("127.0.0.1", port) in (os.getpid(), 0)
    assert port_listener("127.0.0.1", port) is None


def test_port_listener_ipv6():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with s:
        s.listen()
        port = s.getsockname()[1]
        assert port_listener("::1", port) in (os.getpid(), 0)


def test_port_listener_pid_of_a_child(cleanup: Callable[[Any], Any], port: int):
    code = textwrap.dedent(f"""
        import socket, sys, time
        s = socket.socket()
        s.bind(("127.0.0.1", {port}))
        s.listen()
        print("ready", flush=True)
        time.sleep(30)
    """)
    popen = cleanup(subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE))
    assert popen.stdout is not None and popen.stdout.readline() == b"ready\n"
    pid = port_listener("127.0.0.1", port)
    assert pid in (popen.pid, 0)
    if pid:
        assert psutil.Process(pid).cmdline()[:2] == [PY, "-c"]


def test_group_members_ignores_a_process_that_exits_during_the_scan(monkeypatch):
    # A process listed by psutil may be gone when its group is looked up.
    real_getpgid = os.getpgid
    own_group = os.getpgid(0)

    def flaky_getpgid(pid: int) -> int:
        if pid != os.getpid():
            raise ProcessLookupError(3, "No such process")
        return real_getpgid(pid)

    monkeypatch.setattr(launcher.os, "getpgid", flaky_getpgid)
    me = OwnedProcess.of(os.getpid())
    assert me is not None
    members = launcher.group_members(own_group, [me])
    assert [m.pid for m in members] == [os.getpid()]


# --- local shortages and secrets in launch lines ------------------------------------------


def _raised_inside(inner: BaseException, outer: BaseException) -> BaseException:
    """``outer`` as raised while handling ``inner``, the way the SGLang readers wrap
    aiohttp's errors (``raise NoAnswer(...) from None`` keeps the context)."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer from None
    except BaseException as exc:
        return exc


def test_local_errno_sees_through_wrappers():
    from supervisord_ms.sglang_api import NoAnswer

    emfile = OSError(errno.EMFILE, "Too many open files")
    assert launcher.local_errno(emfile) == errno.EMFILE
    assert launcher.local_errno(_raised_inside(emfile, NoAnswer("x"))) == errno.EMFILE
    assert launcher.local_errno(launcher.LocalResourceError("no fd")) is not None
    # The server's side, or a non-blocking "not yet": not a local shortage.
    for exc in (
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        BlockingIOError(errno.EAGAIN, "try again"),
        _raised_inside(ConnectionResetError(errno.ECONNRESET, "reset"), NoAnswer("x")),
        None,
    ):
        assert launcher.local_errno(exc) is None


def test_proc_reads_out_of_descriptors_raise_local_resource_error(
    monkeypatch: pytest.MonkeyPatch,
):
    def no_descriptor(*args: Any, **kw: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(launcher.os, "open", no_descriptor)
    me = OwnedProcess(os.getpid(), 1)
    # "Cannot tell now" is never "dead": a dead verdict would relaunch a live server.
    with pytest.raises(launcher.LocalResourceError, match="EMFILE"):
        me.alive()
    with pytest.raises(launcher.LocalResourceError):
        launcher.listeners(1)


@pytest.mark.parametrize(
    ("argv", "masked"),
    [
        (["--api-key", "k"], ["--api-key", "***"]),
        (["--admin-api-key=k"], ["--admin-api-key=***"]),
        (["--hf-token", "t", "--model", "m"], ["--hf-token", "***", "--model", "m"]),
        (["--api-key", "--port", "1"], ["--api-key", "--port", "1"]),  # no value given
        (["--max-total-tokens", "9", "--tokenizer-path", "p"], None),
        (["--sim-token-latency-s", "0.1", "--keyfile-dir", "d"], None),
    ],
)
def test_secret_flag_values_are_masked(argv: list[str], masked: list[str] | None):
    assert launcher.mask_secret_args(argv) == (argv if masked is None else masked)


def test_spawn_out_of_descriptors_is_local_not_a_launch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def no_descriptor(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(launcher.subprocess, "Popen", no_descriptor)
    with pytest.raises(launcher.LocalResourceError, match="cannot start"):
        spawn(LaunchSpec(argv=(PY, "-c", "pass"), env={}), tmp_path / "s.log")
