"""The GPU view: the file: backend (simulated GPUs) and the NVML adapter, the latter
against a stand-in ``pynvml`` module so it runs without a driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from supervisord_ms.errors import ModelServerdError
from supervisord_ms.gpus import (
    FileGpuView,
    GpuError,
    GpuInfo,
    GpuProcess,
    NvmlGpuView,
    file_gpu_register,
    file_gpu_unregister,
    gpu_holders,
    is_gpu_free,
    open_gpu_view,
    write_file_gpu_view,
)

MIB = 1024 * 1024


@pytest.fixture
def gpu_file(tmp_path):
    path = tmp_path / "gpus.json"
    write_file_gpu_view(path, 2, total_mib=1000)
    return str(path)


@pytest.fixture
def sleeper():
    """A live process that is not this one (stands for an orphan holding memory)."""
    procs = []

    def start():
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- GpuInfo and policies --------------------------------------------------------------


@pytest.mark.parametrize(
    "total, used, ratio, free",
    [
        (1000, 0, 0.9, True),
        (1000, 100, 0.9, True),
        (1000, 101, 0.9, False),
        (1000, 1000, 0.1, False),
        (1000, 1200, 0.0, True),  # over-reported use clamps free to 0, ratio 0 still passes
        (0, 0, 0.5, False),
    ],
)
def test_is_gpu_free(total, used, ratio, free):
    info = GpuInfo(index=0, name="g", total_mib=total, used_mib=used, processes=())
    assert is_gpu_free(info, ratio) is free
    assert info.free_mib == max(0, total - used)


def test_gpu_error_is_a_daemon_error():
    assert issubclass(GpuError, ModelServerdError)


# --- file: backend ---------------------------------------------------------------------


def test_fresh_file_view(gpu_file):
    view = open_gpu_view("file:" + gpu_file)
    assert isinstance(view, FileGpuView)
    gpus = view.snapshot()
    assert [(g.index, g.total_mib, g.used_mib, g.processes) for g in gpus] == [
        (0, 1000, 0, ()),
        (1, 1000, 0, ()),
    ]
    assert "simulation" in gpus[0].name
    assert gpus[0].free_ratio == 1.0
    view.close()


def test_live_processes_count_dead_and_zombies_do_not(gpu_file, sleeper):
    orphan = sleeper()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    zombie_pid = zombie.pid
    # not reaped yet: a zombie until zombie.wait() below
    file_gpu_register(gpu_file, os.getpid(), [0], 100)
    file_gpu_register(gpu_file, orphan.pid, [0, 1], 200)
    raw = json.loads(Path(gpu_file).read_text())
    raw["gpus"][0]["processes"].append({"pid": dead_pid(), "used_mib": 400})
    raw["gpus"][1]["processes"].append({"pid": zombie_pid, "used_mib": 300})
    with open(gpu_file, "w") as f:
        json.dump(raw, f)
    try:
        for _ in range(500):  # wait until the child has exited (and is a zombie)
            if psutil.Process(zombie_pid).status() == psutil.STATUS_ZOMBIE:
                break
            threading.Event().wait(0.01)
        view = FileGpuView(gpu_file)
        gpu0, gpu1 = view.snapshot()
        assert gpu0.used_mib == 300
        assert set(gpu0.processes) == {GpuProcess(os.getpid(), 100), GpuProcess(orphan.pid, 200)}
        assert gpu1.used_mib == 200 and gpu1.processes == (GpuProcess(orphan.pid, 200),)
        assert gpu_holders(view, [1]) == {1: [GpuProcess(orphan.pid, 200)]}
        assert not is_gpu_free(gpu0, 0.9) and is_gpu_free(gpu0, 0.7)
    finally:
        zombie.wait()

    orphan.kill()
    orphan.wait()
    assert [g.used_mib for g in view.snapshot()] == [100, 0]


def test_register_replaces_and_unregister_releases(gpu_file):
    pid = os.getpid()
    file_gpu_register(gpu_file, pid, [0, 1], 100)
    file_gpu_register(gpu_file, pid, [1], 250)
    view = FileGpuView(gpu_file)
    assert [g.used_mib for g in view.snapshot()] == [100, 250]
    file_gpu_unregister(gpu_file, pid)
    assert [g.used_mib for g in view.snapshot()] == [0, 0]
    file_gpu_unregister(gpu_file + ".missing", pid)  # nothing to release


def test_register_prunes_dead_entries(gpu_file):
    file_gpu_register(gpu_file, dead_pid(), [0], 10)  # written, then pruned next time
    file_gpu_register(gpu_file, os.getpid(), [0], 20)
    procs = json.loads(Path(gpu_file).read_text())["gpus"][0]["processes"]
    assert procs == [{"pid": os.getpid(), "used_mib": 20}]


def test_register_out_of_memory_and_unknown_gpu(gpu_file, sleeper):
    holder = sleeper()
    file_gpu_register(gpu_file, holder.pid, [0], 900)
    with pytest.raises(GpuError, match=rf"out of memory on simulated GPU 0.*{holder.pid}"):
        file_gpu_register(gpu_file, os.getpid(), [0], 200, require_free=True)
    file_gpu_register(gpu_file, os.getpid(), [1], 200, require_free=True)
    with pytest.raises(GpuError, match="GPU 7 is not in GPU view file"):
        file_gpu_register(gpu_file, os.getpid(), [7], 1)
    with pytest.raises(GpuError, match="GPU 5 is not on this host"):
        gpu_holders(FileGpuView(gpu_file), [0, 5])


def test_concurrent_registrations_are_not_lost(gpu_file, sleeper):
    holders = [sleeper() for _ in range(6)]
    threads = [
        threading.Thread(target=file_gpu_register, args=(gpu_file, p.pid, [0, 1], 10))
        for p in holders
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gpus = FileGpuView(gpu_file).snapshot()
    assert {p.pid for p in gpus[0].processes} == {p.pid for p in holders}
    assert gpus[1].used_mib == 60


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(GpuError, match=f"{path} does not exist"):
        open_gpu_view(f"file:{path}")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[]", 'no "gpus" list'),
        ('{"gpus": [{"index": 0}]}', "total_mib"),
        ('{"gpus": [{"index": -1, "total_mib": 10}]}', "index"),
        ('{"gpus": [{"index": 0, "total_mib": 10, "processes": [{"pid": "x"}]}]}', "processes"),
        ('{"gpus": [{"index": 0, "total_mib": 9}, {"index": 0, "total_mib": 9}]}', "share"),
    ],
)
def test_corrupt_file(tmp_path, content, problem):
    path = tmp_path / "gpus.json"
    path.write_text(content)
    with pytest.raises(GpuError, match=problem) as info:
        FileGpuView(path)
    assert str(path) in str(info.value)


def test_open_gpu_view_rejects_unknown_backend():
    with pytest.raises(GpuError, match='expected "nvml" or "file:'):
        open_gpu_view("cuda")


def test_write_file_gpu_view_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "gpus.json"
    write_file_gpu_view(path, 3, total_mib=500, name="Fake")
    gpus = FileGpuView(path).snapshot()
    assert [(g.index, g.name, g.total_mib) for g in gpus] == [(i, "Fake", 500) for i in range(3)]
    with pytest.raises(GpuError):
        write_file_gpu_view(path, 0)


# --- NVML --------------------------------------------------------------------------------


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: per-call failures are set in ``fail`` as NVML codes."""

    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
    NVML_ERROR_UNKNOWN = 999

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

        def __str__(self):
            return f"fake NVML error {self.value}"

    def __init__(self, devices):
        super().__init__("pynvml")
        self.devices = devices
        self.fail: dict[str, int] = {}
        self.calls: list[str] = []

    def _call(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise self.NVMLError(self.fail[name])

    def nvmlInit(self):
        self._call("nvmlInit")

    def nvmlShutdown(self):
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex")
        return self.devices[index]

    def nvmlDeviceGetName(self, handle):
        self._call("nvmlDeviceGetName")
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._call("nvmlDeviceGetMemoryInfo")
        total, used = handle["total"], handle["used"]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in handle["procs"]]


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml(
        [
            {
                "name": b"NVIDIA H100 80GB HBM3",
                "total": 81559 * MIB,
                "used": 70000 * MIB,
                "procs": [(4242, 69000 * MIB), (4243, None)],
            },
            {"name": "NVIDIA H100 80GB HBM3", "total": 81559 * MIB, "used": 5 * MIB, "procs": []},
        ]
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_nvml_readings(nvml):
    view = open_gpu_view("nvml")
    assert isinstance(view, NvmlGpuView)
    gpu0, gpu1 = view.snapshot()
    assert gpu0 == GpuInfo(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        total_mib=81559,
        used_mib=70000,
        processes=(GpuProcess(4242, 69000), GpuProcess(4243, 0)),  # None: unknown, not free
    )
    assert gpu1.used_mib == 5 and gpu1.processes == ()
    assert is_gpu_free(gpu1, 0.9) and not is_gpu_free(gpu0, 0.9)
    assert gpu_holders(view, [0]) == {0: [GpuProcess(4242, 69000), GpuProcess(4243, 0)]}
    view.close()
    view.close()
    assert nvml.calls.count("nvmlShutdown") == 1


@pytest.mark.parametrize(
    "call, code, message",
    [
        ("nvmlInit", 12, 'NVML library not found.*install the NVIDIA driver.*gpu_backend = "file:'),
        ("nvmlInit", 9, "driver is not loaded"),
        ("nvmlInit", 4, "no permission"),
        ("nvmlInit", 18, "reboot"),
        ("nvmlDeviceGetCount", 999, r"nvmlDeviceGetCount failed.*999"),
    ],
)
def test_nvml_errors_at_open(nvml, call, code, message):
    nvml.fail[call] = code
    with pytest.raises(GpuError, match=message):
        NvmlGpuView()


def test_nvml_zero_gpus(nvml):
    nvml.devices = []
    with pytest.raises(GpuError, match="no GPUs"):
        NvmlGpuView()
    assert "nvmlShutdown" in nvml.calls


def test_nvml_errors_during_snapshot(nvml):
    view = NvmlGpuView()
    nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = nvml.NVML_ERROR_NOT_SUPPORTED
    assert [g.processes for g in view.snapshot()] == [(), ()]  # memory totals still read
    nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = nvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(GpuError, match="no permission.*GPU 0"):
        view.snapshot()
    nvml.fail = {"nvmlDeviceGetMemoryInfo": nvml.NVML_ERROR_GPU_IS_LOST}
    with pytest.raises(GpuError, match="GPU 0 is lost"):
        view.snapshot()


def test_nvml_module_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuError, match="nvidia-ml-py"):
        open_gpu_view("nvml")


def test_real_nvml_reports_a_clear_error_without_a_driver():
    try:
        view = NvmlGpuView()
    except GpuError as exc:
        assert "NVML" in str(exc) or "NVIDIA" in str(exc)
    else:  # a GPU host: the real library works
        assert view.snapshot()
        view.close()
