"""The TOML config shared by the daemon and the client.

Standard library only: ``ms_client`` imports this module and must stay light.

A bad config is refused whole: every problem is collected (not just the first)
and reported as one line naming the file, the key path (``servers[2].gpus``),
the bad value and what was expected, so an operator fixes everything in one
edit instead of one restart per typo.

Some settings are legal but weaken what the daemon can see; those become
warnings (:attr:`Config.warnings`, same "file: key: ..." form), which
``check-config`` prints and the daemon logs, and the config is still used.

Relative paths are read from the config file's folder, never from the current
directory (which is "/" under systemd and anything in a shell): the ``[daemon]``
paths, a ``file:`` gpu_backend, ``[sglang].python`` when it names a file (it has a
"/"; a bare name such as "python3" is looked up on PATH, as a shell does) and
``model_path`` (see :func:`resolve_model_path`: it may also be a Hugging Face repo
id). A leading "~" is the daemon user's home. What this host can or cannot run
(the interpreter, the module, the GPUs) is checked by :mod:`hostcheck`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ModelServerdError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/modelserverd/config.toml")
CONFIG_ENV_VAR = "MODELSERVERD_CONFIG"
# \A and \Z, not ^ and $: "$" also matches before a trailing newline, and a name
# ends up in file names (logs/<name>.log), URLs and log lines.
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9._-]+\Z")
# Latency samples are kept this many days at most: beyond it the retention cutoff
# is meaningless (and far enough beyond it, not a date at all).
MAX_RETENTION_DAYS = 3650
# The systemd unit (systemd/modelserverd.service) makes the socket's directory:
# RuntimeDirectory=modelserverd, RuntimeDirectoryMode=0750, Group=modelserver.
UNIT_RUNTIME_DIR = "/run/modelserverd"
UNIT_GROUP = "modelserver"

# SGLang's own health check (docs/sglang.md, section 1). Since PR #8444 (2025-07)
# /health and /health_generate are one handler (entrypoints/http_server.py):
# /health submits a one-token request, looks once a second for any output, and
# answers 503 once SGLANG_HEALTH_CHECK_TIMEOUT seconds have passed without one;
# the value is read once, with int(), default 20. Since PR #13320 (2025-11)
# SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION (environ.py, an EnvBool, default true)
# set false makes /health answer 200 at once without generating. Before #8444,
# /health was a plain 200 and neither variable mattered to it.
SGLANG_HEALTH_TIMEOUT_VAR = "SGLANG_HEALTH_CHECK_TIMEOUT"
SGLANG_HEALTH_TIMEOUT_DEFAULT = 20
SGLANG_HEALTH_GENERATION_VAR = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"
# EnvBool's false spellings, compared lower-cased; a value it does not know keeps
# the default (true), as "1", "true", "yes" and "y" do.
_SGLANG_FALSE = frozenset({"false", "0", "no", "n"})


class ConfigError(ModelServerdError):
    """Raised when a config file cannot be used; seen by operators at start,
    by ``check-config`` and on reload (where the running config stays)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/modelserverd/api.sock"
    state_db: str = "/var/lib/modelserverd/state.db"
    log_dir: str = "/var/lib/modelserverd/logs"
    interface: str = ""
    gpu_backend: str = "nvml"
    gpu_free_ratio: float = 0.9
    probe_interval_s: float = 5.0
    # Above SGLang's own /health wait (SGLANG_HEALTH_CHECK_TIMEOUT, 20 s): a check
    # that gave up first would fail servers that are only slow. Validated below.
    health_timeout_s: float = 30.0
    health_failures: int = 3
    # A ready server whose scheduler has not answered a load query (/v1/loads,
    # /get_load) for this long, while its process lives, is hung: SGLang's usual
    # hang leaves the HTTP front answering and /health needs 20 s to notice.
    hang_timeout_s: float = 10.0
    startup_timeout_s: float = 1800.0
    stop_timeout_s: float = 30.0
    retention_days: float = 14
    socket_mode: str = "0660"
    socket_group: str = ""
    admin_group: str = ""

    @property
    def socket_mode_int(self) -> int:
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class RestartConfig:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_failures: int = 5
    failure_window_s: float = 600.0
    stable_after_s: float = 300.0


