"""Config loading and validation: every problem is reported with file, key, value, expectation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from supervisord_ms.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    NAME_PATTERN,
    ConfigError,
    ServerConfig,
    load_config,
    parse_config,
    resolve_config_path,
    server_fields_changed,
)

FILE = "/srv/cfg/modelserverd.toml"
LOCAL = frozenset({"127.0.0.1"})


def toml_value(value: Any) -> str:
    """Just enough TOML for the tests: strings, numbers, booleans, arrays, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def server(drop: tuple[str, ...] = (), **keys: Any) -> str:
    """One [[servers]] block: a valid remote server unless keys say otherwise."""
    values: dict[str, Any] = {
        "ip": "10.0.0.5",
        "port": 30000,
        "model_size": "8B",
        "model_path": "/models/llama-8b",
    }
    values.update(keys)
    lines = [f"{k} = {toml_value(v)}" for k, v in values.items() if k not in drop]
    return "[[servers]]\n" + "\n".join(lines) + "\n"


def section(name: str, **keys: Any) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())


def problems_of(text: str, path: str = FILE, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path, **kwargs)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(text: str, **kwargs: Any) -> str:
    problems = problems_of(text, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


def assert_names(message: str, *parts: str) -> None:
    assert message.startswith(f"{FILE}: "), message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- unknown keys and sections ------------------------------------------------------

UNKNOWN_KEY_CASES = [
    # (config text, key path, suggestion or None for "known keys" list)
    (section("daemon", probe_intervall_s=5.0), "daemon.probe_intervall_s", "probe_interval_s"),
    (section("daemon", sockt="/x.sock"), "daemon.sockt", "socket"),
    (section("restart", backoff_max=9.0), "restart.backoff_max", "backoff_max_s"),
    (section("sglang", extra_arg=["--x"]), "sglang.extra_arg", "extra_args"),
    (section("sglang", pyhton="python3"), "sglang.pyhton", "python"),
    (section("client", max_retries=3), "client.max_retries", "max_retry"),
    (server() + server(port=30001, modle_path="/m"), "servers[1].modle_path", "model_path"),
    (server() + server(port=30001, gpu=[0]), "servers[1].gpu", "gpus"),
    (section("daemon", zzzzzz=1), "daemon.zzzzzz", None),
    (server(qqqqqq=1), "servers[0].qqqqqq", None),
]


@pytest.mark.parametrize(("text", "key", "suggestion"), UNKNOWN_KEY_CASES)
def test_unknown_key_is_named_with_a_suggestion(text: str, key: str, suggestion: str | None):
    message = one_problem(text)
    assert_names(message, f"{key}: unknown key")
    if suggestion is None:
        assert "known keys:" in message
    else:
        assert f'did you mean "{suggestion}"?' in message


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("[deamon]\nsocket = '/x.sock'\n", "deamon", "daemon"),
        ("[server]\nip = '10.0.0.5'\n", "server", "servers"),
        ("[clinet]\n", "clinet", "client"),
        ("[[restarts]]\n", "restarts", "restart"),
    ],
)
def test_unknown_section_is_named_with_a_suggestion(text: str, key: str, suggestion: str):
    message = one_problem(text)
    assert_names(message, f"{key}: unknown key", f'did you mean "{suggestion}"?')


def test_unknown_section_without_close_match_lists_the_sections():
    message = one_problem("[zzzzzz]\n")
    assert_names(message, "zzzzzz: unknown key", "known keys:")
    for name in ("daemon", "restart", "sglang", "client", "servers"):
        assert name in message


# --- wrong types and values in the sections -----------------------------------------

