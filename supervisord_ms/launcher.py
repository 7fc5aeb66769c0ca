"""How an SGLang server is started and stopped: argv, environment, process tree.

Launch: ``<python> -m <module> --model-path ... --tp-size N --nccl-port P
--enable-metrics --log-level-http warning <extra_args>`` with
``CUDA_VISIBLE_DEVICES``, no shell, in a new session so that the process group
holds SGLang's scheduler and detokenizer children. The two default flags (see
:data:`DEFAULT_FLAGS`) are left out when the user's extra_args give the flag.

Stop: SIGTERM to the main process only (SGLang drains and then kills its own tree),
then SIGKILL to the group and to every recorded descendant that is left. SGLang's
children can be re-parented to PID 1 when the parent dies and keep holding GPU
memory for good, so a stop is only finished when the port is free and the GPU view
shows the memory released.

Every signal goes through :class:`OwnedProcess`, which checks the process start
time, so a recycled pid that now belongs to someone else is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .config import ServerConfig, SglangConfig
from .errors import ModelServerdError
from .notify import strip_notify_env


class LaunchError(ModelServerdError):
    """A server process could not be started (missing interpreter, log dir, ...)."""


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str]  # what the launch adds to the daemon's environment

    def shell_line(self) -> str:
        """The launch as one copy-pasteable line (for people; the daemon uses no shell)."""
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


# Flags every launch gets unless the user's extra_args give the flag themselves
# (then theirs stands, e.g. ``--log-level-http info`` to see each request). Both
# are SGLang server arguments (server_args.py; docs/sglang.md, sections 8 and 9):
# - ``--enable-metrics``: without it SGLang serves no /metrics, so none of its
#   load gauges (sglang:num_running_reqs, sglang:num_queue_reqs, ...) exist.
# - ``--log-level-http warning``: the level of SGLang's uvicorn (default: that of
#   --log-level), whose access log writes a line per request at info, so every
#   health check and probe would be a line in the server's log.
DEFAULT_FLAGS: tuple[tuple[str, ...], ...] = (
    ("--enable-metrics",),
    ("--log-level-http", "warning"),
)


def gives_flag(args: Sequence[str], flag: str) -> bool:
    """``args`` set ``flag``, as ``--flag [value]`` or ``--flag=value``."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def build_launch(server: ServerConfig, sglang: SglangConfig, nccl_port: int) -> LaunchSpec:
    user_args = (*sglang.extra_args, *server.extra_args)
    defaults = [arg for flag in DEFAULT_FLAGS if not gives_flag(user_args, flag[0]) for arg in flag]
    argv = [
        sglang.python,
        "-m",
        sglang.module,
        "--model-path",
        server.model_path,
        "--host",
        server.ip,
        "--port",
        str(server.port),
        "--tp-size",
        str(len(server.gpus)),
        "--nccl-port",
        str(nccl_port),
        *defaults,
        *user_args,
    ]
    env = dict(sglang.env)
    env.update(server.env)
    # Set last: the daemon tracks the GPUs of `gpus`, so no env entry may move the server.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in server.gpus)
    return LaunchSpec(argv=tuple(argv), env=env)


def free_tcp_port(exclude: Iterable[int] = ()) -> int:
    """A port nothing listens on now (for NCCL's rendezvous), not in ``exclude``."""
    taken = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise LaunchError("no free TCP port found for --nccl-port")


def allocate_nccl_ports(servers: Sequence[ServerConfig]) -> dict[str, int]:
    """A distinct free port per server, none equal to a configured server port."""
    taken = {s.port for s in servers}
    ports: dict[str, int] = {}
    for server in servers:
        port = free_tcp_port(taken)
        taken.add(port)
        ports[server.name] = port
    return ports


# --- processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class OwnedProcess:
    """A pid together with its start time: the identity that survives pid reuse."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> OwnedProcess | None:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return (
                abs(proc.create_time() - self.create_time) < 0.01
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False

    def signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False


def descendants(pid: int) -> list[OwnedProcess]:
    """Every process below ``pid``, recorded so it can be killed after leaving the group."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            found.append(OwnedProcess(child.pid, child.create_time()))
    return found


def decode_processes(value: str | list | None) -> list[OwnedProcess]:
    """Recorded ``[[pid, create_time], ...]`` (JSON text or already decoded)."""
    if not value:
        return []
    try:
        items = json.loads(value) if isinstance(value, str) else value
        return [OwnedProcess(int(pid), float(ct)) for pid, ct in items]
    except (ValueError, TypeError):
        return []


def group_members(pgid: int) -> list[OwnedProcess]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        # A process may exit between the listing and the look-up (ProcessLookupError).
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                members.append(OwnedProcess(proc.pid, proc.create_time()))
    return members


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Spawned:
    popen: subprocess.Popen[bytes]
    owned: OwnedProcess
    cmdline: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid


