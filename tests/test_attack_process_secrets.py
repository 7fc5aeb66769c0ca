"""Issue 12, item 9 (the launch line): secrets in ``env`` must not be written down.

The finding: ``HF_TOKEN`` in ``[sglang].env`` was written, in clear, to the daemon
log, to every server's log and to the ``events`` table, each read by more people
than the config file. The launch line now keeps the names and masks the values
(``HF_TOKEN=***``), and the values of secret flags such as ``--api-key``.
"""

from __future__ import annotations

from pathlib import Path

from conftest import free_port
from daemon_harness import SGLANG_ENV, wait_until
from test_launcher import make_server

from supervisord_ms.config import SglangConfig
from supervisord_ms.launcher import LaunchSpec, build_launch

HF_TOKEN = "hf_reviewerCanSeeThis0123456789"
SERVER_SECRET = "server-only-secret-4242"
API_KEY = "sk-flag-secret-9999"


def test_the_launch_line_keeps_names_and_masks_values():
    sglang = SglangConfig(env={"HF_TOKEN": HF_TOKEN}, extra_args=("--api-key", API_KEY))
    server = make_server((0, 1), env={"MY_SECRET": SERVER_SECRET})
    line = build_launch(server, sglang, nccl_port=1).shell_line()
    assert "HF_TOKEN=*** MY_SECRET=*** CUDA_VISIBLE_DEVICES=0,1 " in line
    assert "--api-key ***" in line
    for secret in (HF_TOKEN, SERVER_SECRET, API_KEY):
        assert secret not in line
    # Flags that only look alike keep their values.
    spec = LaunchSpec(argv=("p", "--sim-token-latency-s", "0.1", "--max-total-tokens", "9"), env={})
    assert spec.shell_line() == "p --sim-token-latency-s 0.1 --max-total-tokens 9"


def test_no_secret_reaches_the_daemon_log_the_server_log_or_the_events(daemon_factory):
    d = daemon_factory(
        [{"name": "a", "port": free_port(), "gpus": [0], "extra_args": ["--api-key", API_KEY]}],
        sglang_env={**SGLANG_ENV, "HF_TOKEN": HF_TOKEN},
    )
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace('name = "a"\n', f'name = "a"\nenv = {{ MY_SECRET = "{SERVER_SECRET}" }}\n')
    )
    d.start()
    pid = d.wait_state("a", "ready")["pid"]
    d.api("POST", "/v1/servers/a/restart")  # a second launch line
    wait_until(lambda: d.server("a")["pid"] not in (None, pid), 15, "a restarted")
    d.wait_state("a", "ready")
    assert d.stop() == 0

    # The daemon's lines in the server's log; what the server prints itself is its own
    # (SGLang prints its server_args, --api-key included: the log's mode guards it).
    server_log = "\n".join(
        line
        for line in (d.dir / "logs" / "a.log").read_text(errors="replace").splitlines()
        if "modelserverd launching:" in line
    )
    assert server_log.count("modelserverd launching:") == 2
    daemon_log = d.log_path.read_text(errors="replace")
    events = "\n".join(m or "" for (m,) in d.query("select message from events"))
    for where, text in (("daemon log", daemon_log), ("server log", server_log), ("events", events)):
        for secret in (HF_TOKEN, SERVER_SECRET, API_KEY):
            assert secret not in text, f"{secret} in the {where}"
        assert "HF_TOKEN=*** MY_SECRET=***" in text, f"no masked launch line in the {where}"
        assert "--api-key ***" in text
    # Env values never reach the database at all (the argv, compared on adoption, does).
    for path in Path(d.db).parent.glob("state.db*"):
        data = path.read_bytes()
        assert HF_TOKEN.encode() not in data and SERVER_SECRET.encode() not in data, path
