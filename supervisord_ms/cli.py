"""``modelserverd``: the daemon and the operator's commands.

Each command is a thin layer: it loads the config, then either runs the daemon,
asks the running daemon over its socket, or reads the state database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__, states
from .apiclient import ApiError, DaemonUnreachable, call
from .config import Config, ConfigError, load_config
from .display import (
    GAP,
    RESTART_WINDOW_S,
    Column,
    dropped_note,
    error_cell,
    error_time,
    event_text,
    fit,
    latency_cell,
    one_line,
    output_width,
    restarts_since,
    seconds,
)
from .errors import ModelServerdError

EXIT_CONFIG = 4
EXIT_RUN_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus, no restart loop
EXIT_UNREACHABLE = 3
RUN_UMASK = 0o027  # `run`: no bits for others, no write for the group

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="MODELSERVERD_CONFIG",
    help="Config file (default: $MODELSERVERD_CONFIG, else /etc/modelserverd/config.toml).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")


def _load(config_path: str | None, *, local: bool = False, exit_code: int = EXIT_CONFIG) -> Config:
    try:
        if local:
            from .daemon import load_daemon_config

            return load_daemon_config(config_path)
        return load_config(config_path)
    except ModelServerdError as exc:
        click.echo(
            f"modelserverd: config refused ({len(getattr(exc, 'problems', [1]))} problem(s)):",
            err=True,
        )
        click.echo(str(exc), err=True)
        sys.exit(exit_code)


def _api(config: Config, method: str, path: str, body: Any = None) -> Any:
    try:
        return call(config.daemon.socket, method, path, body)
    except DaemonUnreachable as exc:
        click.echo(f"modelserverd: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except ApiError as exc:
        click.echo(f"modelserverd: {exc} ({exc.code})", err=True)
        sys.exit(1 if exc.status != 404 else 2)


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


STATE_COLOURS = {
    states.READY: "green",
    states.STARTING: "cyan",
    states.BACKOFF: "yellow",
    states.WAITING_GPU: "yellow",
    states.PORT_BUSY: "yellow",
    states.UNHEALTHY: "red",
    states.FATAL: "red",
    states.UNREACHABLE: "red",
}


def print_table(
    columns: Sequence[Column | str],
    rows: Sequence[Sequence[Any]],
    colour_column: int | None = None,
) -> None:
    """Aligned columns fitted to the terminal (see :func:`display.fit`): free text
    is cut at a word with ``…``, then the least important columns are left out and
    a line under the table says which. Colour only on a terminal, so pipes get
    clean text; a pipe also gets whole rows unless ``$COLUMNS`` is set."""
    cols = [c if isinstance(c, Column) else Column(c.upper()) for c in columns]
    cells = [[one_line(v) for v in row] for row in rows]
    layout = fit(cols, cells, output_width(sys.stdout))
    click.echo(layout.line(layout.cells(cols, [c.header for c in cols])))
    use_colour = _colour()
    shown = (
        layout.shown.index(colour_column)
        if colour_column is not None and colour_column in layout.shown
        else None
    )
    for row in cells:
        parts = layout.cells(cols, row)
        line = layout.line(parts)
        if (
            use_colour
            and shown is not None
            and colour_column is not None
            and row[colour_column] in STATE_COLOURS
        ):
            start = sum(len(p) + GAP for p in parts[:shown])
            if start < len(line):
                end = min(len(line), start + len(parts[shown]))
                colour = STATE_COLOURS[row[colour_column]]
                line = line[:start] + click.style(line[start:end], fg=colour) + line[end:]
        click.echo(line)
    note = dropped_note(layout)
    if note:
        click.echo(note)


def _duration(value: float | None) -> str:
    if value is None:
        return "-"
    seconds = int(value)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _parse_since(text: str) -> float:
    """``24h``, ``30m``, ``7d``, ``90s`` -> epoch seconds that long ago."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return time.time() - float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter(
            f'got "{text}", expected a duration like 90s, 30m, 24h or 7d'
        ) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="modelserverd")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Supervise the SGLang servers of this host and choose the fastest one.

    Example:

    \b
        modelserverd check-config --config /etc/modelserverd/config.toml
        modelserverd status
    """
    if ctx.invoked_subcommand is None:  # plain `modelserverd`: the help, not an error
        click.echo(ctx.get_help())


@cli.command()
@config_option
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def run(config_path: str | None, log_level: str) -> None:
    """Run the daemon in the foreground (what systemd runs).

    SIGTERM stops every server and exits; SIGHUP reloads the config.

    Example:

    \b
        modelserverd run --config /etc/modelserverd/config.toml
    """
    import faulthandler
    import logging

    from .logsetup import setup_logging

    # The unit sets UMask=0027; started any other way the daemon would inherit the
    # shell's, often 022, and state.db and the server logs (which hold prompts)
    # would be readable by every user of the host. 027 at least: a stricter umask
    # is kept. Set first, before any file or directory is made.
    os.umask(os.umask(RUN_UMASK) | RUN_UMASK)
    faulthandler.enable()  # a watchdog SIGABRT prints every thread's stack to the journal
    setup_logging(getattr(logging, log_level.upper()))
    config = _load(config_path, local=True, exit_code=EXIT_RUN_CONFIG)
    for warning in config.warnings:
        logging.getLogger("modelserverd").warning("config: %s", warning)
    from .api import SocketInUse
    from .daemon import Daemon

    try:
        daemon = Daemon(config)
        code = asyncio.run(daemon.run())
    except SocketInUse as exc:
        click.echo(f"modelserverd: {exc}", err=True)
        sys.exit(1)
    except ModelServerdError as exc:
        click.echo(f"modelserverd: cannot start: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


@cli.command("check-config")
@config_option
@json_option
def check_config(config_path: str | None, as_json: bool) -> None:
    """Validate the config; print each local server's exact launch command.

    Settings that are accepted but weaken health checking are printed on stderr
    as "warning: ..." lines (and listed under "warnings" with --json).

    Example:

    \b
        modelserverd check-config --config /etc/modelserverd/config.toml
        modelserverd check-config --json | jq '.servers[].argv'
    """
    from .launcher import allocate_nccl_ports, build_launch

    config = _load(config_path, local=True)
    managed = config.managed_servers
    ports = allocate_nccl_ports(config.servers)
    launches = {s.name: build_launch(s, config.sglang, ports[s.name]) for s in managed}
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "config": config.path,
                    "ok": True,
                    "warnings": list(config.warnings),
                    "servers": [
                        {
                            "name": s.name,
                            "url": s.url,
                            "model_size": s.model_size,
                            "local": s.local,
                            "managed": s.is_managed,
                            **(
                                {
                                    "argv": list(launches[s.name].argv),
                                    "env": dict(launches[s.name].env),
                                }
                                if s.name in launches
                                else {}
                            ),
                        }
                        for s in config.servers
                    ],
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"{config.path}: OK, {len(config.servers)} servers ({len(managed)} launched by this host)"
    )
    for server in config.servers:
        if server.name not in launches:
            why = "not managed (managed = false)" if server.local else "on another host"
            click.echo(f"{server.name}  {server.url}  {server.model_size}: probed only, {why}")
            continue
        spec = launches[server.name]
        click.echo(f"{server.name}  {server.url}  {server.model_size}  GPUs {list(server.gpus)}")
        click.echo("  env:  " + " ".join(f"{k}={v}" for k, v in spec.env.items()))
        click.echo("  argv: " + json.dumps(list(spec.argv)))
        click.echo("  as a shell line: " + spec.shell_line())
    click.echo("(--nccl-port values are picked free at each launch.)")


def _gateway_line(gw: dict) -> str:
    """One line per gateway whose worker list the daemon keeps."""
    if gw.get("reachable") is False:
        state = f"unreachable ({gw.get('last_error') or 'no answer'}), retrying"
    else:
        state = f"{gw.get('registered', 0)} of this host's servers registered"
    synced = gw.get("last_sync_at") or "never"
    return f"gateway {gw.get('url')}: {state}; last sync {synced}"


def _load_cell(server: dict) -> str:
    """``running+queued/capacity`` as SGLang's scheduler last reported, ``-`` unknown."""
    running, queued = server.get("running"), server.get("queued")
    if running is None or queued is None:
        return "-"
    capacity = server.get("capacity")
    return f"{running}+{queued}/{capacity if capacity else '?'}"


