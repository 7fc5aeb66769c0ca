"""``ms-client``: completions and server questions from the shell.

Each command is a few lines over the library. Tables are for people, ``--json`` for
programs. Exit codes are a contract for scripts: 0 ok, 1 other failure (a request
the server refused, a daemon error, a command that needs the daemon), 2 usage,
3 no server could answer, 4 config problem. Messages go to stderr and say what to do.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from supervisord_ms import __version__
from supervisord_ms.config import DaemonConfig
from supervisord_ms.display import (
    RESTART_WINDOW_S,
    Column,
    error_cell,
    error_time,
    latency_cell,
    output_width,
    restarts_since,
    seconds,
    table_lines,
)

from . import _fallback
from ._client import CLI_CONFIG_HINT, ModelServer, _load, for_caller
from ._exceptions import (
    ConfigProblem,
    DaemonError,
    DaemonUnavailable,
    NoServerAvailable,
    RequestRejected,
    StreamInterrupted,
)
from ._models import ServerInfo
from ._sglang import APIS
from ._transport import DaemonClient, HttpTransport

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_SERVER = 3
EXIT_CONFIG = 4

F = TypeVar("F", bound=Callable[..., Any])


def _fail(code: int, lines: Sequence[str]) -> None:
    for line in lines:
        click.echo(f"ms-client: {line}", err=True)
    raise click.exceptions.Exit(code)


def _errors(func: F) -> F:
    """Turn the library's exceptions into one clear message and the documented code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigProblem as exc:
            problems = for_caller(exc.problems, CLI_CONFIG_HINT)  # the library says config=
            _fail(EXIT_CONFIG, [*problems, "fix the config above (or pass --config PATH)"])
        except (NoServerAvailable, StreamInterrupted) as exc:
            _fail(EXIT_NO_SERVER, [str(exc)])
        except (RequestRejected, DaemonError, DaemonUnavailable) as exc:
            _fail(EXIT_FAILED, [str(exc)])
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $MODELSERVERD_CONFIG, else /etc/modelserverd/config.toml).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")


def _check_size(model_size: str, config: str | None) -> None:
    """A size that differs from a configured one only in case is a typo: say so, as a
    usage error, instead of searching for a server that cannot exist."""
    loaded, _, _ = _load(config, hint=CLI_CONFIG_HINT)
    sizes = sorted({s.model_size for s in loaded.servers}) if loaded else []
    if not sizes or model_size in sizes:
        return
    near = [s for s in sizes if s.lower() == model_size.lower()]
    if near:
        raise click.UsageError(
            f"no model size {model_size!r}; did you mean {near[0]!r}? "
            f"(sizes in the config: {', '.join(sizes)})"
        )