SECTION_VALUE_CASES = [
    # (section, key, TOML value, how the message shows it, expectation fragment)
    ("daemon", "probe_interval_s", "5", '"5"', "a number > 0"),
    ("daemon", "probe_interval_s", 0, "0", "a number > 0"),
    ("daemon", "health_timeout_s", -1.0, "-1.0", "a number > 0"),
    ("daemon", "health_failures", 3.5, "3.5", "an integer >= 1"),
    ("daemon", "health_failures", True, "true", "an integer >= 1"),
    ("daemon", "health_failures", 0, "0", "an integer >= 1"),
    ("daemon", "gpu_free_ratio", 1.5, "1.5", "a number in (0, 1]"),
    ("daemon", "gpu_free_ratio", 0, "0", "a number in (0, 1]"),
    ("daemon", "interface", 0, "0", "a string"),
    ("daemon", "socket", "", '""', "a non-empty string"),
    ("daemon", "state_db", 5, "5", "a non-empty string"),
    ("daemon", "retention_days", "14", '"14"', "a number > 0"),
    ("daemon", "stop_timeout_s", False, "false", "a number > 0"),
    ("daemon", "socket_group", ["a"], '["a"]', "a string"),
    ("restart", "max_failures", "5", '"5"', "an integer >= 1"),
    ("restart", "max_failures", 5.0, "5.0", "an integer >= 1"),
    ("restart", "backoff_initial_s", True, "true", "a number > 0"),
    ("restart", "stable_after_s", -1, "-1", "a number >= 0"),
    ("sglang", "python", "", '""', "a non-empty string"),
    ("sglang", "module", 3, "3", "a non-empty string"),
    ("sglang", "extra_args", [1, 2], "[1, 2]", "a list of strings"),
    ("sglang", "extra_args", ["--x", 1], '["--x", 1]', "a list of strings"),
    ("sglang", "extra_args", "--x", '"--x"', "a list of strings"),
    ("sglang", "env", {"A": 1}, "{A = 1}", "a table of strings"),
    ("sglang", "env", ["A=1"], '["A=1"]', "a table of strings"),
    ("client", "max_retry", True, "true", "an integer >= 1"),
    ("client", "max_retry", 2.5, "2.5", "an integer >= 1"),
    ("client", "latency_growing_rate", 1.0, "1.0", "a number > 1"),
    ("client", "latency_growing_rate", "2", '"2"', "a number > 1"),
    ("client", "benchmark_max_tokens", 16.0, "16.0", "an integer >= 1"),
    ("client", "benchmark_message", " ", '" "', "a non-empty string"),
    ("client", "request_timeout_s", "600", '"600"', "a number > 0"),
]


@pytest.mark.parametrize(("table", "key", "value", "shown", "expected"), SECTION_VALUE_CASES)
def test_bad_section_value(table: str, key: str, value: Any, shown: str, expected: str):
    message = one_problem(section(table, **{key: value}) + server())
    assert_names(message, f"{table}.{key}: got {shown}, expected {expected}")


@pytest.mark.parametrize("text", ["daemon = 5\n", 'daemon = "x"\n', "daemon = [1]\n"])
def test_section_that_is_not_a_table(text: str):
    message = one_problem(text)
    assert_names(message, "daemon: got ", "expected a table [daemon]")


@pytest.mark.parametrize(
    ("value", "shown"),
    [("", '""'), ("file:", '"file:"'), ("NVML", '"NVML"'), ("cuda", '"cuda"'), (1, "1")],
)
def test_bad_gpu_backend(value: Any, shown: str):
    message = one_problem(section("daemon", gpu_backend=value))
    assert_names(message, f"daemon.gpu_backend: got {shown}", '"nvml" or "file:/path/gpus.json"')


@pytest.mark.parametrize(
    ("value", "resolved"),
    [
        ("nvml", "nvml"),
        ("file:/var/sim/gpus.json", "file:/var/sim/gpus.json"),
        ("file:sim/gpus.json", "file:{base}/sim/gpus.json"),
    ],
)
def test_good_gpu_backend(tmp_path: Path, value: str, resolved: str):
    base = tmp_path.resolve()
    config = parse_config(section("daemon", gpu_backend=value), tmp_path / "c.toml")
    assert config.daemon.gpu_backend == resolved.format(base=base)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0o660", '"0o660"'),
        ("0999", '"0999"'),
        ("66", '"66"'),
        ("rw-rw----", '"rw-rw----"'),
        (660, "660"),
        ("", '""'),
    ],
)
def test_bad_socket_mode(value: Any, shown: str):
    message = one_problem(section("daemon", socket_mode=value))
    assert_names(message, f"daemon.socket_mode: got {shown}", "an octal permission string")


@pytest.mark.parametrize(
    ("value", "mode"), [("0660", 0o660), ("660", 0o660), ("0600", 0o600), ("0777", 0o777)]
)
def test_good_socket_mode(value: str, mode: int):
    config = parse_config(section("daemon", socket_mode=value))
    assert config.daemon.socket_mode == value
    assert config.daemon.socket_mode_int == mode


@pytest.mark.parametrize(("initial", "maximum"), [(20.0, 10.0), (301.0, None), (None, 0.5)])
def test_backoff_initial_above_max(initial: float | None, maximum: float | None):
    keys = {}
    if initial is not None:
        keys["backoff_initial_s"] = initial
    if maximum is not None:
        keys["backoff_max_s"] = maximum
    message = one_problem(section("restart", **keys))
    shown_max = 300.0 if maximum is None else maximum
    shown_initial = 1.0 if initial is None else initial
    assert_names(
        message,
        f"restart.backoff_max_s: got {shown_max}",
        f"expected a number >= restart.backoff_initial_s ({shown_initial})",
    )


