"""The daemon's view of this host's GPUs: memory totals, use, and who holds it.

Two backends answer the same questions:

- ``nvml``: NVIDIA's management library through ``pynvml`` (package
  ``nvidia-ml-py``), imported only when this backend is opened, so hosts and
  tests without a driver never load it.
- ``file:/path/gpus.json``: simulated GPUs. A JSON file lists GPUs and the
  processes holding memory on them; the simulator registers its pids there
  while it runs. Memory of dead processes does not count (as on a real GPU,
  where a dead process's memory is released) but memory of live orphans
  does, which is exactly the case the supervisor must handle.

Every failure becomes a :class:`GpuError` whose message names the cause and
what to do, so the daemon can print it to an operator as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from .errors import ModelServerdError

__all__ = [
    "FileGpuView",
    "GpuError",
    "GpuInfo",
    "GpuProcess",
    "GpuView",
    "NvmlGpuView",
    "file_gpu_register",
    "file_gpu_unregister",
    "gpu_holders",
    "is_gpu_free",
    "open_gpu_view",
    "read_file_gpu_view",
    "write_file_gpu_view",
]

MIB = 1024 * 1024
DEFAULT_SIM_GPU_NAME = "Simulated H100 80GB (simulation)"


class GpuError(ModelServerdError):
    """Raised when the GPUs cannot be read (no driver, no permission, a missing or
    corrupt ``file:`` view). Seen by operators at daemon start and by
    ``modelserverd gpus``; the message says what failed and what to do."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_mib: int
    used_mib: int
    processes: tuple[GpuProcess, ...] = ()

    @property
    def free_mib(self) -> int:
        return max(0, self.total_mib - self.used_mib)

    @property
    def free_ratio(self) -> float:
        return self.free_mib / self.total_mib if self.total_mib > 0 else 0.0


class GpuView(Protocol):
    def snapshot(self) -> list[GpuInfo]: ...

    def close(self) -> None: ...


def is_gpu_free(info: GpuInfo, free_ratio: float) -> bool:
    """A GPU is free for a launch when enough of its memory is unused; a ratio rather
    than "no processes" because drivers and monitoring tools hold a little."""
    return info.total_mib > 0 and info.free_mib / info.total_mib >= free_ratio


def gpu_holders(view: GpuView, indexes: Iterable[int]) -> dict[int, list[GpuProcess]]:
    """Who holds memory on these GPUs, so a busy GPU can be reported with the pids
    that keep it busy. Raises :class:`GpuError` for an index this host lacks."""
    by_index = {g.index: g for g in view.snapshot()}
    result: dict[int, list[GpuProcess]] = {}
    for index in indexes:
        info = by_index.get(index)
        if info is None:
            have = ", ".join(str(i) for i in sorted(by_index)) or "none"
            raise GpuError(
                f"GPU {index} is not on this host (GPUs here: {have}); "
                "fix the server's gpus in the config"
            )
        result[index] = list(info.processes)
    return result


def open_gpu_view(backend: str) -> GpuView:
    """Open the backend named by ``daemon.gpu_backend``."""
    if backend == "nvml":
        return NvmlGpuView()
    if backend.startswith("file:") and len(backend) > 5:
        return FileGpuView(backend[5:])
    raise GpuError(f'unknown gpu_backend "{backend}": expected "nvml" or "file:/path/gpus.json"')


# --- NVML -------------------------------------------------------------------------

_FILE_HINT = 'or use gpu_backend = "file:/path/gpus.json" for simulated GPUs'