size_option = click.option(
    "--model-size", default="8B", show_default=True, help="Model size, as in the config."
)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _table(columns: Sequence[Column | str], rows: Sequence[Sequence[Any]]) -> None:
    """Aligned columns fitted to the terminal like ``modelserverd``'s tables: free
    text cut at a word with ``…``, then columns marked ``drop`` left out (a pipe
    gets whole rows unless ``$COLUMNS`` is set)."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    for line in table_lines(
        cols, [[_fmt(v) for v in row] for row in rows], output_width(sys.stdout)
    ):
        click.echo(line)


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


class _Setup:
    """The config (when readable) and the daemon socket, shared by the commands."""

    def __init__(self, config: str | None):
        self.config, self.path, self.problems = _load(config, hint=CLI_CONFIG_HINT)
        self.socket = (self.config.daemon if self.config else DaemonConfig()).socket
        self.daemon = DaemonClient(self.socket)

    def need_config(self, exc: DaemonUnavailable) -> None:
        """Without the daemon the config is the only source of servers."""
        _fallback.note_daemon_down(exc, str(self.path))
        if self.config is None:
            raise ConfigProblem(
                [*self.problems, f"(needed because the daemon is not reachable at {self.socket})"]
            )

    def probe_all(self) -> list[_fallback.ProbeResult]:
        assert self.config is not None
        return _fallback.probe(
            _fallback.servers_from_config(self.config),
            transport=HttpTransport(),
            api=APIS["chat"],
            client=self.config.client,
            early_skip=False,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ms-client")
def cli() -> None:
    """Completions from the best SGLang server, chosen by modelserverd.

    Asks the daemon on its Unix socket which server is best, sends the request
    straight to that server, and falls back across servers when one fails or hangs.
    Without the daemon it probes the servers of the config file itself.

    \b
    Exit codes: 0 ok, 1 other failure, 2 usage, 3 no server could answer,
    4 config problem.

    \b
    Example:
        ms-client complete "Say hello in one short sentence." --model-size 8B
        ms-client best --model-size 70B --json
    """


@cli.command()
@click.argument("prompt")
@size_option
@click.option("--max-tokens", type=click.IntRange(min=1), help="Longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), help="Sampling temperature.")
@click.option("--system", help="System message (chat API only).")
@click.option("--session", help="Session key: keeps a conversation on one server.")
@click.option(
    "--stream/--no-stream", default=True, show_default=True, help="Print text as it arrives."
)
@json_option
@click.option(
    "--api",
    type=click.Choice(sorted(APIS)),
    default="chat",
    show_default=True,
    help="OpenAI chat API or SGLang's native /generate.",
)
@click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False),
    help="JSON file of OpenAI tool definitions (a list, or an object with a "
    '"tools" list); chat API only.',
)
@click.option(
    "--tool-choice",
    help='"auto", "none", "required", or the name of one tool the model must call.',
)
@config_option
@_errors
def complete(
    prompt: str,
    model_size: str,
    max_tokens: int | None,
    temperature: float | None,
    system: str | None,
    session: str | None,
    stream: bool,
    as_json: bool,
    api: str,
    tools_file: str | None,
    tool_choice: str | None,
    config: str | None,
) -> None:
    """Send PROMPT to the best server of a size and print the answer.

    PROMPT "-" reads the prompt from standard input. Text is printed as it
    arrives; --json prints text, reasoning, tool_calls, server, latency_s,
    ttft_s, prompt_tokens, completion_tokens and attempts at the end instead.

    A reasoning model's reasoning is shown only by --json (its "reasoning");
    the plain output is the answer. Tool calls the model made (with --tools)
    follow the answer's text, one per line, as
    `tool call: NAME(ARGUMENTS)` with ARGUMENTS the model's JSON text;
    --json gives them whole, ids included, in "tool_calls".

    \b
    Example:
        ms-client complete "Say hello in one short sentence." --max-tokens 32
        echo "Summarise: ..." | ms-client complete - --model-size 70B --json
        ms-client complete "Weather in Paris?" --tools tools.json --json
    """
    _check_size(model_size, config)
    if prompt == "-":
        prompt = sys.stdin.read()
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if system is not None:
        kwargs["system"] = system
    if tools_file is not None:
        kwargs["tools"] = _read_tools(tools_file)
    if tool_choice is not None:
        kwargs["tool_choice"] = _tool_choice(tool_choice)
    server = ModelServer(model_size, config=config, session_key=session, api=api)
    try:
        if as_json or not stream:
            result = server.get_completion(prompt, **kwargs)
            if as_json:
                _echo_json(result.to_dict())
                return
            if result.text or not result.tool_calls:
                click.echo(result.text)
            _echo_tool_calls(result.tool_calls)
            return
        text_end = "\n"
        answer = server.stream_completion(prompt, **kwargs)
        for chunk in answer:
            click.echo(chunk, nl=False)
            sys.stdout.flush()
            text_end = chunk[-1:]
        if text_end != "\n":
            click.echo()
        _echo_tool_calls(answer.completion.tool_calls if answer.completion else None)
    finally:
        server.close()


def _read_tools(path: str) -> list[dict[str, Any]]:
    """The tool definitions of ``--tools``: a JSON list, or an object with ``tools``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.BadParameter(f"cannot read {path}: {reason}", param_hint="--tools") from None
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}", param_hint="--tools") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise click.BadParameter(
            f'{path} must hold a list of tools like {{"type": "function", "function": '
            '{"name": ..., "parameters": ...}}',
            param_hint="--tools",
        )
    return data


def _tool_choice(value: str) -> str | dict[str, Any]:
    if value in ("auto", "none", "required"):
        return value
    return {"type": "function", "function": {"name": value}}


def _echo_tool_calls(calls: Sequence[dict[str, Any]] | None) -> None:
    """One readable line per call: ``tool call: get_weather({"city": "Paris"})``."""
    for call in calls or ():
        function = call.get("function") or {}
        name = function.get("name") or "?"
        click.echo(f"tool call: {name}({function.get('arguments') or ''})")


@cli.command()
@size_option
@json_option
@config_option
@_errors
def best(model_size: str, as_json: bool, config: str | None) -> None:
    """The servers a request of a size would go to, best first.

    Asks the daemon; without it, probes the config's servers of that size with
    the benchmark message and ranks them by latency (and says so on stderr).

    \b
    Example:
        ms-client best --model-size 8B
        ms-client best --model-size 70B --json | jq -r '.candidates[0].url'
    """
    _check_size(model_size, config)
    setup = _Setup(config)
    n = setup.config.client.max_retry if setup.config else 3
    try:
        candidates = setup.daemon.best(model_size, n=n)
        source = "daemon"
    except DaemonError as exc:
        raise NoServerAvailable(
            model_size, detail=f"the daemon at {setup.socket} found none: {exc.message}"
        ) from None
    except DaemonUnavailable as exc:
        setup.need_config(exc)
        assert setup.config is not None
        ranked = _fallback.choose(
            setup.config, model_size, transport=HttpTransport(), api=APIS["chat"]
        )
        candidates = [s.as_api_object() for s in ranked[:n]]
        source = "probe"
    if not candidates:
        raise NoServerAvailable(model_size, detail=f"the daemon at {setup.socket} offered none")
    if as_json:
        _echo_json({"model_size": model_size, "source": source, "candidates": candidates})
        return
    rows = []
    for rank, obj in enumerate(candidates, 1):
        s = ServerInfo.from_daemon(obj)
        rows.append(
            [
                rank,
                s.name,
                s.address,
                s.state,
                seconds(s.latency_s),
                seconds(s.ttft_s),
                seconds(s.latency_per_token_s),
            ]
        )
    _table(["#", "NAME", "ADDRESS", "STATE", "LATENCY_S", "TTFT_S", "S_PER_TOKEN"], rows)


