"""Checks of a config against this host: can its launches start here at all?

The file alone cannot say whether ``[sglang].python`` exists on this host, whether
it finds ``[sglang].module``, or whether a server's GPU indexes are GPUs this host
has. A config that passed the file's checks but failed these was applied anyway
(issue 13, item 2): a reload restarted every ready server on a python that did not
exist, and all of them went ``fatal``; a server given GPU 9 on a 4-GPU host sat in
``waiting_gpu`` for good. So the daemon makes these checks at start and on every
reload, and ``check-config`` makes them too (all three through
``daemon.load_daemon_config``). A problem refuses the config whole, like a problem
in the file: at start the daemon does not start, on reload the running config
stays and no server is touched.

Only what can be known now is checked:

* the interpreter and the module only when this host launches servers at all;
* the GPU indexes only when the GPU view can be read (NVML may come up after the
  daemon; a server then waits for its GPUs, as before);
* a module lookup that does not finish within :data:`MODULE_PROBE_TIMEOUT_S`, or
  that this host cannot start now (no descriptor or process slot left), is a
  warning, not a refusal: it proves nothing about the config.

The module lookup imports the module's parent packages (``sglang`` for
``sglang.launch_server``), exactly as ``python -m`` does before it runs the
module, so a package that fails on import is found here and not by a fatal
server. It runs with the launch's environment (the daemon's plus ``[sglang].env``)
and the daemon's working directory, as the launch does.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .config import Config, ConfigError, ServerConfig
from .gpus import GpuError, GpuView, open_gpu_view
from .launcher import LOCAL_ERRNOS
from .notify import strip_notify_env

# Long enough for a cold import of sglang's package (it imports no torch); a lookup
# slower than this is a warning, not a refusal.
MODULE_PROBE_TIMEOUT_S = 15.0

# Run by the interpreter under test, with the module name as its only argument.
# Exit 0: runnable with -m; 2: not found (nor its parent package); 3: a package with
# no __main__ (python -m refuses it); 4: the lookup itself failed (a parent package
# that raises on import).
_PROBE = """\
import importlib.util, sys
name = sys.argv[1]
try:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations is not None:
        if importlib.util.find_spec(name + ".__main__") is None:
            sys.exit(3)
except ModuleNotFoundError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(4)
sys.exit(0 if spec is not None else 2)
"""
_NOT_FOUND, _PACKAGE, _LOOKUP_FAILED = 2, 3, 4
# Errors of this host, not of the config (no descriptor, memory or process slot
# left): the check cannot be made now.
_LOCAL_ERRNOS = LOCAL_ERRNOS | {errno.EAGAIN}
_INSTALL_HINT = (
    "install sglang into that interpreter (e.g. `{python} -m pip install sglang`), "
    "or set [sglang].python to the interpreter that has it"
)


@dataclass(frozen=True)
class Findings:
    """What the host checks found: problems refuse the config, warnings do not.
    Each line has the config's "file: key: ..." form."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ProbeResult:
    """How a module lookup by an interpreter ended: ``code`` is its exit status,
    None when it did not finish in time or, with ``error``, could not be started."""

    code: int | None
    output: str = ""
    error: OSError | None = None


Runner = Callable[[Sequence[str], Mapping[str, str], float], ProbeResult]


# --- pure policies ------------------------------------------------------------------


def gpu_problems(
    servers: Sequence[ServerConfig], present: Collection[int], backend: str
) -> list[str]:
    """One line per managed server that is given a GPU index this host does not
    have (``present``: the indexes the GPU view shows). ``servers`` is the config's
    list in file order, so a position is the ``servers[i]`` of the message."""
    have = _indexes(present)
    lines = []
    for i, server in enumerate(servers):
        if not server.is_managed:
            continue
        missing = [g for g in server.gpus if g not in present]
        if not missing:
            continue
        which = ", ".join(str(g) for g in missing)
        lines.append(
            f"servers[{i}].gpus: got {list(server.gpus)}, but this host has no GPU {which}: "
            f"it has {len(present)} GPU{'s' if len(present) != 1 else ''} ({have}) as "
            f'daemon.gpu_backend "{backend}" shows them; expected indexes of this '
            "host's GPUs (or managed = false if the server belongs to another host)"
        )
    return lines


def _indexes(present: Collection[int]) -> str:
    ordered = sorted(present)
    if not ordered:
        return "none"
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        return f"indexes {ordered[0]}-{ordered[-1]}"
    return "indexes " + ", ".join(str(i) for i in ordered)


