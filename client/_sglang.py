"""One streamed request to one SGLang server, with its deadlines.

Every request streams, even when the caller wants the whole answer: a hung SGLang
server keeps its port open and never answers, and only a first-token deadline tells
it from a long answer within a second. Until the first text arrives the read deadline
is that first-token deadline; afterwards each read gets a generous idle timeout, and
the whole request ``request_timeout_s``.

Two APIs: OpenAI chat (``/v1/chat/completions``, deltas in ``choices[0].delta``, a
``usage`` chunk when asked for) and SGLang's native ``/generate`` (each chunk carries
the text so far and ``meta_info`` token counts).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import RequestRejected
from ._models import ServerInfo
from ._policy import status_is_callers_fault
from ._transport import EventStream, HttpStatusError, SglangTransport, TransportError

_RESERVED = {"stream", "stream_options", "messages", "text", "model", "sampling_params"}


@dataclass(frozen=True)
class Request:
    """What the caller asked for, independent of the server and API it goes to."""

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def size_chars(self) -> int:
        """Roughly how much the server must prefill: it widens the first-token deadline."""
        total = len(self.prompt or "") + len(self.system or "")
        for message in self.messages or ():
            content = message.get("content")
            total += len(content) if isinstance(content, str) else len(json.dumps(content))
        return total


class AttemptFailed(Exception):
    """This server could not answer; the next one may. Internal to the client."""

    def __init__(self, reason: str, *, first_token_miss: bool = False, partial: str = ""):
        self.reason = reason
        self.first_token_miss = first_token_miss
        self.partial = partial
        super().__init__(reason)


@dataclass
class Outcome:
    text: str
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    chunks: int


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Parser:
    """Turns one API's stream chunks into text deltas and token counts."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finished = False

    def feed(self, data: str) -> str:
        try:
            obj = json.loads(data)
        except ValueError:
            raise AttemptFailed(f"garbled stream chunk: {data[:80]!r}") from None
        if not isinstance(obj, dict):
            raise AttemptFailed(f"unexpected stream chunk: {data[:80]!r}")
        err = obj.get("error")
        if err:
            message = err.get("message") if isinstance(err, dict) else str(err)
            code = _int(err.get("code")) if isinstance(err, dict) else None
            raise _StreamError(code, str(message or err))
        return self._delta(obj)

    def _delta(self, obj: dict[str, Any]) -> str:
        raise NotImplementedError


