"""One streamed request to one SGLang server, with its deadlines.

Every request streams, even when the caller wants the whole answer: a hung SGLang
server keeps its port open and never answers, and only a first-token deadline tells
it from a long answer within a second. Until the server's first output arrives the read
deadline is that first-token deadline; afterwards each read gets a generous idle
timeout, and the whole request ``request_timeout_s``.

"First output" is any delta, not only answer text. A reasoning model served with
``--reasoning-parser`` streams (SGLang ``serving_chat.py``, 2025-2026) a first chunk whose
delta is only ``{"role": "assistant", "content": ""}`` as soon as it has output, then
``delta.reasoning_content`` for as long as it thinks (often many seconds), and only then
``delta.content``; with ``--tool-call-parser`` and ``tools`` the answer may be nothing but
``delta.tool_calls``. Counting only content would take a thinking server for a hung one.

Two APIs: OpenAI chat (``/v1/chat/completions``, deltas in ``choices[0].delta``, a
``usage`` chunk when asked for) and SGLang's native ``/generate`` (each chunk carries the
text so far, or with ``--incremental-streaming-output`` only the new part, and
``meta_info`` token counts).
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
    """What the caller asked for, independent of the server and API it goes to.

    ``tools`` and ``tool_choice`` are OpenAI's (chat API only); ``sampling`` holds any
    further keys, sent as they are (chat body, or ``/generate``'s ``sampling_params``).
    """

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @property
    def size_chars(self) -> int:
        """Roughly how much the server must prefill: it widens the first-token deadline.
        Tool definitions count: the chat template puts them into the prompt."""
        total = len(self.prompt or "") + len(self.system or "")
        for message in self.messages or ():
            content = message.get("content")
            total += len(content) if isinstance(content, str) else len(json.dumps(content))
        if self.tools:
            total += len(json.dumps(self.tools))
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
    """One answered attempt. ``ttft_s`` is the time to the server's first output of
    any kind; ``chunks`` counts chunks that carried generated output (a token count
    when the server sent none)."""

    text: str
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    chunks: int
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _StreamError(Exception):
    def __init__(self, code: int | None, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def _stream_error(obj: dict[str, Any]) -> _StreamError | None:
    """The error an answer chunk reports, if it is one.

    SGLang reports a failure after the 200 as one more event: ``{"error": {"object":
    "error", "message", "type", "code"}}`` (``create_streaming_error_response``), where
    other OpenAI-style servers send the error object itself, ``{"object": "error",
    "message", "code"}``. Both are read, and a bare ``{"error": "text"}`` too.
    """
    err = obj.get("error")
    if err:
        if isinstance(err, dict):
            return _StreamError(_int(err.get("code")), str(err.get("message") or err))
        return _StreamError(None, str(err))
    if obj.get("object") == "error":
        return _StreamError(_int(obj.get("code")), str(obj.get("message") or obj))
    return None


class _Parser:
    """Turns one API's stream chunks into answer text and what else came with it.

    ``feed`` returns the new answer text and whether the chunk showed progress (any
    output of the server: for the first-token deadline, a reasoning or tool-call
    delta is as good a sign of life as text).
    """

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finished = False
        self.pieces = 0  # chunks that carried generated output

    def feed(self, data: str) -> tuple[str, bool]:
        try:
            obj = json.loads(data)
        except ValueError:
            raise AttemptFailed(f"garbled stream chunk: {data[:80]!r}") from None
        if not isinstance(obj, dict):
            raise AttemptFailed(f"unexpected stream chunk: {data[:80]!r}")
        if "error" in obj or obj.get("object") == "error":
            error = _stream_error(obj)
            if error is not None:
                raise error
        return self._delta(obj)

    def _delta(self, obj: dict[str, Any]) -> tuple[str, bool]:
        raise NotImplementedError

    @property
    def reasoning(self) -> str | None:
        return None

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        return None


class _ToolCalls:
    """OpenAI tool-call deltas merged per ``index``: the first ``id``, ``type`` and
    ``function.name`` seen, and the ``function.arguments`` pieces joined in order."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def merge(self, items: list[Any], *, whole: bool = False) -> bool:
        """Add one delta's calls (or a whole message's, ``whole``); True if any came."""
        grew = False
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            index = _int(item.get("index"))
            if index is None and whole:
                index = position  # a whole message lists its calls without index
            elif index is None:
                # Not OpenAI's stream form: a piece without an id continues the last call.
                last = max(self._calls, default=-1)
                index = last + 1 if item.get("id") or last < 0 else last
            call = self._calls.setdefault(
                index, {"id": None, "type": None, "function": {"name": None, "arguments": ""}}
            )
            for key in ("id", "type"):
                value = item.get(key)
                if isinstance(value, str) and value and not call[key]:
                    call[key] = value
            function = item.get("function")
            if isinstance(function, dict):
                name = function.get("name")
                if isinstance(name, str) and name and not call["function"]["name"]:
                    call["function"]["name"] = name
                arguments = function.get("arguments")
                if isinstance(arguments, (dict, list)):
                    arguments = json.dumps(arguments)
                if isinstance(arguments, str):
                    call["function"]["arguments"] += arguments
            grew = True
        return grew

    def result(self) -> list[dict[str, Any]] | None:
        if not self._calls:
            return None
        calls = []
        for index in sorted(self._calls):
            call = self._calls[index]
            calls.append(
                {
                    "id": call["id"],
                    "type": call["type"] or "function",
                    "function": dict(call["function"]),
                }
            )
        return calls


class _ChatParser(_Parser):
    def __init__(self) -> None:
        super().__init__()
        self._reasoning: list[str] = []
        self._tools = _ToolCalls()

    def _delta(self, obj: dict[str, Any]) -> tuple[str, bool]:
        # Runs once per token: the common chunk (content, no usage, no reasoning, no
        # tool calls) takes the fewest checks.
        usage = obj.get("usage")
        if usage and isinstance(usage, dict):
            self.prompt_tokens = _int(usage.get("prompt_tokens")) or self.prompt_tokens
            self.completion_tokens = _int(usage.get("completion_tokens")) or self.completion_tokens
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list):
            return "", False
        choice = choices[0]
        if not isinstance(choice, dict):
            return "", False
        progress = False
        if choice.get("finish_reason"):
            self.finished = True
            progress = True
        part = choice.get("delta")
        whole = not isinstance(part, dict)
        if whole:
            part = choice.get("message")  # a non-streamed answer
            if not isinstance(part, dict):
                return "", progress
            self.finished = True
            progress = True
        content = part.get("content")
        if not progress:
            # Any delta is output: the role-only first chunk included.
            progress = content is not None or any(v is not None for v in part.values())
        generated = False
        reasoning = part.get("reasoning_content")
        if reasoning and isinstance(reasoning, str):
            self._reasoning.append(reasoning)
            generated = True
        tool_calls = part.get("tool_calls")
        if (
            tool_calls
            and isinstance(tool_calls, list)
            and self._tools.merge(tool_calls, whole=whole)
        ):
            generated = True
        text = content if isinstance(content, str) else ""
        if text or generated:
            self.pieces += 1
        return text, progress

    @property
    def reasoning(self) -> str | None:
        return "".join(self._reasoning) if self._reasoning else None

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        return self._tools.result()