def test_backoff_initial_equal_to_max_is_fine():
    config = parse_config(section("restart", backoff_initial_s=5.0, backoff_max_s=5.0))
    assert config.restart.backoff_initial_s == config.restart.backoff_max_s == 5.0


# --- servers: one key at a time -----------------------------------------------------

SERVER_VALUE_CASES = [
    # (key, TOML value, how the message shows it, expectation fragment)
    ("port", 0, "0", "an integer port in 1..65535"),
    ("port", 65536, "65536", "an integer port in 1..65535"),
    ("port", -1, "-1", "an integer port in 1..65535"),
    ("port", "30001", '"30001"', "an integer port in 1..65535"),
    ("port", 30001.0, "30001.0", "an integer port in 1..65535"),
    ("port", True, "true", "an integer port in 1..65535"),
    ("gpus", [], "[]", "a non-empty list of distinct GPU indexes"),
    ("gpus", [0, 0], "[0, 0]", "a non-empty list of distinct GPU indexes"),
    ("gpus", [1, 2, 1], "[1, 2, 1]", "a non-empty list of distinct GPU indexes"),
    ("gpus", [-1], "[-1]", "integers >= 0"),
    ("gpus", [0.5], "[0.5]", "integers >= 0"),
    ("gpus", [True], "[true]", "integers >= 0"),
    ("gpus", ["0"], '["0"]', "integers >= 0"),
    ("gpus", 0, "0", "a non-empty list of distinct GPU indexes"),
    ("name", "a b", '"a b"', "a name of letters, digits, '.', '_' or '-'"),
    ("name", "x/y", '"x/y"', "a name of letters, digits, '.', '_' or '-'"),
    ("name", "", '""', "a name of letters"),
    ("name", 7, "7", "a name of letters"),
    ("model_size", "8 B", '"8 B"', "a name of letters"),
    ("model_path", "", '""', "a non-empty string"),
    ("model_path", ["/m"], '["/m"]', "a non-empty string"),
    ("ip", "", '""', "an IP address or host name"),
    ("ip", "10.0.0.0/24", '"10.0.0.0/24"', "an IP address or host name"),
    ("ip", "10.0.0.5 ", '"10.0.0.5 "', "an IP address or host name"),
    ("managed", "yes", '"yes"', "true or false"),
    ("managed", 1, "1", "true or false"),
    ("extra_args", [1], "[1]", "a list of strings"),
    ("extra_args", "--x 1", '"--x 1"', "a list of strings"),
    ("env", {"A": 1}, "{A = 1}", "a table of strings"),
    ("env", {"A": ["b"]}, '{A = ["b"]}', "a table of strings"),
]


@pytest.mark.parametrize(("key", "value", "shown", "expected"), SERVER_VALUE_CASES)
def test_bad_server_value(key: str, value: Any, shown: str, expected: str):
    keys: dict[str, Any] = {"port": 30001, "gpus": [1]}
    keys[key] = value
    text = server(gpus=[0]) + server(**keys)
    message = one_problem(text)
    assert_names(message, f"servers[1].{key}: got {shown}, expected ", expected)


@pytest.mark.parametrize("key", ["ip", "port", "model_size", "model_path"])
def test_missing_required_server_key(key: str):
    message = one_problem(server() + server(port=30001, drop=(key,)))
    assert_names(message, f"servers[1].{key}: missing, expected ")


def test_servers_must_be_an_array_of_tables():
    message = one_problem('servers = ["a"]\n')
    assert_names(message, 'servers: got ["a"]', "an array of tables")
    message = one_problem("[servers]\nip = '10.0.0.5'\n")
    assert_names(message, "servers: got {", "an array of tables")


# --- servers: checks across servers -------------------------------------------------


def test_duplicate_explicit_names():
    text = server(name="a") + server(name="b", port=30001) + server(name="a", port=30002)
    message = one_problem(text)
    assert_names(message, 'servers[2].name: got "a"', "a unique name", "servers[0]")


def test_duplicate_default_derived_name():
    # servers[1] gets the default "8B-10.0.0.5-30001", which servers[0] took explicitly.
    text = server(name="8B-10.0.0.5-30001") + server(port=30001)
    message = one_problem(text)
    assert_names(message, 'servers[1].name: got "8B-10.0.0.5-30001"', "unique", "servers[0]")


