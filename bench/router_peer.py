"""The SGLang router (``sglang-router`` on PyPI) as the benchmarks' peer, on loopback.

The router is a Rust binary shipped in a Python wheel. It is a benchmark dependency
only: ``bench/run.py`` installs the pinned version into the running interpreter's
environment when it is missing (:func:`ensure_installed`), and never into the product's
dependencies.

It is launched in front of simulated SGLang servers as SGLang users launch it:

    python -m sglang_router.launch_router --worker-urls URL... --policy POLICY
        --host 127.0.0.1 --port PORT --prometheus-host 127.0.0.1 --prometheus-port PORT2

with every other setting (retries, circuit breaker, health checks, load-balance
thresholds, timeouts) at its default: those defaults are what is compared. Nothing
leaves the machine:

- both listeners are bound to 127.0.0.1 (the defaults are 0.0.0.0);
- the router loads a tokenizer from the model path its workers report
  (``/get_model_info``); the simulated servers report the benchmark's local model
  folder, which holds no tokenizer, so the router logs that it found none instead of
  asking the HuggingFace hub (a path that does not exist locally would be taken for a
  hub model id);
- as a guard, the proxy variables point at a closed port on loopback (loopback itself
  is exempt through ``NO_PROXY``) and ``HF_HUB_OFFLINE=1`` is set, so any other outbound
  request fails at once instead of reaching the network;
- tracing (OpenTelemetry) is off by default and stays off.

Which server answered: the simulator puts its pid (hex) in front of every response id
(``chatcmpl-<pid hex><8 hex digits>``), and the router passes the id through. Which
server the router *sent* a request to, answered or not: its Prometheus counters
``smg_worker_cb_outcomes_total{worker}`` (one per attempt that ended) plus the gauge
``smg_worker_requests_active{worker}`` (attempts in flight).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import FOLDER_ENV, free_ports

ROUTER_PACKAGE = "sglang-router"
ROUTER_VERSION = "0.3.2"
ROUTER_MODULE = "sglang_router.launch_router"
# run.py puts the reason a failed installation gave here, for the rows' notes.
INSTALL_ERROR_ENV = "MSBENCH_ROUTER_INSTALL_ERROR"
# Any outbound request the router might try goes to this closed loopback port instead.
_NOWHERE = "http://127.0.0.1:9"

# The settings the notes quote, with the values the router's own --help gives as
# defaults (read from the installed package when it can be imported).
DEFAULT_KEYS = (
    "policy",
    "retry_max_retries",
    "retry_initial_backoff_ms",
    "retry_backoff_multiplier",
    "cb_failure_threshold",
    "cb_timeout_duration_secs",
    "health_check_interval_secs",
    "health_check_timeout_secs",
    "health_failure_threshold",
    "balance_abs_threshold",
    "balance_rel_threshold",
    "cache_threshold",
    "request_timeout_secs",
)


class RouterUnavailable(RuntimeError):
    """The router could not be installed, started or reached; the message says why."""


# --- installation -------------------------------------------------------------------------


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(ROUTER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_installed(log: Any = print) -> str | None:
    """Install the pinned router into this interpreter's environment when it is missing
    or another version. Returns None when it is there, else the reason it is not."""
    have = installed_version()
    if have == ROUTER_VERSION:
        return None
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        f"{ROUTER_PACKAGE}=={ROUTER_VERSION}",
    ]
    found = f"version {have} found" if have else "not installed"
    log(f"sglang-router {ROUTER_VERSION} ({found}), the benchmarks' peer: running {' '.join(argv)}")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`pip install {ROUTER_PACKAGE}=={ROUTER_VERSION}` could not run: {exc}"
    if proc.returncode != 0:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return (
            f"`pip install {ROUTER_PACKAGE}=={ROUTER_VERSION}` failed "
            f"(exit {proc.returncode}): {tail or 'no output'}"
        )
    importlib.invalidate_caches()
    if installed_version() != ROUTER_VERSION:
        return f"`pip install {ROUTER_PACKAGE}=={ROUTER_VERSION}` ran but the package is not found"
    log(f"sglang-router {ROUTER_VERSION} installed into {sys.prefix}")
    return None


def unavailable_reason() -> str | None:
    """Why the router cannot run here (installation), or None when it may."""
    error = os.environ.get(INSTALL_ERROR_ENV)
    if error:
        return error
    have = installed_version()
    if have is None:
        return (
            f"{ROUTER_PACKAGE} is not installed in {sys.prefix} "
            f"(bench/run.py installs {ROUTER_PACKAGE}=={ROUTER_VERSION})"
        )
    return None


def router_defaults() -> dict[str, Any]:
    """The router's default settings that matter here, from the installed package."""
    try:
        from sglang_router.router_args import RouterArgs  # type: ignore[import-not-found]

        args = RouterArgs()
        return {key: getattr(args, key) for key in DEFAULT_KEYS if hasattr(args, key)}
    except Exception:  # not installed, or a version that moved its arguments
        return {}


