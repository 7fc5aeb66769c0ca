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

Who is ours (issue 12, item 10):

* A process is a pid together with its start time in clock ticks since boot
  (``/proc/<pid>/stat`` field 22). That number never changes and does not depend
  on the wall clock; a start time derived from the boot time (psutil's
  ``create_time()``) moves when the clock is stepped, and every server then looks
  dead. Every signal goes through :class:`OwnedProcess`, which checks that number,
  through a pidfd where the kernel has them, so a recycled pid is never signalled.
* A process group is only signalled while a live process of ours is in it: Linux
  does not hand out a group's id while the group has a member, so such a group is
  still ours. Once the group is empty its id may be anyone's, and it is left alone.

Local trouble is not the server's (issue 12, item 1): when the daemon itself runs
out of descriptors or memory (EMFILE, ENFILE, ...) a check cannot be made, which
says nothing about the server. Such failures raise :class:`LocalResourceError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import ServerConfig, SglangConfig
from .errors import ModelServerdError
from .notify import strip_notify_env


class LaunchError(ModelServerdError):
    """A server process could not be started (missing interpreter, log dir, an
    environment the kernel refuses, ...): a launch failure of that server."""


class LocalResourceError(ModelServerdError):
    """The daemon could not check or launch now because this host ran out of
    something of its own (descriptors, memory, ephemeral ports, processes). Says
    nothing about the server: callers skip the check and retry, and count no failure."""


# Errors that mean "the daemon's own host is short of something", not "the server
# failed": too many open files (per process, system-wide), no memory or buffers, no
# free local port. (EAGAIN, "no process slot", counts only where a process is
# started: elsewhere it is a non-blocking call's "not yet".)
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EADDRNOTAVAIL}
)


def local_errno(exc: BaseException | None) -> int | None:
    """The errno of a local shortage behind ``exc`` (its cause or context chain
    included: aiohttp and the SGLang readers wrap OSError), or None."""
    seen = 0
    while exc is not None and seen < 10:
        for candidate in (exc, getattr(exc, "os_error", None)):
            code = getattr(candidate, "errno", None)
            if isinstance(candidate, OSError) and code in LOCAL_ERRNOS:
                return code
        if isinstance(exc, LocalResourceError):
            return errno.EMFILE
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _local(what: str, exc: OSError) -> LocalResourceError:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return LocalResourceError(f"cannot {what} now: {exc.strerror or exc} ({name})")


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str]  # what the launch adds to the daemon's environment

    def shell_line(self, *, reveal: bool = False) -> str:
        """The launch as one line for people (the daemon uses no shell); with
        ``reveal``, exactly what runs, to copy and paste.

        Otherwise env values are masked (``HF_TOKEN=***``: names kept), and so are the values
        of flags named like secrets (``--api-key ***``), unless ``reveal``: this is
        the line that goes to the daemon log, the server log and the events table
        (issue 12, item 9). ``CUDA_VISIBLE_DEVICES`` stays: the daemon sets it from
        ``gpus``, it is no secret and operators need it."""
        env = " ".join(
            f"{k}={shlex.quote(v) if reveal or k in PUBLIC_ENV else MASK}"
            for k, v in self.env.items()
        )
        if reveal:
            return f"{env} {shlex.join(self.argv)}".strip()
        # A masked value stays unquoted (``HF_TOKEN=***``): the line is for reading.
        masked = mask_secret_args(self.argv)
        argv = " ".join(
            arg if arg != orig else shlex.quote(arg)
            for arg, orig in zip(masked, self.argv, strict=True)
        )
        return f"{env} {argv}".strip()


MASK = "***"
# Env names the daemon itself sets from the config's public fields.
PUBLIC_ENV = frozenset({"CUDA_VISIBLE_DEVICES"})
# Flags whose value is a secret (SGLang's --api-key, --admin-api-key; --hf-token,
# --password and the like): the flag's last word says so.
_SECRET_FLAG = re.compile(
    r"^--?(?:[\w-]*[-_])?(?:api[-_]?key|key|token|secret|password|passwd|credentials?)$", re.I
)


def mask_secret_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret-looking flag replaced by ``***``."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("--"):
            out.append(MASK)
            hide_next = False
            continue
        hide_next = False
        flag, eq, _ = arg.partition("=")
        if _SECRET_FLAG.match(flag):
            if eq:
                out.append(f"{flag}={MASK}")
                continue
            hide_next = True
        out.append(arg)
    return out


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
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                raise _local("pick a port for --nccl-port", exc) from exc
            raise LaunchError(f"cannot pick a port for --nccl-port: {exc}") from exc
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

PROC = "/proc"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the daemon reads (proc(5))."""

    pid: int
    state: str  # "Z": a zombie (exited, not yet reaped); "X": dead
    ppid: int
    pgrp: int
    session: int
    start_ticks: int  # field 22: clock ticks from boot to the start of the process

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X", "x")


def _read(path: str, what: str) -> bytes | None:
    """A file of /proc; None when it is gone (its process exited). A local shortage
    (no descriptor left) raises :class:`LocalResourceError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        if exc.errno in LOCAL_ERRNOS:
            raise _local(what, exc) from exc
        raise
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except ProcessLookupError:  # it exited while being read
        return None
    finally:
        os.close(fd)


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat``, or None when there is no such process."""
    data = _read(f"{PROC}/{pid}/stat", f"read /proc/{pid}/stat")
    if data is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ")".
    fields = data.rpartition(b")")[2].split()
    try:
        return ProcStat(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            session=int(fields[3]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def boot_time_s() -> float:
    """The kernel's boot time on the wall clock (``btime`` of /proc/stat). It moves
    when the wall clock is stepped; only used to read records of older daemons."""
    data = _read(f"{PROC}/stat", "read /proc/stat") or b""
    for line in data.splitlines():
        if line.startswith(b"btime "):
            return float(line.split()[1])
    raise LocalResourceError("cannot read the boot time from /proc/stat")


def uid_of(pid: int) -> int | None:
    """The effective uid of ``pid`` (the owner of ``/proc/<pid>``), None when gone.
    A stat needs no descriptor."""
    try:
        return os.stat(f"{PROC}/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError):
        return None


def _pids() -> list[int]:
    try:
        names = os.listdir(PROC)
    except OSError as exc:
        if exc.errno in LOCAL_ERRNOS:
            raise _local("list /proc", exc) from exc
        raise
    return [int(n) for n in names if n.isdigit()]


@dataclass(frozen=True)
class OwnedProcess:
    """A pid together with its start time in clock ticks since boot: the identity
    that survives pid reuse and wall-clock steps.

    Stored in ``servers.proc_create_time`` (a REAL column named for psutil's
    ``create_time()``, which older daemons stored there) as ``float(start_ticks)``;
    :meth:`from_record` reads both forms.
    """

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> OwnedProcess | None:
        st = read_stat(pid)
        return None if st is None or st.exited else cls(pid, st.start_ticks)

    @classmethod
    def from_record(cls, pid: int, value: float) -> OwnedProcess:
        """The process a record names: ``value`` is the start in clock ticks (this
        daemon), or, from a daemon before issue 12, psutil's ``create_time()``: the
        boot time on the wall clock plus the start ticks in seconds. That older form
        is compared with today's boot time, once, when the record is read."""
        recorded = float(value)
        st = read_stat(pid)
        if st is not None and (
            recorded == st.start_ticks
            or abs(recorded - (boot_time_s() + st.start_ticks / CLK_TCK)) < 0.01
        ):
            return cls(pid, st.start_ticks)
        # Gone, or someone else now: an identity no live process has.
        return cls(pid, int(recorded) if recorded.is_integer() else -1)

    def record_value(self) -> float:
        """What ``servers.proc_create_time`` and ``descendants`` hold for it."""
        return float(self.start_ticks)

    def stat(self, *, exited: bool = False) -> ProcStat | None:
        """Its ``/proc/<pid>/stat`` while the pid is still this process (a zombie
        too with ``exited``), else None."""
        st = read_stat(self.pid)
        if st is None or st.start_ticks != self.start_ticks:
            return None
        if st.exited and not exited:
            return None
        return st

    def alive(self) -> bool:
        """Still running (a zombie counts as dead). Raises :class:`LocalResourceError`
        when it cannot be told now."""
        return self.stat() is not None

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if the pid is still this process. Through a pidfd, the
        signal cannot reach a process that got the pid after the check."""
        try:
            fd: int | None = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                raise _local(f"signal pid {self.pid}", exc) from exc
            fd = None  # a kernel without pidfds (before 5.3): check, then kill
        try:
            if not self.alive():
                return False
            if fd is None:
                os.kill(self.pid, sig)
            else:
                signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            if fd is not None:
                os.close(fd)


def descendants(pid: int) -> list[OwnedProcess]:
    """Every process below ``pid``, recorded so it can be killed after leaving the group."""
    children: dict[int, list[ProcStat]] = {}
    for p in _pids():
        st = read_stat(p)
        if st is not None and not st.exited:
            children.setdefault(st.ppid, []).append(st)
    found: list[OwnedProcess] = []
    todo, seen = [pid], {pid}
    while todo:
        for st in children.get(todo.pop(), ()):
            if st.pid not in seen:
                seen.add(st.pid)
                found.append(OwnedProcess(st.pid, st.start_ticks))
                todo.append(st.pid)
    return found


def decode_processes(value: str | list | None) -> list[OwnedProcess]:
    """Recorded ``[[pid, start], ...]`` (JSON text or already decoded); see
    :meth:`OwnedProcess.from_record` for the start's two forms."""
    if not value:
        return []
    try:
        items = json.loads(value) if isinstance(value, str) else value
        pairs = [(int(pid), float(start)) for pid, start in items]
    except (ValueError, TypeError):
        return []
    return [OwnedProcess.from_record(pid, start) for pid, start in pairs]