@cli.command()
@json_option
@config_option
@_errors
def servers(as_json: bool, config: str | None) -> None:
    """Every configured server with its state, latency and restarts in 24 h.

    Asks the daemon; without it, probes every server of the config once and
    shows which answered (and says so on stderr). The columns are those of
    `modelserverd status`: LATENCY_S only for a ready or unhealthy server,
    RESTARTS_24H over the last 24 hours, LAST_ERROR with its age when known.

    \b
    Example:
        ms-client servers
        ms-client servers --json | jq '.servers[] | select(.state != "ready") | .name'
    """
    setup = _Setup(config)
    restarts: list[dict[str, Any]] | None = None
    try:
        found = setup.daemon.servers()
        restarts = _restarts(setup.daemon)
    except DaemonUnavailable as exc:
        setup.need_config(exc)
        found = []
        for result in setup.probe_all():
            obj = result.measured.as_api_object()
            obj["last_error"] = result.error
            found.append(obj)
    now = time.time()
    recent = restarts_since(restarts or [], now - RESTART_WINDOW_S)
    if restarts is not None:
        for s in found:
            s["restarts_24h"] = recent.get(str(s.get("name")), 0)
    if as_json:
        _echo_json({"servers": found})
        return
    rows = [
        [
            s.get("name"),
            s.get("model_size"),
            ServerInfo.from_daemon(s).address,
            s.get("state"),
            s.get("pid"),
            s.get("restarts_24h"),
            latency_cell(s),
            error_cell(s, error_time(str(s.get("name")), s.get("last_error"), restarts or []), now),
        ]
        for s in found
    ]
    _table(
        [
            Column("NAME"),
            Column("SIZE", drop=3),
            Column("ADDRESS", drop=4),
            Column("STATE"),
            Column("PID", drop=5),
            Column("RESTARTS_24H", drop=1),
            Column("LATENCY_S"),
            Column("LAST_ERROR", flex=True, min_width=24),
        ],
        rows,
    )


def _restarts(daemon: DaemonClient) -> list[dict[str, Any]] | None:
    """The daemon's newest restart rows (for RESTARTS_24H), or None if it serves none."""
    try:
        rows = daemon.request("GET", "/v1/restarts?limit=1000").get("restarts")
    except DaemonError:
        return None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else None


@cli.command()
@json_option
@config_option
@_errors
def sizes(as_json: bool, config: str | None) -> None:
    """Model sizes that have at least one ready server.

    Asks the daemon; without it, probes every server of the config once.

    \b
    Example:
        ms-client sizes
        ms-client sizes --json
    """
    setup = _Setup(config)
    try:
        found = setup.daemon.sizes()
    except DaemonUnavailable as exc:
        setup.need_config(exc)
        found = []
        for result in setup.probe_all():
            if result.ok and result.server.model_size not in found:
                found.append(result.server.model_size)
    if as_json:
        _echo_json({"sizes": found})
        return
    for size in found:
        click.echo(size)


@cli.command()
@click.option("--server", help="Only this server's samples.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest N."
)
@json_option
@config_option
@_errors
def latency(server: str | None, limit: int, as_json: bool, config: str | None) -> None:
    """Recent latency samples (probes and clients), newest first.

    Needs the daemon: it keeps the history.

    \b
    Example:
        ms-client latency --server llama8b-a --limit 10
        ms-client latency --json
    """
    setup = _Setup(config)
    try:
        samples = setup.daemon.latency(server=server, limit=limit)
    except DaemonUnavailable as exc:
        _fail(
            EXIT_FAILED,
            [
                f"latency needs the daemon, which keeps the history: {exc}",
                f"start it (systemctl start modelserverd) or check daemon.socket in {setup.path}",
            ],
        )
        return
    if as_json:
        _echo_json({"samples": samples})
        return
    rows = [
        [
            s.get("ts"),
            s.get("server"),
            s.get("source"),
            s.get("ok"),
            seconds(s.get("latency_s")),
            seconds(s.get("ttft_s")),
            s.get("completion_tokens"),
            s.get("error"),
        ]
        for s in samples
    ]
    _table(
        [
            Column("TS"),
            Column("SERVER"),
            Column("SOURCE", drop=2),
            Column("OK"),
            Column("LATENCY_S"),
            Column("TTFT_S", drop=1),
            Column("TOKENS", drop=3),
            Column("ERROR", flex=True),
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ms-client`` command."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="ms-client")


if __name__ == "__main__":
    main()