def _writer_line(writer: Any) -> str | None:
    """The state database writer's health (``/v1/status`` "writer") as one line,
    or ``None`` while it writes and has dropped nothing."""
    if not isinstance(writer, dict):
        return None
    ok = writer.get("ok", True) is not False
    dropped = writer.get("dropped_samples") or 0
    if ok and not dropped:
        return None
    error = writer.get("last_error") or "no error text"
    parts = []
    if not ok:
        parts.append(f"writes are failing: {error}")
        parts.append(
            f"{writer.get('queued_events', 0)} events/restarts and "
            f"{writer.get('queued_samples', 0)} latency samples wait to be written"
        )
    if dropped:
        parts.append(f"{dropped} latency samples dropped since the daemon started")
        if ok:
            parts.append(f"last error: {error}")
    return "state database: " + "; ".join(parts)


STATUS_COLUMNS = {
    # drop: which columns go first when the rows are wider than the terminal.
    "name": Column("NAME"),
    "size": Column("SIZE", drop=4),
    "where": Column("WHERE", drop=8),
    "gpus": Column("GPUS", drop=7),
    "state": Column("STATE"),
    "pid": Column("PID", drop=6),
    "uptime": Column("UPTIME", drop=2),
    "version": Column("VERSION", drop=9),
    "latency": Column("LATENCY_S"),
    "load": Column("LOAD", drop=3),
    "gateway": Column("GATEWAY", drop=5),
    "restarts": Column("RESTARTS_24H", drop=1),
    "error": Column("LAST_ERROR", flex=True, min_width=24),
}