def group_is_ours(pgid: int | None, anchors: Iterable[OwnedProcess]) -> bool:
    """Whether process group ``pgid`` still holds a process of ours (``anchors``, each
    checked by its start time; an unreaped zombie of ours counts: it keeps its pid,
    and so the group's id). Linux hands out no pid that is in use as a group id, so
    such a group is still ours; once it is empty its id may be anyone's."""
    if pgid is None or pgid <= 1:
        return False
    for anchor in anchors:
        st = anchor.stat(exited=True)
        if st is not None and st.pgrp == pgid:
            return True
    return False


def group_members(pgid: int, anchors: Iterable[OwnedProcess]) -> list[OwnedProcess]:
    """The live members of group ``pgid``, provided the group is ours (see
    :func:`group_is_ours`); [] otherwise."""
    if not group_is_ours(pgid, anchors):
        return []
    members = []
    for pid in _pids():
        try:
            if os.getpgid(pid) != pgid:  # a system call, no descriptor
                continue
        except OSError:  # it exited between the listing and the look-up
            continue
        st = read_stat(pid)
        if st is not None and not st.exited and st.pgrp == pgid:
            members.append(OwnedProcess(pid, st.start_ticks))
    return members


def signal_group(pgid: int | None, sig: int, anchors: Iterable[OwnedProcess]) -> bool:
    """``killpg(pgid, sig)``, only while the group is ours (see :func:`group_is_ours`).
    True when sent."""
    if not group_is_ours(pgid, anchors):
        return False
    assert pgid is not None
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@dataclass
class Spawned:
    popen: subprocess.Popen[bytes]
    owned: OwnedProcess
    cmdline: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid


