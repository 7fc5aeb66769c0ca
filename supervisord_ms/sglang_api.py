"""What the daemon reads from SGLang besides generations: load, server info, liveness.

These endpoints never generate, so they cost the GPU nothing. Which process answers
matters (python/sglang/srt/entrypoints/http_server.py; links in docs/sglang.md):

* ``/get_model_info`` is answered by the HTTP front alone: proof the front lives.
* ``/v1/loads`` (SGLang PR #16976, 2026-01) and the older ``/get_load`` are asked of
  the scheduler through the tokenizer manager, with no timeout on SGLang's side: a
  hung scheduler leaves them waiting, while a busy one answers between batches.
  That difference is the daemon's evidence of a hang.
* ``/get_server_info`` carries the version and the server arguments, and also asks
  the scheduler for its internal state, so it waits while the scheduler is hung.
* ``/metrics`` (only with ``--enable-metrics``) is served by the front from what the
  scheduler last wrote: a load figure, never proof of life.

Parsers are pure; the fetchers translate aiohttp's errors at this boundary.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

LOAD_PATHS = ("/v1/loads", "/get_load")


@dataclass(frozen=True)
class Load:
    running: int
    queued: int
    token_usage: float | None = None
    capacity: int | None = None  # max_running_requests, where the answer says it


@dataclass(frozen=True)
class ServerInfo:
    version: str | None
    incremental_streaming_output: bool | None
    max_running_requests: int | None
    # server_args.py: tokens prefilled per scheduler step; None when chunked prefill is
    # off (-1) or the answer does not say. With it on, no one step is long.
    chunked_prefill_size: int | None = None


class NoLoadEndpoint(Exception):
    """The server has neither /v1/loads nor /get_load (an old SGLang)."""


class NoAnswer(Exception):
    """The server did not answer in time, or the connection failed; ``reason`` says
    which, in words for the event log."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return int(value)


def _ratio(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def parse_v1_loads(body: Any) -> Load | None:
    """``{"loads": [{"num_running_reqs", "num_waiting_reqs", "token_usage",
    "max_running_requests", ...}, ...]}``, one entry per data-parallel rank."""
    loads = body.get("loads") if isinstance(body, dict) else None
    if not isinstance(loads, list):
        return None
    running = queued = 0
    usage: list[float] = []
    capacity = 0
    for entry in loads:
        if not isinstance(entry, dict):
            return None
        r, q = _count(entry.get("num_running_reqs")), _count(entry.get("num_waiting_reqs"))
        if r is None or q is None:
            return None
        running, queued = running + r, queued + q
        u = _ratio(entry.get("token_usage"))
        if u is not None:
            usage.append(u)
        capacity += _count(entry.get("max_running_requests")) or 0
    return Load(
        running=running,
        queued=queued,
        token_usage=max(usage) if usage else None,
        capacity=capacity or None,
    )


def parse_get_load(body: Any) -> Load | None:
    """``[{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}, ...]``, where
    ``num_reqs`` counts the waiting requests too."""
    entries = body if isinstance(body, list) else [body]
    running = queued = 0
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        total, waiting = _count(entry.get("num_reqs")), _count(entry.get("num_waiting_reqs"))
        if total is None or waiting is None:
            return None
        running += max(0, total - waiting)
        queued += waiting
    return Load(running=running, queued=queued)


PARSERS = {"/v1/loads": parse_v1_loads, "/get_load": parse_get_load}


def parse_server_info(body: Any) -> ServerInfo:
    if not isinstance(body, dict):
        return ServerInfo(None, None, None)
    version = body.get("version")
    # --incremental-streaming-output was --stream-output before its rename.
    incremental = body.get("incremental_streaming_output", body.get("stream_output"))
    return ServerInfo(
        version=version if isinstance(version, str) and version else None,
        incremental_streaming_output=incremental if isinstance(incremental, bool) else None,
        max_running_requests=_count(body.get("max_running_requests")) or None,
        chunked_prefill_size=_count(body.get("chunked_prefill_size")) or None,
    )


async def _get_json(http: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int, Any]:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                await resp.read()
                return resp.status, None
            try:
                return 200, await resp.json(content_type=None)
            except ValueError:
                return 200, None
    except asyncio.TimeoutError:
        raise NoAnswer(f"no answer from {url} within {timeout_s:g} s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise NoAnswer(f"{url}: {exc}") from None


async def read_load(
    http: aiohttp.ClientSession, base_url: str, timeout_s: float, prefer: str | None = None
) -> tuple[Load, str]:
    """The scheduler's load and the path that answered. Raises :class:`NoAnswer` when
    the scheduler did not answer in time and :class:`NoLoadEndpoint` when the server
    has no load endpoint at all."""
    paths = [prefer] if prefer else []
    paths += [p for p in LOAD_PATHS if p != prefer]
    for path in paths:
        status, body = await _get_json(http, base_url + path, timeout_s)
        if status == 404:
            continue
        load = PARSERS[path](body) if status == 200 else None
        if load is None:
            raise NoAnswer(f"{base_url}{path} answered HTTP {status} without a load")
        return load, path
    raise NoLoadEndpoint(f"{base_url} has neither {' nor '.join(LOAD_PATHS)}")


async def read_server_info(
    http: aiohttp.ClientSession, base_url: str, timeout_s: float
) -> ServerInfo:
    status, body = await _get_json(http, base_url + "/get_server_info", timeout_s)
    if status != 200:
        raise NoAnswer(f"{base_url}/get_server_info answered HTTP {status}")
    return parse_server_info(body)


async def front_answers(http: aiohttp.ClientSession, base_url: str, timeout_s: float) -> bool:
    """Whether SGLang's HTTP front answers ``/get_model_info`` (which never waits for
    the scheduler)."""
    try:
        status, _ = await _get_json(http, base_url + "/get_model_info", timeout_s)
    except NoAnswer:
        return False
    return status == 200