@cli.command()
@config_option
@json_option
def status(config_path: str | None, as_json: bool) -> None:
    """One row per server: state, pid, uptime, SGLang version, latency, load
    (running+queued/capacity, from SGLang's scheduler), restarts in the last 24 hours,
    last error.

    LATENCY_S is the current estimate in seconds while the server is ready or
    unhealthy, "-" in any other state. LAST_ERROR starts with its age ("12m ago:")
    when a restart dates it; a ready server shows an error only then. Rows are cut
    to the terminal's width ($COLUMNS): the least important columns are left out
    and cut text ends in "…"; --json has everything. A line under the daemon's
    says so when the state database cannot be written or latency samples were
    dropped.

    Example:

    \b
        modelserverd status
        modelserverd status --json | jq '.servers[] | {name, state}'
    """
    config = _load(config_path)
    info = _api(config, "GET", "/v1/status")
    servers = _api(config, "GET", "/v1/servers")["servers"]
    restarts = _api(config, "GET", "/v1/restarts?limit=1000")["restarts"]
    now = time.time()
    recent = restarts_since(restarts, now - RESTART_WINDOW_S)
    if as_json:
        for s in servers:
            s["restarts_24h"] = recent.get(s["name"], 0)
        click.echo(json.dumps({"daemon": info, "servers": servers}, indent=2))
        return
    counts = ", ".join(f"{n} {s}" for s, n in sorted(info.get("servers_by_state", {}).items()))
    click.echo(
        f"modelserverd {info.get('version')} pid {info.get('pid')}, up "
        f"{_duration(info.get('uptime_s'))}, config {info.get('config_path')}"
        + (f"; {counts}" if counts else "")
    )
    writer_line = _writer_line(info.get("writer"))
    if writer_line:
        click.echo(click.style(writer_line, fg="red") if _colour() else writer_line)
    if info.get("gpu_error"):
        click.echo(f"GPU view: {info['gpu_error']}")
    gateway = info.get("gateway")
    for gw in (gateway or {}).get("gateways", []):
        click.echo(_gateway_line(gw))
    keys = [k for k in STATUS_COLUMNS if k != "gateway" or gateway]
    rows = []
    for s in servers:
        cells = {
            "name": s["name"],
            "size": s["model_size"],
            "where": ("local" if s["local"] else "remote") + f" {s['ip']}:{s['port']}",
            "gpus": ",".join(map(str, s["gpus"])) or "-",
            "state": s["state"],
            "pid": s.get("pid"),
            "uptime": _duration(s.get("uptime_s")),
            "version": s.get("sglang_version"),
            "latency": latency_cell(s),
            "load": _load_cell(s),
            "gateway": s.get("gateway"),
            "restarts": recent.get(s["name"], 0),
            "error": error_cell(s, error_time(s["name"], s.get("last_error"), restarts), now),
        }
        rows.append([cells[k] for k in keys])
    print_table([STATUS_COLUMNS[k] for k in keys], rows, colour_column=keys.index("state"))


