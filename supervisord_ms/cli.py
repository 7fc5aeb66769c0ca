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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__, states
from .apiclient import ApiError, DaemonUnreachable, call
from .config import Config, ConfigError, load_config
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
    headers: Sequence[str], rows: Sequence[Sequence[Any]], colour_column: int | None = None
) -> None:
    """Plain aligned columns; colour only on a terminal, so pipes get clean text."""
    text_rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h)
        for i, h in enumerate(headers)
    ]
    header = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=False))
    click.echo(header.rstrip())
    use_colour = _colour()
    for row in text_rows:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths, strict=False)):
            padded = cell.ljust(w)
            if use_colour and i == colour_column and cell in STATE_COLOURS:
                padded = click.style(padded, fg=STATE_COLOURS[cell])
            cells.append(padded)
        click.echo("  ".join(cells).rstrip())


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _latency(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms" if value < 10 else f"{value:.1f}s"


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

        modelserverd check-config --config /etc/modelserverd/config.toml
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
            click.echo(f"\n{server.name}  {server.url}  {server.model_size}: probed only, {why}")
            continue
        spec = launches[server.name]
        click.echo(f"\n{server.name}  {server.url}  {server.model_size}  GPUs {list(server.gpus)}")
        click.echo("  env:  " + " ".join(f"{k}={v}" for k, v in spec.env.items()))
        click.echo("  argv: " + json.dumps(list(spec.argv)))
        click.echo("  as a shell line: " + spec.shell_line())
    click.echo("\n(--nccl-port values are picked free at each launch.)")


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


@cli.command()
@config_option
@json_option
def status(config_path: str | None, as_json: bool) -> None:
    """One row per server: state, pid, uptime, SGLang version, latency, load (running
    +queued/capacity, from SGLang's scheduler), restarts in 24 h. A line under the
    daemon's says so when the state database cannot be written or latency samples
    were dropped.

    Example:

        modelserverd status
        modelserverd status --json | jq '.servers[] | {name, state}'
    """
    config = _load(config_path)
    info = _api(config, "GET", "/v1/status")
    servers = _api(config, "GET", "/v1/servers")["servers"]
    restarts = _api(config, "GET", "/v1/restarts?limit=1000")["restarts"]
    from .store import parse_iso

    day_ago = time.time() - 86400
    recent: dict[str, int] = {}
    for row in restarts:
        if parse_iso(row["ts"]) >= day_ago:
            recent[row["server"]] = recent.get(row["server"], 0) + 1
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
    rows = []
    for s in servers:
        where = ("local" if s["local"] else "remote") + f" {s['ip']}:{s['port']}"
        rows.append(
            [
                s["name"],
                s["model_size"],
                where,
                ",".join(map(str, s["gpus"])) or "-",
                s["state"],
                s.get("pid") or "-",
                _duration(s.get("uptime_s")),
                s.get("sglang_version") or "-",
                _latency(s.get("latency_s")),
                _load_cell(s),
                *([s.get("gateway") or "-"] if gateway else []),
                recent.get(s["name"], 0),
                (s.get("last_error") or "")[:60],
            ]
        )
    print_table(
        [
            "name",
            "size",
            "where",
            "gpus",
            "state",
            "pid",
            "uptime",
            "version",
            "latency",
            "load",
            *(["gateway"] if gateway else []),
            "restarts24h",
            "last error",
        ],
        rows,
        colour_column=4,
    )


@cli.command()
@config_option
@json_option
def gpus(config_path: str | None, as_json: bool) -> None:
    """The GPUs as the daemon sees them (NVML, or the simulated file: view).

    Example:

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
        ["gpu", "name", "total", "used", "free", "free?", "processes"],
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


@cli.command()
@config_option
@json_option
@click.option("--server", help="Only this server.")
@click.option("--since", default="24h", show_default=True, help="How far back: 90s, 30m, 24h, 7d.")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
def history(
    config_path: str | None, as_json: bool, server: str | None, since: str, limit: int
) -> None:
    """Restarts and state changes, newest first (read from the state database).

    Example:

        modelserverd history --server llama8b-a --since 7d
    """
    from .store import Store

    config = _load(config_path)
    cutoff = _parse_since(since)
    db_path = config.daemon.state_db
    if not Path(db_path).exists():
        click.echo(
            f"modelserverd: no state database at {db_path} yet (the daemon creates it)", err=True
        )
        sys.exit(1)
    store = Store(db_path)
    restarts = store.restarts(server=server, limit=limit, since=cutoff)
    events = store.events(server=server, limit=limit, since=cutoff)
    store.close()
    if as_json:
        click.echo(json.dumps({"restarts": restarts, "events": events}, indent=2))
        return
    click.echo(f"Restarts since {since} ago:")
    print_table(
        [
            "time",
            "server",
            "reason",
            "attempt",
            "backoff",
            "old pid",
            "new pid",
            "exit",
            "signal",
            "message",
        ],
        [
            [
                r["ts"],
                r["server"],
                r["reason"],
                r["attempt"],
                "-" if r["backoff_s"] is None else f"{r['backoff_s']:.2f}s",
                r["old_pid"],
                r["new_pid"],
                r["exit_code"],
                r["signal"],
                (r["message"] or "")[:60],
            ]
            for r in restarts
        ],
    )
    click.echo(f"\nState changes since {since} ago:")
    print_table(
        ["time", "server", "kind", "from", "to", "message"],
        [
            [
                e["ts"],
                e["server"] or "(daemon)",
                e["kind"],
                e["old_state"],
                e["new_state"],
                (e["message"] or "")[:70],
            ]
            for e in events
        ],
        colour_column=4,
    )


@cli.command()
@config_option
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(0, 10**7))
def logs(config_path: str | None, name: str, follow: bool, lines: int) -> None:
    """A server's own stdout+stderr (its log file under log_dir).

    Example:

        modelserverd logs llama8b-a -f
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
    if not path.exists():
        click.echo(
            f"modelserverd: no log yet at {path} (the server has not been launched by this host)",
            err=True,
        )
        sys.exit(1)
    with open(path, "rb") as f:
        tail = f.read().splitlines()[-lines:] if lines else []
        for line in tail:
            click.echo(line.decode(errors="replace"))
        while follow:
            chunk = f.readline()
            if chunk:
                click.echo(chunk.decode(errors="replace"), nl=False)
            else:
                if f.tell() > path.stat().st_size:  # rotated (copy-truncate)
                    f.seek(0)
                time.sleep(0.25)


def _admin(action: str) -> Callable[..., None]:
    def command(config_path: str | None, names: tuple[str, ...], as_json: bool) -> None:
        config = _load(config_path)
        results = []
        for name in names:
            before = _api(config, "GET", f"/v1/servers/{name}")
            if action == "stop" and before.get("state") == "stopped":
                results.append({"server": name, "requested": None, "state": "stopped"})
                if not as_json:
                    click.echo(f"{name}: already stopped")
                continue
            result = _api(config, "POST", f"/v1/servers/{name}/{action}")
            results.append(result)
            if not as_json:
                click.echo(f"{name}: {action} requested")
        if as_json:
            click.echo(json.dumps(results[0] if len(results) == 1 else results))

    command.__doc__ = (
        f"Ask the daemon to {action} local servers (admin only).\n\n"
        f"Example:\n\n\b\n    modelserverd {action} llama8b-a\n"
        f"    modelserverd {action} llama8b-a llama8b-b\n"
    )
    return command


_names_argument = click.argument("names", nargs=-1, required=True)
for _action in ("restart", "stop", "start"):
    cli.command(_action)(config_option(json_option(_names_argument(_admin(_action)))))


@cli.command()
@config_option
@json_option
def reload(config_path: str | None, as_json: bool) -> None:
    """Re-read the config and apply it by difference (same as SIGHUP).

    Example:

        modelserverd reload
    """
    config = _load(config_path)
    result = _api(config, "POST", "/v1/reload")
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
    try:
        cli(prog_name="modelserverd")
    except ConfigError as exc:  # pragma: no cover - _load handles the usual paths
        click.echo(str(exc), err=True)
        sys.exit(EXIT_CONFIG)


if __name__ == "__main__":
    main()
