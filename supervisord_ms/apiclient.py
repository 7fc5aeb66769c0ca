"""A few lines of HTTP over the daemon's Unix socket, for the operator commands.

Standard library only (http.client with an AF_UNIX socket), so the commands
start fast and never need aiohttp.
"""

from __future__ import annotations

import errno
import grp
import http.client
import json
import os
import pwd
import socket
import stat
import struct
from typing import Any

from .errors import ModelServerdError


class DaemonUnreachable(ModelServerdError):
    """The daemon's socket is missing, refuses, or is not permitted; the message says
    what to do (start the daemon, join the socket's group)."""


class ApiError(ModelServerdError):
    """The daemon answered with an error body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        self.status, self.code = status, code
        super().__init__(message)


_UCRED = struct.Struct("3i")


def trusted_server_uids(path: str) -> set[int]:
    """Who may be serving the daemon's socket: root, the caller, and the owner of
    the socket's folder when that folder is theirs alone (no one else may write
    it, and it sits in a folder only root or that owner may write, as systemd's
    /run/modelserverd does). Anyone else listening there is another user's
    program in the daemon's place, and is sent nothing."""
    trusted = {0, os.geteuid()}
    folder = os.path.dirname(os.path.realpath(path))
    try:
        st = os.stat(folder)
        above = os.stat(os.path.dirname(folder))
    except OSError:
        return trusted
    closed = not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    above_closed = not above.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if closed and above_closed and above.st_uid in (0, st.st_uid):
        trusted.add(st.st_uid)
    return trusted


def _check_server(sock: socket.socket, path: str) -> None:
    try:
        pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return  # not Linux, or no peer: nothing to check against
    if uid in trusted_server_uids(path):
        return
    try:
        who = f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        who = f"uid {uid}"
    raise DaemonUnreachable(
        f"{path} is served by {who}, pid {pid}: not root, not you, and not the owner of "
        "its folder, so it may be another user's program posing as modelserverd; nothing "
        f"was sent to it. Check `ls -ld {os.path.dirname(path)} {path}` and [daemon].socket "
        "(the daemon's socket belongs in a folder of its own, such as /run/modelserverd)"
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
            _check_server(sock, self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _unreachable(path: str, exc: OSError) -> DaemonUnreachable:
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        return DaemonUnreachable(
            f"modelserverd is not running: no socket at {path} "
            "(start it with `systemctl start modelserverd` or `modelserverd run`)"
        )
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        try:
            gid = os.stat(path).st_gid
            group = grp.getgrgid(gid).gr_name
        except (OSError, KeyError):
            gid, group = -1, "the socket's group"
        if gid == 0 or group in ("root", "the socket's group"):
            # Never advise joining root: the socket has no group of its own yet.
            return DaemonUnreachable(
                f"not permitted to use {path}: the socket is root's only; the operator "
                'sets [daemon].socket_group (e.g. "modelserver", the group the unit\'s '
                "sysusers entry creates) and adds users to it "
                "(`sudo usermod -aG modelserver $USER`), or run as root"
            )
        return DaemonUnreachable(
            f"not permitted to use {path}: join the group {group} "
            f"(`sudo usermod -aG {group} $USER`, then log in again) or run as root"
        )
    if exc.errno == errno.ECONNREFUSED:
        return DaemonUnreachable(
            f"modelserverd is not running: {path} refuses connections (stale socket); "
            "start it with `systemctl start modelserverd`"
        )
    return DaemonUnreachable(f"cannot reach modelserverd at {path}: {exc}")


def call(
    socket_path: str, method: str, path: str, body: Any = None, *, timeout: float = 30.0
) -> Any:
    """One request to the daemon; returns the decoded JSON (or text for /metrics)."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may have answered before reading (too many connections)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as exc:
        raise _unreachable(socket_path, exc) from None
    except http.client.HTTPException as exc:
        raise DaemonUnreachable(f"bad answer from modelserverd at {socket_path}: {exc}") from None
    finally:
        conn.close()
    if "json" not in (resp.getheader("Content-Type") or ""):
        if resp.status >= 400:
            raise ApiError(resp.status, "http_error", raw.decode(errors="replace"))
        return raw.decode(errors="replace")
    data = json.loads(raw or b"null")
    if resp.status >= 400:
        err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
        raise ApiError(resp.status, err.get("code", "error"), err.get("message", str(data)))
    return data
