"""``ModelServer``: completions from the best SGLang server of one model size.

The seed's class kept a current server, measured each request, rebuilt its choice when
a request was slower than ``LATENCY_GROWING_RATE`` x the expected latency and retried
failures up to ``MAX_RETRY`` times. This one keeps those ideas with the daemon as the
judge of "best":

- Candidates come from the daemon's ``/v1/best`` (``n = max_retry``, ``key`` = the
  session key), cached for a second so a busy program does not ask on every call.
- Requests go straight to SGLang, always streamed, so a hung server is caught by a
  first-token deadline instead of a ten-minute timeout. An error moves to the next
  candidate at once, over at most ``max_retry`` distinct servers. A 4xx is the
  caller's mistake and is raised at once.
- Each success is compared with what the server usually takes for that many tokens;
  repeated slowness (not one outlier) asks the daemon again, excluding that server.
- Every attempt is reported to the daemon in the background.
- Without the daemon it probes the config's servers itself (see ``_fallback``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from supervisord_ms.config import (
    CONFIG_ENV_VAR,
    ClientConfig,
    Config,
    ConfigError,
    DaemonConfig,
    load_config,
    resolve_config_path,
)

from . import _fallback
from ._exceptions import (
    Attempt,
    ConfigProblem,
    DaemonError,
    DaemonUnavailable,
    NoServerAvailable,
    StreamInterrupted,
)
from ._models import Completion, ServerInfo
from ._policy import (
    SLOW_WINDOW,
    demote,
    first_token_timeout,
    is_slow,
    mid_answer_timeout,
    should_reselect,
)
from ._reporter import SampleReporter, reporter_for
from ._sglang import APIS, AttemptFailed, Outcome, Request, stream_attempt
from ._transport import DaemonClient, HttpTransport, SglangTransport

CANDIDATE_TTL_S = 1.0  # how long the daemon's answer is reused
CANDIDATE_CACHE_KEYS = 1024  # routing keys (threads, sessions) remembered at once
DAEMON_RETRY_S = 10.0  # after the daemon was unreachable, how long before asking again
DEMOTE_S = 10.0  # a server that failed here is tried last for this long
EXCLUDE_S = 30.0  # a server found repeatedly slow is excluded for this long
DEFAULT_IDLE_TIMEOUT_S = 60.0  # the longest pause of a live stream once text was handed out


class CompletionStream(Iterator[str]):
    """Text chunks of one answer as they arrive; ``completion`` is set at the end.

    Only the answer's content is iterated. A reasoning model's reasoning and a
    model's tool calls are in ``completion.reasoning`` and ``completion.tool_calls``
    once the stream is exhausted (a reasoning model may think for a while before the
    first chunk comes; that is not a hang).

    Closing it early (``close()``, leaving a ``with`` block, or garbage collection)
    drops the connection, which makes the server stop generating.
    """

    def __init__(self, gen: Generator[str, None, Completion]):
        self._gen = gen
        self.completion: Completion | None = None

    def __iter__(self) -> CompletionStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.completion = stop.value
            raise StopIteration from None

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# How a caller names the config file. The shared config loader speaks to the
# command line; a Python caller is told about the ``config=`` parameter instead.
CLI_CONFIG_HINT = "pass --config"
LIBRARY_CONFIG_HINT = "pass ModelServer(..., config=PATH)"


def for_caller(problems: Sequence[str], hint: str) -> list[str]:
    """``problems`` with the loader's advice to pass ``--config`` (or the library's
    ``config=``) reworded as ``hint``."""
    return [p.replace(CLI_CONFIG_HINT, hint).replace(LIBRARY_CONFIG_HINT, hint) for p in problems]


def _load(
    config: str | os.PathLike[str] | None, *, hint: str = LIBRARY_CONFIG_HINT
) -> tuple[Config | None, Path, list[str]]:
    """The config, or None with the problems when a missing default file may be excused.

    On a daemon host the file is often readable by root only while the socket is open to
    a group: then the daemon alone is enough, and the file matters only without it. A
    file that was named explicitly, or exists and is invalid, is an error at once.
    ``hint`` is how the caller names another file: ``config=`` for Python code (the
    default), ``--config`` for ``ms-client``.
    """
    path = resolve_config_path(config)
    try:
        return load_config(path), path, []
    except ConfigError as exc:
        problems = for_caller(exc.problems, hint)
        explicit = config is not None or bool(os.environ.get(CONFIG_ENV_VAR))
        unreadable = not path.is_file() or not os.access(path, os.R_OK)
        if explicit or not unreadable:
            raise ConfigProblem(problems) from None
        return None, path, problems


class ModelServer:
    """Completions from the best server of one model size, with fallback and retry.

    ``config`` is the config file (default: ``$MODELSERVERD_CONFIG``, else
    ``/etc/modelserverd/config.toml``); its ``[client]`` table sets ``max_retry``,
    ``latency_growing_rate`` and the timeouts. ``session_key`` keeps a conversation
    on one server while it stays healthy and not overloaded (SGLang's prefix cache).
    Without one (``spread``, the default), each instance and thread is its own
    caller with a key of its own, so callers keep warm servers and spread over the
    fleet; ``spread=False`` tries the daemon's order, best first, which sends every
    caller to the same server. ``api`` picks the
    OpenAI chat API or SGLang's native ``/generate``. ``socket_path`` overrides the
    daemon socket of the config. ``transport`` replaces the HTTP layer (tests).

    Thread-safe: one object may serve many threads; connections are pooled.
    """

    def __init__(
        self,
        model_size: str = "8B",
        *,
        config: str | os.PathLike[str] | None = None,
        session_key: str | None = None,
        spread: bool = True,
        api: str = "chat",
        socket_path: str | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        transport: SglangTransport | None = None,
    ):
        if api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {api!r}")
        self.model_size = model_size
        self.session_key = session_key
        self.spread = spread
        self.api = api
        self._api = APIS[api]
        self._config, self._config_path, self._config_problems = _load(config)
        self._client_cfg = self._config.client if self._config else ClientConfig()
        daemon_cfg = self._config.daemon if self._config else DaemonConfig()
        self.socket_path = socket_path or daemon_cfg.socket
        self._daemon = DaemonClient(self.socket_path)
        self._owns_transport = transport is None
        self._transport: SglangTransport = transport or HttpTransport()
        self._idle_s = min(idle_timeout_s, self._client_cfg.request_timeout_s)
        self._reporter: SampleReporter | None = None

        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        # The daemon's answer per routing key (see _route_key), reused for a moment.
        self._cache: dict[str | None, tuple[float, list[ServerInfo]]] = {}
        self._instance_key = f"ms-{uuid.uuid4().hex[:16]}"
        self._fallback: list[ServerInfo] | None = None
        self._daemon_retry_at = 0.0
        self._current: ServerInfo | None = None
        self._slow: deque[bool] = deque(maxlen=SLOW_WINDOW)
        self._excluded: dict[str, float] = {}
        self._demoted: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"ModelServer({self.model_size!r}, api={self.api!r}, "
            f"current_server={self.current_server!r})"
        )

    @property
    def current_server(self) -> str | None:
        """The server that answered last; None before the first answer or after a
        re-selection."""
        with self._lock:
            return self._current.name if self._current else None

    @property
    def config_path(self) -> Path:
        return self._config_path

    # --- public requests ---------------------------------------------------------

    def get_completion(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        **sampling: Any,
    ) -> Completion:
        """The whole answer. Streamed underneath (see the module doc), so a hung server
        costs a first-token deadline, and a server failing mid-answer is retried
        elsewhere. Raises NoServerAvailable, RequestRejected or ConfigProblem.

        ``tools`` and ``tool_choice`` are OpenAI's (chat API only; the server needs
        ``--tool-call-parser``): the calls come back in ``Completion.tool_calls``.
        Other keyword arguments go to the server as they are (``top_p=0.9``,
        ``chat_template_kwargs={...}``; for ``/generate``, into ``sampling_params``).
        """
        req = self._request(
            prompt, messages, system, max_tokens, temperature, sampling, tools, tool_choice
        )
        return _fallback.drain(self._run(req, live=False))

    def stream_completion(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        **sampling: Any,
    ) -> CompletionStream:
        """Text chunks as they arrive; afterwards ``.completion`` holds the Completion.

        Failures before the first chunk move to the next server like get_completion;
        a failure after text was handed out raises StreamInterrupted. Arguments as
        for get_completion.
        """
        req = self._request(
            prompt, messages, system, max_tokens, temperature, sampling, tools, tool_choice
        )
        return CompletionStream(self._run(req, live=True))

    def close(self) -> None:
        """Send the samples still queued (briefly) and close idle connections."""
        if self._reporter is not None:
            self._reporter.flush(1.0)
        if self._owns_transport and isinstance(self._transport, HttpTransport):
            self._transport.close()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the request loop ----------------------------------------------------------

    def _request(
        self,
        prompt: str | None,
        messages: Sequence[dict[str, Any]] | None,
        system: str | None,
        max_tokens: int | None,
        temperature: float | None,
        sampling: dict[str, Any],
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
    ) -> Request:
        if prompt is None and not messages:
            raise ValueError("give a prompt or messages")
        if messages is not None and not all(isinstance(m, dict) for m in messages):
            raise ValueError('messages must be dicts like {"role": "user", "content": "..."}')
        if self.api == "generate" and (messages is not None or system is not None):
            raise ValueError(
                "api='generate' sends raw text: use prompt only, or api='chat' for "
                "messages and system"
            )
        if self.api == "generate" and (tools is not None or tool_choice is not None):
            raise ValueError("tools and tool_choice need api='chat'")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError(
                'tools must be dicts like {"type": "function", "function": {"name": ...}}'
            )
        return Request(
            prompt=prompt,
            messages=tuple(messages) if messages is not None else None,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            sampling=dict(sampling),
            tools=tuple(tools) if tools is not None else None,
            tool_choice=tool_choice,
        )

    def _run(self, req: Request, *, live: bool) -> Generator[str, None, Completion]:
        cfg = self._client_cfg
        attempts: list[Attempt] = []
        tried: set[str] = set()
        misses = 0
        for server in self._candidates():
            if len(attempts) >= cfg.max_retry:
                break
            if server.name in tried:
                continue
            tried.add(server.name)
            first_s = first_token_timeout(
                server.expected_ttft_s,
                prompt_chars=req.size_chars,
                misses=misses,
                cap_s=cfg.request_timeout_s,
            )
            started = time.monotonic()
            gen = stream_attempt(
                self._transport,
                server,
                self._api,
                req,
                first_token_s=first_s,
                idle_s=mid_answer_timeout(
                    server.expectation,
                    benchmark_tokens=cfg.benchmark_max_tokens,
                    live=live,
                    cap_s=self._idle_s,
                ),
                total_s=cfg.request_timeout_s,
            )
            delivered = False
            try:
                while True:
                    try:
                        delta = next(gen)
                    except StopIteration as stop:
                        outcome: Outcome = stop.value
                        break
                    if live:
                        delivered = True
                        yield delta
            except AttemptFailed as exc:
                self._report(
                    server, ok=False, latency_s=time.monotonic() - started, error=exc.reason
                )
                self._failed(server)
                if delivered:
                    raise StreamInterrupted(
                        server=server.name,
                        address=server.address,
                        error=exc.reason,
                        partial_text=exc.partial,
                    ) from None
                attempts.append(Attempt(server.name, server.address, exc.reason))
                if exc.first_token_miss:
                    misses += 1
                continue
            finally:
                gen.close()
            self._report(server, ok=True, latency_s=outcome.latency_s, outcome=outcome)
            self._succeeded(server, outcome)
            return Completion(
                text=outcome.text,
                server=server.name,
                latency_s=outcome.latency_s,
                ttft_s=outcome.ttft_s,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                attempts=len(attempts) + 1,
                reasoning=outcome.reasoning,
                tool_calls=outcome.tool_calls,
            )
        with self._lock:
            # Everything offered failed: ask afresh next time (a new probe without
            # the daemon) instead of replaying the same list.
            self._cache.clear()
            self._fallback = None
        raise NoServerAvailable(self.model_size, attempts)

    # --- choosing --------------------------------------------------------------------

    def _ordered(self, servers: list[ServerInfo], now: float) -> list[ServerInfo]:
        """Called with the lock held. The list itself while nothing failed here (every
        request passes through; nobody changes the list)."""
        for table in (self._demoted, self._excluded):
            if table:
                for name in [n for n, until in table.items() if until <= now]:
                    del table[name]
        if not self._demoted:
            return servers
        return demote(servers, [s.name for s in servers], self._demoted)

    def _route_key(self) -> str | None:
        """The key the daemon places this request by: the session key; else, with
        ``spread``, one of this instance and thread. Each caller then keeps a warm
        server (SGLang's prefix cache) while callers spread over the fleet by
        consistent hashing with bounded loads; without it, every caller would be
        sent to the same "best" server."""
        if self.session_key is not None:
            return self.session_key
        if self.spread:
            return f"{self._instance_key}-{threading.get_ident()}"
        return None

    def _candidates(self) -> list[ServerInfo]:
        now = time.monotonic()
        key = self._route_key()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and now - cached[0] < CANDIDATE_TTL_S:
                return self._ordered(cached[1], now)
            ask_daemon = now >= self._daemon_retry_at
            excluded = [n for n, until in self._excluded.items() if until > now]
        servers: list[ServerInfo] | None = None
        if ask_daemon:
            try:
                servers = self._from_daemon(excluded, key)
            except DaemonUnavailable as exc:
                with self._lock:
                    self._daemon_retry_at = time.monotonic() + DAEMON_RETRY_S
                _fallback.note_daemon_down(exc, str(self._config_path))
            else:
                with self._lock:
                    self._fallback = None
        if servers is None:
            servers = self._from_config(excluded, key)
        with self._lock:
            now = time.monotonic()
            if len(self._cache) >= CANDIDATE_CACHE_KEYS:
                self._cache.clear()
            self._cache[key] = (now, servers)
            return self._ordered(servers, now)

    def _from_daemon(self, excluded: list[str], key: str | None) -> list[ServerInfo]:
        size = self.model_size
        try:
            found = self._daemon.best(size, n=self._client_cfg.max_retry, key=key, exclude=excluded)
        except DaemonError as exc:
            if exc.code == "no_ready_server" and excluded:
                # Only the slow server is left: slow beats nothing.
                return self._from_daemon([], key)
            if exc.code == "no_ready_server":
                # The daemon's message already says which states and what to do.
                detail = f"the daemon at {self.socket_path} says: {exc.message}"
            else:
                detail = (
                    f"the daemon at {self.socket_path} refused to choose a {size} server "
                    f"({exc.message}); see `ms-client servers` or `modelserverd status`"
                )
            raise NoServerAvailable(size, detail=detail) from None
        if not found and excluded:
            return self._from_daemon([], key)
        if not found:
            raise NoServerAvailable(
                size, detail=f"the daemon at {self.socket_path} offered no {size} server"
            )
        return [ServerInfo.from_daemon(obj) for obj in found]

    def _from_config(self, excluded: list[str], key: str | None) -> list[ServerInfo]:
        if self._config is None:
            raise ConfigProblem(
                [
                    *self._config_problems,
                    f"(the config is needed because the daemon is not reachable at "
                    f"{self.socket_path})",
                ]
            )
        with self._probe_lock:  # one probe round at a time, shared by all threads
            with self._lock:
                if self._fallback is not None:
                    return self._fallback
            ranked = _fallback.choose(
                self._config,
                self.model_size,
                transport=self._transport,
                api=self._api,
                key=key,
                exclude=excluded,
            )
            with self._lock:
                self._fallback = ranked
            return ranked

    # --- after an attempt ------------------------------------------------------------

    def _failed(self, server: ServerInfo) -> None:
        with self._lock:
            self._demoted[server.name] = time.monotonic() + DEMOTE_S
            if self._current is not None and self._current.name == server.name:
                self._current = None
                self._slow.clear()

    def _succeeded(self, server: ServerInfo, outcome: Outcome) -> None:
        cfg = self._client_cfg
        slow = is_slow(
            latency_s=outcome.latency_s,
            ttft_s=outcome.ttft_s,
            completion_tokens=outcome.completion_tokens or outcome.chunks,
            expected=server.expectation,
            growing_rate=cfg.latency_growing_rate,
            benchmark_tokens=cfg.benchmark_max_tokens,
        )
        with self._lock:
            self._demoted.pop(server.name, None)
            if self._current is None or self._current.name != server.name:
                self._current = server
                self._slow.clear()
            if slow is not None:
                self._slow.append(slow)
            if should_reselect(self._slow):
                self._excluded[server.name] = time.monotonic() + EXCLUDE_S
                self._slow.clear()
                self._current = None
                self._cache.clear()
                self._fallback = None

    def _report(
        self,
        server: ServerInfo,
        *,
        ok: bool,
        latency_s: float,
        error: str | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        if self._reporter is None:
            self._reporter = reporter_for(self._daemon)
        self._reporter.report(
            {
                "server": server.name,
                "latency_s": round(latency_s, 6),
                "ok": ok,
                "error": error,
                "prompt_tokens": outcome.prompt_tokens if outcome else None,
                "completion_tokens": outcome.completion_tokens if outcome else None,
                "ttft_s": round(outcome.ttft_s, 6) if outcome and outcome.ttft_s else None,
            }
        )