def check_launchable(spec: LaunchSpec) -> None:
    """Refuse, with a message an operator can act on, what ``execve`` would refuse:
    an environment name that is empty or holds "=" or NUL, a NUL in a value or an
    argument. Values are never quoted in the message: they may be secrets."""
    for name, value in spec.env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise LaunchError(
                f"environment variable name {name!r} (from [sglang].env or the server's "
                'env) cannot be used: a name must not be empty or contain "=" or a NUL '
                "byte; fix the config and reload"
            )
        if not isinstance(value, str) or "\0" in value:
            raise LaunchError(
                f"environment variable {name} (from [sglang].env or the server's env): "
                "its value contains a NUL byte; fix the config and reload"
            )
    for arg in spec.argv:
        if "\0" in arg:
            raise LaunchError(
                f"launch argument {mask_secret_args([arg])[0]!r} contains a NUL byte; "
                "fix the config ([sglang] or the server's extra_args, model_path) and reload"
            )


# How long spawn retries reading a just-started process's start time when the
# daemon is out of descriptors, before it kills that process and gives up.
_IDENTITY_TRIES = 50


def spawn(spec: LaunchSpec, log_path: str | Path) -> Spawned:
    """Start the server in its own session with stdout+stderr appended to its log.

    Raises :class:`LaunchError` when the launch itself is wrong (a server failure)
    and :class:`LocalResourceError` when this host cannot start a process now."""
    check_launchable(spec)
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
        if exc.errno in LOCAL_ERRNOS:
            raise _local(f"open server log {log_path}", exc) from exc
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
        if exc.errno in LOCAL_ERRNOS or exc.errno == errno.EAGAIN:  # fork: no process slot
            raise _local(f"start {spec.argv[0]}", exc) from exc
        raise LaunchError(f"cannot start {spec.argv[0]}: {exc}") from exc
    except (ValueError, TypeError) as exc:  # what the checks above did not foresee
        raise LaunchError(f"cannot start {spec.argv[0]}: {exc}") from exc
    finally:
        log.close()
    return Spawned(popen=popen, owned=_identity(popen), cmdline=list(spec.argv))


