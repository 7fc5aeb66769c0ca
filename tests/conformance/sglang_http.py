"""The HTTP side of the conformance checks: standard library only, one connection
per request, and the timings the checks report (when the response headers came,
when each server-sent event came), measured from the moment the request was sent.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

SSE_DONE = "[DONE]"
# entrypoints/http_server.py: HEALTH_CHECK_TIMEOUT = int(env SGLANG_HEALTH_CHECK_TIMEOUT).
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 20.0


def health_check_timeout_s() -> float:
    """The server's own health-check timeout, as this run was told it."""
    raw = os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "")
    try:
        return float(raw) if raw.strip() else DEFAULT_HEALTH_CHECK_TIMEOUT_S
    except ValueError:
        return DEFAULT_HEALTH_CHECK_TIMEOUT_S


class BadUrl(ValueError):
    """SGLANG_URL is not ``http://host:port`` (or https)."""


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _excerpt(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Answer:
    """A whole (non-streamed) answer."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from sending the request to the end of the body

    def json(self) -> Any:
        return _decode(self.body)

    def describe(self) -> str:
        return f"HTTP {self.status} after {self.seconds:.3f} s: {_excerpt(self.body)}"


@dataclass
class Event:
    data: str  # the payload of one ``data:`` line
    at_s: float  # when it was read, from sending the request

    def json(self) -> Any:
        return _decode(self.data.encode())


@dataclass
class Stream:
    """A server-sent-events answer, read to its end."""

    status: int
    headers: dict[str, str]
    headers_s: float  # when the status line and headers had arrived
    events: list[Event] = field(default_factory=list)
    body: bytes = b""  # the body of an answer that is not a stream (an error)
    end_s: float = 0.0

    @property
    def first_chunk_s(self) -> float | None:
        return self.events[0].at_s if self.events else None

    @property
    def data(self) -> list[str]:
        return [e.data for e in self.events]

    def chunks(self) -> list[Any]:
        """The JSON payloads, in order, without the closing ``[DONE]``."""
        return [e.json() for e in self.events if e.data != SSE_DONE]

    def describe(self) -> str:
        shown = [e.data if len(e.data) < 200 else e.data[:200] + "..." for e in self.events[:6]]
        more = f" (+{len(self.events) - 6} more)" if len(self.events) > 6 else ""
        return (
            f"HTTP {self.status}, headers after {self.headers_s:.3f} s, "
            f"{len(self.events)} events{more}: {shown} {_excerpt(self.body)}"
        )


class SGLang:
    """A running SGLang server (or anything that claims to be one) at ``url``."""

    def __init__(self, url: str, api_key: str = "", timeout_s: float = 60.0):
        parts = urllib.parse.urlsplit(url.strip().rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadUrl(f"SGLANG_URL={url!r} is not http://host:port")
        if parts.path or parts.query:
            raise BadUrl(f"SGLANG_URL={url!r}: give only http://host:port, without a path")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._api_key = api_key
        self.timeout_s = timeout_s

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout_s)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "*/*"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:  # a server started with --api-key
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def request(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> Answer:
        """One request; HTTP error statuses are returned, connection problems raise
        ``OSError`` (``TimeoutError`` when nothing came within ``timeout_s``)."""
        raw = None if body is None else json.dumps(body).encode()
        conn = self._connect(timeout_s or self.timeout_s)
        try:
            began = time.monotonic()
            conn.request(method, path, body=raw, headers=self._headers(raw))
            resp = conn.getresponse()
            data = resp.read()
            seconds = time.monotonic() - began
            headers = {k.lower(): v for k, v in resp.getheaders()}
            return Answer(resp.status, headers, data, seconds)
        finally:
            conn.close()

    def get(self, path: str, timeout_s: float | None = None) -> Answer:
        return self.request("GET", path, None, timeout_s)

    def post(self, path: str, body: Any, timeout_s: float | None = None) -> Answer:
        return self.request("POST", path, body, timeout_s)

    def stream(self, path: str, body: Any, timeout_s: float | None = None) -> Stream:
        """POST and read the answer line by line, timing the headers and each
        ``data:`` line. ``timeout_s`` bounds each read, not the whole stream."""
        raw = json.dumps(body).encode()
        conn = self._connect(timeout_s or self.timeout_s)
        try:
            began = time.monotonic()
            conn.request("POST", path, body=raw, headers=self._headers(raw))
            # getresponse() returns once the status line and the headers are in.
            resp = conn.getresponse()
            out = Stream(
                status=resp.status,
                headers={k.lower(): v for k, v in resp.getheaders()},
                headers_s=time.monotonic() - began,
            )
            if "text/event-stream" not in out.headers.get("content-type", ""):
                out.body = resp.read()
                out.end_s = time.monotonic() - began
                return out
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data = line[5:].strip().decode("utf-8", "replace")
                    out.events.append(Event(data, time.monotonic() - began))
            out.end_s = time.monotonic() - began
            return out
        finally:
            conn.close()


def error_message(obj: Any) -> str | None:
    """The message of an error answer or chunk: SGLang's OpenAI routes put it at the
    top (``ErrorResponse``) or under ``error`` (streams, ``/generate``)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("message"), str):
        return obj["message"]
    inner = obj.get("error")
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return inner["message"]
    return None
