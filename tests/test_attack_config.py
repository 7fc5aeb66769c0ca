"""Issue 12, items 7 and 11 (the config side): values that passed check-config and
then broke the daemon at run time, and a socket_group that cannot reach the socket.

* An env name with "=" (or a NUL, or empty) made every launch raise ValueError:
  the server went fatal with "internal error" and stayed fatal after the fix.
* ``retention_days = 1000000`` (or ``inf``) made housekeeping die without a log line.
* A name with a trailing newline matched ``^...$``.
* A socket_group other than the unit's group cannot pass the 0750 runtime directory.
"""

from __future__ import annotations

import grp
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisord_ms import cli as cli_module
from supervisord_ms.config import NAME_PATTERN, ConfigError, parse_config

FILE = "/srv/cfg/modelserverd.toml"
REMOTE = '[[servers]]\nip = "10.0.0.5"\nport = 30000\nmodel_size = "8B"\nmodel_path = "/m"\n'


def problems(text: str, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILE, **kwargs)
    return info.value.problems


# -- env names ---------------------------------------------------------------

BAD_ENV = [
    # (TOML of the table, the name as the message shows it)
    ('{"BAD=KEY" = "1"}', '"BAD=KEY"'),
    ('{"=" = "1"}', '"="'),
    ('{"" = "1"}', '""'),
    ('{"A\\u0000B" = "1"}', '"A\\u0000B"'),
]


@pytest.mark.parametrize(("table", "shown"), BAD_ENV)
def test_sglang_env_name_that_no_launch_can_use_is_refused(table: str, shown: str) -> None:
    (message,) = problems(f"[sglang]\nenv = {table}\n" + REMOTE)
    assert message.startswith(f"{FILE}: sglang.env: got ")
    assert 'names that are not empty and hold no "=" and no NUL character' in message
    assert f"(not {shown})" in message


@pytest.mark.parametrize(("table", "shown"), BAD_ENV)
def test_server_env_name_that_no_launch_can_use_is_refused(table: str, shown: str) -> None:
    (message,) = problems(REMOTE + f"env = {table}\n")
    assert message.startswith(f"{FILE}: servers[0].env: got ")
    assert f"(not {shown})" in message


def test_env_value_with_a_nul_is_refused() -> None:
    (message,) = problems(REMOTE + 'env = {HF_HOME = "/x\\u0000y"}\n')
    assert "servers[0].env" in message and 'the value of "HF_HOME" has one' in message


def test_ordinary_env_names_are_fine() -> None:
    config = parse_config(
        '[sglang]\nenv = {SGLANG_LOG_LEVEL = "info", "lower.case-name" = ""}\n' + REMOTE, FILE
    )
    assert config.sglang.env["lower.case-name"] == ""


def test_check_config_refuses_the_env_name_before_anything_launches(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    path = tmp_path / "config.toml"
    path.write_text(
        "[[servers]]\n"
        'name = "a"\nip = "127.0.0.1"\nport = 30000\nmodel_size = "8B"\n'
        f'model_path = "{model}"\ngpus = [0]\nenv = {{"BAD=KEY" = "1"}}\n'
    )
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--config", str(path)])
    assert result.exit_code == cli_module.EXIT_CONFIG
    assert f'{path}: servers[0].env: got {{BAD=KEY = "1"}}' in result.stderr


# -- retention_days and other numbers ----------------------------------------


@pytest.mark.parametrize("value", ["1000000", "3650.5", "inf", "1e308"])
def test_retention_days_beyond_ten_years_is_refused(value: str) -> None:
    (message,) = problems(f"[daemon]\nretention_days = {value}\n")
    assert message.startswith(f"{FILE}: daemon.retention_days: got ")
    assert "expected a number > 0 and <= 3650 (days" in message


@pytest.mark.parametrize("value", ["3650", "0.5", "14"])
def test_retention_days_within_ten_years_is_fine(value: str) -> None:
    config = parse_config(f"[daemon]\nretention_days = {value}\n", FILE)
    assert config.daemon.retention_days == float(value)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("daemon", "probe_interval_s"),
        ("daemon", "stop_timeout_s"),
        ("restart", "backoff_max_s"),
        ("client", "request_timeout_s"),
    ],
)
def test_infinite_durations_are_refused(section: str, key: str) -> None:
    (message,) = problems(f"[{section}]\n{key} = inf\n")
    assert message.startswith(f"{FILE}: {section}.{key}: got inf, expected a number")


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["name", "model_size"])
def test_a_trailing_newline_is_not_part_of_a_name(key: str) -> None:
    text = REMOTE.replace('model_size = "8B"\n', "") + f'{key} = "a\\n"\n'
    if key == "name":
        text += 'model_size = "8B"\n'
    (message,) = problems(text)
    assert message == (
        f'{FILE}: servers[0].{key}: got "a\\n", expected a name of letters, digits, '
        "'.', '_' or '-'"
    )


def test_name_pattern_is_anchored_at_the_very_end() -> None:
    assert NAME_PATTERN.match("a\n") is None and NAME_PATTERN.fullmatch("a\n") is None
    assert NAME_PATTERN.match("llama-8b.a_1")


# -- socket_group and the socket's directory ---------------------------------


def _groups() -> tuple[grp.struct_group, grp.struct_group]:
    """Two distinct groups of this host."""
    groups = {g.gr_gid: g for g in grp.getgrall()}
    if len(groups) < 2:
        pytest.skip("this host has fewer than two groups")
    first, second = list(groups.values())[:2]
    return first, second


def _daemon(socket: str, group: str) -> str:
    return f'[daemon]\nsocket = "{socket}"\nsocket_group = "{group}"\n'


@pytest.mark.skipif(
    os.path.exists("/run/modelserverd"), reason="this host has a real /run/modelserverd"
)
def test_check_config_warns_that_the_units_runtime_directory_blocks_another_group(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(_daemon("/run/modelserverd/api.sock", "gpuusers"))
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--json", "--config", str(path)])
    assert result.exit_code == 0, result.output
    (warning,) = json.loads(result.stdout)["warnings"]
    assert warning.startswith(f'{path}: daemon.socket_group: members of "gpuusers" cannot reach')
    assert "/run/modelserverd is mode 0750 with group modelserver" in warning
    assert "RuntimeDirectoryMode=0755" in warning
    assert result.stderr == f"warning: {warning}\n"
    # The unit's own group passes: no warning.
    path.write_text(_daemon("/run/modelserverd/api.sock", "modelserver"))
    result = CliRunner().invoke(cli_module.cli, ["check-config", "--json", "--config", str(path)])
    assert json.loads(result.stdout)["warnings"] == []


def test_an_existing_directory_is_judged_as_it_is(tmp_path: Path) -> None:
    first, second = _groups()
    folder = tmp_path / "run"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    try:
        os.chown(folder, -1, first.gr_gid)
    except PermissionError:
        pytest.skip("cannot change the folder's group here")
    socket = str(folder / "api.sock")

    def warnings(group: str) -> tuple[str, ...]:
        return parse_config(_daemon(socket, group), FILE, host_addresses=[]).warnings

    (warning,) = warnings(second.gr_name)
    assert f"mode 0750 with group {first.gr_name}, so only that group" in warning
    assert f'Set socket_group = "{first.gr_name}"' in warning
    assert warnings(first.gr_name) == ()
    os.chmod(folder, 0o751)  # anyone may pass through
    assert warnings(second.gr_name) == ()
    # The client's view (no host addresses) never looks at the file system.
    os.chmod(folder, 0o750)
    assert parse_config(_daemon(socket, second.gr_name), FILE).warnings == ()