def append_log_note(log_path: str | Path, text: str) -> None:
    """Append one line of the daemon's own to a server's log, in the form of the
    launch line above (``=== <UTC time> modelserverd: <text>``), so that
    ``modelserverd logs NAME`` shows why each launch ended next to what the server
    printed (issue 13, item 3). Raises OSError; the caller decides what that means."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = " ".join(text.split())  # one line, whatever the message held
    with open(log_path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        lead = b""
        if end:  # after a last line of the server's that has no newline: on a line of its own
            f.seek(end - 1)
            lead = b"" if f.read(1) == b"\n" else b"\n"
        f.write(lead + f"=== {stamp} modelserverd: {line}\n".encode(errors="replace"))


def _identity(popen: subprocess.Popen[bytes]) -> OwnedProcess:
    """The start time of a child just started. It is our unreaped child, so its pid
    stays its own until we wait for it."""
    for _ in range(_IDENTITY_TRIES):
        try:
            st = read_stat(popen.pid)
        except LocalResourceError:
            time.sleep(0.02)
            continue
        # None: it is gone already (not possible before we reap it); a start that
        # matches no live process makes it count as exited.
        return OwnedProcess(popen.pid, st.start_ticks if st is not None else -1)
    popen.kill()  # safe: our own child, not yet reaped
    popen.wait()
    raise LocalResourceError(
        f"cannot read the start time of the new pid {popen.pid} (no descriptor left); "
        "it was stopped, the launch is retried"
    )


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
#
# Who listens on a server's ip:port (issue 12, item 3): a local user can bind the
# port while SGLang loads its weights with the port closed, answer /health, and be
# sent every prompt. The kernel's socket tables (/proc/net/tcp, tcp6) give each
# listening socket's inode and owner uid; /proc/<pid>/fd of the server's own process
# tree tells whether the socket is one of its own. Reading the tables costs one pass
# over the host's sockets; the whole host's /proc/<pid>/fd is read only to name the
# pid of a listener that is not the server's.


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket of this network namespace."""

    address: str
    port: int
    uid: int
    inode: int


@dataclass(frozen=True)
class PortHolder:
    """A process that listens on a port, as far as this daemon can see it."""

    pid: int | None  # None: in no process this daemon can see (another pid namespace)
    uid: int | None

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid else "a process this daemon cannot see"
        return who + (f" (uid {self.uid})" if self.uid is not None else "")


@dataclass(frozen=True)
class ListenerCheck:
    """The listeners that take the connections for a server's ip:port."""

    ours: frozenset[int]  # socket inodes held by the server's own process tree
    foreign: tuple[PortHolder, ...]


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # Each 32-bit word is printed as a number in the host's byte order.
    raw = b"".join(
        struct.pack("=I", int(hex_address[i : i + 8], 16)) for i in range(0, len(hex_address), 8)
    )
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# How old a reading of the listening sockets the periodic checks may use. Every
# server's health check asks who listens on its port; reading /proc/net/tcp costs the
# kernel time in proportion to every socket on the host (a busy host has thousands in
# TIME_WAIT), so one reading serves every server's check for this long.
LISTEN_TABLE_MAX_AGE_S = 1.0
_listen_table: tuple[float, dict[int, list[Listener]]] | None = None
_listen_table_lock = threading.Lock()


