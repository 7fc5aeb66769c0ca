"""hostcheck: a config's interpreter, module and GPU indexes against this host
(issue 13, item 2). The policies are tables; the probe runs a real interpreter."""

from __future__ import annotations

import errno
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisord_ms import hostcheck
from supervisord_ms.config import Config, ConfigError, ServerConfig, SglangConfig, parse_config
from supervisord_ms.gpus import GpuError, write_file_gpu_view
from supervisord_ms.hostcheck import ProbeResult, gpu_problems, probe_verdict

PY = sys.executable
LOCAL = ["127.0.0.1"]


def _server(name: str, gpus: tuple[int, ...], *, local: bool = True, **kw: Any) -> ServerConfig:
    return ServerConfig(
        name=name,
        ip="127.0.0.1",
        port=30000,
        model_size="8B",
        model_path="/m",
        gpus=gpus,
        local=local,
        **kw,
    )


# --- GPU indexes: a table ------------------------------------------------------------

GPU_CASES = [
    # (servers' gpus, indexes present, expected problem fragments, one list per problem)
    ([(0,), (1, 2)], {0, 1, 2, 3}, []),
    ([(3,)], {0, 1, 2, 3}, []),
    ([(4,)], {0, 1, 2, 3}, [["servers[0].gpus: got [4]", "no GPU 4", "4 GPUs (indexes 0-3)"]]),
    (
        [(0,), (2, 5, 6)],
        {0, 1, 2, 3},
        [["servers[1].gpus: got [2, 5, 6]", "no GPU 5, 6"]],
    ),
    ([(0,)], set(), [["no GPU 0", "it has 0 GPUs (none)"]]),
    ([(1,)], {0}, [["it has 1 GPU (indexes 0)"]]),
    ([(1,)], {0, 2}, [["2 GPUs (indexes 0, 2)"]]),
]


@pytest.mark.parametrize(("gpus", "present", "expected"), GPU_CASES)
def test_gpu_problems(gpus, present, expected):
    servers = [_server(f"s{i}", g) for i, g in enumerate(gpus)]
    problems = gpu_problems(servers, present, "nvml")
    assert len(problems) == len(expected), problems
    for problem, fragments in zip(problems, expected, strict=True):
        for fragment in fragments:
            assert fragment in problem, (fragment, problem)
        assert 'daemon.gpu_backend "nvml"' in problem


def test_gpu_problems_leave_servers_this_host_does_not_launch():
    servers = [
        _server("remote", (9,), local=False),
        _server("unmanaged", (9,), managed=False),
    ]
    assert gpu_problems(servers, {0}, "nvml") == []


# --- the module lookup's verdict: a table ----------------------------------------------

VERDICT_CASES = [
    (ProbeResult(0), None, ()),
    (
        ProbeResult(2, "No module named 'sglang'"),
        "problem",
        ('sglang.module: "sglang.launch_server" is not found by py', "No module named", "pip"),
    ),
    (ProbeResult(3), "problem", ("package without a __main__",)),
    (ProbeResult(4, "Traceback\nImportError: libcuda.so"), "problem", ("ImportError: libcuda",)),
    (ProbeResult(1, "SyntaxError"), "problem", ('sglang.python: got "py"', "exit status 1")),
    (ProbeResult(None), "warning", ("did not finish", "not checked")),
    (
        ProbeResult(None, error=OSError(errno.ENOEXEC, "Exec format error")),
        "problem",
        ("cannot be started", "Exec format error"),
    ),
    (
        ProbeResult(None, error=OSError(errno.EMFILE, "Too many open files")),
        "warning",
        ("not checked now",),
    ),
]


@pytest.mark.parametrize(("result", "kind", "fragments"), VERDICT_CASES)
def test_probe_verdict(result, kind, fragments):
    verdict = probe_verdict("py", "sglang.launch_server", result)
    if kind is None:
        assert verdict is None
        return
    assert verdict is not None and verdict[0] == kind, verdict
    for fragment in fragments:
        assert fragment in verdict[1], (fragment, verdict[1])


# --- the interpreter on this host ---------------------------------------------------------