class NvmlGpuView:
    """Real GPUs through NVML. ``pynvml`` is imported here, not at module level, so
    that importing this module never needs the NVIDIA library."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise GpuError(
                "the pynvml module is missing: install the nvidia-ml-py package "
                f"(pip install nvidia-ml-py) {_FILE_HINT}"
            ) from exc
        self._nvml: Any = pynvml
        self._closed = False
        with self._translate("nvmlInit"):
            pynvml.nvmlInit()
        try:
            with self._translate("nvmlDeviceGetCount"):
                count = pynvml.nvmlDeviceGetCount()
            if count <= 0:
                raise GpuError(
                    "NVML reports no GPUs on this host: check `nvidia-smi` and that the "
                    f"devices are visible to the daemon, {_FILE_HINT}"
                )
        except GpuError:
            self.close()
            raise

    @contextlib.contextmanager
    def _translate(self, call: str, index: int | None = None) -> Iterator[None]:
        nvml = self._nvml
        try:
            yield
        except nvml.NVMLError as exc:
            raise GpuError(_nvml_message(nvml, exc, call, index)) from exc
        except OSError as exc:  # the shared library can fail to load as an OSError
            raise GpuError(f"NVML call {call} failed: {exc}; {_FILE_HINT}") from exc

    def snapshot(self) -> list[GpuInfo]:
        nvml = self._nvml
        with self._translate("nvmlDeviceGetCount"):
            count = nvml.nvmlDeviceGetCount()
        gpus: list[GpuInfo] = []
        for index in range(count):
            with self._translate("nvmlDeviceGetHandleByIndex", index):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            with self._translate("nvmlDeviceGetName", index):
                name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            with self._translate("nvmlDeviceGetMemoryInfo", index):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                raw_procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError as exc:
                # Some virtualised GPUs cannot list processes; memory totals still work.
                if getattr(exc, "value", None) != nvml.NVML_ERROR_NOT_SUPPORTED:
                    raise GpuError(
                        _nvml_message(nvml, exc, "nvmlDeviceGetComputeRunningProcesses", index)
                    ) from exc
                raw_procs = []
            processes = tuple(
                GpuProcess(pid=int(p.pid), used_mib=_bytes_to_mib(p.usedGpuMemory))
                for p in raw_procs
            )
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(name),
                    total_mib=_bytes_to_mib(memory.total),
                    used_mib=_bytes_to_mib(memory.used),
                    processes=processes,
                )
            )
        return gpus

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def _bytes_to_mib(value: int | None) -> int:
    # usedGpuMemory is None where the driver cannot tell (e.g. WDDM, some containers).
    return int(value) // MIB if value else 0


def _nvml_message(nvml: Any, exc: Exception, call: str, index: int | None) -> str:
    code = getattr(exc, "value", None)
    where = f" for GPU {index}" if index is not None else ""
    if code == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", object()):
        return (
            "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver is installed "
            'on this host; install the NVIDIA driver or use gpu_backend = "file:..." '
            "for simulated GPUs"
        )
    if code == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", object()):
        return (
            "the NVIDIA driver is not loaded (NVML_ERROR_DRIVER_NOT_LOADED): check "
            "`nvidia-smi`, load the kernel module (modprobe nvidia) or reboot after a "
            f"driver update, {_FILE_HINT}"
        )
    if code == getattr(nvml, "NVML_ERROR_NO_PERMISSION", object()):
        return (
            f"no permission to query the GPUs through NVML ({call}{where}): run the "
            "daemon as a user that may open /dev/nvidia* (check the device permissions)"
        )
    if code == getattr(nvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", object()):
        return (
            "the NVIDIA driver and its NVML library have different versions: reboot "
            "(or reload the nvidia kernel modules) after the driver upgrade"
        )
    if code == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", object()):
        return (
            f"GPU{(' ' + str(index)) if index is not None else ''} is lost (fell off the "
            "bus): check `dmesg` and `nvidia-smi`; the host likely needs a reset"
        )
    return f"NVML call {call}{where} failed: {exc} (NVML error code {code})"


# --- file: backend ----------------------------------------------------------------


class FileGpuView:
    """Simulated GPUs from a JSON file. Checks the file at open so a wrong path is
    reported when the daemon starts rather than at the first launch."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.snapshot()

    def snapshot(self) -> list[GpuInfo]:
        data = read_file_gpu_view(self.path)
        alive: dict[int, bool] = {}
        gpus: list[GpuInfo] = []
        for gpu in data["gpus"]:
            live = []
            for proc in gpu["processes"]:
                pid = proc["pid"]
                if pid not in alive:
                    alive[pid] = _pid_alive(pid)
                if alive[pid]:
                    live.append(GpuProcess(pid=pid, used_mib=proc["used_mib"]))
            gpus.append(
                GpuInfo(
                    index=gpu["index"],
                    name=gpu["name"],
                    total_mib=gpu["total_mib"],
                    used_mib=sum(p.used_mib for p in live),
                    processes=tuple(live),
                )
            )
        return gpus

    def close(self) -> None:
        pass