def spawn(spec: LaunchSpec, log_path: str | Path) -> Spawned:
    """Start the server in its own session with stdout+stderr appended to its log."""
    executable = spec.argv[0]
    if os.sep not in executable and shutil.which(executable) is None:
        raise LaunchError(
            f'[sglang].python: "{executable}" is not on PATH; '
            "set it to the interpreter that has sglang installed"
        )
    log_path = Path(log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
    except OSError as exc:
        raise LaunchError(f"cannot open server log {log_path}: {exc}") from exc
    env = dict(os.environ)
    strip_notify_env(env)  # systemd's notify socket is the daemon's, not the server's
    env.update(spec.env)
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        log.write(f"\n=== {stamp} modelserverd launching: {spec.shell_line()}\n".encode())
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise LaunchError(f"cannot start {spec.argv[0]}: {exc}") from exc
    finally:
        log.close()
    owned = OwnedProcess.of(popen.pid) or OwnedProcess(popen.pid, time.time())
    return Spawned(popen=popen, owned=owned, cmdline=list(spec.argv))


def rotate_log(path: str | Path, max_bytes: int, keep: int = 3) -> bool:
    """Copy-and-truncate rotation: the server keeps its O_APPEND descriptor, so it
    never needs a signal or a restart to move to a fresh file."""
    path = Path(path)
    try:
        if path.stat().st_size <= max_bytes:
            return False
        for i in range(keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        with open(path, "r+b") as f:
            f.truncate(0)
        return True
    except OSError:
        return False


# --- ports --------------------------------------------------------------------------


def port_listener(ip: str, port: int) -> int | None:
    """Pid of the process listening on ip:port (0 when it is unknown), None when free."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.Error:
        conns = []
    for conn in conns:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if conn.laddr.ip in (ip, "0.0.0.0", "::"):
            return conn.pid or 0
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return 0
    return None


# --- stopping -----------------------------------------------------------------------


# How long the rest of a tree may take to go once its main process has exited.
LEFTOVER_GRACE_S = 1.0


async def _wait_gone(procs: Sequence[OwnedProcess], deadline: float) -> bool:
    while True:
        if not any(p.alive() for p in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def stop_tree(
    main: OwnedProcess,
    pgid: int | None,
    recorded: Sequence[OwnedProcess],
    *,
    timeout_s: float,
) -> list[str]:
    """SIGTERM the main process only; once it is gone, or ``timeout_s`` later, SIGKILL
    the group and every recorded descendant that is left.

    SGLang handles SIGTERM itself (tokenizer_manager.py ``sigterm_watchdog``): /health
    answers 503, in-flight requests finish, then it SIGKILLs its own tree. A SIGTERM to
    the whole group would kill the schedulers mid-drain and cut every stream.

    Returns a note per escalation, for the event log.
    """
    notes: list[str] = []
    # A dead main's pid may already belong to someone else: only walk a live one.
    live_children = descendants(main.pid) if main.alive() else []
    tree = [main, *live_children, *recorded]
    if pgid is not None:
        tree.extend(group_members(pgid))
    tree = list({p.pid: p for p in tree if p.alive()}.values())
    if not tree:
        return notes
    if main.alive():
        main.signal(signal.SIGTERM)
        if not await _wait_gone([main], time.monotonic() + timeout_s):
            notes.append(
                f"pid {main.pid} still running {timeout_s:g} s after SIGTERM "
                "(stop_timeout_s); sending SIGKILL to its process group and descendants"
            )
    if pgid is not None:
        tree.extend(p for p in group_members(pgid) if p.pid not in {q.pid for q in tree})
    # SGLang kills its children just before itself: give the kernel a moment to
    # finish them before calling them leftovers.
    if not main.alive() and await _wait_gone(tree, time.monotonic() + LEFTOVER_GRACE_S):
        return notes
    left = [p for p in tree if p.alive()]
    if not left:
        return notes
    if pgid is not None:
        signal_group(pgid, signal.SIGKILL)
    for proc in left:
        proc.signal(signal.SIGKILL)
    if main not in left:
        notes.append(
            f"pid {main.pid} exited; killed what its tree left running: "
            f"{', '.join(str(p.pid) for p in left)}"
        )
    if not await _wait_gone(left, time.monotonic() + 5.0):
        survivors = [p.pid for p in left if p.alive()]
        notes.append(f"processes survived SIGKILL (uninterruptible?): {survivors}")
    return notes


async def kill_leftovers(pgid: int | None, recorded: Sequence[OwnedProcess]) -> list[int]:
    """After the main process died on its own: SIGKILL what is left of its tree."""
    left = [p for p in recorded if p.alive()]
    if pgid is not None:
        left.extend(p for p in group_members(pgid) if p.alive())
    # Members still carrying our group id are ours: Linux does not hand out a pid
    # that is still in use as a process group id.
    left = list({p.pid: p for p in left}.values())
    for proc in left:
        proc.signal(signal.SIGKILL)
    await _wait_gone(left, time.monotonic() + 5.0)
    return [p.pid for p in left]