@dataclass(frozen=True)
class SglangConfig:
    python: str = "python3"
    module: str = "sglang.launch_server"
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientConfig:
    max_retry: int = 3
    latency_growing_rate: float = 2.0
    benchmark_message: str = "Say hello in one short sentence."
    benchmark_max_tokens: int = 16
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class GatewayConfig:
    """An SGLang gateway (sgl-model-gateway, ``sglang-router``) whose worker list the
    daemon keeps true for this host's servers; no ``url``: no gateway."""

    url: tuple[str, ...] = ()
    api_key: str = field(default="", repr=False)  # sent as "Authorization: Bearer"
    worker_api_key: str = field(default="", repr=False)  # the gateway's key to SGLang
    sync_interval_s: float = 5.0
    request_timeout_s: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class ServerConfig:
    name: str
    ip: str
    port: int
    model_size: str
    model_path: str
    gpus: tuple[int, ...] = ()
    managed: bool | None = None  # None: decided by locality
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    local: bool = False  # ip is one of this host's addresses (known only to the daemon)
    # The server's batch size (SGLang's --max-running-requests), for a server that
    # does not report it in /v1/loads or /get_server_info; None: learned.
    max_running_requests: int | None = None
    # Its worker priority and cost at the gateway ([gateway]); None: the gateway's.
    gateway_priority: int | None = None
    gateway_cost: float | None = None

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"

    @property
    def is_managed(self) -> bool:
        """Launched and signalled by this host's daemon (otherwise probed only)."""
        return self.local and self.managed is not False


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    sglang: SglangConfig = field(default_factory=SglangConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    servers: tuple[ServerConfig, ...] = ()
    # "file: key: ..." lines about settings that are accepted but weaken health
    # checking; check-config prints them, the daemon logs them on start and reload.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def server(self, name: str) -> ServerConfig | None:
        return next((s for s in self.servers if s.name == name), None)

    @property
    def managed_servers(self) -> tuple[ServerConfig, ...]:
        return tuple(s for s in self.servers if s.is_managed)


def resolve_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config``, else ``$MODELSERVERD_CONFIG``, else the default path."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


# --- validation -------------------------------------------------------------------

Check = Callable[[Any], "str | None"]  # returns what was expected, or None when fine


def _is_number(v: Any) -> bool:
    """An int or a finite float: TOML's ``inf`` passes every "> 0" check and then
    breaks the arithmetic of timers and cutoffs far from where it was written."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


def _positive_number(v: Any) -> str | None:
    return None if _is_number(v) and v > 0 else "a number > 0"


def _non_negative_number(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "a number >= 0"


def _retention_days(v: Any) -> str | None:
    if _is_number(v) and 0 < v <= MAX_RETENTION_DAYS:
        return None
    return f"a number > 0 and <= {MAX_RETENTION_DAYS} (days; ten years at most)"


def _ratio(v: Any) -> str | None:
    return None if _is_number(v) and 0 < v <= 1 else "a number in (0, 1]"


def _int_at_least(low: int) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        return None if ok else f"an integer >= {low}"

    return check


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def _non_empty_string(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _string_list(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    return None if ok else 'a list of strings, e.g. ["--mem-fraction-static", "0.85"]'


def _gateway_urls(v: Any) -> str | None:
    urls = [v] if isinstance(v, str) else v
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return 'a gateway URL or a list of them, e.g. "http://gw.internal:30000"'
    if not all(re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", u) for u in urls if u):
        return 'http:// or https:// URLs, e.g. "http://gw.internal:30000"'
    return None


def _env_table(v: Any) -> str | None:
    """A launch environment: names and values as ``execve`` takes them. A name
    with "=" or a NUL, an empty name, or a value with a NUL makes the launch fail
    (ValueError in the child's set-up), and the server would go fatal at run time
    over a config that check-config had passed."""
    if not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
        return 'a table of strings, e.g. {SGLANG_LOG_LEVEL = "info"}'
    bad_names = [k for k in v if not k or "=" in k or "\0" in k]
    if bad_names:
        return (
            'environment variable names that are not empty and hold no "=" and no NUL '
            f"character (not {', '.join(_show(k) for k in bad_names)})"
        )
    bad_values = [k for k, x in v.items() if "\0" in x]
    if bad_values:
        return (
            "values without a NUL character "
            f"(the value of {', '.join(_show(k) for k in bad_values)} has one)"
        )
    return None


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _octal_mode(v: Any) -> str | None:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3}", v):
        return None
    return 'an octal permission string, e.g. "0660"'


def _gpu_backend(v: Any) -> str | None:
    if v == "nvml" or (isinstance(v, str) and v.startswith("file:") and len(v) > 5):
        return None
    return '"nvml" or "file:/path/gpus.json"'


def _port(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535
    return None if ok else "an integer port in 1..65535"


def _name(v: Any) -> str | None:
    ok = isinstance(v, str) and NAME_PATTERN.fullmatch(v)
    return None if ok else "a name of letters, digits, '.', '_' or '-'"


def _gpus(v: Any) -> str | None:
    ok = (
        isinstance(v, list)
        and v
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
        and len(set(v)) == len(v)
    )
    return None if ok else "a non-empty list of distinct GPU indexes (integers >= 0), e.g. [0, 1]"


def _ip(v: Any) -> str | None:
    ok = isinstance(v, str) and v and not re.search(r"\s|/", v)
    return None if ok else 'an IP address or host name, e.g. "10.0.0.5"'


SECTIONS: dict[str, dict[str, Check]] = {
    "daemon": {
        "socket": _non_empty_string,
        "state_db": _non_empty_string,
        "log_dir": _non_empty_string,
        "interface": _string,
        "gpu_backend": _gpu_backend,
        "gpu_free_ratio": _ratio,
        "probe_interval_s": _positive_number,
        "health_timeout_s": _positive_number,
        "health_failures": _int_at_least(1),
        "hang_timeout_s": _positive_number,
        "startup_timeout_s": _positive_number,
        "stop_timeout_s": _positive_number,
        "retention_days": _retention_days,
        "socket_mode": _octal_mode,
        "socket_group": _string,
        "admin_group": _string,
    },
    "restart": {
        "backoff_initial_s": _positive_number,
        "backoff_max_s": _positive_number,
        "max_failures": _int_at_least(1),
        "failure_window_s": _positive_number,
        "stable_after_s": _non_negative_number,
    },
    "sglang": {
        "python": _non_empty_string,
        "module": _non_empty_string,
        "extra_args": _string_list,
        "env": _env_table,
    },
    "client": {
        "max_retry": _int_at_least(1),
        "latency_growing_rate": lambda v: None if _is_number(v) and v > 1 else "a number > 1",
        "benchmark_message": _non_empty_string,
        "benchmark_max_tokens": _int_at_least(1),
        "request_timeout_s": _positive_number,
    },
    "gateway": {
        "url": _gateway_urls,
        "api_key": _string,
        "worker_api_key": _string,
        "sync_interval_s": _positive_number,
        "request_timeout_s": _positive_number,
    },
}

SERVER_KEYS: dict[str, Check] = {
    "name": _name,
    "ip": _ip,
    "port": _port,
    "model_size": _name,
    "model_path": _non_empty_string,
    "gpus": _gpus,
    "managed": _bool,
    "extra_args": _string_list,
    "env": _env_table,
    "max_running_requests": _int_at_least(1),
    "gateway_priority": _int_at_least(0),
    "gateway_cost": _positive_number,
}
SERVER_REQUIRED = ("ip", "port", "model_size", "model_path")
PATH_KEYS = ("socket", "state_db", "log_dir")


def _show(value: Any) -> str:
    if isinstance(value, str):
        # Escaped when it holds a newline, a NUL or the like, so the message stays
        # one line and shows what is there.
        return f'"{value}"' if value.isprintable() else json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_show_key(k)} = {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _show_key(key: Any) -> str:
    """A table key as written, quoted only when it is empty or not printable."""
    return key if isinstance(key, str) and key and key.isprintable() else _show(key)


def _unknown(path: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f'; did you mean "{close[0]}"?' if close else f"; known keys: {', '.join(known)}"
    return f"{path}: unknown key{hint}"


class _Problems:
    def __init__(self, file: str):
        self.file = file
        self.items: list[str] = []
        self.warnings: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(f"{self.file}: {message}")

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.file}: {message}")

    def bad(self, key: str, value: Any, expected: str) -> None:
        self.add(f"{key}: got {_show(value)}, expected {expected}")


def _check_table(
    problems: _Problems, prefix: str, table: Mapping[str, Any], checks: Mapping[str, Check]
) -> dict[str, Any]:
    good: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}"
        check = checks.get(key)
        if check is None:
            problems.add(_unknown(path, key, checks))
            continue
        expected = check(value)
        if expected:
            problems.bad(path, value, expected)
        else:
            good[key] = value
    return good


def _resolve_path(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _join(base: Path, value: str) -> str:
    """``value`` read from ``base`` when relative, "~" expanded; an absolute value is
    kept as written. Symlinks are not resolved: a venv's ``bin/python`` is a link to
    the system interpreter and only works under its own name, and a model folder's
    path is the name SGLang serves the model under."""
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(base, expanded))


# A Hugging Face repo id, as SGLang's --model-path also takes it ("owner/name"; the
# Hub's names are letters, digits, "-", "_" and "."): fetched from the Hub or found
# in its cache by SGLang, so there is nothing on this host to check.
HF_REPO_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_PATH_PREFIXES = ("/", "~", "./", "../")


def resolve_model_path(base: Path, value: str) -> tuple[str, bool]:
    """What to launch with for ``model_path``, and whether it is a path on this host.

    A path: a value that starts with "/", "~", "./" or "../" (or is "." or ".."),
    or one that names something that exists in the config file's folder; relative
    paths are read from that folder (issue 13, item 4). Anything else is passed to
    SGLang as written: a Hugging Face repo id such as
    "meta-llama/Llama-3.1-8B-Instruct". Write "./models/x" to make a relative
    folder a path whether or not it exists yet."""
    if value in (".", "..") or value.startswith(_PATH_PREFIXES):
        return _join(base, value), True
    joined = _join(base, value)
    if os.path.lexists(joined):
        return joined, True
    return value, False


def _resolve_python(base: Path, value: str) -> str:
    """``[sglang].python``: a file when it holds a "/" (read from the config's folder
    when relative) or starts with "~"; a bare name is looked up on PATH at launch."""
    if "/" in value or value.startswith("~"):
        return _join(base, value)
    return value


def _freeze(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _default_name(model_size: str, ip: str, port: int) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{model_size}-{ip}-{port}")


def parse_config(
    text: str,
    path: str | os.PathLike[str] = "<config>",
    *,
    host_addresses: Iterable[str] | None = None,
) -> Config:
    """Validate TOML text. With ``host_addresses`` (the daemon knows them) servers
    are marked local and the checks that only concern local servers run too."""
    file = str(path)
    problems = _Problems(file)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None

    base = Path(file).resolve().parent
    sections: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key == "servers":
            continue
        if key not in SECTIONS:
            problems.add(_unknown(key, key, [*SECTIONS, "servers"]))
            continue
        if not isinstance(value, dict):
            problems.bad(key, value, f"a table [{key}]")
            continue
        sections[key] = _check_table(problems, key, value, SECTIONS[key])

    daemon_values = sections.get("daemon", {})
    for key in PATH_KEYS:
        if key in daemon_values:
            daemon_values[key] = _resolve_path(base, daemon_values[key])
    backend = daemon_values.get("gpu_backend")
    if isinstance(backend, str) and backend.startswith("file:"):
        daemon_values["gpu_backend"] = "file:" + _resolve_path(base, backend[5:])
    sglang_values = sections.get("sglang", {})
    if "python" in sglang_values:
        sglang_values["python"] = _resolve_python(base, sglang_values["python"])
    restart_values = sections.get("restart", {})
    if restart_values.get("backoff_initial_s", 1.0) > restart_values.get("backoff_max_s", 300.0):
        problems.add(
            f"restart.backoff_max_s: got {restart_values.get('backoff_max_s', 300.0)}, "
            "expected a number >= restart.backoff_initial_s "
            f"({restart_values.get('backoff_initial_s', 1.0)})"
        )

    addresses = set(host_addresses) if host_addresses is not None else None
    indexed = _check_servers(problems, raw.get("servers", []), addresses, base)
    health_timeout_s: float | None = daemon_values.get(
        "health_timeout_s", DaemonConfig.health_timeout_s
    )
    raw_daemon = raw.get("daemon")
    given = isinstance(raw_daemon, dict) and "health_timeout_s" in raw_daemon
    if given and "health_timeout_s" not in daemon_values:
        health_timeout_s = None  # given but refused (reported): nothing to compare
    _check_sglang_health(
        problems, health_timeout_s, sections.get("sglang", {}).get("env", {}), indexed
    )
    if addresses is not None:  # the daemon's view (and check-config's), not the client's
        _check_socket_reach(
            problems,
            daemon_values.get("socket", DaemonConfig.socket),
            daemon_values.get("socket_group", DaemonConfig.socket_group),
        )

    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        path=file,
        daemon=DaemonConfig(**daemon_values),
        restart=RestartConfig(**restart_values),
        sglang=SglangConfig(**_freeze(sections.get("sglang", {}))),
        client=ClientConfig(**sections.get("client", {})),
        gateway=_gateway(sections.get("gateway", {})),
        servers=tuple(server for _, server in indexed),
        warnings=tuple(problems.warnings),
    )


def _gateway(values: dict[str, Any]) -> GatewayConfig:
    url = values.get("url", ())
    urls = [url] if isinstance(url, str) else list(url)
    return GatewayConfig(**{**values, "url": tuple(u.rstrip("/") for u in urls if u)})


def _check_socket_reach(problems: _Problems, socket_path: str, group: str) -> None:
    """Warn when ``socket_group`` is given the socket but not its directory.

    Connecting to a Unix socket needs search permission on its directory. Under
    systemd that is /run/modelserverd, which the unit makes mode 0750 with group
    modelserver: any other ``socket_group`` gets the socket's 0660 and still
    "permission denied", with nothing in the daemon's log to say why. The
    directory as it is on this host is looked at when it exists, else the unit's.
    """
    if not group:
        return
    parent = Path(socket_path).parent
    try:
        st = parent.stat()
    except OSError:
        st = None
    if st is None:
        if str(parent) != UNIT_RUNTIME_DIR or group == UNIT_GROUP:
            return
        mode, dir_group = 0o750, UNIT_GROUP
        how = " (as the systemd unit creates it: RuntimeDirectoryMode=0750, Group=modelserver)"
    else:
        import grp
        import stat

        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o001:
            return  # anyone may pass
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            return  # an unknown group is refused when the daemon starts
        if st.st_gid == gid and mode & 0o010:
            return
        try:
            dir_group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            dir_group = str(st.st_gid)
        how = ""
    problems.warn(
        f"daemon.socket_group: members of {_show(group)} cannot reach {socket_path}: its "
        f"directory {parent} is mode {mode:04o} with group {dir_group}{how}, so only "
        f"that group and the directory's owner may pass through it, and the others get "
        f'"permission denied". Set socket_group = "{dir_group}", add the users to '
        f"{dir_group} as well, or (under systemd) set RuntimeDirectoryMode=0755 in a "
        "drop-in: the socket's own mode and group still decide who may connect"
    )


def _sglang_timeout(value: str) -> int | None:
    """SGLANG_HEALTH_CHECK_TIMEOUT as SGLang reads it (``int()``), None if it cannot."""
    try:
        return int(value)
    except ValueError:
        return None


def _sglang_generates(value: str | None) -> bool:
    """Whether /health generates, given SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION.
    SGLang's EnvBool ignores a value it does not know and keeps its default (true)."""
    return value is None or value.lower() not in _SGLANG_FALSE


def _check_sglang_health(
    problems: _Problems,
    health_timeout_s: float | None,
    sglang_env: Mapping[str, str],
    indexed: list[tuple[int, ServerConfig]],
) -> None:
    """Our /health timeout against SGLang's own, for every server this host launches.

    The supervisor's check gives up after ``health_timeout_s``; SGLang's /health
    answers 503 after SGLANG_HEALTH_CHECK_TIMEOUT. Ours must be the longer one, or
    a server that is slow but alive loses the race on every busy check and is
    restarted for nothing. The SGLang timeout in effect is the server's ``env``,
    else ``[sglang].env``, else 20 (the daemon's own environment is not looked at:
    check-config runs from a shell, the daemon under systemd). Where /health does
    not generate (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION false) it answers at
    once, so there is no race: that is a warning instead.
    """
    envs = [("sglang.env", sglang_env)]
    envs += [(f"servers[{i}].env", server.env) for i, server in indexed]
    for where, env in envs:
        value = env.get(SGLANG_HEALTH_TIMEOUT_VAR)
        if value is not None and _sglang_timeout(value) is None:
            problems.bad(
                f"{where}.{SGLANG_HEALTH_TIMEOUT_VAR}",
                value,
                'a whole number of seconds, e.g. "20" (SGLang reads it with int())',
            )
        flag = env.get(SGLANG_HEALTH_GENERATION_VAR)
        if flag is not None and not _sglang_generates(flag):
            problems.warn(
                f"{where}.{SGLANG_HEALTH_GENERATION_VAR}: {_show(flag)} makes SGLang's /health "
                "answer 200 without generating a token, so it cannot see a hung scheduler; "
                "modelserverd then relies on its own scheduler check to find hangs"
            )
    if health_timeout_s is None:
        return  # already reported as a bad value
    # (SGLang timeout, where it comes from) -> names of the servers it is too long for
    too_long: dict[tuple[int, str], list[str]] = {}
    for i, server in indexed:
        if not server.is_managed:
            continue
        flag = server.env.get(SGLANG_HEALTH_GENERATION_VAR)
        if flag is None:
            flag = sglang_env.get(SGLANG_HEALTH_GENERATION_VAR)
        if not _sglang_generates(flag):
            continue
        if SGLANG_HEALTH_TIMEOUT_VAR in server.env:
            value, source = server.env[SGLANG_HEALTH_TIMEOUT_VAR], f"from servers[{i}].env"
        elif SGLANG_HEALTH_TIMEOUT_VAR in sglang_env:
            value, source = sglang_env[SGLANG_HEALTH_TIMEOUT_VAR], "from sglang.env"
        else:
            value, source = str(SGLANG_HEALTH_TIMEOUT_DEFAULT), "SGLang's default"
        timeout = _sglang_timeout(value)
        if timeout is not None and health_timeout_s <= timeout:
            too_long.setdefault((timeout, source), []).append(server.name)
    for (timeout, source), names in too_long.items():
        problems.bad(
            "daemon.health_timeout_s",
            health_timeout_s,
            f"a number above {timeout}, the {SGLANG_HEALTH_TIMEOUT_VAR} of "
            f"{', '.join(names)} ({source}): SGLang's /health waits that long for one "
            "generated token before it answers 503, so a check that gives up sooner fails "
            f"servers that are slow but alive; set health_timeout_s to {timeout + 10} or "
            f"more, or lower {SGLANG_HEALTH_TIMEOUT_VAR}",
        )


def _check_servers(
    problems: _Problems, raw_servers: Any, addresses: set[str] | None, base: Path
) -> list[tuple[int, ServerConfig]]:
    """The valid servers, each with its index in the file (for messages)."""
    if not isinstance(raw_servers, list) or not all(isinstance(s, dict) for s in raw_servers):
        problems.bad("servers", raw_servers, "an array of tables, each written [[servers]]")
        return []
    servers: list[tuple[int, ServerConfig]] = []
    seen_names: dict[str, int] = {}
    seen_endpoints: dict[tuple[str, int], int] = {}
    gpu_owner: dict[int, int] = {}
    for i, table in enumerate(raw_servers):
        prefix = f"servers[{i}]"
        values = _check_table(problems, prefix, table, SERVER_KEYS)
        missing = [k for k in SERVER_REQUIRED if k not in table]
        for key in missing:
            problems.add(f"{prefix}.{key}: missing, expected {SERVER_KEYS[key](None)}")
        # The cross-server checks run on whatever is valid, so a typo in one key
        # does not hide a clash that the next reload would report.
        name = values.get("name")
        if "name" not in table and all(k in values for k in ("model_size", "ip", "port")):
            name = _default_name(values["model_size"], values["ip"], values["port"])
        if name is not None:
            if name in seen_names:
                problems.add(
                    f'{prefix}.name: got "{name}", expected a unique name '
                    f"(servers[{seen_names[name]}] has it already)"
                )
            seen_names.setdefault(name, i)
        if "ip" in values and "port" in values:
            endpoint = (values["ip"], values["port"])
            if endpoint in seen_endpoints:
                problems.add(
                    f"{prefix}.port: got {values['port']} on {values['ip']}, "
                    "expected a free ip:port "
                    f"(servers[{seen_endpoints[endpoint]}] listens there already)"
                )
            seen_endpoints.setdefault(endpoint, i)
        if len(values) != len(table) or missing:
            continue
        values["name"] = name
        written = values["model_path"]
        values["model_path"], is_path = resolve_model_path(base, written)
        local = addresses is not None and values["ip"] in addresses
        server = ServerConfig(local=local, **_freeze(values))
        if server.is_managed:
            if not server.gpus:
                problems.add(
                    f"{prefix}.gpus: missing, expected a non-empty list of GPU indexes "
                    "for a server this host launches"
                )
            for gpu in server.gpus:
                if gpu in gpu_owner:
                    problems.add(
                        f"{prefix}.gpus: GPU {gpu} is given to servers[{gpu_owner[gpu]}] too, "
                        "expected each GPU to belong to one local server"
                    )
                gpu_owner.setdefault(gpu, i)
            problem = _model_path_problem(written, server.model_path, is_path, base)
            if problem:
                problems.add(f"{prefix}.model_path: got {_show(written)}, {problem}")
        servers.append((i, server))
    return servers


def _model_path_problem(written: str, resolved: str, is_path: bool, base: Path) -> str | None:
    """What is wrong with the ``model_path`` of a server this host launches, if anything."""
    if not is_path:
        if HF_REPO_ID.fullmatch(written):
            return None  # a Hugging Face repo id: SGLang fetches it
        return (
            f"which is neither a file or folder in the config file's folder ({base}, where "
            "relative paths are read from) nor a Hugging Face repo id; expected the model's "
            'directory (e.g. "/models/Meta-Llama-3.1-8B-Instruct" or "./models/x"), a repo '
            'id "owner/name", or managed = false'
        )
    if os.path.exists(resolved):
        return None
    where = "" if resolved == written else f" (read as {resolved}"
    if where and not os.path.isabs(os.path.expanduser(written)):
        where += f": relative paths are read from the config file's folder {base}"
    return (
        f"which does not exist on this host{where + ')' if where else ''}; expected the "
        "model's directory (or set managed = false)"
    )


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    host_addresses: Iterable[str] | None = None,
) -> Config:
    """Read and validate the config file (see :func:`resolve_config_path`)."""
    resolved = resolve_config_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{resolved}: no such config file; create it (see the README's example) "
                f"or pass --config / set {CONFIG_ENV_VAR}"
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{resolved}: cannot read config: {exc}"]) from None
    return parse_config(text, resolved, host_addresses=host_addresses)


def server_fields_changed(old: ServerConfig, new: ServerConfig) -> list[str]:
    """Names of fields that differ; a reload restarts a server only when one does.
    ``max_running_requests`` only informs selection, so it never restarts one."""
    return [
        f.name
        for f in fields(ServerConfig)
        if f.name not in SELECTION_ONLY_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    ]


SELECTION_ONLY_FIELDS = frozenset({"max_running_requests", "gateway_priority", "gateway_cost"})