@cli.command()
@config_option
@json_option
def gpus(config_path: str | None, as_json: bool) -> None:
    """The GPUs as the daemon sees them (NVML, or the simulated file: view).

    Example:

    \b
        modelserverd gpus
    """
    from .gpus import open_gpu_view

    config = _load(config_path)
    try:
        view = open_gpu_view(config.daemon.gpu_backend)
        infos = view.snapshot()
        view.close()
    except ModelServerdError as exc:
        click.echo(f"modelserverd: {exc}", err=True)
        sys.exit(1)
    ratio = config.daemon.gpu_free_ratio
    from .gpus import is_gpu_free

    if as_json:
        click.echo(
            json.dumps(
                {
                    "gpu_free_ratio": ratio,
                    "gpus": [
                        {
                            "index": g.index,
                            "name": g.name,
                            "total_mib": g.total_mib,
                            "used_mib": g.used_mib,
                            "free_mib": g.free_mib,
                            "free_ratio": round(g.free_ratio, 4),
                            "free": is_gpu_free(g, ratio),
                            "processes": [
                                {"pid": p.pid, "used_mib": p.used_mib} for p in g.processes
                            ],
                        }
                        for g in infos
                    ],
                },
                indent=2,
            )
        )
        return
    print_table(
        [
            Column("GPU"),
            Column("NAME", flex=True, min_width=12),
            Column("TOTAL"),
            Column("USED"),
            Column("FREE"),
            Column("FREE?"),
            Column("PROCESSES", flex=True, min_width=12),
        ],
        [
            [
                g.index,
                g.name,
                f"{g.total_mib} MiB",
                f"{g.used_mib} MiB",
                f"{g.free_ratio:.0%}",
                "yes" if is_gpu_free(g, ratio) else "no",
                " ".join(f"{p.pid}:{p.used_mib}MiB" for p in g.processes) or "-",
            ]
            for g in infos
        ],
    )


RESTART_COLUMNS = [
    Column("TIME"),
    Column("SERVER"),
    Column("REASON"),
    Column("ATTEMPT", drop=4),
    Column("BACKOFF_S", drop=2),
    Column("OLD_PID", drop=5),
    Column("NEW_PID", drop=3),
    Column("EXIT", drop=1),
    Column("SIGNAL", drop=6),
    Column("MESSAGE", flex=True, min_width=24),
]
EVENT_COLUMNS = [
    Column("TIME"),
    Column("SERVER"),
    Column("KIND", drop=1),
    Column("FROM", drop=2),
    Column("TO"),
    Column("MESSAGE", flex=True, min_width=24),
]


class _NoHistory(Exception):
    """The history cannot be read from the file or from the daemon; the message says why."""