def probe_verdict(python: str, module: str, result: ProbeResult) -> tuple[str, str] | None:
    """("problem" | "warning", text) for a module lookup's result; None when the
    module can be run with ``python -m``."""
    where = f'sglang.module: "{module}"'
    hint = _INSTALL_HINT.format(python=python)
    if result.error is not None:
        code = result.error.errno
        if code in _LOCAL_ERRNOS:
            return "warning", (
                f"sglang.python: could not start {python} to check that it finds "
                f'"{module}" ({result.error.strerror or result.error}); not checked now'
            )
        return "problem", (
            f"sglang.python: got {_quote(python)}, which cannot be started on this host "
            f"({result.error.strerror or result.error}); expected a Python interpreter "
            "that has sglang installed"
        )
    if result.code is None:
        return "warning", (
            f"{where}: {python} did not finish looking for it within "
            f"{MODULE_PROBE_TIMEOUT_S:g} s; not checked, the config is used as it is"
        )
    if result.code == 0:
        return None
    detail = _last_line(result.output)
    if result.code == _NOT_FOUND:
        why = f" ({detail})" if detail else ""
        return "problem", f"{where} is not found by {python} (sglang.python){why}; {hint}"
    if result.code == _PACKAGE:
        return "problem", (
            f"{where} is a package without a __main__ module, so `{python} -m {module}` "
            'cannot run it; expected a runnable module, e.g. "sglang.launch_server"'
        )
    if result.code == _LOOKUP_FAILED:
        return "problem", (
            f"{where}: {python} fails while looking for it ({detail}); {hint}, or fix "
            "that installation"
        )
    return "problem", (
        f"sglang.python: got {_quote(python)}, which does not run as a Python interpreter "
        f"(exit status {result.code}{': ' + detail if detail else ''}); expected the "
        "interpreter that has sglang installed"
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _quote(value: str) -> str:
    return f'"{value}"'


# --- I/O at the edge ------------------------------------------------------------------


def launch_env(config: Config) -> dict[str, str]:
    """The environment every launch starts from: the daemon's plus ``[sglang].env``
    (without systemd's notify socket, as launcher.spawn does)."""
    env = dict(os.environ)
    strip_notify_env(env)
    env.update(config.sglang.env)
    return env


def find_python(python: str, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The interpreter's path, or None and what is wrong with it. A name without
    "/" is looked up on the launch environment's PATH, as the launch does."""
    if "/" not in python:
        found = shutil.which(python, path=env.get("PATH", os.defpath))
        if found is None:
            return None, (
                f"sglang.python: got {_quote(python)}, which is not on PATH "
                f"({env.get('PATH', os.defpath)}); expected the full path of the interpreter "
                'that has sglang installed (e.g. "/opt/sglang/venv/bin/python"): the '
                "daemon's PATH under systemd is not your shell's"
            )
        return found, ""
    if not os.path.exists(python):
        return None, (
            f"sglang.python: got {_quote(python)}, which does not exist on this host; "
            "expected the path of the interpreter that has sglang installed (e.g. "
            '"/opt/sglang/venv/bin/python"; relative paths are read from the config '
            "file's folder)"
        )
    if os.path.isdir(python) or not os.access(python, os.X_OK):
        what = "a directory" if os.path.isdir(python) else "not executable by this user"
        return None, (
            f"sglang.python: got {_quote(python)}, which is {what}; expected the "
            "interpreter that has sglang installed"
        )
    return python, ""


def run_probe(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> ProbeResult:
    """Run the lookup; the answer is its exit status and what it printed."""
    try:
        done = subprocess.run(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(code=None)
    except OSError as exc:
        return ProbeResult(code=None, error=exc)
    return ProbeResult(
        code=done.returncode, output=(done.stderr + done.stdout).decode(errors="replace")
    )


def python_findings(config: Config, runner: Runner = run_probe) -> Findings:
    """Whether ``[sglang].python`` can run ``[sglang].module``; checked only when
    this host launches servers."""
    out = Findings()
    if not config.managed_servers:
        return out
    env = launch_env(config)
    python, problem = find_python(config.sglang.python, env)
    if python is None:
        out.problems.append(f"{config.path}: {problem}")
        return out
    result = runner([python, "-c", _PROBE, config.sglang.module], env, MODULE_PROBE_TIMEOUT_S)
    verdict = probe_verdict(config.sglang.python, config.sglang.module, result)
    if verdict is not None:
        kind, text = verdict
        (out.problems if kind == "problem" else out.warnings).append(f"{config.path}: {text}")
    return out


def gpu_findings(config: Config, opener: Callable[[str], GpuView] = open_gpu_view) -> Findings:
    """GPU indexes against this host's GPUs, when the GPU view can be read."""
    out = Findings()
    if not any(s.is_managed for s in config.servers):
        return out
    try:
        view = opener(config.daemon.gpu_backend)
        try:
            present = {g.index for g in view.snapshot()}
        finally:
            view.close()
    except GpuError:
        return out  # not readable now: the daemon reports it; servers wait for GPUs
    backend = config.daemon.gpu_backend
    out.problems.extend(
        f"{config.path}: {line}" for line in gpu_problems(config.servers, present, backend)
    )
    return out


def check_host(
    config: Config,
    *,
    runner: Runner = run_probe,
    gpu_opener: Callable[[str], GpuView] = open_gpu_view,
) -> Config:
    """The config, with the host checks' warnings added; raises
    :class:`config.ConfigError` with every problem found."""
    found = [python_findings(config, runner), gpu_findings(config, gpu_opener)]
    problems = [p for f in found for p in f.problems]
    if problems:
        raise ConfigError(problems)
    warnings = [w for f in found for w in f.warnings]
    if not warnings:
        return config
    return replace(config, warnings=(*config.warnings, *warnings))