def test_two_servers_on_one_ip_port():
    text = server(name="a") + server(name="b", ip="10.0.0.6") + server(name="c")
    message = one_problem(text)
    assert_names(message, "servers[2].port: got 30000 on 10.0.0.5", "a free ip:port", "servers[0]")


def test_same_endpoint_without_names_reports_name_and_port():
    problems = problems_of(server() + server())
    assert len(problems) == 2
    assert_names(problems[0], 'servers[1].name: got "8B-10.0.0.5-30000"')
    assert_names(problems[1], "servers[1].port: got 30000 on 10.0.0.5")


def test_clash_is_reported_even_when_the_other_server_has_a_typo():
    # A bad key in servers[0] must not hide that servers[1] takes its name and ip:port.
    problems = problems_of(server(name="a", gpus=[0, 0]) + server(name="a"))
    assert len(problems) == 3, problems
    assert_names(problems[0], "servers[0].gpus: got [0, 0]")
    assert_names(problems[1], 'servers[1].name: got "a"', "servers[0]")
    assert_names(problems[2], "servers[1].port: got 30000 on 10.0.0.5", "servers[0]")


def test_invalid_explicit_name_does_not_fall_back_to_a_default():
    # servers[1]'s explicit (bad) name must not be replaced by the default that
    # servers[0] already has: only the bad name is a problem.
    text = server(port=30001) + server(name="a b", port=30001, ip="10.0.0.6")
    message = one_problem(text)
    assert_names(message, 'servers[1].name: got "a b"')


def test_one_gpu_on_two_local_servers(tmp_path: Path):
    model = str(tmp_path)
    text = server(ip="127.0.0.1", model_path=model, gpus=[0, 1]) + server(
        ip="127.0.0.1", port=30001, model_path=model, gpus=[2, 1]
    )
    message = one_problem(text, host_addresses=LOCAL)
    assert_names(message, "servers[1].gpus: GPU 1 is given to servers[0] too", "one local server")


@pytest.mark.parametrize("addresses", [LOCAL, None])
def test_one_gpu_on_two_remote_servers_is_fine(addresses: frozenset[str] | None):
    text = server(gpus=[0]) + server(port=30001, gpus=[0])
    config = parse_config(text, FILE, host_addresses=addresses)
    assert [s.gpus for s in config.servers] == [(0,), (0,)]
    assert not any(s.local or s.is_managed for s in config.servers)


def test_one_gpu_on_a_local_and_an_unmanaged_local_server_is_fine(tmp_path: Path):
    text = server(ip="127.0.0.1", model_path=str(tmp_path), gpus=[0]) + server(
        ip="127.0.0.1", port=30001, gpus=[0], managed=False
    )
    config = parse_config(text, FILE, host_addresses=LOCAL)
    assert [s.is_managed for s in config.servers] == [True, False]


def test_local_server_with_missing_model_path(tmp_path: Path):
    missing = str(tmp_path / "no-such-model")
    message = one_problem(
        server(ip="127.0.0.1", model_path=missing, gpus=[0]), host_addresses=LOCAL
    )
    assert_names(message, f'servers[0].model_path: got "{missing}"', "does not exist")


def test_remote_server_with_missing_model_path_is_fine(tmp_path: Path):
    missing = str(tmp_path / "no-such-model")
    config = parse_config(server(model_path=missing, gpus=[0]), FILE, host_addresses=LOCAL)
    (only,) = config.servers
    assert only.model_path == missing
    assert not only.local


def test_local_managed_server_needs_gpus(tmp_path: Path):
    message = one_problem(server(ip="127.0.0.1", model_path=str(tmp_path)), host_addresses=LOCAL)
    assert_names(message, "servers[0].gpus: missing", "a non-empty list of GPU indexes")


def test_unmanaged_local_server_needs_no_gpus_nor_model(tmp_path: Path):
    missing = str(tmp_path / "no-such-model")
    text = server(ip="127.0.0.1", model_path=missing, managed=False)
    (only,) = parse_config(text, FILE, host_addresses=LOCAL).servers
    assert only.local
    assert only.managed is False
    assert not only.is_managed
    assert only.gpus == ()


def test_local_server_is_managed_by_default(tmp_path: Path):
    text = server(ip="127.0.0.1", model_path=str(tmp_path), gpus=[3, 1])
    config = parse_config(text, FILE, host_addresses=LOCAL)
    (only,) = config.servers
    assert only.local and only.is_managed
    assert only.gpus == (3, 1)
    assert config.managed_servers == (only,)