def _read_history(
    config: Config, server: str | None, cutoff: str, limit: int
) -> tuple[dict[str, Any], str | None]:
    """The history since ``cutoff`` (ISO text), and a note when it came from the daemon.

    From state.db, read-only: any user who may read the file, none needs to write
    its folder. Else from the daemon, which answers whoever may use its socket."""
    from .store import StoreError, parse_iso, read_history

    db = config.daemon.state_db
    try:
        data = read_history(db, server=server, since=parse_iso(cutoff), limit=limit)
    except StoreError as exc:
        why = _unreadable(db, exc)
    else:
        _check_known(config, server, data["servers"], db)
        return data, None
    query = f"?limit={min(limit, 1000)}"
    if server is not None:
        query += f"&server={urllib.parse.quote(server)}"
    data = {}
    for table in ("restarts", "events"):
        try:
            rows = call(config.daemon.socket, "GET", f"/v1/{table}{query}")[table]
        except DaemonUnreachable as exc:
            raise _NoHistory(f"{why}; and {exc}") from None
        except ApiError as exc:
            if exc.status == 404 and server is not None:
                _check_known(config, server, [], db)
            raise _NoHistory(f"{why}; and the daemon answered: {exc}") from None
        data[table] = [r for r in rows if str(r.get("ts", "")) >= cutoff]
    return data, f"{why}: the history comes from the daemon"


def _unreadable(db: str, exc: Exception) -> str:
    """Why state.db could not be read, in the operator's terms."""
    parent = Path(db).parent
    if os.path.isdir(parent) and not os.access(parent, os.X_OK):
        return f"{parent} is closed to uid {os.geteuid()}, so {Path(db).name} cannot be read"
    if not os.path.exists(db):
        return f"no state database at {db} yet (the daemon creates it)"
    return str(exc)


def _check_known(config: Config, server: str | None, historic: Sequence[str], db: str) -> None:
    """An unknown ``--server`` is a typo until shown otherwise: say which names exist."""
    names = {s.name for s in config.servers}
    if server is None or server in names or server in historic:
        return
    known = ", ".join(sorted(names | set(historic))) or "none"
    click.echo(
        f"modelserverd: no server named {server} in {config.path} or in the history "
        f"of {db}; known: {known}",
        err=True,
    )
    sys.exit(2)


@cli.command()
@config_option
@json_option
@click.option("--server", help="Only this server.")
@click.option("--since", default="24h", show_default=True, help="How far back: 90s, 30m, 24h, 7d.")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
def history(
    config_path: str | None, as_json: bool, server: str | None, since: str, limit: int
) -> None:
    """Restarts and events (state changes, reloads), newest first.

    Read from the state database, read-only, so any user who may read the file
    can run it; otherwise from the daemon. Messages are cut at
    a word to fit the terminal ($COLUMNS); --json has them whole.

    Example:

    \b
        modelserverd history --server llama8b-a --since 7d
        modelserverd history --json | jq '.restarts[] | select(.reason == "crash")'
    """
    from .store import iso_utc

    config = _load(config_path)
    cutoff = iso_utc(_parse_since(since))
    try:
        data, note = _read_history(config, server, cutoff, limit)
    except _NoHistory as exc:
        click.echo(f"modelserverd: cannot read the history: {exc}", err=True)
        sys.exit(1)
    if note:
        click.echo(f"modelserverd: {note}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {"since": cutoff, "restarts": data["restarts"], "events": data["events"]},
                indent=2,
            )
        )
        return
    window = f"{cutoff[:19]}Z ({since} ago)" + (f" for {server}" if server else "")
    restarts, events = data["restarts"], data["events"]
    if restarts:
        click.echo(f"Restarts since {window}:")
        print_table(
            RESTART_COLUMNS,
            [
                [
                    r["ts"],
                    r["server"],
                    r["reason"],
                    r["attempt"],
                    seconds(r["backoff_s"]),
                    r["old_pid"],
                    r["new_pid"],
                    r["exit_code"],
                    r["signal"],
                    r["message"],
                ]
                for r in restarts
            ],
        )
    else:
        click.echo(f"No restarts since {window}.")
    if events:
        click.echo(f"\nEvents since {window}:")
        print_table(
            EVENT_COLUMNS,
            [
                [
                    e["ts"],
                    e["server"] or "(daemon)",
                    e["kind"],
                    e["old_state"],
                    e["new_state"],
                    event_text(e["kind"], e["message"]),
                ]
                for e in events
            ],
            colour_column=4,
        )
    else:
        click.echo(f"\nNo events since {window}.")


