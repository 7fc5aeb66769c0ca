"""What an operator met, each now refused or recorded:

- a bad ``[sglang].python`` passed ``check-config``; a reload then restarted every
   ready server on it and all went ``fatal``. A GPU index the host lacks left a
   server in ``waiting_gpu`` for good;
- launches that failed left no ``restarts`` row, and ``modelserverd logs`` did not
   say why a launch ended;
- a relative ``model_path`` was read from the current directory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port
from daemon_harness import ApiError, DaemonUnderTest, make_daemon, wait_until

from supervisord_ms import cli as cli_module
from supervisord_ms.config import ConfigError, parse_config
from supervisord_ms.daemon import load_daemon_config
from supervisord_ms.launcher import append_log_note, build_launch

PY_LINE = f"python = {json.dumps(sys.executable)}"


def _edit(d: DaemonUnderTest, old: str, new: str) -> None:
    text = d.config_path.read_text()
    assert old in text, old
    d.config_path.write_text(text.replace(old, new))


def _wrapper(path: Path) -> Path:
    """An interpreter of its own for a test: a script that runs this one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    path.chmod(0o755)
    return path


def _restarts(d: DaemonUnderTest, name: str) -> list[tuple]:
    return d.query(
        "select reason, old_pid, new_pid, exit_code, message from restarts "
        "where server = ? order by id",
        name,
    )


def _rows(d: DaemonUnderTest, name: str, count: int) -> list[tuple]:
    """The server's restart rows once there are ``count`` of them (they are queued)."""

    def ready() -> list[tuple] | None:
        rows = _restarts(d, name)
        return rows if len(rows) == count else None

    return wait_until(ready, 10, f"{count} restart rows of {name}")


def _server_log(d: DaemonUnderTest, name: str) -> str:
    """What ``modelserverd logs NAME`` prints."""
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ms.cli", "logs", name, "-n", "200"]
        + ["--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# --- item 2: what cannot start is refused before anything is touched ----------------------


def test_check_config_refuses_an_interpreter_that_does_not_exist(tmp_path: Path):
    d = make_daemon(tmp_path / "d", [{"name": "a", "port": free_port(), "gpus": [0]}])
    _edit(d, PY_LINE, 'python = "/nonexistent/python"')
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--config", str(d.config_path)])
    assert result.exit_code == cli_module.EXIT_CONFIG
    assert (
        f'{d.config_path}: sglang.python: got "/nonexistent/python", which does not exist on '
        "this host; expected the path of the interpreter that has sglang installed"
    ) in result.stderr


def test_check_config_refuses_a_module_the_interpreter_lacks_and_a_gpu_the_host_lacks(
    tmp_path: Path,
):
    d = make_daemon(tmp_path / "d", [{"name": "a", "port": free_port(), "gpus": [2, 6]}])
    _edit(d, '"supervisord_ms.sim"', '"sglang_not_here.launch_server"')
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--config", str(d.config_path)])
    assert result.exit_code == cli_module.EXIT_CONFIG
    assert "config refused (2 problem(s))" in result.stderr
    assert 'sglang.module: "sglang_not_here.launch_server" is not found by' in result.stderr
    assert "servers[0].gpus: got [2, 6], but this host has no GPU 6: it has 4 GPUs" in (
        result.stderr
    )


def test_check_config_passes_the_simulator(tmp_path: Path):
    d = make_daemon(tmp_path / "d", [{"name": "a", "port": free_port(), "gpus": [3]}])
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--config", str(d.config_path)])
    assert result.exit_code == 0, result.output
    assert "OK, 1 servers (1 launched by this host)" in result.stdout


def test_daemon_refuses_to_start_with_a_gpu_the_host_lacks(daemon_factory):
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [4]}])
    d.start(wait=False)
    wait_until(lambda: d.proc.poll() is not None, 30, "the daemon's exit")
    assert d.proc.returncode == 78  # EX_CONFIG: systemd does not restart it in a loop
    assert "servers[0].gpus: got [4], but this host has no GPU 4" in d.log()
    assert not Path(d.socket).exists()