def _pid_alive(pid: int) -> bool:
    """A zombie has released its memory on a real GPU, so it counts as dead here."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(path: str, data: Any) -> dict[str, Any]:
    def bad(what: str) -> GpuError:
        return GpuError(
            f"GPU view file {path} is corrupt: {what}; expected "
            '{"gpus": [{"index", "name", "total_mib", "processes": [{"pid", "used_mib"}]}]} '
            "(recreate it, e.g. with `modelserverd demo`)"
        )

    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise bad('no "gpus" list at the top level')
    for i, gpu in enumerate(data["gpus"]):
        where = f"gpus[{i}]"
        if not isinstance(gpu, dict):
            raise bad(f"{where} is not an object")
        if not _is_int(gpu.get("index")) or gpu["index"] < 0:
            raise bad(f"{where}.index is not an integer >= 0")
        if not _is_int(gpu.get("total_mib")) or gpu["total_mib"] <= 0:
            raise bad(f"{where}.total_mib is not an integer > 0")
        gpu.setdefault("name", DEFAULT_SIM_GPU_NAME)
        if not isinstance(gpu["name"], str):
            raise bad(f"{where}.name is not a string")
        procs = gpu.setdefault("processes", [])
        if not isinstance(procs, list):
            raise bad(f"{where}.processes is not a list")
        for j, proc in enumerate(procs):
            ok = (
                isinstance(proc, dict)
                and _is_int(proc.get("pid"))
                and _is_int(proc.get("used_mib"))
                and proc["used_mib"] >= 0
            )
            if not ok:
                raise bad(f"{where}.processes[{j}] is not {{pid, used_mib >= 0}}")
    indexes = [g["index"] for g in data["gpus"]]
    if len(set(indexes)) != len(indexes):
        raise bad("two GPUs share an index")
    return data


def read_file_gpu_view(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw, validated file contents (dead processes included)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise GpuError(
            f"GPU view file {path} does not exist: create it (`modelserverd demo` writes "
            'one) or point gpu_backend = "file:..." at the right path'
        ) from None
    except OSError as exc:
        raise GpuError(f"cannot read GPU view file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise GpuError(
            f"GPU view file {path} is corrupt: not valid JSON ({exc}); recreate it, "
            "e.g. with `modelserverd demo`"
        ) from None
    return _validate(path, data)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Writers serialise on a side lock file: the data file itself is replaced by
    rename, so a lock held on it would guard an inode nobody reads any more."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise GpuError(f"cannot lock GPU view file {path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: str, data: dict[str, Any]) -> None:
    # Readers never take the lock: they see the old file or the new one, never half.
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gpus-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise GpuError(f"cannot write GPU view file {path}: {exc}") from None


def _prune_dead(data: dict[str, Any]) -> None:
    # Entries of dead pids would count for nothing; dropping them keeps the file small
    # over many simulated restarts.
    alive: dict[int, bool] = {}
    for gpu in data["gpus"]:
        kept = []
        for proc in gpu["processes"]:
            pid = proc["pid"]
            if pid not in alive:
                alive[pid] = _pid_alive(pid)
            if alive[pid]:
                kept.append(proc)
        gpu["processes"] = kept


def write_file_gpu_view(
    path: str | os.PathLike[str],
    count: int,
    total_mib: int = 81920,
    name: str = DEFAULT_SIM_GPU_NAME,
) -> None:
    """Create (or reset) a view of ``count`` idle simulated GPUs."""
    path = os.fspath(path)
    if count < 1 or total_mib < 1:
        raise GpuError(f"cannot create GPU view file {path}: need count >= 1 and total_mib >= 1")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise GpuError(f"cannot create folder for GPU view file {path}: {exc}") from None
    data = {
        "gpus": [
            {"index": i, "name": name, "total_mib": int(total_mib), "processes": []}
            for i in range(count)
        ]
    }
    with _locked(path):
        _write_atomic(path, data)


def file_gpu_register(
    path: str | os.PathLike[str],
    pid: int,
    gpu_indexes: Sequence[int],
    used_mib: int,
    *,
    require_free: bool = False,
) -> None:
    """Record that ``pid`` holds ``used_mib`` on each of ``gpu_indexes`` (replacing an
    earlier entry of the same pid). With ``require_free`` the check and the write
    happen under one lock and :class:`GpuError` reports an out-of-memory GPU, the
    way a real CUDA allocation would fail on a GPU someone else holds."""
    path = os.fspath(path)
    with _locked(path):
        data = read_file_gpu_view(path)
        _prune_dead(data)
        by_index = {g["index"]: g for g in data["gpus"]}
        missing = [i for i in gpu_indexes if i not in by_index]
        if missing:
            have = ", ".join(str(i) for i in sorted(by_index))
            raise GpuError(
                f"GPU {missing[0]} is not in GPU view file {path} (it has GPUs {have}): "
                "check CUDA_VISIBLE_DEVICES / the server's gpus"
            )
        for index in gpu_indexes:
            gpu = by_index[index]
            others = [p for p in gpu["processes"] if p["pid"] != pid]
            if require_free:
                free = gpu["total_mib"] - sum(p["used_mib"] for p in others)
                if free < used_mib:
                    holders = ", ".join(str(p["pid"]) for p in others) or "none"
                    raise GpuError(
                        f"out of memory on simulated GPU {index}: need {used_mib} MiB, "
                        f"{free} MiB free (held by pids {holders})"
                    )
            gpu["processes"] = [*others, {"pid": int(pid), "used_mib": int(used_mib)}]
        _write_atomic(path, data)


def file_gpu_unregister(path: str | os.PathLike[str], pid: int) -> None:
    """Release everything ``pid`` holds, as a clean process exit does on a real GPU.
    A missing file means there is nothing to release."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    with _locked(path):
        data = read_file_gpu_view(path)
        for gpu in data["gpus"]:
            gpu["processes"] = [p for p in gpu["processes"] if p["pid"] != pid]
        _prune_dead(data)
        _write_atomic(path, data)