class _GenerateParser(_Parser):
    """``/generate`` chunks. SGLang sends the text so far in each one, or with
    ``--incremental-streaming-output`` only the new part; ``incremental`` is the
    server's setting (from the daemon, which reads ``/get_server_info``) or None when
    unknown: then a chunk that does not extend the text so far shows the server is
    incremental, and it is taken as such from then on. (An incremental piece that
    happens to repeat the whole text so far is misread while the setting is unknown.)
    """

    def __init__(self, incremental: bool | None = None) -> None:
        super().__init__()
        self.incremental = incremental
        self.text = ""
        self._seen_incremental = False

    def _delta(self, obj: dict[str, Any]) -> tuple[str, bool]:
        progress = False
        meta = obj.get("meta_info")
        if isinstance(meta, dict):
            tokens = _int(meta.get("completion_tokens"))
            if tokens is not None and tokens > (self.completion_tokens or 0):
                progress = True
            self.prompt_tokens = _int(meta.get("prompt_tokens")) or self.prompt_tokens
            self.completion_tokens = tokens or self.completion_tokens
            if meta.get("finish_reason"):
                self.finished = True
                progress = True
        text = obj.get("text")
        if not isinstance(text, str):
            return "", progress
        incremental = self.incremental
        if incremental is None:
            if not self._seen_incremental and not text.startswith(self.text):
                self._seen_incremental = True
            incremental = self._seen_incremental
        if incremental:
            delta = text
            self.text += text
        else:
            delta = text[len(self.text) :] if len(text) > len(self.text) else ""
            self.text = text if len(text) >= len(self.text) else self.text
        if delta:
            self.pieces += 1
            progress = True
        return delta, progress


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
        if req.tools is not None:
            body["tools"] = list(req.tools)
        if req.tool_choice is not None:
            body["tool_choice"] = req.tool_choice
        body.update({k: v for k, v in req.sampling.items() if k not in _RESERVED})
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    def parser(self, server: ServerInfo) -> _Parser:
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

    def parser(self, server: ServerInfo) -> _Parser:
        return _GenerateParser(server.incremental_streaming_output)


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
    """Yield the answer's text (content only) as it arrives; return the :class:`Outcome`,
    which also holds the reasoning and tool calls.

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

    parser = api.parser(server)
    parts: list[str] = []
    ttft: float | None = None
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
                delta, progress = parser.feed(data)
            except _StreamError as exc:
                # An error event after the 200 fails this attempt; the next server may
                # answer. A 4xx code stays the caller's fault, as a 4xx status is:
                # SGLang sends one for a request it will not serve (too long, bad
                # parameters) once its stream has begun; server trouble comes as 5xx
                # (aborts carry 500/503 since 2025) or as a connection that ends.
                if exc.code is not None and status_is_callers_fault(exc.code):
                    raise RequestRejected(
                        server=server.name,
                        address=server.address,
                        status=exc.code,
                        message=exc.message,
                    ) from None
                where = "mid-answer" if ttft is not None else "before any output"
                raise AttemptFailed(
                    f"error {where}: {exc.message}", partial="".join(parts)
                ) from None
            if progress and ttft is None:
                ttft = time.monotonic() - started
            if delta:
                parts.append(delta)
                yield delta
        if not done and stream.is_sse and not parser.finished:
            raise AttemptFailed(
                "connection closed before the answer ended"
                if ttft is not None
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
        chunks=parser.pieces,
        reasoning=parser.reasoning,
        tool_calls=parser.tool_calls,
    )