def test_reload_that_cannot_start_is_refused_and_ready_servers_keep_running(daemon_factory):
    d = daemon_factory(
        [
            {"name": "a", "port": free_port(), "gpus": [0]},
            {"name": "b", "port": free_port(), "gpus": [1]},
        ]
    ).start()
    d.wait_all_ready()
    pids = {n: d.server(n)["pid"] for n in ("a", "b")}
    original = d.config_path.read_text()

    bad_configs = [
        (PY_LINE, 'python = "/nonexistent/python"', 'sglang.python: got "/nonexistent/python"'),
        ('"supervisord_ms.sim"', '"supervisord_ms.no_such_sim"', "is not found by"),
        ("gpus = [1]", "gpus = [7]", "servers[1].gpus: got [7], but this host has no GPU 7"),
    ]
    for old, new, expected in bad_configs:
        d.config_path.write_text(original.replace(old, new))
        with pytest.raises(ApiError) as info:
            d.api("POST", "/v1/reload")
        assert info.value.status == 400 and info.value.code == "bad_config"
        assert "the running one stays in force" in str(info.value)
        assert expected in str(info.value)
        rows = wait_until(
            lambda e=expected: d.query(
                "select message from events where kind = 'reload_refused' and message like ?",
                f"%{e}%",
            ),
            10,
            f"a reload_refused event naming {expected!r}",
        )
        assert "ready servers keep running: a, b" in rows[0][0]

    # Nothing was touched: same processes, no restart, still ready.
    for name, pid in pids.items():
        server = d.server(name)
        assert (server["state"], server["pid"]) == ("ready", pid)
    assert d.query("select count(*) from restarts")[0][0] == 0

    d.config_path.write_text(original)
    result = d.api("POST", "/v1/reload")
    assert result["restarted"] == [] and sorted(result["unchanged"]) == ["a", "b"]


# --- item 3: every relaunch is a row; the server's log says why each launch ended ------------


def test_launches_that_fail_are_restart_rows_and_lines_in_the_servers_log(
    daemon_factory, tmp_path: Path
):
    wrapper = _wrapper(tmp_path / "bin" / "python")
    d = daemon_factory(
        [{"name": "a", "port": free_port(), "gpus": [0]}], restart={"max_failures": 3}
    )
    _edit(d, PY_LINE, f"python = {json.dumps(str(wrapper))}")
    d.start()
    ready_pid = d.wait_state("a", "ready")["pid"]

    wrapper.unlink()  # an upgrade takes the interpreter away under the running daemon
    d.api("POST", "/v1/servers/a/restart")
    d.wait_state("a", "fatal", 30)
    rows = _rows(d, "a", 3)
    # The restart by request, then two relaunches after failed launches; none got a pid.
    assert [(r[0], r[2]) for r in rows] == [("manual", None), ("crash", None), ("crash", None)]
    assert rows[0][1] == ready_pid
    assert rows[0][4].startswith("restart requested; this launch failed: cannot start")
    assert rows[1][4].startswith("launch failed: cannot start")
    assert rows[2][4].endswith("this launch failed the same way")
    recent = d.query(
        "select count(*) from restarts where server = 'a' and ts >= datetime('now', '-1 day')"
    )
    assert recent[0][0] == 3  # the README's "restarts in the last 24 h" counts them

    log = _server_log(d, "a")
    assert "modelserverd: launch ended after" in log
    assert "stopped: restart requested (manual); relaunching" in log
    failed = [line for line in log.splitlines() if "modelserverd: launch failed:" in line]
    assert len(failed) == 3, log
    assert "restarting in" in failed[0]
    assert (
        "fatal: 3 failures within 60 s; fix the cause and run `modelserverd start a`"
        in (failed[-1])
    )

    _wrapper(wrapper)  # the interpreter is back: a start brings the server back
    d.api("POST", "/v1/servers/a/start")
    new_pid = d.wait_state("a", "ready")["pid"]
    last = _rows(d, "a", 4)[-1]

    assert (last[0], last[1], last[2]) == ("manual", None, new_pid)


def test_a_crash_says_why_in_the_log_and_a_reload_in_backoff_is_a_config_change(
    daemon_factory,
):
    d = daemon_factory(
        [
            {
                "name": "a",
                "port": free_port(),
                "gpus": [0],
                "extra_args": ["--sim-crash-after", "0", "--sim-exit-code", "3"],
            }
        ],
        restart={"backoff_initial_s": 6.0, "backoff_max_s": 12.0},
    ).start()
    d.wait_state("a", "backoff", 20)
    log = wait_until(
        lambda: (lambda text: text if "launch ended" in text else None)(_server_log(d, "a")),
        10,
        "the launch's end in the server's log",
    )
    (line,) = [x for x in log.splitlines() if "modelserverd: launch ended" in x]
    assert "exited with code 3 (crash); failure 1 within 60 s (fatal at 5); restarting in" in line

    # A reload that fixes the server while it waits out its backoff: the relaunch is
    # the config change's, and the crash it follows is kept in the row.
    _edit(d, '["--sim-crash-after", "0", "--sim-exit-code", "3"]', '["--sim-exit-code", "3"]')
    assert d.api("POST", "/v1/reload")["restarted"] == ["a"]
    d.wait_state("a", "ready", 20)
    ((reason, _, new_pid, exit_code, message),) = wait_until(
        lambda: _restarts(d, "a"), 10, "the relaunch's row"
    )
    assert (reason, exit_code) == ("config_change", 3)
    assert new_pid == d.server("a")["pid"]
    assert message.startswith("config changed (after crash: pid ")


# --- item 4: relative paths are read from the config file's folder ---------------------------


