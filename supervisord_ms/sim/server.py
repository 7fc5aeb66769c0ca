"""The simulated SGLang server: HTTP API, latency model, faults, GPU memory, children.

Everything a test, benchmark or demo needs from an SGLang server without a GPU:
the same paths and response shapes, a startup that refuses connections and then
answers 503 before 200, answers whose latency follows time-to-first-token plus
per-token time, and the ways real servers fail (crash, hang with the port open,
500s, slowness, orphaned children holding GPU memory). Faults are set by flags
at launch or by ``POST /sim/fault`` at run time.

Log lines are a contract that tests wait for:

    modelserverd simulator (not a real model): ...
    sim: pid=1234 listening on http://127.0.0.1:30000
    sim: ready
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from .. import __version__
from ..gpus import GpuError, file_gpu_register, file_gpu_unregister, read_file_gpu_view
from . import BANNER
from .options import DEFAULT_MEM_FRACTION, SimOptions, gpu_indexes, parse_options

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
STREAM_GROUP = 8  # tokens per chunk when tokens take no time
CHILD_READY_TIMEOUT_S = 60.0
FAULT_MODES = ("normal", "hang", "crash", "error", "slow", "unhealthy")
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
        self.rng = random.Random(opts.seed)
        self.phase = "startup"
        self.hung = opts.hang_after == 0
        self.unhealthy = False
        self.slow_factor = opts.slow_factor
        self.error_rate = opts.error_rate
        self.exit_code = opts.exit_code
        # One-shot triggers: each fires once, and mode "normal" clears them.
        self.crash_after = opts.crash_after
        self.hang_after = opts.hang_after
        self.error_after = opts.error_after
        self.crashing = False
        self.generation_requests = 0
        self.health_requests = 0
        self.errors_total = 0
        self.in_flight = 0
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.gpus = list(gpus)
        self.gpu_mib = gpu_mib
        self.children: list[int] = []
        self.started_at = time.time()
        self._never = asyncio.Event()
        self._texts: dict[int, str] = {}
        self._tokens = [FILLER[0]] + [" " + FILLER[i % len(FILLER)] for i in range(1, 512)]
        self._id_prefix = f"{os.getpid():x}"

    # --- state ------------------------------------------------------------------

    @property
    def mode(self) -> str:
        if self.hung:
            return "hang"
        if self.crashing:
            return "crash"
        if self.unhealthy:
            return "unhealthy"
        if self.error_rate > 0:
            return "error"
        if self.slow_factor != 1.0:
            return "slow"
        return "normal"

    def state(self) -> dict[str, Any]:
        return {
            "simulation": True,
            "note": BANNER,
            "pid": os.getpid(),
            "model": self.opts.model_name,
            "phase": self.phase,
            "ready": self.phase == "ready",
            "mode": self.mode,
            "slow_factor": self.slow_factor,
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
            },
            "prompt_tokens_total": self.prompt_tokens_total,
            "completion_tokens_total": self.completion_tokens_total,
            "gpus": self.gpus,
            "gpu_file": self.opts.gpu_file,
            "gpu_mib": self.gpu_mib,
            "children": self.children,
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    def enter_hang(self, why: str) -> None:
        if not self.hung:
            self.hung = True
            log(f"hanging ({why}): no more answers, the port stays open (simulated)")

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
        the answer to give instead."""
        if self.hung or self.crashing:
            await self.hang()
        if self.phase != "ready":
            return _error(503, "the server is still starting (simulated warm-up)", "Unavailable")
        if self.unhealthy:
            return _error(503, "the server is unhealthy (simulated)", "Unavailable")
        self.generation_requests += 1
        n = self.generation_requests
        if self.hang_after is not None and n > self.hang_after:
            self.enter_hang(f"after {self.hang_after} generation requests")
            await self.hang()
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

    def _finish(self, n: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        if self.hang_after is not None and n >= self.hang_after:
            self.enter_hang(f"after {self.hang_after} generation requests")
        if self.crash_after is not None and n >= self.crash_after:
            self.crash(f"after {self.crash_after} generation requests")

    def _timing(self) -> tuple[float, float]:
        factor = self.slow_factor
        noise = self.opts.noise
        if noise:
            factor *= self.rng.uniform(1.0 - noise, 1.0 + noise)
        return self.opts.ttft_s * factor, self.opts.token_latency_s * factor

    def _length(self, max_tokens: int | None) -> tuple[int, bool]:
        """Tokens to answer and whether the request's limit cut the answer short."""
        n = self.opts.output_tokens
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

    async def _paced(self, n: int, ttft: float, per_token: float) -> AsyncIterator[tuple[int, int]]:
        """Token ranges in the rhythm of a real decode: token i is due at
        ttft + i * per_token after the start; tokens that take no time come in groups."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        group = 1 if per_token > 0 else STREAM_GROUP
        i = 0
        while i < n:
            delay = start + ttft + i * per_token - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.hung:
                await self.hang()
            end = min(n, i + group)
            yield i, end
            i = end
        delay = start + ttft + n * per_token - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.hung:
            await self.hang()

    async def _sleep_latency(self, n: int) -> None:
        ttft, per_token = self._timing()
        total = ttft + n * per_token
        if total > 0:
            await asyncio.sleep(total)
        if self.hung:
            await self.hang()

    def _new_id(self, n: int) -> str:
        return f"{self._id_prefix}{n:08x}"

    async def _stream_start(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        return resp

    async def _stream_end(self, resp: web.StreamResponse) -> None:
        await resp.write(SSE_DONE)
        await resp.write_eof()

    # --- generation endpoints -----------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
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
            return _error(400, str(exc), "BadRequestError")
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
                resp = await self._stream_start(request)
                try:
                    ttft, per_token = self._timing()
                    async for _start, end in self._paced(count, ttft, per_token):
                        chunk = {"text": self._text(0, end), "meta_info": meta(end, False)}
                        await resp.write(_sse({**chunk, "index": 0}))
                    final = {"text": self._text(0, count), "meta_info": meta(count, True)}
                    await resp.write(_sse({**final, "index": 0}))
                    await self._stream_end(resp)
                except ConnectionError:
                    return resp
                self._finish(n, prompt_tokens, count)
                return resp
            await self._sleep_latency(count)
            out = {"text": self._text(0, count), "meta_info": meta(count, True)}
            self._finish(n, prompt_tokens, count)
            return _json_response(out)
        finally:
            self.in_flight -= 1

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise BadRequest("messages must be a list of {role, content} objects")
            prompt_tokens = CHAT_OVERHEAD + sum(
                CHAT_MESSAGE_OVERHEAD + _content_words(m.get("content")) for m in messages
            )
            max_tokens = _openai_max_tokens(body)
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")
        return await self._openai(request, body, prompt_tokens, max_tokens, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
            prompt_tokens = _prompt_count(body.get("prompt"), "prompt")
            max_tokens = _openai_max_tokens(body)
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")
        return await self._openai(request, body, prompt_tokens, max_tokens, chat=False)

    async def _openai(
        self,
        request: web.Request,
        body: dict[str, Any],
        prompt_tokens: int,
        max_tokens: int | None,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        admitted = await self._admit()
        if isinstance(admitted, web.Response):
            return admitted
        n = admitted
        self.in_flight += 1
        try:
            count, capped = self._length(max_tokens)
            finish = "length" if capped else "stop"
            rid = ("chatcmpl-" if chat else "cmpl-") + self._new_id(n)
            created = int(time.time())
            model = self.opts.model_name
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": count,
                "total_tokens": prompt_tokens + count,
            }
            if body.get("stream"):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                kind = "chat.completion.chunk" if chat else "text_completion"
                resp = await self._stream_start(request)

                def chunk(piece: str | None, reason: str | None, first: bool) -> bytes:
                    if chat:
                        delta: dict[str, Any] = {}
                        if first:
                            delta["role"] = "assistant"
                        if piece is not None:
                            delta["content"] = piece
                        choice: dict[str, Any] = {"index": 0, "delta": delta}
                    else:
                        choice = {"index": 0, "text": piece or ""}
                    choice["logprobs"] = None
                    choice["finish_reason"] = reason
                    return _sse(
                        {
                            "id": rid,
                            "object": kind,
                            "created": created,
                            "model": model,
                            "choices": [choice],
                        }
                    )

                try:
                    ttft, per_token = self._timing()
                    first = True
                    async for start, end in self._paced(count, ttft, per_token):
                        await resp.write(chunk(self._text(start, end), None, first))
                        first = False
                    await resp.write(chunk(None if chat else "", finish, first))
                    if include_usage:
                        await resp.write(
                            _sse(
                                {
                                    "id": rid,
                                    "object": kind,
                                    "created": created,
                                    "model": model,
                                    "choices": [],
                                    "usage": usage,
                                }
                            )
                        )
                    await self._stream_end(resp)
                except ConnectionError:
                    return resp
                self._finish(n, prompt_tokens, count)
                return resp
            await self._sleep_latency(count)
            text = self._text(0, count)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            self._finish(n, prompt_tokens, count)
            return _json_response(out)
        finally:
            self.in_flight -= 1

    # --- health and information ---------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self.health_requests += 1
        if self.hung or self.crashing:
            await self.hang()
        if self.phase != "ready" or self.unhealthy:
            return web.Response(status=503)
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        """SGLang answers this by generating one token, so slowness shows here too."""
        resp = await self.health(request)
        if resp.status == 200:
            ttft, _ = self._timing()
            if ttft > 0:
                await asyncio.sleep(ttft)
            if self.hung:
                await self.hang()
        return resp

    async def _answerable(self) -> None:
        if self.hung or self.crashing:
            await self.hang()

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
        await self._answerable()
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
                "version": f"modelserverd-sim-{__version__}",
                "simulation": True,
                "note": BANNER,
                "sim": {
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

    async def metrics(self, request: web.Request) -> web.Response:
        await self._answerable()
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
            f"sglang:num_running_reqs{label} {self.in_flight}",
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
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")

        if mode == "normal":
            self.unhealthy = False
            self.slow_factor = 1.0
            self.error_rate = 0.0
            self.crash_after = self.hang_after = self.error_after = None
        elif mode == "slow" and slow is None:
            slow = 10.0
        elif mode == "error" and rate is None:
            rate = 1.0
        elif mode == "unhealthy":
            self.unhealthy = True
        if slow is not None:
            self.slow_factor = float(slow)
        if rate is not None:
            self.error_rate = float(rate)
        if code is not None:
            self.exit_code = code
        if mode is not None:
            log(f"fault mode -> {mode} (via /sim/fault)")
        if mode == "hang":
            answer = self.state()
            answer["mode"] = "hang"
            self.enter_hang("via /sim/fault")
            return _json_response(answer)
        if mode == "crash":
            answer = self.state()
            answer["mode"] = "crash"
            resp = _json_response(answer)
            await resp.prepare(request)
            await resp.write_eof()
            self.crash("via /sim/fault")
            return resp
        return _json_response(self.state())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health_generate)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/state", self.sim_state)
        app.router.add_post("/sim/fault", self.sim_fault)
        return app


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


async def serve(sim: Simulator) -> int:
    """Startup phases, then serve until SIGTERM/SIGINT. Returns the exit code."""
    opts = sim.opts
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(name: str) -> None:
        log(f"{name} received, shutting down")
        stop.set()

    if opts.ignore_sigterm:
        loop.add_signal_handler(
            signal.SIGTERM, lambda: log("SIGTERM ignored (--sim-ignore-sigterm)")
        )
    else:
        loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")

    if opts.startup_s > 0:
        log(f"loading (simulated) for {opts.startup_s:g}s; the port stays closed")
    if await _wait(stop, opts.startup_s):
        return 0
    if opts.crash_after == 0:
        sim.crash("during startup (--sim-crash-after 0)")
        await sim.hang()

    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        log(f"error: cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}")
        await runner.cleanup()
        return 1
    sim.phase = "warmup"
    log(f"pid={os.getpid()} listening on {_url(opts.host, opts.port)}")
    if opts.warmup_s > 0:
        log(f"warming up (simulated) for {opts.warmup_s:g}s; /health answers 503")
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
        code = asyncio.run(serve(sim))
    finally:
        _stop_children(children, opts.children_survive)
        if registered:
            try:
                file_gpu_unregister(opts.gpu_file or "", pid)
            except GpuError as exc:
                log(f"cannot release GPU memory: {exc}")
        log(f"stopped (exit code {code})")
    return code