def describe_defaults(defaults: dict[str, Any]) -> str:
    """The defaults as one phrase for a row's note."""
    d = defaults
    if not d:
        return "its default settings"
    parts = []
    if "retry_max_retries" in d:
        parts.append(
            f"up to {d['retry_max_retries']} attempts a request "
            f"(backoff {d.get('retry_initial_backoff_ms', '?')} ms x "
            f"{d.get('retry_backoff_multiplier', '?')}), the policy choosing each time"
        )
    if "cb_failure_threshold" in d:
        parts.append(
            f"a circuit breaker that opens after {d['cb_failure_threshold']} failures in a "
            f"row and stays open {d.get('cb_timeout_duration_secs', '?')} s"
        )
    if "health_check_interval_secs" in d:
        parts.append(
            f"a /health check every {d['health_check_interval_secs']} s (timeout "
            f"{d.get('health_check_timeout_secs', '?')} s, "
            f"{d.get('health_failure_threshold', '?')} failures to eject)"
        )
    if "request_timeout_secs" in d:
        parts.append(f"request timeout {d['request_timeout_secs']} s")
    if "balance_abs_threshold" in d:
        parts.append(
            f"cache_aware balances load only when the busiest worker has "
            f"{d['balance_abs_threshold']} more requests in flight than the idlest and "
            f"{d.get('balance_rel_threshold', '?')}x as many"
        )
    return "its defaults: " + "; ".join(parts)


# --- one router process ----------------------------------------------------------------------


_METRIC = re.compile(
    r"^(smg_worker_cb_outcomes_total|smg_worker_requests_active)\{([^}]*)\}\s+(\S+)"
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_dispatches(text: str) -> dict[str, float]:
    """Attempts the router has sent to each worker URL so far (ended + in flight)."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        worker = labels.get("worker")
        if worker:
            counts[worker] = counts.get(worker, 0.0) + float(m.group(3))
    return counts


_OPENED = re.compile(r"^smg_worker_cb_transitions_total\{([^}]*)\}\s+(\S+)")


def parse_breaker_opened(text: str) -> dict[str, float]:
    """How many times each worker's circuit breaker has opened so far."""
    opened: dict[str, float] = {}
    for line in text.splitlines():
        m = _OPENED.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(1)))
        if labels.get("to") == "open" and labels.get("worker"):
            worker = labels["worker"]
            opened[worker] = opened.get(worker, 0.0) + float(m.group(2))
    return opened


class Router:
    """One ``sglang_router.launch_router`` process in its own session. Use as a context
    manager; leaving it stops the router (SIGTERM, then SIGKILL to its group)."""

    def __init__(self, folder: Path, worker_urls: list[str], *, policy: str = "cache_aware"):
        self.folder = folder
        self.worker_urls = list(worker_urls)
        self.policy = policy
        self.port, self.metrics_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / f"router-{policy}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            ROUTER_MODULE,
            "--worker-urls",
            *self.worker_urls,
            "--policy",
            self.policy,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(self.metrics_port),
            "--log-level",
            "warn",
        ]

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> Router:
        reason = unavailable_reason()
        if reason:
            raise RouterUnavailable(reason)
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_KEYS}
        env.update(
            {
                "HTTP_PROXY": _NOWHERE,
                "HTTPS_PROXY": _NOWHERE,
                "ALL_PROXY": _NOWHERE,
                "NO_PROXY": "127.0.0.1,localhost,::1",
                "HF_HUB_OFFLINE": "1",
                "RUST_LOG_STYLE": "never",
                FOLDER_ENV: str(self.folder),
            }
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise RouterUnavailable(f"cannot start {ROUTER_MODULE}: {exc}") from None
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RouterUnavailable(
                    f"{ROUTER_MODULE} exited with {self.proc.returncode}: {self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                if self._all_workers_healthy():
                    return self
            if time.monotonic() > deadline:
                raise RouterUnavailable(
                    f"the router did not list {len(self.worker_urls)} healthy workers within "
                    f"{timeout:g} s: {self.log_tail()}"
                )
            time.sleep(0.1)

    def _get(self, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _all_workers_healthy(self) -> bool:
        status, body = self._get(self.port, "/workers", timeout=2.0)
        if status != 200:
            return False
        workers = json.loads(body).get("workers", [])
        healthy = {w.get("url") for w in workers if w.get("is_healthy")}
        return set(self.worker_urls) <= healthy

    def metrics(self) -> str:
        """The router's Prometheus metrics, as text."""
        status, body = self._get(self.metrics_port, "/metrics", timeout=2.0)
        if status != 200:
            raise OSError(f"router metrics answered {status}")
        return body.decode("utf-8", "replace")

    def dispatches(self) -> dict[str, float]:
        """Attempts sent to each worker so far, from the router's metrics."""
        return parse_dispatches(self.metrics())

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no log"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return " / ".join(kept[-lines:]) or "no output"

    def close(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # The router waits up to shutdown_grace_period_secs (180 s) for requests in
        # flight on SIGTERM; the benchmark has already given up on those.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


_PROXY_KEYS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def launch_line() -> str:
    """How the benchmarks launch the router, for the README."""
    return (
        "python -m sglang_router.launch_router --worker-urls URL... --policy cache_aware "
        "--host 127.0.0.1 --port P --prometheus-host 127.0.0.1 --prometheus-port P2 "
        "--log-level warn"
    )
