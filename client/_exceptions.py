"""Exceptions of ms_client.

    ClientError                 base: everything ms_client raises on purpose
    ├── ConfigProblem           the config file cannot be used (.problems, one line each)
    ├── NoServerAvailable       no server of the size could answer (.attempts: what each got)
    ├── StreamInterrupted       a streamed answer broke after text had been handed out
    ├── RequestRejected         an SGLang server refused the request itself (HTTP 4xx)
    ├── DaemonError             the daemon answered, with an error (unknown server, bad input)
    └── DaemonUnavailable       the daemon cannot be reached; internal: ModelServer and the
                                CLI catch it and choose servers from the config instead

Socket and ``http.client`` errors never reach callers: they are translated where the
I/O happens, and a failed attempt becomes one entry of ``NoServerAvailable.attempts``.
Every message says what failed, on which server or socket, and what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ClientError(Exception):
    """Base of every error ms_client raises; catch this to handle them all."""


@dataclass(frozen=True)
class Attempt:
    """One server tried for one request, and what went wrong there."""

    server: str
    address: str
    error: str

    def __str__(self) -> str:
        return f"{self.server} ({self.address}): {self.error}"


class ConfigProblem(ClientError):
    """The config file is missing, unreadable or invalid and the client needs it.

    Raised by ``ModelServer(...)`` for an invalid file, and on the first request when
    the daemon is down and the servers must be read from a file that cannot be read.
    """

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NoServerAvailable(ClientError):
    """No server of the model size could answer after every allowed attempt.

    ``attempts`` lists each server tried and what it got, so one message explains the
    whole failure; it is empty when no server was even offered (``detail`` says why).
    """

    def __init__(
        self, model_size: str, attempts: Sequence[Attempt] = (), *, detail: str | None = None
    ):
        self.model_size = model_size
        self.attempts = list(attempts)
        self.detail = detail
        if self.attempts:
            n = len(self.attempts)
            tried = "; ".join(str(a) for a in self.attempts)
            message = (
                f"no {model_size} server could answer ({n} attempt{'s' if n != 1 else ''}): "
                f"{tried}. Check the servers with `ms-client servers` or `modelserverd status`"
            )
        else:
            message = detail or f"no {model_size} server is available"
        super().__init__(message)


class StreamInterrupted(ClientError):
    """A streamed answer broke after part of it had been handed to the caller.

    It cannot be retried on another server without repeating text the caller has seen;
    ``partial_text`` holds what was delivered. Not raised by ``get_completion``, which
    retries such failures elsewhere because its caller has seen nothing yet.
    """

    def __init__(self, *, server: str, address: str, error: str, partial_text: str):
        self.server = server
        self.address = address
        self.error = error
        self.partial_text = partial_text
        super().__init__(
            f"{server} ({address}) failed mid-answer after {len(partial_text)} characters: "
            f"{error}; send the request again"
        )


class RequestRejected(ClientError):
    """An SGLang server answered 4xx: the request is wrong and would fail everywhere.

    Raised at once, without trying other servers (for example ``max_tokens`` beyond the
    model's context, or an unknown sampling parameter).
    """

    def __init__(self, *, server: str, address: str, status: int, message: str):
        self.server = server
        self.address = address
        self.status = status
        self.message = message
        super().__init__(
            f"{server} ({address}) rejected the request with HTTP {status}: {message}; "
            "fix the request (another server would refuse it too)"
        )


class DaemonError(ClientError):
    """The daemon answered with an error object (``{"error": {"code", "message"}}``)."""

    def __init__(self, *, socket_path: str, status: int, code: str, message: str):
        self.socket_path = socket_path
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"the daemon at {socket_path} answered {status} {code}: {message}")


class DaemonUnavailable(ClientError):
    """The daemon's socket is missing, refuses, times out or answers garbage.

    Internal: ``ModelServer`` and ``ms-client best|servers|sizes`` catch it and choose
    servers from the config file instead; ``ms-client latency`` reports it.
    """

    def __init__(self, *, socket_path: str, reason: str):
        self.socket_path = socket_path
        self.reason = reason
        super().__init__(f"daemon not reachable at {socket_path} ({reason})")