def test_relative_paths_are_read_from_the_config_files_folder(daemon_factory):
    """The daemon runs from the test's working directory, not the config's folder:
    "./model" and "./bin/python" must still be the ones beside the config file."""
    d = daemon_factory([{"name": "a", "port": free_port(), "gpus": [0]}])
    _wrapper(d.dir / "bin" / "python")
    _edit(d, f"model_path = {json.dumps(str(d.dir / 'model'))}", 'model_path = "./model"')
    _edit(d, PY_LINE, 'python = "./bin/python"')
    assert Path.cwd() != d.dir
    d.start()
    server = d.wait_state("a", "ready")
    assert server["model_path"] == str(d.dir / "model")
    cmdline = d.query("select cmdline from servers where name = 'a'")[0][0]
    assert json.loads(cmdline)[:3] == [str(d.dir / "bin" / "python"), "-m", "supervisord_ms.sim"]


SERVER = '[[servers]]\nname = "a"\nip = "127.0.0.1"\nport = 30000\nmodel_size = "8B"\ngpus = [0]\n'


def _parse(folder: Path, model_path: str):
    path = folder / "config.toml"
    text = SERVER + f"model_path = {json.dumps(model_path)}\n"
    path.write_text(text)
    return parse_config(text, path, host_addresses=["127.0.0.1"])


def test_relative_model_path_does_not_depend_on_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "etc"
    (folder / "models" / "llama").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for written in ("./models/llama", "models/llama", "../etc/models/llama"):
        (server,) = _parse(folder, written).servers
        assert server.model_path == str(folder / "models" / "llama"), written


def test_a_missing_relative_model_path_names_where_it_was_looked_for(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        _parse(tmp_path, "./models/none")
    (problem,) = info.value.problems
    assert 'servers[0].model_path: got "./models/none", which does not exist on this host' in (
        problem
    )
    assert f"read as {tmp_path / 'models' / 'none'}" in problem
    assert f"relative paths are read from the config file's folder {tmp_path}" in problem


def test_a_hugging_face_repo_id_is_passed_to_sglang_as_written(tmp_path: Path):
    config = _parse(tmp_path, "meta-llama/Llama-3.1-8B-Instruct")
    (server,) = config.managed_servers
    assert server.model_path == "meta-llama/Llama-3.1-8B-Instruct"
    spec = build_launch(server, config.sglang, 40000)
    assert spec.argv[spec.argv.index("--model-path") + 1] == "meta-llama/Llama-3.1-8B-Instruct"


def test_a_folder_beside_the_config_wins_over_a_repo_id(tmp_path: Path):
    (tmp_path / "meta-llama" / "Llama-3.1-8B-Instruct").mkdir(parents=True)
    (server,) = _parse(tmp_path, "meta-llama/Llama-3.1-8B-Instruct").servers
    assert server.model_path == str(tmp_path / "meta-llama" / "Llama-3.1-8B-Instruct")


def test_a_bare_name_that_is_no_folder_and_no_repo_id_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        _parse(tmp_path, "llama")
    (problem,) = info.value.problems
    assert 'got "llama", which is neither a file or folder in the config file' in problem
    assert "Hugging Face repo id" in problem


def test_home_relative_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "m").mkdir(parents=True)
    folder = tmp_path / "cfg"
    folder.mkdir()
    (server,) = _parse(folder, "~/models/m").servers
    assert server.model_path == str(tmp_path / "models" / "m")


def test_relative_python_keeps_its_own_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A venv's bin/python is a link; resolving it would leave the venv, so a relative
    python is joined to the config's folder and not resolved."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    os.symlink(sys.executable, venv_bin / "python")
    (tmp_path / "model").mkdir()
    path = tmp_path / "config.toml"
    text = '[sglang]\npython = "venv/bin/python"\nmodule = "supervisord_ms.sim"\n' + SERVER
    path.write_text(text + 'model_path = "./model"\n')
    monkeypatch.chdir("/")
    config = load_daemon_config(path, on_host=False)
    assert config.sglang.python == str(venv_bin / "python")
    (server,) = config.servers
    assert server.model_path == str(tmp_path / "model")
    # A bare name stays a PATH lookup.
    plain = parse_config('[sglang]\npython = "python3"\n', path)
    assert plain.sglang.python == "python3"


def test_a_note_in_the_servers_log_is_a_line_of_its_own(tmp_path: Path):
    log = tmp_path / "logs" / "a.log"
    append_log_note(log, "launch failed: x;\nrestarting in 1.0 s")  # makes the folder
    log.write_bytes(log.read_bytes() + b"Traceback (most recent call last")  # no newline
    append_log_note(log, "launch ended after 0.4 s: pid 7 exited with code 1 (crash)")
    lines = log.read_text().splitlines()
    assert lines[0].endswith(" modelserverd: launch failed: x; restarting in 1.0 s")
    assert lines[0].startswith("=== ")
    assert lines[1] == "Traceback (most recent call last"
    assert lines[2].endswith(
        "modelserverd: launch ended after 0.4 s: pid 7 exited with code 1 (crash)"
    )