def _config(tmp_path: Path, python: str = PY, module: str = "supervisord_ms.sim", **kw) -> Config:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    write_file_gpu_view(str(tmp_path / "gpus.json"), kw.pop("gpu_count", 4))
    gpus = kw.pop("gpus", [0])
    text = (
        f'[daemon]\ngpu_backend = "file:{tmp_path / "gpus.json"}"\n'
        f'[sglang]\npython = "{python}"\nmodule = "{module}"\n'
        f'[[servers]]\nname = "a"\nip = "127.0.0.1"\nport = 30000\nmodel_size = "8B"\n'
        f'model_path = "{model}"\ngpus = {gpus}\n' + "".join(f"{k} = {v}\n" for k, v in kw.items())
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return parse_config(text, path, host_addresses=LOCAL)


def _refused(config: Config) -> str:
    with pytest.raises(ConfigError) as info:
        hostcheck.check_host(config)
    (problem,) = info.value.problems
    assert problem.startswith(f"{config.path}: "), problem
    return problem


def test_the_simulator_passes(tmp_path: Path):
    config = _config(tmp_path)
    assert hostcheck.check_host(config) is config


def test_a_missing_interpreter_is_refused(tmp_path: Path):
    problem = _refused(_config(tmp_path, python="/nonexistent/python"))
    assert 'sglang.python: got "/nonexistent/python", which does not exist on this host' in problem


def test_an_interpreter_not_on_path_is_refused(tmp_path: Path):
    problem = _refused(_config(tmp_path, python="no-such-python-3.99"))
    assert '"no-such-python-3.99", which is not on PATH' in problem
    assert "full path" in problem


def test_a_file_that_is_not_executable_is_refused(tmp_path: Path):
    plain = tmp_path / "python"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    problem = _refused(_config(tmp_path, python=str(plain)))
    assert "not executable" in problem


def test_an_executable_that_is_no_interpreter_is_refused(tmp_path: Path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 7\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    problem = _refused(_config(tmp_path, python=str(fake)))
    assert "does not run as a Python interpreter (exit status 7)" in problem


def test_a_module_the_interpreter_cannot_find_is_refused(tmp_path: Path):
    problem = _refused(_config(tmp_path, module="sglang_no_such.launch_server"))
    assert 'sglang.module: "sglang_no_such.launch_server" is not found by' in problem
    assert "No module named 'sglang_no_such'" in problem


def test_a_package_without_main_is_refused(tmp_path: Path):
    problem = _refused(_config(tmp_path, module="supervisord_ms"))
    assert "package without a __main__ module" in problem


def test_the_lookup_runs_with_sglang_env(tmp_path: Path):
    """[sglang].env reaches the launch, so it reaches the lookup: a PYTHONPATH there
    makes a module found that the daemon's own environment does not have."""
    extra = tmp_path / "extra"
    (extra / "mysglang").mkdir(parents=True)
    (extra / "mysglang" / "__init__.py").write_text("")
    (extra / "mysglang" / "serve.py").write_text("")
    config = _config(tmp_path, module="mysglang.serve")
    with pytest.raises(ConfigError):
        hostcheck.check_host(config)
    text = Path(config.path).read_text() + f'[sglang.env]\nPYTHONPATH = "{extra}"\n'
    with_env = parse_config(text, config.path, host_addresses=LOCAL)
    assert hostcheck.check_host(with_env) is with_env


def test_a_slow_lookup_is_a_warning_not_a_refusal(tmp_path: Path):
    config = _config(tmp_path)
    checked = hostcheck.check_host(config, runner=lambda argv, env, timeout: ProbeResult(None))
    (warning,) = checked.warnings
    assert "did not finish looking for it" in warning


def test_no_launch_here_no_interpreter_check(tmp_path: Path):
    """A host that only probes (no server of its own) needs no sglang."""
    config = _config(tmp_path, python="/nonexistent/python", managed="false")
    assert config.managed_servers == ()
    assert hostcheck.check_host(config) is config


# --- GPU indexes on this host ----------------------------------------------------------------


def test_a_gpu_index_beyond_the_hosts_gpus_is_refused(tmp_path: Path):
    problem = _refused(_config(tmp_path, gpus=[4]))
    assert "servers[0].gpus: got [4], but this host has no GPU 4" in problem
    assert "it has 4 GPUs (indexes 0-3)" in problem


def test_an_unreadable_gpu_view_skips_the_gpu_check(tmp_path: Path):
    config = _config(tmp_path, gpus=[4])

    def broken(backend: str):
        raise GpuError("NVML not loaded")

    assert hostcheck.check_host(config, gpu_opener=broken) is config


def test_every_problem_is_reported_at_once(tmp_path: Path):
    config = _config(tmp_path, python="/nonexistent/python", gpus=[9])
    with pytest.raises(ConfigError) as info:
        hostcheck.check_host(config)
    assert len(info.value.problems) == 2
    assert "sglang.python" in info.value.problems[0]
    assert "servers[0].gpus" in info.value.problems[1]


def test_launch_env_has_sglang_env_and_no_notify_socket(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    config = Config(path="x", sglang=SglangConfig(env={"PYTHONPATH": "/opt/x"}))
    env = hostcheck.launch_env(config)
    assert env["PYTHONPATH"] == "/opt/x"
    assert "NOTIFY_SOCKET" not in env
