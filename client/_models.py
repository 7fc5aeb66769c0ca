"""Plain data: the result of a completion, and one server as the client sees it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._policy import Expectation


@dataclass(frozen=True)
class Completion:
    """One finished answer and how it was obtained.

    ``text`` is the answer's content. ``reasoning`` is what a reasoning model thought
    first (SGLang's ``reasoning_content``, with ``--reasoning-parser``), None when the
    server sent none. ``tool_calls`` are the calls a model made (``tools`` in the
    request, ``--tool-call-parser`` on the server), OpenAI-style
    ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
    ``arguments`` a JSON text, or None when there were none.

    ``attempts`` counts the servers tried, the one that answered included; the
    latencies are what this client measured (``ttft_s``: time to the server's first
    output, which for a reasoning model is its first reasoning, not its first text).
    Token counts are the server's own (``usage`` / ``meta_info``), None if it sent none.
    """

    text: str
    server: str
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def __str__(self) -> str:
        """The answer itself, so ``print(server.get_completion(...))`` prints it."""
        return self.text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class ServerInfo:
    """A server a request can go to, with what is known of its usual speed."""

    name: str
    ip: str
    port: int
    model_size: str
    model_path: str = ""
    latency_s: float | None = None
    ttft_s: float | None = None
    latency_per_token_s: float | None = None
    state: str = "ready"
    # SGLang's --incremental-streaming-output (the daemon reads /get_server_info):
    # /generate chunks carry only the new text. None: unknown, the client guesses.
    incremental_streaming_output: bool | None = None
    sglang_version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def address(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def expectation(self) -> Expectation:
        return Expectation(self.latency_s, self.ttft_s, self.latency_per_token_s)

    @property
    def expected_ttft_s(self) -> float | None:
        """The usual first token; failing that, a whole benchmark answer bounds it."""
        return self.ttft_s if self.ttft_s else self.latency_s

    @classmethod
    def from_daemon(cls, obj: dict[str, Any]) -> ServerInfo:
        """A server object of the daemon's API; unknown or odd fields are tolerated."""
        ip = str(obj.get("ip") or "127.0.0.1")
        port = obj.get("port")
        return cls(
            name=str(obj.get("name") or f"{ip}:{port}"),
            ip=ip,
            port=int(port) if isinstance(port, int) else 0,
            model_size=str(obj.get("model_size") or ""),
            model_path=str(obj.get("model_path") or ""),
            latency_s=_float(obj.get("latency_s")),
            ttft_s=_float(obj.get("ttft_s")),
            latency_per_token_s=_float(obj.get("latency_per_token_s")),
            state=str(obj.get("state") or "ready"),
            incremental_streaming_output=_bool(obj.get("incremental_streaming_output")),
            sglang_version=_str(obj.get("sglang_version")),
            raw=dict(obj),
        )

    def as_api_object(self) -> dict[str, Any]:
        """The daemon's server-object shape, for output made without the daemon."""
        base: dict[str, Any] = {
            "name": self.name,
            "ip": self.ip,
            "port": self.port,
            "url": self.url,
            "model_size": self.model_size,
            "model_path": self.model_path,
            "state": self.state,
            "latency_s": self.latency_s,
            "latency_per_token_s": self.latency_per_token_s,
            "ttft_s": self.ttft_s,
            "incremental_streaming_output": self.incremental_streaming_output,
            "sglang_version": self.sglang_version,
        }
        return {**base, **self.raw} if self.raw else base