@cli.command()
@config_option
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(0, 10**7))
def logs(config_path: str | None, name: str, follow: bool, lines: int) -> None:
    """A server's own stdout+stderr (its log file under log_dir).

    Example:

    \b
        modelserverd logs llama8b-a -f
        modelserverd logs llama8b-a -n 500 | grep -i error
    """
    config = _load(config_path)
    if config.server(name) is None:
        click.echo(
            f"modelserverd: no server named {name} in {config.path}; known: "
            + ", ".join(s.name for s in config.servers),
            err=True,
        )
        sys.exit(2)
    path = Path(config.daemon.log_dir) / f"{name}.log"
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        click.echo(
            f"modelserverd: no log yet at {path} (the server has not been launched by this host)",
            err=True,
        )
        sys.exit(1)
    except OSError as exc:
        click.echo(
            f"modelserverd: cannot read {path}: {exc.strerror or exc} (uid {os.geteuid()}); "
            "server logs hold prompts, so only the daemon's user and group may read them: "
            "run as root or as a member of that group",
            err=True,
        )
        sys.exit(1)
    with f:
        tail = f.read().splitlines()[-lines:] if lines else []
        for line in tail:
            click.echo(line.decode(errors="replace"))
        while follow:
            chunk = f.readline()
            if chunk:
                click.echo(chunk.decode(errors="replace"), nl=False)
            else:
                try:
                    if f.tell() > path.stat().st_size:  # rotated (copy-truncate)
                        f.seek(0)
                except OSError:
                    pass  # moved away: keep reading what is open until it comes back
                time.sleep(0.25)


def _request(
    config: Config, action: str, names: Sequence[str], as_json: bool, quiet: bool = False
) -> list[dict]:
    """Send ``action`` for each server; returns each server object as it was before
    (``None`` for one that needed nothing) and prints what was asked (nothing when
    ``quiet``)."""
    results, befores = [], []
    for name in names:
        before = _api(config, "GET", f"/v1/servers/{name}")
        if action == "stop" and before.get("state") == "stopped":
            results.append({"server": name, "requested": None, "state": "stopped"})
            befores.append(None)
            if not as_json and not quiet:
                click.echo(f"{name}: already stopped")
            continue
        results.append(_api(config, "POST", f"/v1/servers/{name}/{action}"))
        befores.append(before)
        if not as_json and not quiet:
            click.echo(f"{name}: {action} requested")
    if as_json and not quiet:
        click.echo(json.dumps(results[0] if len(results) == 1 else results))
    return befores


def _admin(action: str) -> Callable[..., None]:
    def command(config_path: str | None, names: tuple[str, ...], as_json: bool) -> None:
        _request(_load(config_path), action, names, as_json)

    command.__doc__ = (
        f"Ask the daemon to {action} local servers (admin only).\n\n"
        f"Example:\n\n\b\n    modelserverd {action} llama8b-a\n"
        f"    modelserverd {action} llama8b-a llama8b-b\n"
    )
    return command


_names_argument = click.argument("names", nargs=-1, required=True)
for _action in ("stop", "start"):
    cli.command(_action)(config_option(json_option(_names_argument(_admin(_action)))))


@cli.command()
@config_option
@json_option
@_names_argument
@click.option(
    "--wait",
    is_flag=True,
    help="Show each server's states until it is ready again; exit 1 with its error if it fails.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds --wait waits (default: the config's stop_timeout_s + startup_timeout_s + 60).",
)
def restart(
    config_path: str | None,
    as_json: bool,
    names: tuple[str, ...],
    wait: bool,
    timeout: float | None,
) -> None:
    """Ask the daemon to restart local servers (admin only).

    With --wait, each server's states are shown as they change, one line per
    server, until it is ready again ("a: stopping → starting → ready (12.3 s)");
    a server that fails instead (backoff, fatal) ends the wait with its error,
    which names its exit code, and exit status 1.

    Example:

    \b
        modelserverd restart llama8b-a
        modelserverd restart llama8b-a llama8b-b --wait
    """
    config = _load(config_path)
    befores = _request(config, "restart", names, as_json, quiet=as_json and wait)
    if not wait:
        return
    if timeout is None:
        timeout = config.daemon.stop_timeout_s + config.daemon.startup_timeout_s + 60.0
    watches = [_Watch(n, b) for n, b in zip(names, befores, strict=True) if b is not None]
    try:
        _watch_restarts(config, watches, timeout, quiet=as_json)
    except KeyboardInterrupt:
        click.echo("", err=True)
        click.echo(
            "modelserverd: stopped waiting; the restart goes on (see modelserverd status)",
            err=True,
        )
        sys.exit(130)
    if as_json:
        click.echo(json.dumps([w.as_json() for w in watches]))
    failed = [w for w in watches if not w.ok]
    for w in failed:
        click.echo(f"modelserverd: {w.why()}", err=True)
    sys.exit(1 if failed else 0)


