"""The systemd unit, the sysusers.d entry and the example config, as shipped.

systemd-analyze checks what a reader cannot: that systemd parses every line of
the unit (``verify``) and how exposed the service is (``security``). Neither needs
a booted systemd, so these run in containers and CI too. A missing
systemd-analyze fails the test (it does not skip): an unchecked unit is how a
typo ships and disables a hardening line silently.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisord_ms.config import (
    SECTIONS,
    ClientConfig,
    DaemonConfig,
    GatewayConfig,
    RestartConfig,
    SglangConfig,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "modelserverd.service"
SYSUSERS = ROOT / "systemd" / "modelserverd.sysusers"
EXAMPLE = ROOT / "examples" / "config.toml"
DOC = ROOT / "docs" / "systemd.md"

MAX_EXPOSURE = 4.0
INSTALLED_EXEC = "/usr/local/bin/modelserverd"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed; run `make system-deps` (it installs systemd and sqlite3)"
        )
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}``; keys may repeat in a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(timespan: str) -> float:
    """A systemd time span such as ``120``, ``90s`` or ``2min 30s``, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return unit_directives(UNIT.read_text())["Service"]


def installed_modelserverd() -> str:
    """An executable for ExecStart= that exists here: verify refuses a unit whose
    binary is missing, and /usr/local/bin/modelserverd is where ``make install``
    puts it, not where the tests run."""
    candidates = [Path(sys.prefix) / "bin" / "modelserverd", shutil.which("modelserverd")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return sys.executable  # the same unit semantics; only the path is checked


# --- systemd-analyze ------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(
        text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={installed_modelserverd()} ")
    )
    result = _run([analyze, "verify", "--man=no", str(copy)])
    # verify exits 0 even for unknown keys or bad values ("..., ignoring"), so
    # anything it says about this unit is a failure.
    complaints = [line for line in result.stderr.splitlines() if "modelserverd" in line]
    assert result.returncode == 0 and not complaints, result.stderr + result.stdout