def test_without_host_addresses_nothing_is_local(tmp_path: Path):
    text = server(ip="127.0.0.1", model_path=str(tmp_path / "missing"))
    config = parse_config(text, FILE)
    assert config.managed_servers == ()


# --- SGLang's own health check timeout (issue 10) -----------------------------------

HEALTH_WHY = (
    "SGLang's /health waits that long for one generated token before it answers 503, "
    "so a check that gives up sooner fails servers that are slow but alive"
)


def local(tmp_path: Path, name: str, port: int = 30000, **keys: Any) -> str:
    """A server this host launches (ip in LOCAL, model folder present)."""
    return server(name=name, ip="127.0.0.1", port=port, model_path=str(tmp_path), **keys)


def test_health_timeout_at_sglangs_default_is_refused(tmp_path: Path):
    text = section("daemon", health_timeout_s=20.0) + local(tmp_path, "a", gpus=[0])
    text += local(tmp_path, "b", port=30001, gpus=[1]) + server(name="remote")
    assert one_problem(text, host_addresses=LOCAL) == (
        f"{FILE}: daemon.health_timeout_s: got 20.0, expected a number above 20, "
        f"the SGLANG_HEALTH_CHECK_TIMEOUT of a, b (SGLang's default): {HEALTH_WHY}; "
        "set health_timeout_s to 30 or more, or lower SGLANG_HEALTH_CHECK_TIMEOUT"
    )


def test_health_timeout_below_sglang_env_is_refused(tmp_path: Path):
    text = (
        section("daemon", health_timeout_s=45)
        + section("sglang.env", SGLANG_HEALTH_CHECK_TIMEOUT="60")
        + local(tmp_path, "a", gpus=[0])
    )
    assert one_problem(text, host_addresses=LOCAL) == (
        f"{FILE}: daemon.health_timeout_s: got 45, expected a number above 60, "
        f"the SGLANG_HEALTH_CHECK_TIMEOUT of a (from sglang.env): {HEALTH_WHY}; "
        "set health_timeout_s to 70 or more, or lower SGLANG_HEALTH_CHECK_TIMEOUT"
    )


def test_a_servers_env_overrides_sglang_env(tmp_path: Path):
    # a's own value (10) is fine with 30 s; b inherits [sglang].env's 40, which is not.
    text = (
        section("sglang.env", SGLANG_HEALTH_CHECK_TIMEOUT="40")
        + local(tmp_path, "a", gpus=[0], env={"SGLANG_HEALTH_CHECK_TIMEOUT": "10"})
        + local(tmp_path, "b", port=30001, gpus=[1])
        + local(tmp_path, "c", port=30002, gpus=[2], env={"SGLANG_HEALTH_CHECK_TIMEOUT": "35"})
    )
    assert problems_of(text, host_addresses=LOCAL) == [
        f"{FILE}: daemon.health_timeout_s: got 30.0, expected a number above 40, "
        f"the SGLANG_HEALTH_CHECK_TIMEOUT of b (from sglang.env): {HEALTH_WHY}; "
        "set health_timeout_s to 50 or more, or lower SGLANG_HEALTH_CHECK_TIMEOUT",
        f"{FILE}: daemon.health_timeout_s: got 30.0, expected a number above 35, "
        f"the SGLANG_HEALTH_CHECK_TIMEOUT of c (from servers[2].env): {HEALTH_WHY}; "
        "set health_timeout_s to 45 or more, or lower SGLANG_HEALTH_CHECK_TIMEOUT",
    ]


def test_health_timeout_above_sglangs_is_accepted(tmp_path: Path):
    text = (
        section("daemon", health_timeout_s=2.5)
        + section("sglang.env", SGLANG_HEALTH_CHECK_TIMEOUT="2")
        + local(tmp_path, "a", gpus=[0])
    )
    config = parse_config(text, FILE, host_addresses=LOCAL)
    assert config.daemon.health_timeout_s == 2.5
    assert config.warnings == ()
    # The default is above SGLang's default.
    config = parse_config(local(tmp_path, "a", gpus=[0]), FILE, host_addresses=LOCAL)
    assert config.daemon.health_timeout_s == 30.0 and config.warnings == ()