class _StreamError(Exception):
    def __init__(self, code: int | None, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


class _ChatParser(_Parser):
    def _delta(self, obj: dict[str, Any]) -> str:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _int(usage.get("prompt_tokens")) or self.prompt_tokens
            self.completion_tokens = _int(usage.get("completion_tokens")) or self.completion_tokens
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return ""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finished = True
        part = choice.get("delta")
        if not isinstance(part, dict):
            part = choice.get("message")  # a non-streamed answer
            if isinstance(part, dict):
                self.finished = True
        content = part.get("content") if isinstance(part, dict) else None
        return content if isinstance(content, str) else ""


class _GenerateParser(_Parser):
    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def _delta(self, obj: dict[str, Any]) -> str:
        meta = obj.get("meta_info")
        if isinstance(meta, dict):
            self.prompt_tokens = _int(meta.get("prompt_tokens")) or self.prompt_tokens
            self.completion_tokens = _int(meta.get("completion_tokens")) or self.completion_tokens
            if meta.get("finish_reason"):
                self.finished = True
        text = obj.get("text")
        if not isinstance(text, str):
            return ""
        # SGLang sends the text so far; a server set to incremental output sends
        # only the new part. Tell them apart by the prefix.
        if text.startswith(self.text):
            delta = text[len(self.text) :]
            self.text = text
        else:
            delta = text
            self.text += text
        return delta


class ChatApi:
    name = "chat"
    path = "/v1/chat/completions"

    def body(self, req: Request, server: ServerInfo) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if req.system is not None:
            messages.append({"role": "system", "content": req.system})
        if req.messages is not None:
            messages.extend(req.messages)
        if req.prompt is not None:
            messages.append({"role": "user", "content": req.prompt})
        body: dict[str, Any] = {"model": server.model_path or "default", "messages": messages}
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        if req.temperature is not None:
            body["temperature"] = req.temperature
        body.update({k: v for k, v in req.sampling.items() if k not in _RESERVED})
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    def parser(self) -> _Parser:
        return _ChatParser()


class GenerateApi:
    name = "generate"
    path = "/generate"

    def body(self, req: Request, server: ServerInfo) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if req.max_tokens is not None:
            params["max_new_tokens"] = req.max_tokens
        if req.temperature is not None:
            params["temperature"] = req.temperature
        params.update({k: v for k, v in req.sampling.items() if k not in _RESERVED})
        return {"text": req.prompt or "", "sampling_params": params, "stream": True}

    def parser(self) -> _Parser:
        return _GenerateParser()


APIS = {"chat": ChatApi(), "generate": GenerateApi()}


class Cancel:
    """Lets another thread drop a request in flight (abandoned benchmark probes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: EventStream | None = None
        self.cancelled = False

    def attach(self, stream: EventStream) -> None:
        with self._lock:
            self._stream = stream
            cancelled = self.cancelled
        if cancelled:
            stream.abort()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            stream = self._stream
        if stream is not None:
            stream.abort()


def stream_attempt(
    transport: SglangTransport,
    server: ServerInfo,
    api: ChatApi | GenerateApi,
    req: Request,
    *,
    first_token_s: float,
    idle_s: float,
    total_s: float,
    cancel: Cancel | None = None,
) -> Generator[str, None, Outcome]:
    """Yield the answer's text as it arrives; return the :class:`Outcome`.

    Raises :class:`AttemptFailed` when this server cannot answer (the caller tries the
    next one) and :class:`RequestRejected` when the request itself is refused. Closing
    the generator early drops the connection, which makes SGLang stop generating.
    """
    started = time.monotonic()
    first_deadline = started + min(first_token_s, total_s)
    total_deadline = started + total_s
    try:
        stream = transport.open(
            server.ip, server.port, api.path, api.body(req, server), deadline=first_deadline
        )
    except HttpStatusError as exc:
        if status_is_callers_fault(exc.status):
            raise RequestRejected(
                server=server.name, address=server.address, status=exc.status, message=exc.message
            ) from None
        raise AttemptFailed(exc.reason) from None
    except TransportError as exc:
        if exc.timeout:
            raise AttemptFailed(
                f"no first token within {first_token_s:.2f} s", first_token_miss=True
            ) from None
        raise AttemptFailed(exc.reason) from None
    if cancel is not None:
        cancel.attach(stream)

    parser = api.parser()
    parts: list[str] = []
    ttft: float | None = None
    chunks = 0
    done = False
    try:
        while True:
            if ttft is None:
                deadline = first_deadline
            else:
                deadline = min(time.monotonic() + idle_s, total_deadline)
            try:
                data = stream.next_event(deadline)
            except TransportError as exc:
                partial = "".join(parts)
                if not exc.timeout:
                    raise AttemptFailed(exc.reason, partial=partial) from None
                if ttft is None:
                    raise AttemptFailed(
                        f"no first token within {first_token_s:.2f} s", first_token_miss=True
                    ) from None
                if time.monotonic() >= total_deadline - 0.001:
                    raise AttemptFailed(
                        f"answer not finished within request_timeout_s ({total_s:g} s)",
                        partial=partial,
                    ) from None
                raise AttemptFailed(
                    f"no data for {idle_s:g} s mid-answer", partial=partial
                ) from None
            if data is None:
                break
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                delta = parser.feed(data)
            except _StreamError as exc:
                if exc.code is not None and status_is_callers_fault(exc.code):
                    raise RequestRejected(
                        server=server.name,
                        address=server.address,
                        status=exc.code,
                        message=exc.message,
                    ) from None
                raise AttemptFailed(
                    f"error mid-answer: {exc.message}", partial="".join(parts)
                ) from None
            if delta:
                chunks += 1
                if ttft is None:
                    ttft = time.monotonic() - started
                parts.append(delta)
                yield delta
        if not done and stream.is_sse and not parser.finished:
            raise AttemptFailed(
                "connection closed before the answer ended"
                if parts
                else "connection closed without an answer",
                partial="".join(parts),
            )
        stream.finish(min(time.monotonic() + idle_s, total_deadline))
    except BaseException:
        stream.abort()
        raise
    latency = time.monotonic() - started
    return Outcome(
        text="".join(parts),
        latency_s=latency,
        ttft_s=ttft if ttft is not None else latency,
        prompt_tokens=parser.prompt_tokens,
        completion_tokens=parser.completion_tokens,
        chunks=chunks,
    )