def test_drop_ins_in_the_docs_parse(tmp_path: Path) -> None:
    """Every ``ini`` override shown in docs/systemd.md, applied as a drop-in: a
    documented override that systemd ignores would lose hardening silently."""
    analyze = _tool("systemd-analyze")
    blocks = re.findall(r"```ini\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "docs/systemd.md shows no overrides"
    exec_start = re.compile(r"^ExecStart=/\S*/modelserverd ", re.M)
    for i, block in enumerate(blocks):
        unit_dir = tmp_path / f"case{i}"
        drop_in = unit_dir / f"{UNIT.name}.d" / "override.conf"
        drop_in.parent.mkdir(parents=True)
        drop_in.write_text(exec_start.sub(f"ExecStart={installed_modelserverd()} ", block))
        (unit_dir / UNIT.name).write_text(
            exec_start.sub(f"ExecStart={installed_modelserverd()} ", UNIT.read_text())
        )
        result = subprocess.run(
            [analyze, "verify", "--man=no", UNIT.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=unit_dir,
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
        )
        complaints = [line for line in result.stderr.splitlines() if "modelserverd" in line]
        assert result.returncode == 0 and not complaints, f"override:\n{block}\n{result.stderr}"


def test_security_exposure_is_at_most_4(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = _run(
        [analyze, "security", "--offline=true", "--threshold=40", "--no-pager", str(UNIT)]
    )
    match = re.search(
        r"Overall exposure level for modelserverd\.service: (\d+\.\d+)", result.stdout
    )
    assert match, f"no exposure line in systemd-analyze output:\n{result.stdout}{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{result.stdout}"
    assert result.returncode == 0, result.stdout + result.stderr
    # The figure the README and docs/systemd.md give is the one measured here.
    for doc in (UNIT.parent.parent / "README.md", UNIT.parent.parent / "docs" / "systemd.md"):
        assert f"exposure {exposure:.1f}" in doc.read_text(), f"{doc} must say {exposure:.1f}"


# --- the promises docs/systemd.md makes -------------------------------------------


def test_unit_has_the_promised_directives(service: dict[str, list[str]]) -> None:
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "User": "modelserver",
        "RuntimeDirectory": "modelserverd",
        "StateDirectory": "modelserverd",
        "ConfigurationDirectory": "modelserverd",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "UMask": "0027",
        "DevicePolicy": "closed",
        "LimitMEMLOCK": "infinity",
        "OOMPolicy": "continue",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], f"{key}: got {service.get(key)}, expected {value}"
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"] == [f"{INSTALLED_EXEC} run --config /etc/modelserverd/config.toml"]
    assert seconds(service["WatchdogSec"][0]) > 0
    assert service["CapabilityBoundingSet"] == [""]
    # An allow list: @system-service first, then single additions, never a "~" deny list.
    assert service["SystemCallFilter"][0] == "@system-service"
    assert not any(value.startswith("~") for value in service["SystemCallFilter"])


def test_stop_timeout_outlasts_the_daemons_own_stop(service: dict[str, list[str]]) -> None:
    # The daemon's stop: stop_timeout_s per server (in parallel), SIGKILL, then
    # waiting for the port and the GPU memory. systemd's SIGKILL must come later.
    stop = seconds(service["TimeoutStopSec"][0])
    assert stop > DaemonConfig().stop_timeout_s
    assert stop >= 2 * DaemonConfig().stop_timeout_s + 30


def test_cuda_stays_possible(service: dict[str, list[str]]) -> None:
    # PrivateDevices hides /dev/nvidia*; W^X breaks libffi, the CUDA driver and JITs;
    # ProcSubset=pid hides /proc/driver/nvidia.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert "ProcSubset" not in service
    allowed = {value.split()[0] for value in service["DeviceAllow"]}
    assert {"char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"} <= allowed
    families = service["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)


def test_example_paths_live_in_the_units_directories(service: dict[str, list[str]]) -> None:
    daemon = parse_config(EXAMPLE.read_text(), EXAMPLE).daemon
    runtime = service["RuntimeDirectory"][0]
    state = service["StateDirectory"][0]
    assert daemon.socket.startswith(f"/run/{runtime}/")
    assert daemon.state_db.startswith(f"/var/lib/{state}/")
    assert daemon.log_dir.startswith(f"/var/lib/{state}/")
    assert Path(DaemonConfig().socket).parent == Path(f"/run/{runtime}")


# --- sysusers.d --------------------------------------------------------------------


def test_sysusers_creates_the_user_and_groups(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()  # an empty root: only this entry's users and groups
    result = _run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])
    # It reports what it creates on stderr; a line naming the file is a parse problem.
    complaints = [line for line in result.stderr.splitlines() if SYSUSERS.name in line]
    assert result.returncode == 0 and not complaints, result.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc" / "group").read_text().splitlines()
    }
    user = passwd["modelserver"]
    assert user[5] == "/var/lib/modelserverd"
    assert user[6] == "/usr/sbin/nologin"
    assert groups["modelserver"][2] == user[3], "primary group modelserver"
    for extra in ("video", "render"):
        assert "modelserver" in groups[extra][3].split(","), f"modelserver not in {extra}"


def test_unit_user_matches_sysusers(service: dict[str, list[str]]) -> None:
    users = [
        line.split()[1]
        for line in SYSUSERS.read_text().splitlines()
        if line.strip().startswith("u ")
    ]
    assert users == service["User"] == service["Group"]


# --- examples/config.toml -------------------------------------------------------------


def test_example_config_is_valid() -> None:
    config = parse_config(EXAMPLE.read_text(), EXAMPLE)
    assert [s.name for s in config.servers] == ["llama8b-a", "llama8b-b", "llama70b", "llama8b-c"]
    sizes = {s.name: (s.model_size, len(s.gpus)) for s in config.servers}
    assert sizes["llama70b"] == ("70B", 4)
    assert sizes["llama8b-a"] == sizes["llama8b-b"] == ("8B", 1)


def test_example_config_on_its_host(tmp_path: Path) -> None:
    """As the daemon on 10.0.0.5 reads it: three servers launched here on
    disjoint GPUs, the fourth probed only. Model paths point at folders that
    exist, since the daemon checks them for the servers it launches."""
    text = EXAMPLE.read_text().replace('"/models/', f'"{tmp_path}/models/')
    for name in re.findall(r'model_path = "([^"]+)"', text):
        Path(name).mkdir(parents=True, exist_ok=True)
    config = parse_config(text, EXAMPLE, host_addresses=["10.0.0.5", "127.0.0.1"])
    managed = config.managed_servers
    assert [s.name for s in managed] == ["llama8b-a", "llama8b-b", "llama70b"]
    gpus = [gpu for s in managed for gpu in s.gpus]
    assert len(gpus) == len(set(gpus)) and set(gpus) <= set(range(8))
    remote = config.server("llama8b-c")
    assert remote is not None and not remote.local and not remote.is_managed


def test_example_writes_out_every_default() -> None:
    """The example shows the defaults, so a reader can trust it as a reference;
    only socket_group is set on purpose (the group the sysusers entry creates)."""
    config = parse_config(EXAMPLE.read_text(), EXAMPLE)
    intended = {("daemon", "socket_group"): "modelserver"}
    defaults = {
        "daemon": DaemonConfig(),
        "restart": RestartConfig(),
        "sglang": SglangConfig(),
        "client": ClientConfig(),
        "gateway": GatewayConfig(),
    }
    for section, keys in SECTIONS.items():
        section_text = re.search(rf"^\[{section}\]\n(.*?)(?=^\[)", EXAMPLE.read_text(), re.S | re.M)
        assert section_text, f"[{section}] missing from the example"
        for key in keys:
            assert re.search(rf"^{key} = ", section_text.group(1), re.M), f"{section}.{key} missing"
            got = getattr(getattr(config, section), key)
            want = intended.get((section, key), getattr(defaults[section], key))
            assert got == want, f"{section}.{key}: example has {got!r}, default is {want!r}"