WAIT_POLL_S = 0.2
ARROW = "\u2192"
# A restart that reaches one of these instead of ready has failed (or was undone).
WAIT_FAILED = (states.BACKOFF, states.FATAL, states.STOPPED)


class _Watch:
    """One server watched after a restart request: the states it passed through,
    and how it ended (``ok`` None while it goes on)."""

    def __init__(self, name: str, before: dict):
        self.name, self.before = name, before
        self.began = time.monotonic()
        self.states: list[str] = []
        self.last: dict = before
        self.ok: bool | None = None
        self.elapsed_s = 0.0
        self.moved = False

    def see(self, server: dict) -> None:
        """Take one answer of ``GET /v1/servers/NAME``."""
        self.last = server
        b = self.before
        new_run = server.get("started_at") != b.get("started_at") or server.get("pid") != b.get(
            "pid"
        )
        self.moved = self.moved or new_run or server.get("state") != b.get("state")
        if not self.moved:
            return  # the request has not been acted on yet
        state = server.get("state", "?")
        if not self.states or self.states[-1] != state:
            self.states.append(state)
        self.elapsed_s = time.monotonic() - self.began
        if state == states.READY and new_run:
            self.ok = True
        elif state in WAIT_FAILED:
            self.ok = False

    def line_end(self) -> str:
        return f" ({self.elapsed_s:.1f} s)"

    def why(self) -> str:
        error = self.last.get("last_error") or "no error recorded"
        state = self.last.get("state")
        if self.ok is None:
            return (
                f"{self.name} is still {state} after {self.elapsed_s:.0f} s; the daemon goes "
                "on (modelserverd status)"
            )
        if state == states.BACKOFF:
            then = "the daemon relaunches it after its backoff"
        elif state == states.FATAL:
            then = f"it stays down: fix the cause, then modelserverd start {self.name}"
        else:
            then = "it was stopped meanwhile"
        return (
            f"{self.name} did not come back ({state}): {one_line(error)}; {then} "
            f"(modelserverd logs {self.name}; modelserverd history --server {self.name})"
        )

    def as_json(self) -> dict:
        return {
            "server": self.name,
            "ready": bool(self.ok),
            "state": self.last.get("state"),
            "states": self.states,
            "elapsed_s": round(self.elapsed_s, 3),
            "last_error": None if self.ok else self.last.get("last_error"),
        }


def _watch_restarts(config: Config, watches: list[_Watch], timeout: float, quiet: bool) -> None:
    """Poll the servers until each is ready again, has failed, or ``timeout`` passes.

    States print as they come, one line per server in the order given; a later
    server's states wait (nothing is lost) until the line above it is finished."""
    printer = _StateLines(watches, quiet)
    deadline = time.monotonic() + timeout
    while True:
        for w in watches:
            if w.ok is None:
                w.see(_api(config, "GET", f"/v1/servers/{w.name}"))
        printer.show()
        if all(w.ok is not None for w in watches) or time.monotonic() >= deadline:
            break
        time.sleep(WAIT_POLL_S)
    for w in watches:
        if w.ok is None:
            w.elapsed_s = time.monotonic() - w.began
    printer.show(final=True)