@pytest.mark.parametrize("addresses", [None, frozenset()])
def test_health_timeout_does_not_concern_servers_launched_elsewhere(
    tmp_path: Path, addresses: frozenset[str] | None
):
    # Remote servers are probed, not health-checked against SGLang's timeout; an
    # unmanaged local one is not launched here either.
    text = section("daemon", health_timeout_s=5.0) + local(tmp_path, "a", gpus=[0])
    text += server(name="b", port=30001)
    assert parse_config(text, FILE, host_addresses=addresses).daemon.health_timeout_s == 5.0
    text = section("daemon", health_timeout_s=5.0) + local(tmp_path, "a", managed=False)
    assert parse_config(text, FILE, host_addresses=LOCAL).servers[0].local


def test_bad_health_timeout_is_reported_once(tmp_path: Path):
    text = (
        section("daemon", health_timeout_s=-1.0)
        + section("sglang.env", SGLANG_HEALTH_CHECK_TIMEOUT="60")
        + local(tmp_path, "a", gpus=[0])
    )
    message = one_problem(text, host_addresses=LOCAL)
    assert message == f"{FILE}: daemon.health_timeout_s: got -1.0, expected a number > 0"


@pytest.mark.parametrize("value", ["20s", "2.5", "", "twenty"])
def test_sglang_health_timeout_must_be_whole_seconds(tmp_path: Path, value: str):
    expected = 'a whole number of seconds, e.g. "20" (SGLang reads it with int())'
    text = section("sglang.env", SGLANG_HEALTH_CHECK_TIMEOUT=value) + server()
    assert one_problem(text) == (
        f'{FILE}: sglang.env.SGLANG_HEALTH_CHECK_TIMEOUT: got "{value}", expected {expected}'
    )
    # In a server's env, whether or not this host launches it.
    text = server(env={"SGLANG_HEALTH_CHECK_TIMEOUT": value})
    assert one_problem(text, host_addresses=LOCAL) == (
        f'{FILE}: servers[0].env.SGLANG_HEALTH_CHECK_TIMEOUT: got "{value}", expected {expected}'
    )


def generation_warning(key: str, value: str) -> str:
    return (
        f'{FILE}: {key}.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION: "{value}" makes SGLang\'s '
        "/health answer 200 without generating a token, so it cannot see a hung scheduler; "
        "modelserverd then relies on its own scheduler check to find hangs"
    )


@pytest.mark.parametrize("value", ["0", "false", "False", "NO", "n"])
def test_health_without_generation_is_a_warning(tmp_path: Path, value: str):
    text = (
        section("sglang.env", SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=value)
        + local(tmp_path, "a", gpus=[0])
        + server(name="b", env={"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": value})
    )
    config = parse_config(text, FILE, host_addresses=LOCAL)
    assert config.warnings == (
        generation_warning("sglang.env", value),
        generation_warning("servers[1].env", value),
    )
    assert config == parse_config(text, FILE, host_addresses=LOCAL)  # warnings do not compare


@pytest.mark.parametrize("value", ["1", "true", "yes", "Y", "off", " 0"])
def test_health_with_generation_gives_no_warning(tmp_path: Path, value: str):
    # "off" and " 0" are not EnvBool spellings: SGLang keeps its default, true.
    text = section("sglang.env", SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=value)
    config = parse_config(text + local(tmp_path, "a", gpus=[0]), FILE, host_addresses=LOCAL)
    assert config.warnings == ()


