"""A simulated SGLang child process (scheduler / detokenizer).

Started by the simulator with ``python -m supervisord_ms.sim.child``. It holds
GPU memory under its own pid in the ``file:`` GPU view, like SGLang's
scheduler processes. Normally it dies with its parent (PR_SET_PDEATHSIG) and by
SIGTERM; with ``--survive`` it ignores SIGTERM/SIGHUP and outlives the parent,
reproducing the orphaned schedulers that keep GPU memory after their server was
SIGKILLed.

Kept free of aiohttp so that starting one is cheap.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence

from ..gpus import GpuError, file_gpu_register, file_gpu_unregister

POLL_S = 0.1
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SGLang's kill_itself_when_parent_died: the kernel SIGKILLs this process when
    its parent exits (PR_SET_PDEATHSIG). Polling the parent pid stays as a fallback
    where prctl is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _log(index: int, message: str) -> None:
    try:
        print(f"sim-child[{index}]: {message}", flush=True)
    except (OSError, ValueError):  # the parent's pipe may be gone; living on matters more
        pass


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m supervisord_ms.sim.child")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--ready-fd", type=int, default=None, help="written to once registered")
    p.add_argument("--gpu-file", default=None)
    p.add_argument("--gpu-mib", type=int, default=0)
    p.add_argument("--gpus", default="", help="comma-separated GPU indexes")
    p.add_argument("--survive", action="store_true")
    p.add_argument("--leave-group", action="store_true")
    p.add_argument("--orphan-lifetime-s", type=float, default=3600.0)
    return p.parse_args(argv)


def _report(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (line + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    index = args.index
    if args.leave_group:
        os.setsid()
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    if args.survive:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    else:
        # SIGTERM keeps its default action: SGLang's scheduler processes die by it,
        # which is how a SIGTERM to the whole group cuts the server down mid-drain.
        for sig in (signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, on_signal)
        _die_with_parent()
        if os.getppid() != args.parent_pid:
            return 0  # the parent died before the kernel could be told

    pid = os.getpid()
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    registered = False
    if args.gpu_file and gpus:
        try:
            file_gpu_register(args.gpu_file, pid, gpus, args.gpu_mib, require_free=True)
            registered = True
        except GpuError as exc:
            _log(index, f"error: {exc}")
            _report(args.ready_fd, f"error: {exc}")
            return 1
    _log(
        index,
        f"pid={pid} pgid={os.getpgid(0)} parent={args.parent_pid} "
        f"gpus={','.join(map(str, gpus)) or '-'} gpu_mib={args.gpu_mib if registered else 0} "
        f"survive={'yes' if args.survive else 'no'}",
    )
    _report(args.ready_fd, "ok")

    orphaned_at: float | None = None
    try:
        while not stop:
            time.sleep(POLL_S)
            if os.getppid() != args.parent_pid:
                if not args.survive:
                    _log(index, "parent is gone, exiting")
                    break
                if orphaned_at is None:
                    orphaned_at = time.monotonic()
                    _log(index, "parent is gone; surviving as an orphan (simulated)")
                lifetime = args.orphan_lifetime_s
                if lifetime > 0 and time.monotonic() - orphaned_at >= lifetime:
                    _log(index, f"orphan lifetime of {lifetime:g}s over, exiting")
                    break
    finally:
        if registered:
            try:
                file_gpu_unregister(args.gpu_file, pid)
            except GpuError as exc:
                _log(index, f"cannot release GPU memory: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