class _StateLines:
    """``name: stopping → starting → ready (12.3 s)``, written a state at a time."""

    def __init__(self, watches: list[_Watch], quiet: bool):
        self.watches, self.quiet = watches, quiet
        self.current = 0
        self.printed = 0  # states of the current line already written

    def show(self, final: bool = False) -> None:
        if self.quiet:
            return
        while self.current < len(self.watches):
            w = self.watches[self.current]
            for state in w.states[self.printed :]:
                click.echo(
                    f"{w.name}: {state}" if self.printed == 0 else f" \u2192 {state}", nl=False
                )
                self.printed += 1
            if w.ok is None and not final:
                break
            if self.printed == 0:
                click.echo(f"{w.name}: {w.last.get('state')}", nl=False)
            click.echo(w.line_end() if w.ok is not None else " (still waiting)")
            self.current += 1
            self.printed = 0
        sys.stdout.flush()


def _socket_of_refused(config_path: str | None) -> str:
    """The daemon's socket named by a config file that does not validate: its
    ``[daemon].socket`` when the file is TOML with that string, else the default."""
    from .config import DaemonConfig, resolve_config_path, tomllib

    try:
        raw = tomllib.loads(Path(resolve_config_path(config_path)).read_text(encoding="utf-8"))
        socket = raw.get("daemon", {}).get("socket")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        socket = None
    return socket if isinstance(socket, str) and socket else DaemonConfig().socket


@cli.command()
@config_option
@json_option
def reload(config_path: str | None, as_json: bool) -> None:
    """Re-read the config and apply it by difference (same as SIGHUP).

    A config with problems is still sent to the daemon: it refuses it, keeps the
    running one, and records the refusal (modelserverd history shows it).

    Example:

    \b
        modelserverd reload
        modelserverd check-config && modelserverd reload
    """
    try:
        socket = load_config(config_path).daemon.socket
    except ConfigError as exc:
        socket, problems = _socket_of_refused(config_path), exc.problems
    else:
        problems = []
    try:
        result = call(socket, "POST", "/v1/reload")
    except DaemonUnreachable as exc:
        if problems:
            _load(config_path)  # prints the problems, exits EXIT_CONFIG
        click.echo(f"modelserverd: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except ApiError as exc:
        if exc.code != "bad_config":
            click.echo(f"modelserverd: {exc} ({exc.code})", err=True)
            sys.exit(1)
        click.echo(
            "modelserverd: the daemon refused the new config; the running one stays in force "
            "(modelserverd history shows the refusal):",
            err=True,
        )
        click.echo("\n".join(problems) if problems else str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    if as_json:
        click.echo(json.dumps(result))
        return
    for key in ("added", "removed", "restarted", "unchanged"):
        click.echo(f"{key}: {', '.join(result.get(key, [])) or '-'}")
    if result.get("needs_daemon_restart"):
        click.echo("needs a daemon restart to apply: " + ", ".join(result["needs_daemon_restart"]))


@cli.command()
@click.option(
    "--dir",
    "workdir",
    default="demo-run",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes its files (a new or empty folder, or one an earlier "
    "demo made; nothing else is ever deleted).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave the daemon and its servers running at the end, and print the commands "
    "to go on by hand.",
)
@click.option("--stop", is_flag=True, help="Stop the daemon a --keep-running demo left.")
def demo(workdir: str, keep_running: bool, stop: bool) -> None:
    """Run the whole loop on simulated GPUs and simulated SGLang servers.

    Example:

    \b
        modelserverd demo
        modelserverd demo --keep-running     # then: modelserverd demo --stop
    """
    from .demo import run_demo, stop_demo

    if stop:
        sys.exit(stop_demo(Path(workdir)))
    sys.exit(run_demo(Path(workdir), keep_running=keep_running))


def main() -> None:
    """Entry point. An expected failure the commands did not turn into a message
    themselves (a state database that cannot be read, say) still ends in one line
    and exit status 1, never a traceback."""
    try:
        cli(prog_name="modelserverd")
    except ConfigError as exc:  # pragma: no cover - _load handles the usual paths
        click.echo(str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    except ModelServerdError as exc:
        click.echo(f"modelserverd: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