def test_without_generation_sglangs_timeout_does_not_apply(tmp_path: Path):
    # /health answers at once when it does not generate: no race to refuse.
    text = section("daemon", health_timeout_s=5.0) + local(
        tmp_path, "a", gpus=[0], env={"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}
    )
    config = parse_config(text, FILE, host_addresses=LOCAL)
    assert config.warnings == (generation_warning("servers[0].env", "0"),)
    # A server's own "1" turns generation back on, and SGLang's timeout with it.
    text = (
        section("daemon", health_timeout_s=5.0)
        + section("sglang.env", SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION="0")
        + local(tmp_path, "a", gpus=[0], env={"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "1"})
        + local(tmp_path, "b", port=30001, gpus=[1])
    )
    message = one_problem(text, host_addresses=LOCAL)
    assert message.startswith(f"{FILE}: daemon.health_timeout_s: got 5.0, expected a number above")
    assert "the SGLANG_HEALTH_CHECK_TIMEOUT of a (SGLang's default)" in message


def test_warnings_come_with_load_config(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(section("sglang.env", SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION="0") + server())
    (warning,) = load_config(path).warnings
    assert warning.startswith(f"{path}: sglang.env.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION: ")


# --- several problems at once -------------------------------------------------------


def test_every_problem_in_a_file_is_reported(tmp_path: Path):
    text = (
        section("daemon", probe_intervall_s=5.0, health_failures=2.5, socket_mode="rw")
        + section("restart", backoff_initial_s=50.0, backoff_max_s=10.0)
        + section("client", max_retry=True)
        + "[deamon]\n"
        + server(name="a", port=0)  # 1 problem
        + server(name="b", gpus=[0, 1], ip="127.0.0.1", model_path=str(tmp_path))
        + server(name="b", port=30001, gpus=[1], ip="127.0.0.1", model_path="/no/such/model")
        + server(name="c", port=30002, drop=("model_size",))
    )
    problems = problems_of(text, host_addresses=LOCAL)
    expected = [
        "daemon.probe_intervall_s: unknown key",
        "daemon.health_failures: got 2.5",
        'daemon.socket_mode: got "rw"',
        "restart.backoff_max_s: got 10.0",
        "client.max_retry: got true",
        "deamon: unknown key",
        "servers[0].port: got 0",
        'servers[2].name: got "b"',
        "servers[2].gpus: GPU 1 is given to servers[1]",
        'servers[2].model_path: got "/no/such/model"',
        "servers[3].model_size: missing",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for fragment in expected:
        assert sum(fragment in p for p in problems) == 1, fragment
    assert all(p.startswith(f"{FILE}: ") for p in problems)


# --- reading the file ---------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (message,) = info.value.problems
    assert message.startswith(f"{path}: no such config file")
    assert CONFIG_ENV_VAR in message and "--config" in message


def test_directory_instead_of_file(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    (message,) = info.value.problems
    assert message.startswith(f"{tmp_path}: cannot read config")


def test_non_utf8_bytes(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[sglang]\npython = "/opt/py\xe9thon"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (message,) = info.value.problems
    assert message.startswith(f"{path}: cannot read config")
    assert "utf-8" in message


@pytest.mark.parametrize(
    "text",
    ["this is not toml", "[daemon\n", "[daemon]\nsocket = \n", 'a = "x"\na = "y"\n', "x = 0660\n"],
)
def test_non_toml_text(tmp_path: Path, text: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (message,) = info.value.problems
    assert message.startswith(f"{path}: not valid TOML: ")


def test_load_config_reads_and_validates(tmp_path: Path):
    path = tmp_path / "ok.toml"
    path.write_text(server(name="a", gpus=[0]))
    config = load_config(path)
    assert config.path == str(path)
    assert config.server("a") is not None
    assert config.server("b") is None
    path.write_text(server(port=0))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: servers[0].port: got 0")


# --- defaults -----------------------------------------------------------------------


def test_servers_only_file_gets_every_default():
    config = parse_config(server(), FILE)
    d = config.daemon
    assert d.socket == "/run/modelserverd/api.sock"
    assert d.state_db == "/var/lib/modelserverd/state.db"
    assert d.log_dir == "/var/lib/modelserverd/logs"
    assert d.interface == ""
    assert d.gpu_backend == "nvml"
    assert d.gpu_free_ratio == 0.9
    assert d.probe_interval_s == 5.0
    assert d.health_timeout_s == 30.0
    assert d.health_failures == 3
    assert d.startup_timeout_s == 1800.0
    assert d.stop_timeout_s == 30.0
    assert d.retention_days == 14
    assert d.socket_mode == "0660"
    assert d.socket_mode_int == 0o660
    assert d.socket_group == ""
    assert d.admin_group == ""
    r = config.restart
    assert r.backoff_initial_s == 1.0
    assert r.backoff_max_s == 300.0
    assert r.max_failures == 5
    assert r.failure_window_s == 600.0
    assert r.stable_after_s == 300.0
    g = config.sglang
    assert g.python == "python3"
    assert g.module == "sglang.launch_server"
    assert tuple(g.extra_args) == ()
    assert dict(g.env) == {}
    c = config.client
    assert c.max_retry == 3
    assert c.latency_growing_rate == 2.0
    assert c.benchmark_message == "Say hello in one short sentence."
    assert c.benchmark_max_tokens == 16
    assert c.request_timeout_s == 600.0
    (s,) = config.servers
    assert s.name == "8B-10.0.0.5-30000"
    assert (s.ip, s.port, s.model_size, s.model_path) == (
        "10.0.0.5",
        30000,
        "8B",
        "/models/llama-8b",
    )
    assert s.gpus == ()
    assert s.managed is None
    assert tuple(s.extra_args) == ()
    assert dict(s.env) == {}
    assert s.local is False
    assert s.url == "http://10.0.0.5:30000"


def test_given_values_replace_defaults():
    text = (
        section("daemon", probe_interval_s=1, health_failures=7, interface="eno1")
        + section("sglang", python="/opt/venv/bin/python", extra_args=["--log-level", "debug"])
        + section("sglang.env", SGLANG_LOG_LEVEL="info")
        + section("client", max_retry=5)
        + server(name="x", gpus=[2, 3], extra_args=["--mem-fraction-static", "0.8"], env={"A": "b"})
    )
    config = parse_config(text, FILE)
    assert config.daemon.probe_interval_s == 1
    assert config.daemon.health_failures == 7
    assert config.daemon.interface == "eno1"
    assert config.sglang.python == "/opt/venv/bin/python"
    assert config.sglang.extra_args == ("--log-level", "debug")
    assert dict(config.sglang.env) == {"SGLANG_LOG_LEVEL": "info"}
    assert config.client.max_retry == 5
    (s,) = config.servers
    assert s.gpus == (2, 3)
    assert s.extra_args == ("--mem-fraction-static", "0.8")
    assert dict(s.env) == {"A": "b"}


@pytest.mark.parametrize(
    ("model_size", "ip", "port", "name"),
    [
        ("8B", "10.0.0.5", 30000, "8B-10.0.0.5-30000"),
        ("70B", "gpu-host.example", 30001, "70B-gpu-host.example-30001"),
        ("8B", "::1", 30000, "8B---1-30000"),
        ("8B", "fe80::1%eth0", 8000, "8B-fe80--1-eth0-8000"),
        ("8B", "2001:db8::7", 1, "8B-2001-db8--7-1"),
    ],
)
def test_default_server_name(model_size: str, ip: str, port: int, name: str):
    (s,) = parse_config(server(model_size=model_size, ip=ip, port=port), FILE).servers
    assert s.name == name
    assert NAME_PATTERN.match(s.name)


def test_ipv6_url_is_bracketed():
    (s,) = parse_config(server(ip="::1"), FILE).servers
    assert s.url == "http://[::1]:30000"


# --- where the config comes from, and paths relative to it -------------------------


def test_resolve_config_path_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert resolve_config_path() == DEFAULT_CONFIG_PATH
    assert resolve_config_path(None) == Path("/etc/modelserverd/config.toml")
    monkeypatch.setenv(CONFIG_ENV_VAR, "")
    assert resolve_config_path() == DEFAULT_CONFIG_PATH
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "env.toml"))
    assert resolve_config_path() == tmp_path / "env.toml"
    assert resolve_config_path(tmp_path / "flag.toml") == tmp_path / "flag.toml"
    assert resolve_config_path(str(tmp_path / "flag.toml")) == tmp_path / "flag.toml"


def test_load_config_uses_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from_env = tmp_path / "env.toml"
    from_env.write_text(server(name="from-env"))
    from_flag = tmp_path / "flag.toml"
    from_flag.write_text(server(name="from-flag"))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(from_env))
    assert [s.name for s in load_config().servers] == ["from-env"]
    assert [s.name for s in load_config(from_flag).servers] == ["from-flag"]


def test_relative_daemon_paths_resolve_against_the_config_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ms.toml").write_text(
        section(
            "daemon",
            state_db="state/state.db",
            log_dir="logs",
            socket="../run/api.sock",
            gpu_backend="file:sim/gpus.json",
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = etc.resolve()
    for path in (etc / "ms.toml", "../etc/ms.toml"):
        d = load_config(path).daemon
        assert d.state_db == str(base / "state" / "state.db")
        assert d.log_dir == str(base / "logs")
        assert d.socket == str(tmp_path.resolve() / "run" / "api.sock")
        assert d.gpu_backend == f"file:{base / 'sim' / 'gpus.json'}"


def test_absolute_and_home_daemon_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = section("daemon", state_db="/var/x/state.db", log_dir="~/logs")
    d = parse_config(text, tmp_path / "c.toml").daemon
    assert d.state_db == "/var/x/state.db"
    assert d.log_dir == str(tmp_path / "home" / "logs")


# --- reload support -----------------------------------------------------------------


def test_server_fields_changed():
    old = ServerConfig(name="a", ip="10.0.0.5", port=1, model_size="8B", model_path="/m")
    same = ServerConfig(name="a", ip="10.0.0.5", port=1, model_size="8B", model_path="/m")
    assert server_fields_changed(old, same) == []
    new = ServerConfig(name="a", ip="10.0.0.5", port=2, model_size="8B", model_path="/m", gpus=(1,))
    assert server_fields_changed(old, new) == ["port", "gpus"]