def listeners(port: int, *, max_age_s: float = 0.0) -> list[Listener]:
    """Every listening TCP socket on ``port``, any address (IPv4 and IPv6); from a
    reading of the whole table up to ``max_age_s`` old when that is allowed."""
    global _listen_table
    if max_age_s > 0:
        with _listen_table_lock:
            now = time.monotonic()
            if _listen_table is None or now - _listen_table[0] > max_age_s:
                _listen_table = (now, _read_listen_table())
            return list(_listen_table[1].get(port, ()))
    found = []
    needle = f":{port:04X} "
    for table in ("tcp", "tcp6"):
        data = _read(f"{PROC}/net/{table}", f"read /proc/net/{table}")
        if not data:
            continue
        for line in data.decode("ascii", "replace").splitlines()[1:]:
            if needle not in line:
                continue
            parts = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(parts) < 10 or parts[3] != "0A":  # 0A: TCP_LISTEN
                continue
            address, _, port_hex = parts[1].partition(":")
            try:
                if int(port_hex, 16) != port:
                    continue
                found.append(
                    Listener(str(_decode_address(address)), port, int(parts[7]), int(parts[9]))
                )
            except ValueError:
                continue
    return found


def _read_listen_table() -> dict[int, list[Listener]]:
    """Every listening TCP socket on the host, by port."""
    by_port: dict[int, list[Listener]] = {}
    for table in ("tcp", "tcp6"):
        data = _read(f"{PROC}/net/{table}", f"read /proc/net/{table}")
        if not data:
            continue
        for line in data.decode("ascii", "replace").splitlines()[1:]:
            # The state column alone is " 0A " (TCP_LISTEN): addresses are 8 or 32
            # hex digits with a port after a colon, never two on their own.
            if " 0A " not in line:
                continue
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":
                continue
            address, _, port_hex = parts[1].partition(":")
            try:
                entry = Listener(
                    str(_decode_address(address)), int(port_hex, 16), int(parts[7]), int(parts[9])
                )
            except ValueError:
                continue
            by_port.setdefault(entry.port, []).append(entry)
    return by_port


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _targets(ip: str) -> list[_Address] | None:
    """The addresses connections to ``ip`` go to (a host name such as ``localhost``
    is resolved); None when that cannot be told, and every address then counts."""
    try:
        addresses = [ipaddress.ip_address(ip)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(ip, None, type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        except (OSError, ValueError):
            return None
    return [
        a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a
        for a in addresses
    ]


def _takes(listener_address: str, targets: list[_Address] | None) -> bool:
    if targets is None:
        return True
    try:
        la = ipaddress.ip_address(listener_address)
    except ValueError:
        return True
    for sa in targets:
        if la.is_unspecified:
            # 0.0.0.0 takes IPv4; :: takes IPv6 and (unless IPV6_V6ONLY) IPv4 too.
            if la.version == 6 or sa.version == 4:
                return True
        elif sa.is_unspecified:
            if la.version == sa.version:
                return True
        elif la == sa:
            return True
    return False


def catches(listener_address: str, ip: str) -> bool:
    """Whether a socket listening on ``listener_address`` takes connections made to ``ip``."""
    return _takes(listener_address, _targets(ip))


def listeners_for(ip: str, port: int, *, max_age_s: float = 0.0) -> list[Listener]:
    """The listening sockets that take the connections made to ``ip:port``."""
    targets = _targets(ip)
    return [
        entry for entry in listeners(port, max_age_s=max_age_s) if _takes(entry.address, targets)
    ]


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` has open."""
    path = f"{PROC}/{pid}/fd"
    try:
        names = os.listdir(path)
    except OSError as exc:
        if exc.errno in LOCAL_ERRNOS:
            raise _local(f"list {path}", exc) from exc
        return set()  # gone, or not ours to read
    found = set()
    for name in names:
        try:
            target = os.readlink(f"{path}/{name}")  # no descriptor needed
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            with contextlib.suppress(ValueError):
                found.add(int(target[8:-1]))
    return found


def socket_owners(inodes: Iterable[int], pids: Iterable[int] | None = None) -> dict[int, int]:
    """For each socket inode, a pid (of ``pids``, default every process) that has it open."""
    want = set(inodes)
    owners: dict[int, int] = {}
    for pid in pids if pids is not None else _pids():
        if not want:
            break
        held = socket_inodes(pid) & want
        owners.update(dict.fromkeys(held, pid))
        want -= held
    return owners


def check_listeners(
    ip: str,
    port: int,
    tree: Callable[[], Iterable[int]],
    known: Iterable[int] = (),
    *,
    max_age_s: float = 0.0,
) -> ListenerCheck:
    """Which of the sockets that take connections for ``ip:port`` are the server's
    own: held by a pid of ``tree()`` (its process tree; only called when a socket
    not in ``known``, the inodes found to be its own before, listens). ``max_age_s``:
    see :func:`listeners`."""
    found = listeners_for(ip, port, max_age_s=max_age_s)
    inodes = {entry.inode for entry in found}
    ours = inodes & set(known)
    unknown = inodes - ours
    if unknown:
        own = set(socket_owners(unknown, tree()))
        ours |= own
        unknown -= own
    foreign: tuple[PortHolder, ...] = ()
    if unknown:
        owners = socket_owners(unknown)
        foreign = tuple(
            PortHolder(owners.get(entry.inode), entry.uid)
            for entry in found
            if entry.inode in unknown
        )
    return ListenerCheck(frozenset(ours), foreign)


def port_holder(ip: str, port: int) -> PortHolder | None:
    """Who holds ``ip:port``, None when it is free to bind."""
    found = listeners_for(ip, port)
    if found:
        owners = socket_owners({entry.inode for entry in found})
        first = next((e for e in found if e.inode in owners), found[0])
        return PortHolder(owners.get(first.inode), first.uid)
    # Bound without listening (or in another namespace): the bind tells.
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in LOCAL_ERRNOS:
            raise _local(f"check port {port}", exc) from exc
        raise
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return PortHolder(None, None)
    return None


def port_listener(ip: str, port: int) -> int | None:
    """Pid of the process listening on ip:port (0 when it is unknown), None when free."""
    holder = port_holder(ip, port)
    if holder is None:
        return None
    return holder.pid or 0


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


def _live(procs: Iterable[OwnedProcess]) -> list[OwnedProcess]:
    return list({p.pid: p for p in procs if p.alive()}.values())


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

    The group is only looked at, and signalled, while a process of ours is in it
    (:func:`group_is_ours`): ``main`` (also as an unreaped zombie) or one of the
    processes found in its tree.

    Returns a note per escalation, for the event log.
    """
    notes: list[str] = []
    # A dead main's pid may already belong to someone else: only walk a live one.
    live_children = descendants(main.pid) if main.alive() else []
    tree = [main, *live_children, *recorded]
    if pgid is not None:
        tree.extend(group_members(pgid, [main, *tree]))
    tree = _live(tree)
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
        known = {q.pid for q in tree}
        tree.extend(p for p in group_members(pgid, [main, *tree]) if p.pid not in known)
    # SGLang kills its children just before itself: give the kernel a moment to
    # finish them before calling them leftovers.
    if not main.alive() and await _wait_gone(tree, time.monotonic() + LEFTOVER_GRACE_S):
        return notes
    left = [p for p in tree if p.alive()]
    if not left:
        return notes
    if pgid is not None:
        signal_group(pgid, signal.SIGKILL, [main, *left])
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


async def kill_leftovers(
    pgid: int | None, recorded: Sequence[OwnedProcess], leader: OwnedProcess | None = None
) -> list[int]:
    """After the main process died on its own: SIGKILL what is left of its tree.

    The group is searched only while it holds a process of ours: the dead ``leader``
    itself while it is our unreaped zombie, or a recorded descendant."""
    left = [p for p in recorded if p.alive()]
    if pgid is not None:
        anchors = [*recorded, *([leader] if leader is not None else [])]
        left.extend(group_members(pgid, anchors))
    left = _live(left)
    for proc in left:
        proc.signal(signal.SIGKILL)
    await _wait_gone(left, time.monotonic() + 5.0)
    return [p.pid for p in left]
