"""A stand-in for the SGLang gateway's worker API (``sglang-router`` 0.3.2), in process.

Written from the gateway's source (sgl-project/sglang, ``sgl-model-gateway/src/``:
``server.rs`` for the routes, ``core/worker_service.rs`` for the answers and error
codes, ``core/job_queue.rs`` for the background jobs and their ``job_status``,
``protocols/worker_spec.rs`` for the bodies, ``middleware.rs`` ``auth_middleware`` for
the key) and checked against the 0.3.2 binary on loopback (``docs/fleet.md``):

* ``POST /workers {"url", ...}``: 202 ``{"status": "accepted", "worker_id", "url",
  "location", "message"}`` plus a ``Location`` header. The id is reserved for the URL,
  so posting a URL again answers the same id (the job then fails: "already exists").
  The worker is added by a job: it is listed only once the job is done.
* ``GET /workers``: ``{"workers": [info, ...], "total", "stats": {"prefill_count",
  "decode_count", "regular_count"}}``, finished registrations only.
* ``GET /workers/{id}``: the info (plus ``job_status`` while a job for its URL is
  known), a pending stub while only its add job exists, 404 otherwise; 400 for an id
  that is not a UUID.
* ``DELETE /workers/{id}``: 202 (removal queued), 404 unknown, 400 not a UUID.
* ``PUT /workers/{id} {"priority", "cost"}``: 202.
* ``api_key``: every worker route needs ``Authorization: Bearer <key>`` (exactly that
  prefix), else 401 with an empty body.
* POST/PUT without ``Content-Type: application/json``: 415; a body without ``url``: 422.

Test knobs: :meth:`FakeGateway.refuse` (stop listening: connection refused),
:meth:`FakeGateway.restart` (listen again, optionally empty, as a restarted gateway
is), ``error_status`` (answer every worker call with that 5xx), ``answer_delay_s``
(answer slowly), ``add_delay_s`` (how long an add job runs), ``fail_adds`` (URLs whose
add job fails, as for a worker the gateway cannot reach), :meth:`add_foreign` (a worker
another host registered). Every call is recorded in ``calls``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Call:
    method: str
    path: str
    body: Any
    authorization: str | None
    status: int
    at: float


@dataclass
class Worker:
    id: str
    url: str
    priority: int = 50
    cost: float = 1.0

    def info(self) -> dict[str, Any]:
        # The fields of worker_spec.rs WorkerInfo for an HTTP worker, as 0.3.2 lists them.
        return {
            "id": self.id,
            "url": self.url,
            "model_id": "/models/fake",
            "priority": self.priority,
            "cost": self.cost,
            "worker_type": "regular",
            "is_healthy": True,
            "load": 0,
            "connection_mode": "HTTP",
            "metadata": {"tp_size": "1"},
            "disable_health_check": False,
        }


@dataclass
class FakeGateway:
    port: int = field(default_factory=free_port)
    api_key: str | None = None
    add_delay_s: float = 0.0
    remove_delay_s: float = 0.0
    answer_delay_s: float = 0.0
    error_status: int | None = None
    fail_adds: dict[str, str] = field(default_factory=dict)  # url -> job error

    def __post_init__(self) -> None:
        self.calls: list[Call] = []
        self.workers: dict[str, Worker] = {}  # id -> registered worker
        self.reserved: dict[str, str] = {}  # url -> id (registry's reserve_id_for_url)
        self.jobs: dict[str, dict[str, Any]] = {}  # url -> job_status
        self.restarts = 0
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeGateway:
        app = web.Application()
        app.router.add_route("*", "/workers", self._workers)
        app.router.add_route("*", "/workers/{worker_id}", self._worker)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        return self

    async def refuse(self) -> None:
        """Stop listening: calls now get "connection refused". State is kept, as for
        a gateway behind a network cut; :meth:`restart` listens again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, *, empty: bool = True) -> None:
        """Listen again; ``empty``: with no workers, as after a real restart (the
        gateway keeps its registry in memory only, and ids are new)."""
        await self.refuse()
        if empty:
            for task in self._tasks:
                task.cancel()
            self.workers.clear()
            self.reserved.clear()
            self.jobs.clear()
        self.restarts += 1
        await self.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.refuse()

    # --- helpers for tests ---------------------------------------------------------------
    def add_foreign(self, url: str) -> str:
        """Register a worker directly, as another host's daemon would have."""
        wid = str(uuid.uuid4())
        self.reserved[url] = wid
        self.workers[wid] = Worker(wid, url)
        return wid

    def listed_urls(self) -> list[str]:
        return sorted(w.url for w in self.workers.values())

    def id_of(self, url: str) -> str | None:
        for w in self.workers.values():
            if w.url == url:
                return w.id
        return None

    def calls_to(self, method: str, prefix: str = "/workers") -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.startswith(prefix)]

    # --- the API ---------------------------------------------------------------------------
    async def _gate(self, request: web.Request) -> web.Response | None:
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        if self.api_key is not None:
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or header[7:] != self.api_key:
                return web.Response(status=401)
        if self.error_status is not None:
            return web.Response(status=self.error_status, text="upstream trouble")
        return None

    async def _record(self, request: web.Request, response: web.Response) -> web.Response:
        body = None
        if request.body_exists:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        self.calls.append(
            Call(
                request.method,
                request.path,
                body,
                request.headers.get("Authorization"),
                response.status,
                time.monotonic(),
            )
        )
        return response

    async def _json_body(
        self, request: web.Request
    ) -> tuple[dict[str, Any] | None, web.Response | None]:
        if request.content_type != "application/json":
            return None, web.Response(
                status=415, text="Expected request with `Content-Type: application/json`"
            )
        try:
            body = json.loads(await request.read())
        except ValueError:
            return None, web.Response(status=400, text="Failed to parse the request body as JSON")
        if not isinstance(body, dict):
            return None, web.Response(status=422, text="Failed to deserialize the JSON body")
        return body, None

    async def _workers(self, request: web.Request) -> web.Response:
        refused = await self._gate(request)
        if refused is not None:
            return await self._record(request, refused)
        if request.method == "GET":
            infos = [w.info() for w in self.workers.values()]
            return await self._record(
                request,
                web.json_response(
                    {
                        "workers": infos,
                        "total": len(infos),
                        "stats": {
                            "prefill_count": 0,
                            "decode_count": 0,
                            "regular_count": len(infos),
                        },
                    }
                ),
            )
        if request.method != "POST":
            return await self._record(request, web.Response(status=405))
        body, error = await self._json_body(request)
        if error is not None:
            return await self._record(request, error)
        assert body is not None
        url = body.get("url")
        if not isinstance(url, str):
            return await self._record(
                request,
                web.Response(
                    status=422,
                    text="Failed to deserialize the JSON body into the target type: "
                    "missing field `url`",
                ),
            )
        wid = self.reserved.setdefault(url, str(uuid.uuid4()))
        self.jobs[url] = _job("AddWorker", url, "pending")
        self._spawn(self._add_job(wid, url, body))
        location = f"/workers/{wid}"
        return await self._record(
            request,
            web.json_response(
                {
                    "status": "accepted",
                    "worker_id": wid,
                    "url": url,
                    "location": location,
                    "message": "Worker addition queued for background processing",
                },
                status=202,
                headers={"Location": location},
            ),
        )

    async def _worker(self, request: web.Request) -> web.Response:
        refused = await self._gate(request)
        if refused is not None:
            return await self._record(request, refused)
        raw = request.match_info["worker_id"]
        try:
            uuid.UUID(raw)
        except ValueError:
            return await self._record(
                request,
                web.json_response(
                    {
                        "error": f"Invalid worker_id '{raw}' (expected UUID). Error: invalid",
                        "code": "BAD_REQUEST",
                    },
                    status=400,
                ),
            )
        url = next((u for u, i in self.reserved.items() if i == raw), None)
        not_found = web.json_response(
            {"error": f"Worker {raw} not found", "code": "WORKER_NOT_FOUND"}, status=404
        )
        if request.method == "GET":
            worker = self.workers.get(raw)
            if worker is not None:
                info = worker.info()
                if worker.url in self.jobs:
                    info["job_status"] = self.jobs[worker.url]
                return await self._record(request, web.json_response(info))
            if url is not None and url in self.jobs:
                return await self._record(
                    request,
                    web.json_response(
                        {
                            "id": raw,
                            "url": url,
                            "model_id": "unknown",
                            "priority": 0,
                            "cost": 1.0,
                            "worker_type": "unknown",
                            "is_healthy": False,
                            "load": 0,
                            "connection_mode": "unknown",
                            "disable_health_check": False,
                            "job_status": self.jobs[url],
                        }
                    ),
                )
            return await self._record(request, not_found)
        if url is None:
            return await self._record(request, not_found)
        if request.method == "DELETE":
            self.jobs[url] = _job("RemoveWorker", url, "pending")
            self._spawn(self._remove_job(raw, url))
            return await self._record(
                request,
                web.json_response(
                    {
                        "status": "accepted",
                        "worker_id": raw,
                        "message": "Worker removal queued for background processing",
                    },
                    status=202,
                ),
            )
        if request.method == "PUT":
            body, error = await self._json_body(request)
            if error is not None:
                return await self._record(request, error)
            assert body is not None
            worker = self.workers.get(raw)
            if worker is not None:
                if isinstance(body.get("priority"), int):
                    worker.priority = body["priority"]
                if isinstance(body.get("cost"), (int, float)):
                    worker.cost = float(body["cost"])
            return await self._record(
                request,
                web.json_response(
                    {
                        "status": "accepted",
                        "worker_id": raw,
                        "message": "Worker update queued for background processing",
                    },
                    status=202,
                ),
            )
        return await self._record(request, web.Response(status=405))

    # --- background jobs (job_queue.rs) ------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_job(self, wid: str, url: str, body: dict[str, Any]) -> None:
        self.jobs[url] = _job("AddWorker", url, "processing")
        await asyncio.sleep(self.add_delay_s)
        if any(w.url == url for w in self.workers.values()):
            self.jobs[url] = _job("AddWorker", url, "failed", f"Worker {url} already exists")
            return
        if url in self.fail_adds:
            self.jobs[url] = _job("AddWorker", url, "failed", self.fail_adds[url])
            return
        if self.reserved.get(url) != wid:
            return  # removed (and its reservation released) while the job ran
        worker = Worker(wid, url)
        if isinstance(body.get("priority"), int):
            worker.priority = body["priority"]
        if isinstance(body.get("cost"), (int, float)):
            worker.cost = float(body["cost"])
        self.workers[wid] = worker
        self.jobs.pop(url, None)  # a finished job leaves no status behind

    async def _remove_job(self, wid: str, url: str) -> None:
        self.jobs[url] = _job("RemoveWorker", url, "processing")
        await asyncio.sleep(self.remove_delay_s)
        self.workers.pop(wid, None)
        if self.reserved.get(url) == wid:
            del self.reserved[url]
        self.jobs.pop(url, None)


def _job(job_type: str, url: str, status: str, message: str | None = None) -> dict[str, Any]:
    return {
        "job_type": job_type,
        "worker_url": url,
        "status": status,
        "message": message,
        "timestamp": int(time.time()),
    }
