"""The simulated SGLang server: HTTP front, faults, GPU memory, children, shutdown.

Everything a test, benchmark or demo needs from an SGLang server without a GPU,
modelled on SGLang's source (python/sglang/srt/ in sgl-project/sglang; the
version differences are in profiles.py, the links in docs/sglang.md):

* the port refuses connections while weights load (``--sim-startup-s``), then the
  front answers; /health per profile (``entrypoints/http_server.py``);
* generation goes through a scheduler with finite capacity (scheduler.py);
* response headers: ``/generate`` streams at once, chat streams at once (legacy) or
  with the first chunk (current, PR #21900); the first chat chunk carries only the
  role; reasoning and tool calls as their own deltas (``serving_chat.py``);
* SIGTERM: /health answers 503, in-flight requests finish, then the process kills
  its own tree with SIGKILL (``tokenizer_manager.py`` ``sigterm_watchdog``,
  ``utils`` ``kill_process_tree``);
* children, one per TP rank, hold the GPU memory; one that dies takes the server
  down (the scheduler's SIGQUIT to its parent);
* faults: crash, scheduler hang (front alive), freeze (SIGSTOP), busy (long queue,
  healthy), a long step (the scheduler silent for a while, then well), child crash,
  500s, an error chunk after a 200, slowness. Faults are set by flags at launch or by
  ``POST /sim/fault`` at run time.

Log lines are a contract that tests wait for:

    modelserverd simulator (not a real model): ...
    sim: pid=1234 listening on http://127.0.0.1:30000
    sim: ready
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..gpus import GpuError, file_gpu_register, file_gpu_unregister, read_file_gpu_view
from . import BANNER
from .options import DEFAULT_MEM_FRACTION, SimOptions, gpu_indexes, parse_options
from .profiles import (
    DEFAULT_HEALTH_CHECK_TIMEOUT_S,
    HEALTH_CHECK_TIMEOUT_ENV,
    HEALTH_GENERATION_ENV,
    PROFILES,
)
from .scheduler import Busy, Scheduler, Timing

FILLER_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat"
)
FILLER = FILLER_TEXT.split()
PROMPT_OVERHEAD = 1  # a begin-of-sequence token
CHAT_OVERHEAD = 3  # the assistant turn's header
CHAT_MESSAGE_OVERHEAD = 4  # role markers around each message
EOS_TOKEN_ID = 2
CHILD_READY_TIMEOUT_S = 60.0
# utils/watchdog.py SubprocessWatchdog (SGLang PR #18582): how often the main
# process looks whether a child died.
CHILD_WATCH_S = 1.0
FAULT_MODES = (
    "normal",
    "scheduler_hang",
    "hang",  # the usual hang: same as scheduler_hang
    "freeze",
    "busy",
    "long_step",
    "child_crash",
    "crash",
    "error",
    "error_chunk",
    "slow",
    "unhealthy",
)
# The busy fault's defaults: a long queue ahead, a first token tens of seconds away.
BUSY_QUEUED = 200
BUSY_FIRST_TOKEN_S = 30.0
# entrypoints/http_server.py: uvicorn.run(..., timeout_keep_alive=5).
KEEPALIVE_TIMEOUT_S = 5.0
# The long_step fault's default length.
LONG_STEP_S = 5.0
JSON_TYPE = "application/json"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def log(message: str) -> None:
    try:
        print(f"sim: {message}", flush=True)
    except (OSError, ValueError):  # a closed log must not take the server down
        pass


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type=JSON_TYPE)


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return _json_response(body, status)


class BadRequest(Exception):
    pass


def _words(text: str) -> int:
    return len(text.split())


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return _words(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(
            _words(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text", ""), str)
        )
    if content is None:
        return 0
    raise BadRequest("message content must be a string or a list of content parts")


def _optional_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _prompt_count(prompt: Any, name: str) -> int:
    if isinstance(prompt, str):
        return _words(prompt) + PROMPT_OVERHEAD
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return len(prompt)
    raise BadRequest(f"{name} must be a string or a list of token ids (batches are not simulated)")


class Simulator:
    """State and handlers of one simulated server. Counters are plain attributes: the
    event loop is single-threaded, so no handler can interleave an update."""

    def __init__(self, opts: SimOptions, gpus: Sequence[int] = (), gpu_mib: int = 0):
        self.opts = opts
        self.profile = PROFILES[opts.profile]
        self.rng = random.Random(opts.seed)
        self.phase = "startup"
        self.scheduler = Scheduler(
            max_running=opts.max_running_requests,
            max_total_tokens=opts.max_total_tokens,
            timing=Timing(opts.ttft_s, opts.token_latency_s, opts.batch_slowdown, opts.noise),
            rng=self.rng,
        )
        self.scheduler.slow_factor = opts.slow_factor
        env = os.environ
        self.health_check_timeout_s = _env_float(
            HEALTH_CHECK_TIMEOUT_ENV, DEFAULT_HEALTH_CHECK_TIMEOUT_S
        )
        self.health_generation = env.get(HEALTH_GENERATION_ENV, "1").strip().lower() not in (
            "0",
            "false",
            "no",
            "off",
        )
        # tokenizer_manager.gracefully_exit: set by SIGTERM, /health then answers 503.
        self.gracefully_exit = False
        # tokenizer_manager.server_status == UnHealthy after a failed health check: a
        # SIGTERM then exits without draining.
        self.failed_health_check = False
        self.unhealthy = False
        self.error_rate = opts.error_rate
        self.error_chunk = False
        self.exit_code = opts.exit_code
        # One-shot triggers: each fires once, and mode "normal" clears them.
        self.crash_after = opts.crash_after
        self.hang_after = opts.hang_after
        self.error_after = opts.error_after
        self.crashing = False
        self.generation_requests = 0
        self.health_requests = 0
        self.errors_total = 0
        # tokenizer_manager.rid_to_state, what a drain waits for: requests in flight,
        # and requests abandoned while the scheduler was hung (never cleared)
        self.in_flight = 0
        self.stuck = 0
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.gpus = list(gpus)
        self.gpu_mib = gpu_mib
        self.chunked_prefill_size = (
            opts.chunked_prefill_size
            if opts.chunked_prefill_size is not None
            else _chunked_prefill_default(opts, gpus)
        )
        self.children: list[int] = []
        self.kill_tree: Callable[[str], None] = _exit_now
        self.started_at = time.time()
        self._never = asyncio.Event()
        self._texts: dict[int, str] = {}
        self._tokens = [FILLER[0]] + [" " + FILLER[i % len(FILLER)] for i in range(1, 512)]
        self._id_prefix = f"{os.getpid():x}"
        self._gauges = (0, 0, 0.0)
        if opts.hang_after == 0:
            self.enter_hang("hung from the start (--sim-hang-after 0)")

    # --- state ------------------------------------------------------------------

    @property
    def mode(self) -> str:
        if self.scheduler.stalled:
            return "long_step"
        if self.scheduler.hung:
            return "scheduler_hang"
        if self.crashing:
            return "crash"
        if self.unhealthy:
            return "unhealthy"
        if self.scheduler.busy is not None:
            return "busy"
        if self.error_chunk:
            return "error_chunk"
        if self.error_rate > 0:
            return "error"
        if self.scheduler.slow_factor != 1.0:
            return "slow"
        return "normal"

    def state(self) -> dict[str, Any]:
        sched = self.scheduler
        return {
            "simulation": True,
            "note": BANNER,
            "pid": os.getpid(),
            "model": self.opts.model_name,
            "profile": self.profile.name,
            "sglang_version": self.profile.version,
            "phase": self.phase,
            "ready": self.phase == "ready",
            "draining": self.gracefully_exit,
            "mode": self.mode,
            "slow_factor": sched.slow_factor,
            "error_rate": self.error_rate,
            "exit_code": self.exit_code,
            "triggers": {
                "crash_after": self.crash_after,
                "hang_after": self.hang_after,
                "error_after": self.error_after,
            },
            "requests": {
                "generation": self.generation_requests,
                "health": self.health_requests,
                "errors": self.errors_total,
                "in_flight": self.in_flight,
                "running": len(sched.running),
                "queued": len(sched.waiting),
            },
            "max_running_requests": sched.max_running,
            "prompt_tokens_total": self.prompt_tokens_total,
            "completion_tokens_total": self.completion_tokens_total,
            "gpus": self.gpus,
            "gpu_file": self.opts.gpu_file,
            "gpu_mib": self.gpu_mib,
            "children": self.children,
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    def enter_hang(self, why: str, kind: str = "scheduler") -> None:
        if kind == "freeze":
            log(f"freezing ({why}): the whole process stops (SIGSTOP, simulated)")
            # Let the answer that caused it leave first; SIGCONT or SIGKILL ends it.
            asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGSTOP)
            return
        if not self.scheduler.hung:
            self.scheduler.hang()
            log(
                f"scheduler hung ({why}): the HTTP front answers, streams, load and "
                "health checks get nothing (simulated)"
            )

    async def hang(self) -> None:
        """Park the handler for good; shutdown cancels it."""
        await self._never.wait()

    def crash(self, why: str) -> None:
        """Exit at once, like a process killed by an error: no cleanup, no GPU release
        (a dead pid holds nothing in the GPU view anyway)."""
        if self.crashing:
            return
        self.crashing = True
        code = self.exit_code
        log(f"crashing ({why}) with exit code {code} (simulated)")
        # A short delay lets the answer that triggered the crash leave the socket.
        asyncio.get_running_loop().call_later(0.02, os._exit, code)

    # --- the request pipeline -----------------------------------------------------

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    async def _admit(self) -> int | web.Response:
        """Apply the fault state to a new generation request: its sequence number, or
        the answer to give instead. Requests are accepted while draining, as SGLang's
        tokenizer manager does; only /health tells a balancer to stop sending."""
        if self.crashing:
            await self.hang()  # the process is about to exit
        if self.phase not in ("warmup", "ready"):
            return _error(503, "the server is still starting (simulated)", "Unavailable")
        if self.unhealthy:
            return _error(503, "the server is unhealthy (simulated)", "Unavailable")
        self.generation_requests += 1
        n = self.generation_requests
        if self.hang_after is not None and n > self.hang_after:
            self.hang_after = None
            self.enter_hang(f"after {n - 1} generation requests", self.opts.hang_kind)
        if self.crash_after is not None and n > self.crash_after:
            await self.hang()  # the process is about to exit
        if self.error_after is not None and n > self.error_after:
            log(f"answering 500 from now on (after {self.error_after} generation requests)")
            self.error_after = None
            self.error_rate = 1.0
        rate = self.error_rate
        if rate > 0 and (rate >= 1.0 or self.rng.random() < rate):
            self.errors_total += 1
            return _error(
                500, "simulated internal server error (fault injection)", "InternalServerError"
            )
        return n

    def _request_ended(self) -> None:
        """A request leaves rid_to_state when the scheduler finishes or aborts it; a
        hung scheduler does neither, so a request abandoned by its client (its handler
        cancelled) stays counted and a drain after SIGTERM waits for it. Called from
        the handlers' ``finally``, where the exception being raised is visible."""
        aborted = isinstance(sys.exc_info()[1], asyncio.CancelledError)
        if aborted and self.scheduler.hung:
            self.stuck += 1
        self.in_flight -= 1

    @property
    def requests_left(self) -> int:
        return self.in_flight + self.stuck

    def _finish(self, n: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        if self.hang_after is not None and n >= self.hang_after:
            self.hang_after = None
            self.enter_hang(f"after {n} generation requests", self.opts.hang_kind)
        if self.crash_after is not None and n >= self.crash_after:
            self.crash(f"after {self.crash_after} generation requests")

    def _length(self, max_tokens: int | None) -> tuple[int, bool]:
        """Tokens to answer and whether the request's limit cut the answer short."""
        n = self.opts.output_tokens
        if self.opts.reasoning_parser:
            n += self.opts.reasoning_tokens  # reasoning counts against max_tokens
        if max_tokens is not None and max_tokens < n:
            return max_tokens, True
        return n, False

    def _text(self, start: int, end: int) -> str:
        if start == 0:
            text = self._texts.get(end)
            if text is None:
                text = "".join(self._token(i) for i in range(end))
                self._texts[end] = text
            return text
        return "".join(self._token(i) for i in range(start, end))

    def _token(self, i: int) -> str:
        if i < len(self._tokens):
            return self._tokens[i]
        return " " + FILLER[i % len(FILLER)]

    def _new_id(self, n: int) -> str:
        return f"{self._id_prefix}{n:08x}"

    async def _tokens_paced(self, count: int) -> AsyncIterator[int]:
        """Tokens done so far, as the scheduler produces them; an ``error_chunk``
        fault ends the stream half way with :class:`_MidStreamError`."""
        async for done in self.scheduler.generate(count):
            if self.error_chunk and done >= max(1, count // 2):
                raise _MidStreamError("simulated error after the answer had started")
            yield done

    # --- generation endpoints -----------------------------------------------------

    async def _refuse(
        self, request: web.Request, body: dict[str, Any] | None, message: str, *, openai: bool
    ) -> web.StreamResponse:
        """A request SGLang refuses. A stream whose headers leave at once (``/generate``
        always; OpenAI routes before PR #21900) has sent its 200 already, so the
        refusal is an error chunk; otherwise it is an HTTP 400."""
        stream = isinstance(body, dict) and bool(body.get("stream"))
        early = not openai or not self.profile.chat_headers_at_first_chunk
        if stream and early:
            out = _Stream(request, defer_headers=False, openai=openai)
            await out.open()
            await out.fail(message, code=400)
            return out.response
        if openai:
            return _error(400, message, "BadRequestError")
        return _json_response({"error": {"message": message}}, 400)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] | None = None
        try:
            body = await self._read_json(request)
            if "text" in body and body["text"] is not None:
                prompt_tokens = _prompt_count(body["text"], "text")
            elif "input_ids" in body:
                prompt_tokens = _prompt_count(body["input_ids"], "input_ids")
            else:
                raise BadRequest("give text (a string) or input_ids (a list of token ids)")
            params = body.get("sampling_params") or {}
            if not isinstance(params, dict):
                raise BadRequest("sampling_params must be an object")
            max_new = _optional_count(params.get("max_new_tokens"), "max_new_tokens")
        except BadRequest as exc:
            return await self._refuse(request, body, str(exc), openai=False)
        admitted = await self._admit()
        if isinstance(admitted, web.Response):
            return admitted
        n = admitted
        self.in_flight += 1
        try:
            began = time.perf_counter()
            count, capped = self._length(max_new)
            rid = self._new_id(n)
            if capped:
                finish: dict[str, Any] = {"type": "length", "length": count}
            else:
                finish = {"type": "stop", "matched": EOS_TOKEN_ID}

            def meta(done: int, final: bool) -> dict[str, Any]:
                return {
                    "id": rid,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": done,
                    "cached_tokens": 0,
                    "finish_reason": finish if final else None,
                    "e2e_latency": round(time.perf_counter() - began, 6),
                }

            if body.get("stream"):
                # http_server.py generate_request: a StreamingResponse, so the headers
                # leave at once, before the first token (every version).
                out = _Stream(request, defer_headers=False, openai=False)
                await out.open()
                incremental = self.opts.incremental_streaming_output
                try:
                    sent = 0
                    async for done in self._tokens_paced(count):
                        final = done >= count
                        text = self._text(sent, done) if incremental else self._text(0, done)
                        sent = done
                        await out.send(
                            _sse({"text": text, "meta_info": meta(done, final), "index": 0})
                        )
                    await out.close()
                except _MidStreamError as exc:
                    self.errors_total += 1
                    await out.fail(str(exc))
                    return out.response
                except ConnectionError:
                    return out.response
                self._finish(n, prompt_tokens, count)
                return out.response
            try:
                await self.scheduler.tokens_all_at_once(count)
            except _MidStreamError as exc:
                return _error(500, str(exc), "InternalServerError")
            result = {"text": self._text(0, count), "meta_info": meta(count, True)}
            self._finish(n, prompt_tokens, count)
            return _json_response(result)
        finally:
            self._request_ended()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] | None = None
        try:
            body = await self._read_json(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise BadRequest("messages must be a list of {role, content} objects")
            prompt_tokens = CHAT_OVERHEAD + sum(
                CHAT_MESSAGE_OVERHEAD + _content_words(m.get("content")) for m in messages
            )
            max_tokens = _openai_max_tokens(body)
            tool = _first_tool_name(body.get("tools"))
        except BadRequest as exc:
            return await self._refuse(request, body, str(exc), openai=True)
        if not self.opts.tool_call_parser:
            tool = None
        return await self._openai(request, body, prompt_tokens, max_tokens, chat=True, tool=tool)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] | None = None
        try:
            body = await self._read_json(request)
            prompt_tokens = _prompt_count(body.get("prompt"), "prompt")
            max_tokens = _openai_max_tokens(body)
        except BadRequest as exc:
            return await self._refuse(request, body, str(exc), openai=True)
        return await self._openai(request, body, prompt_tokens, max_tokens, chat=False)

    def _answer_plan(self, count: int, chat: bool, tool: str | None) -> _Plan:
        """How ``count`` tokens divide into reasoning, text and a tool call."""
        reasoning = 0
        if chat and self.opts.reasoning_parser:
            reasoning = min(count, self.opts.reasoning_tokens)
        answer = count - reasoning
        arguments = None
        if tool is not None and answer > 0:
            arguments = json.dumps({"query": self._text(0, answer).strip()})
        return _Plan(reasoning=reasoning, answer=answer, tool=tool, arguments=arguments)

    async def _openai(
        self,
        request: web.Request,
        body: dict[str, Any],
        prompt_tokens: int,
        max_tokens: int | None,
        *,
        chat: bool,
        tool: str | None = None,
    ) -> web.StreamResponse:
        admitted = await self._admit()
        if isinstance(admitted, web.Response):
            return admitted
        n = admitted
        self.in_flight += 1
        try:
            count, capped = self._length(max_tokens)
            plan = self._answer_plan(count, chat, tool)
            finish = "length" if capped else ("tool_calls" if plan.arguments else "stop")
            rid = ("chatcmpl-" if chat else "cmpl-") + self._new_id(n)
            created = int(time.time())
            model = self.opts.model_name
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": count,
                "total_tokens": prompt_tokens + count,
            }
            kind = "chat.completion.chunk" if chat else "text_completion"

            def envelope(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                obj = {"id": rid, "object": kind, "created": created, "model": model}
                obj["choices"] = choices
                obj.update(extra)
                return _sse(obj)

            if body.get("stream"):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                out = _Stream(
                    request, defer_headers=self.profile.chat_headers_at_first_chunk, openai=True
                )
                await out.open()
                try:
                    sent = 0
                    async for done in self._tokens_paced(count):
                        if chat and sent == 0:
                            # serving_chat.py: the first output of a choice is announced
                            # by a chunk that carries only the role.
                            role = {"role": "assistant", "content": ""}
                            await out.send(envelope([_choice(role, None)]))
                        for delta in plan.deltas(self, sent, done, rid) if chat else ():
                            await out.send(envelope([_choice(delta, None)]))
                        if not chat:
                            choice = {"index": 0, "text": self._text(sent, done)}
                            await out.send(
                                envelope([{**choice, "logprobs": None, "finish_reason": None}])
                            )
                        sent = done
                    if chat:
                        last = _choice({}, finish)
                        if finish == "stop":
                            last["matched_stop"] = EOS_TOKEN_ID
                        await out.send(envelope([last]))
                    else:
                        await out.send(
                            envelope(
                                [
                                    {
                                        "index": 0,
                                        "text": "",
                                        "logprobs": None,
                                        "finish_reason": finish,
                                    }
                                ]
                            )
                        )
                    if include_usage:
                        await out.send(envelope([], usage=usage))
                    await out.close()
                except _MidStreamError as exc:
                    self.errors_total += 1
                    await out.fail(str(exc))
                    return out.response
                except ConnectionError:
                    return out.response
                self._finish(n, prompt_tokens, count)
                return out.response
            try:
                await self.scheduler.tokens_all_at_once(count)
            except _MidStreamError as exc:
                return _error(500, str(exc), "InternalServerError")
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": None}
                if plan.arguments is None:
                    message["content"] = self._text(plan.reasoning, count)
                else:
                    message["tool_calls"] = [plan.tool_call(rid, plan.arguments)]
                if self.opts.reasoning_parser:
                    message["reasoning_content"] = self._text(0, plan.reasoning)
                choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": self._text(0, count),
                    "logprobs": None,
                    "finish_reason": finish,
                }
            result = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            self._finish(n, prompt_tokens, count)
            return _json_response(result)
        finally:
            self._request_ended()

    # --- health and information ---------------------------------------------------

    async def _answerable(self) -> None:
        if self.crashing:
            await self.hang()

    async def health(self, request: web.Request) -> web.Response:
        """Per profile (see profiles.py): a plain 200 from the front (legacy), or
        SGLang's generating check (current)."""
        self.health_requests += 1
        await self._answerable()
        if self.unhealthy:
            return web.Response(status=503)
        if not self.profile.health_generates:
            # Legacy: /health is the front's plain 200 (even while warming up);
            # /health_generate runs the generating check without the state checks.
            if request.path == "/health":
                return web.Response(status=200)
            return web.Response(status=200 if await self._health_generate() else 503)
        if self.gracefully_exit or self.phase != "ready":
            return web.Response(status=503)
        if not self.health_generation and request.path == "/health":
            return web.Response(status=200)
        return web.Response(status=200 if await self._health_generate() else 503)

    async def _health_generate(self) -> bool:
        """http_server.py health_generate: a one-token request, then a look once a
        second for any output received since the check began."""
        loop = asyncio.get_running_loop()
        tic = time.monotonic()
        probe = loop.create_task(self.scheduler.tokens_all_at_once(1))
        try:
            while time.monotonic() < tic + self.health_check_timeout_s:
                await asyncio.sleep(1.0)
                if self.scheduler.last_output > tic:
                    self.failed_health_check = False
                    return True
        finally:
            probe.cancel()
        self.failed_health_check = True
        log(
            f"health check failed: no output from the scheduler for "
            f"{self.health_check_timeout_s:g} s"
        )
        return False

    async def models(self, request: web.Request) -> web.Response:
        await self._answerable()
        return _json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.opts.model_name,
                        "object": "model",
                        "created": int(self.started_at),
                        "owned_by": "modelserverd-simulator",
                        "root": self.opts.model_path,
                        "note": BANNER,
                        "simulation": True,
                    }
                ],
            }
        )

    async def model_info(self, request: web.Request) -> web.Response:
        """Answered by the HTTP front alone: proof the front lives, not the scheduler."""
        await self._answerable()
        return _json_response(
            {
                "model_path": self.opts.model_path,
                "tokenizer_path": self.opts.model_path,
                "is_generation": True,
                "served_model_name": self.opts.model_name,
                "simulation": True,
                "note": BANNER,
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        """Server arguments, the scheduler's internal state (so it waits for the
        scheduler) and the version."""
        await self._answerable()
        await self.scheduler.alive()
        o = self.opts
        return _json_response(
            {
                "model_path": o.model_path,
                "served_model_name": o.model_name,
                "host": o.host,
                "port": o.port,
                "tp_size": o.tp_size,
                "nccl_port": o.nccl_port,
                "base_gpu_id": o.base_gpu_id,
                "mem_fraction_static": o.mem_fraction_static,
                "max_running_requests": o.max_running_requests,
                "max_total_tokens": o.max_total_tokens,
                "chunked_prefill_size": self.chunked_prefill_size,
                "enable_metrics": o.enable_metrics,
                "reasoning_parser": o.reasoning_parser,
                "tool_call_parser": o.tool_call_parser,
                # server_args.py: --stream-output until its rename (SGLang PR #20614)
                self.profile.streaming_flag: o.incremental_streaming_output,
                "internal_states": [{"last_gen_throughput": 0.0}],
                "version": self.profile.version,
                "simulation": True,
                "note": BANNER,
                "sim": {
                    "profile": self.profile.name,
                    "ttft_s": o.ttft_s,
                    "token_latency_s": o.token_latency_s,
                    "noise": o.noise,
                    "output_tokens": o.output_tokens,
                    "gpus": self.gpus,
                    "gpu_mib": self.gpu_mib,
                    "ignored_flags": list(o.ignored),
                },
            }
        )

    async def get_load(self, request: web.Request) -> web.Response:
        """The older load endpoint: one entry per data-parallel rank, asked of the
        scheduler (so it waits while the scheduler is hung)."""
        await self._answerable()
        load = await self.scheduler.load()
        running, waiting = load["num_running_reqs"], load["num_waiting_reqs"]
        return _json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": running + waiting,
                    "num_waiting_reqs": waiting,
                    "num_tokens": load["num_tokens"],
                }
            ]
        )

    async def v1_loads(self, request: web.Request) -> web.Response:
        """The newer load endpoint (current profile; SGLang PR #16976), asked of the
        scheduler like /get_load."""
        await self._answerable()
        if not self.profile.has_v1_loads:
            return _error(404, "Not Found", "NotFoundError")
        load = await self.scheduler.load()
        now = _iso_now()
        total = self.opts.max_total_tokens or 0
        entry = {
            "dp_rank": 0,
            "timestamp": now,
            "num_running_reqs": load["num_running_reqs"],
            "num_waiting_reqs": load["num_waiting_reqs"],
            "num_used_tokens": load["num_tokens"],
            "num_total_tokens": load["num_tokens"],
            "max_total_num_tokens": total,
            "token_usage": load["token_usage"],
            "gen_throughput": 0.0,
            "cache_hit_rate": 0.0,
            "utilization": load["token_usage"],
            "max_running_requests": self.scheduler.max_running,
        }
        return _json_response(
            {
                "timestamp": now,
                "version": self.profile.version,
                "accelerator": "simulated",
                "num_accelerators": len(self.gpus) or self.opts.tp_size,
                "loads": [entry],
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """Only with --enable-metrics. The front serves the gauges the scheduler last
        wrote, so a hung scheduler's gauges go stale instead of going away."""
        await self._answerable()
        if not self.opts.enable_metrics:
            return _error(404, "Not Found", "NotFoundError")
        sched = self.scheduler
        if not sched.hung:
            self._gauges = (sched.num_running, sched.num_waiting, sched.token_usage)
        running, queued, usage = self._gauges
        label = '{model_name="' + self.opts.model_name.replace('"', "'") + '"}'
        lines = [
            "# HELP sglang:num_requests_total Generation requests received (simulated).",
            "# TYPE sglang:num_requests_total counter",
            f"sglang:num_requests_total{label} {self.generation_requests}",
            "# TYPE sglang:prompt_tokens_total counter",
            f"sglang:prompt_tokens_total{label} {self.prompt_tokens_total}",
            "# TYPE sglang:generation_tokens_total counter",
            f"sglang:generation_tokens_total{label} {self.completion_tokens_total}",
            "# TYPE sglang:num_running_reqs gauge",
            f"sglang:num_running_reqs{label} {running}",
            "# TYPE sglang:num_queue_reqs gauge",
            f"sglang:num_queue_reqs{label} {queued}",
            "# TYPE sglang:token_usage gauge",
            f"sglang:token_usage{label} {usage}",
            "# HELP sim_errors_total Requests answered with a simulated error.",
            "# TYPE sim_errors_total counter",
            f"sim_errors_total {self.errors_total}",
            "# HELP sim_health_requests_total Health checks received.",
            "# TYPE sim_health_requests_total counter",
            f"sim_health_requests_total {self.health_requests}",
            "# HELP sim_info The simulator's fault mode (this is not a real model).",
            "# TYPE sim_info gauge",
            f'sim_info{{mode="{self.mode}",simulation="true"}} 1',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # --- run-time faults ----------------------------------------------------------

    async def sim_state(self, request: web.Request) -> web.Response:
        await self._answerable()
        return _json_response(self.state())

    async def sim_fault(self, request: web.Request) -> web.StreamResponse:
        await self._answerable()
        try:
            body = await self._read_json(request)
            mode = body.get("mode")
            if mode is not None and mode not in FAULT_MODES:
                raise BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
            slow = body.get("slow_factor")
            if slow is not None and not (_is_number(slow) and slow > 0):
                raise BadRequest(f"slow_factor must be a number > 0, got {slow!r}")
            rate = body.get("error_rate")
            if rate is not None and not (_is_number(rate) and 0 <= rate <= 1):
                raise BadRequest(f"error_rate must be a number in [0, 1], got {rate!r}")
            code = body.get("exit_code")
            if code is not None and not (isinstance(code, int) and not isinstance(code, bool)):
                raise BadRequest(f"exit_code must be an integer, got {code!r}")
            queued = body.get("queued", BUSY_QUEUED)
            if not (isinstance(queued, int) and not isinstance(queued, bool) and queued >= 0):
                raise BadRequest(f"queued must be an integer >= 0, got {queued!r}")
            first = body.get("first_token_s", BUSY_FIRST_TOKEN_S)
            if not (_is_number(first) and first >= 0):
                raise BadRequest(f"first_token_s must be a number >= 0, got {first!r}")
            seconds = body.get("seconds", LONG_STEP_S)
            if not (_is_number(seconds) and seconds > 0):
                raise BadRequest(f"seconds must be a number > 0, got {seconds!r}")
            if mode == "child_crash" and not self.children:
                raise BadRequest("child_crash needs children (--sim-children N, N >= 1)")
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")

        sched = self.scheduler
        if mode == "normal":
            self.unhealthy = False
            self.error_chunk = False
            sched.slow_factor = 1.0
            sched.set_busy(None)
            sched.resume()
            self.stuck = 0
            self.error_rate = 0.0
            self.crash_after = self.hang_after = self.error_after = None
        elif mode == "slow" and slow is None:
            slow = 10.0
        elif mode == "error" and rate is None:
            rate = 1.0
        elif mode == "unhealthy":
            self.unhealthy = True
        elif mode == "error_chunk":
            self.error_chunk = True
        elif mode == "busy":
            sched.set_busy(Busy(queued=queued, first_token_s=float(first)))
        elif mode == "long_step":
            sched.stall(float(seconds))
        if slow is not None:
            sched.slow_factor = float(slow)
        if rate is not None:
            self.error_rate = float(rate)
        if code is not None:
            self.exit_code = code
        if mode is not None:
            log(f"fault mode -> {mode} (via /sim/fault)")
        answer = self.state()
        if mode in ("hang", "scheduler_hang"):
            self.enter_hang("via /sim/fault")
            answer["mode"] = "scheduler_hang"
        elif mode == "freeze":
            self.enter_hang("via /sim/fault", "freeze")
            answer["mode"] = "freeze"
        elif mode == "child_crash":
            victim = self.children[0]
            log(f"killing child pid {victim} (simulated scheduler crash)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            answer["mode"] = "child_crash"
        elif mode == "crash":
            answer["mode"] = "crash"
            resp = _json_response(answer)
            await resp.prepare(request)
            await resp.write_eof()
            self.crash("via /sim/fault")
            return resp
        return _json_response(answer)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/get_load", self.get_load)
        app.router.add_get("/v1/loads", self.v1_loads)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/state", self.sim_state)
        app.router.add_post("/sim/fault", self.sim_fault)
        return app


class _MidStreamError(Exception):
    """The error_chunk fault: an error after the answer had started."""


class _Stream:
    """An SSE answer whose headers leave either at once or with its first chunk."""

    def __init__(self, request: web.Request, *, defer_headers: bool, openai: bool):
        self.request = request
        self.defer = defer_headers
        self.openai = openai
        self.response = web.StreamResponse(headers=SSE_HEADERS)

    async def open(self) -> None:
        if not self.defer:
            await self.response.prepare(self.request)

    async def send(self, data: bytes) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(data)

    async def close(self) -> None:
        await self.send(SSE_DONE)
        await self.response.write_eof()

    async def fail(self, message: str, code: int = 500) -> None:
        """serving_chat.py: an exception inside the stream becomes an error chunk
        after the 200 (the status has left), then the stream ends."""
        with contextlib.suppress(ConnectionError):
            await self.send(_sse(_stream_error(message, self.openai, code)))
            await self.close()


def _stream_error(message: str, openai: bool, code: int = 500) -> dict[str, Any]:
    """serving_base.py create_streaming_error_response for the OpenAI routes;
    http_server.py generate_request sends only the message."""
    if not openai:
        return {"error": {"message": message}}
    kind = "BadRequestError" if code == 400 else "InternalServerError"
    return {
        "error": {"object": "error", "message": message, "type": kind, "param": None, "code": code}
    }


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def _choice(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


@dataclass(frozen=True)
class _Plan:
    reasoning: int  # the first tokens: reasoning_content
    answer: int  # the rest: content, or a tool call's arguments
    tool: str | None
    arguments: str | None

    def tool_call(self, rid: str, arguments: str) -> dict[str, Any]:
        """The call as a whole answer has it, and as the first streamed piece starts it."""
        return {
            "index": 0,
            "id": f"call_{rid[-8:]}",
            "type": "function",
            "function": {"name": self.tool, "arguments": arguments},
        }

    def deltas(self, sim: Simulator, sent: int, done: int, rid: str) -> list[dict[str, Any]]:
        """The chat deltas for tokens ``sent..done``."""
        out: list[dict[str, Any]] = []
        if sent < self.reasoning:
            out.append({"reasoning_content": sim._text(sent, min(done, self.reasoning))})
        lo, hi = max(sent, self.reasoning) - self.reasoning, done - self.reasoning
        if hi <= lo:
            return out
        if self.arguments is None:
            out.append({"content": sim._text(lo + self.reasoning, hi + self.reasoning)})
            return out
        # The arguments leave in as many pieces as there are answer tokens.
        size = len(self.arguments)
        a, b = size * lo // self.answer, size * hi // self.answer
        call: dict[str, Any] = {"index": 0, "function": {"arguments": self.arguments[a:b]}}
        if lo == 0:
            call = self.tool_call(rid, self.arguments[a:b])
        out.append({"tool_calls": [call]})
        return out


def _first_tool_name(tools: Any) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of {type, function} objects")
    for entry in tools:
        fn = entry.get("function") if isinstance(entry, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and name:
            return name
    return None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def _exit_now(why: str) -> None:
    os._exit(1)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _openai_max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    return _optional_count(value, "max_tokens")


# --- process life -------------------------------------------------------------------


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless ``event`` is set first; True when it was."""
    if seconds <= 0:
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True


async def serve(sim: Simulator, children: Sequence[subprocess.Popen] = ()) -> int:
    """Startup phases, then serve until SIGINT or the end of a SIGTERM drain.
    Returns the exit code (a drained SIGTERM ends in SIGKILL, as in SGLang)."""
    opts = sim.opts
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def kill_tree(why: str) -> None:
        """utils.kill_process_tree(include_parent=True): SIGKILL every child, then
        this process."""
        log(f"{why}; killing the process tree (SIGKILL)")
        for proc in children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        os.kill(os.getpid(), signal.SIGKILL)

    sim.kill_tree = kill_tree

    def on_sigterm() -> None:
        if sim.phase == "startup":
            log("SIGTERM received while loading; exiting")
            stop.set()
        elif not sim.gracefully_exit:
            log("SIGTERM received; draining requests, then shutting down")
            sim.gracefully_exit = True

    if opts.ignore_sigterm:
        loop.add_signal_handler(
            signal.SIGTERM, lambda: log("SIGTERM ignored (--sim-ignore-sigterm)")
        )
    else:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, lambda: (log("SIGINT received, stopping"), stop.set()))
    background = [
        loop.create_task(_sigterm_watchdog(sim)),
        loop.create_task(_watch_children(sim, children)),
    ]
    try:
        return await _serve_phases(sim, stop)
    finally:
        for task in background:
            task.cancel()


async def _serve_phases(sim: Simulator, stop: asyncio.Event) -> int:
    opts = sim.opts
    if opts.startup_s > 0:
        log(f"loading (simulated) for {opts.startup_s:g}s; the port stays closed")
    if await _wait(stop, opts.startup_s):
        return 0
    if opts.crash_after == 0:
        sim.crash("during startup (--sim-crash-after 0)")
        await sim.hang()

    # handler_cancellation: a client that goes away aborts its request, even one still
    # queued, as SGLang's tokenizer manager aborts a request whose connection closed.
    # keepalive_timeout: SGLang's uvicorn closes a connection idle for 5 s
    # (entrypoints/http_server.py, uvicorn.run(..., timeout_keep_alive=5)).
    runner = web.AppRunner(
        sim.app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        handler_cancellation=True,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        log(f"error: cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}")
        await runner.cleanup()
        return 1
    sim.phase = "warmup"
    log(
        f"pid={os.getpid()} listening on {_url(opts.host, opts.port)} "
        f"(SGLang {sim.profile.version}, profile {sim.profile.name})"
    )
    if opts.warmup_s > 0:
        log(f"warming up (simulated) for {opts.warmup_s:g}s")
    if not await _wait(stop, opts.warmup_s):
        sim.phase = "ready"
        log("ready")
        await stop.wait()
    sim.phase = "stopping"
    try:
        await asyncio.wait_for(runner.cleanup(), 5.0)
    except asyncio.TimeoutError:
        pass
    return 0


async def _sigterm_watchdog(sim: Simulator) -> None:
    """tokenizer_manager.py sigterm_watchdog: look every few seconds whether a SIGTERM
    came; then wait until no request is left (or exit at once when the last health
    check failed), then kill the tree."""
    poll = sim.opts.drain_poll_s
    while not sim.gracefully_exit:
        await asyncio.sleep(poll)
    while True:
        left = sim.requests_left
        if sim.failed_health_check:
            log(f"SIGTERM after a failed health check; exiting with {left} requests left")
            break
        if left == 0:
            break
        log(f"gracefully exiting: {left} requests left")
        await asyncio.sleep(poll)
    sim.kill_tree("drained after SIGTERM")


async def _watch_children(sim: Simulator, children: Sequence[subprocess.Popen]) -> None:
    """A scheduler child that dies takes the server down: SGLang's subprocess watchdog
    sees a non-zero exit and SIGQUITs its own process, whose handler kills the tree
    (a child that catches an exception sends that SIGQUIT itself)."""
    while children:
        await asyncio.sleep(CHILD_WATCH_S)
        for proc in children:
            code = proc.poll()
            if code:
                sim.kill_tree(f"child pid {proc.pid} exited ({code})")
                return


def _chunked_prefill_default(opts: SimOptions, gpus: Sequence[int]) -> int:
    """server_args.py sets ``chunked_prefill_size`` from the GPU's memory when it is
    not given: 2048 under 35 GiB, 8192 under 160 GiB, else 16384; 4096 when the
    memory is unknown."""
    totals: list[int] = []
    if opts.gpu_file:
        with contextlib.suppress(GpuError):
            data = read_file_gpu_view(opts.gpu_file)
            totals = [g["total_mib"] for g in data["gpus"] if g["index"] in gpus]
    if not totals:
        return 4096
    memory = min(totals)
    return 2048 if memory < 35 * 1024 else 8192 if memory < 160 * 1024 else 16384


def _mib_for(opts: SimOptions, gpus: Sequence[int]) -> int:
    if opts.gpu_mib is not None:
        return opts.gpu_mib
    fraction = opts.mem_fraction_static or DEFAULT_MEM_FRACTION
    data = read_file_gpu_view(opts.gpu_file or "")
    totals = [g["total_mib"] for g in data["gpus"] if g["index"] in gpus]
    return int(min(totals) * fraction) if totals else 0


def _start_children(opts: SimOptions, gpus: Sequence[int], mib: int) -> list[subprocess.Popen]:
    """Start the children and wait until each holds its GPU memory, as SGLang's
    schedulers load their share of the model before the server opens its port."""
    count = opts.children
    shares = [mib // count + (1 if i < mib % count else 0) for i in range(count)]
    started: list[tuple[subprocess.Popen, int]] = []
    for i in range(count):
        read_fd, write_fd = os.pipe()
        argv = [
            sys.executable,
            "-m",
            "supervisord_ms.sim.child",
            "--parent-pid",
            str(os.getpid()),
            "--index",
            str(i),
            "--ready-fd",
            str(write_fd),
            "--orphan-lifetime-s",
            str(opts.orphan_lifetime_s),
        ]
        if opts.gpu_file and gpus:
            argv += ["--gpu-file", opts.gpu_file, "--gpu-mib", str(shares[i])]
            argv += ["--gpus", ",".join(str(g) for g in gpus)]
        if opts.children_survive:
            argv.append("--survive")
        if opts.children_leave_group:
            argv.append("--leave-group")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(write_fd,))
        os.close(write_fd)
        started.append((proc, read_fd))
        log(f"child {i} pid={proc.pid}")
    failed = None
    deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
    for i, (proc, read_fd) in enumerate(started):
        try:
            line = ""
            remaining = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([read_fd], [], [], remaining)
            if readable:
                line = os.read(read_fd, 4096).decode(errors="replace").strip()
        finally:
            os.close(read_fd)
        if line != "ok" and failed is None:
            failed = f"child {i} (pid {proc.pid}) failed to start: {line or 'no answer'}"
    procs = [p for p, _ in started]
    if failed:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        raise RuntimeError(failed)
    return procs


def _stop_children(procs: Sequence[subprocess.Popen], survive: bool) -> None:
    """SIGTERM every child; children that honour it are waited for, survivors are left
    running (they ignore SIGTERM, which is the point of the simulation)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    if survive:
        return
    deadline = time.monotonic() + 3.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    pid = os.getpid()
    print(
        f"{BANNER}: pid={pid} model={opts.model_name} tp_size={opts.tp_size} "
        f"host={opts.host} port={opts.port}",
        flush=True,
    )
    if opts.ignored:
        log(f"note: ignoring SGLang flags the simulator does not use: {' '.join(opts.ignored)}")
    if opts.ignore_sigterm:
        # Until the event loop installs its own handler, SIGTERM must not kill us either.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        gpus = gpu_indexes(opts)
    except ValueError as exc:
        log(f"error: {exc}")
        return 1
    mib = 0
    registered = False
    children: list[subprocess.Popen] = []
    try:
        if opts.gpu_file:
            mib = _mib_for(opts, gpus)
            if opts.children == 0:
                file_gpu_register(opts.gpu_file, pid, gpus, mib, require_free=True)
                registered = True
            log(
                f"holding {mib} MiB on GPU(s) {','.join(map(str, gpus))} in {opts.gpu_file} "
                f"({'children' if opts.children else 'this process'})"
            )
        if opts.children:
            children = _start_children(opts, gpus, mib)
    except (GpuError, RuntimeError) as exc:
        log(f"error: {exc}")
        if registered:
            file_gpu_unregister(opts.gpu_file or "", pid)
        return 1

    sim = Simulator(opts, gpus, mib)
    sim.children = [p.pid for p in children]
    code = 1
    try:
        code = asyncio.run(serve(sim, children))
    finally:
        _stop_children(children, opts.children_survive)
        if registered:
            try:
                file_gpu_unregister(opts.gpu_file or "", pid)
            except GpuError as exc:
                log(f"cannot release GPU memory: {exc}")
        log(f"stopped (exit code {code})")
    return code
