"""SGLang's scheduler in miniature: continuous batching with finite capacity.

In SGLang the HTTP front (tokenizer manager) runs in the main process and hands
every request to the scheduler (``managers/scheduler.py``), which runs at most
``--max-running-requests`` of them in one batch and queues the rest; each decode
step produces one token for every running request, and a bigger batch makes each
step slower. Load questions (``/get_load``, ``/v1/loads``) and health checks go
through the scheduler too, so a hung scheduler leaves the front answering
``/v1/models`` while streams, load and health wait for ever.

This module models exactly that and nothing of HTTP: one :class:`Sequence` per
request, a FIFO queue for slots, per-token pacing that grows with the batch, a
``hung`` state that freezes every output and load answer, a ``busy`` state (a long
foreign queue ahead of every new request, with the batch still producing), and
``last_output`` (the tokenizer manager's ``last_receive_tstamp``) that health
checks read.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

# How often the phantom batch of a busy server produces output.
BUSY_STEP_S = 0.05


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    token_s: float
    batch_slowdown: float  # extra per-token time per other running request, as a share
    noise: float


@dataclass
class Busy:
    """A queue the simulator did not receive: ``queued`` requests ahead of every new
    one, which gets its first token only after ``first_token_s``."""

    queued: int
    first_token_s: float


class Sequence:
    """One request inside the scheduler (SGLang's ``Req``)."""

    __slots__ = ("max_new", "done", "slot")

    def __init__(self, max_new: int):
        self.max_new = max_new
        self.done = 0
        self.slot = False


class Scheduler:
    def __init__(
        self,
        *,
        max_running: int,
        max_total_tokens: int | None,
        timing: Timing,
        rng: random.Random,
    ):
        self.max_running = max_running
        self.max_total_tokens = max_total_tokens
        self.timing = timing
        self.rng = rng
        self.slow_factor = 1.0
        self.running: set[Sequence] = set()
        self.waiting: deque[tuple[Sequence, asyncio.Future[None]]] = deque()
        self.busy: Busy | None = None
        self.last_output = 0.0  # time.monotonic() of the last token produced
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._busy_task: asyncio.Task[None] | None = None
        self._stall: asyncio.TimerHandle | None = None

    # --- faults ------------------------------------------------------------------
    @property
    def hung(self) -> bool:
        return not self._resumed.is_set()

    def hang(self) -> None:
        """The usual GPU/NCCL hang: no step ever completes again."""
        self._cancel_stall()
        self._resumed.clear()

    def resume(self) -> None:
        self._cancel_stall()
        self._resumed.set()

    def stall(self, seconds: float) -> None:
        """One forward step that takes ``seconds`` (an unchunked prefill of a long
        prompt, a first-time kernel compile): nothing else happens until it ends, load
        queries included, since scheduler.py's event loop reads its input
        (``process_input_requests``) only between batches."""
        self._cancel_stall()
        self._resumed.clear()
        self._stall = asyncio.get_running_loop().call_later(seconds, self._end_stall)

    @property
    def stalled(self) -> bool:
        return self._stall is not None

    def _end_stall(self) -> None:
        self._stall = None
        self._resumed.set()

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    async def alive(self) -> None:
        """Wait for the scheduler to be able to answer (for ever when hung)."""
        await self._resumed.wait()

    def set_busy(self, busy: Busy | None) -> None:
        self.busy = busy
        if busy is not None and (self._busy_task is None or self._busy_task.done()):
            self._busy_task = asyncio.get_running_loop().create_task(self._phantom_batch())

    async def _phantom_batch(self) -> None:
        """The batch of a busy server keeps producing tokens: it is healthy."""
        while self.busy is not None:
            await self.alive()
            self.last_output = time.monotonic()
            await asyncio.sleep(BUSY_STEP_S)

    # --- load ----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        if self.busy is not None:
            return self.max_running
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + (self.busy.queued if self.busy else 0)

    @property
    def num_tokens(self) -> int:
        return sum(s.done for s in self.running)

    @property
    def token_usage(self) -> float:
        if not self.max_total_tokens:
            return round(self.num_running / self.max_running, 4)
        return round(min(1.0, self.num_tokens / self.max_total_tokens), 4)

    async def load(self) -> dict[str, float]:
        """What the scheduler reports when asked; waits while it is hung."""
        await self.alive()
        return {
            "num_running_reqs": self.num_running,
            "num_waiting_reqs": self.num_waiting,
            "num_tokens": self.num_tokens,
            "token_usage": self.token_usage,
        }

    # --- generation --------------------------------------------------------------------
    def _per_token_s(self) -> float:
        t = self.timing
        batch = max(1, len(self.running))
        return t.token_s * self.slow_factor * (1.0 + t.batch_slowdown * (batch - 1))

    def _jitter(self) -> float:
        noise = self.timing.noise
        return self.rng.uniform(1.0 - noise, 1.0 + noise) if noise else 1.0

    async def _acquire(self, seq: Sequence) -> None:
        if self.busy is not None:
            await asyncio.sleep(self.busy.first_token_s)
        if len(self.running) < self.max_running and not self.waiting:
            self.running.add(seq)
            seq.slot = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, fut)
        self.waiting.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if entry in self.waiting:
                self.waiting.remove(entry)
            elif seq.slot:  # granted in the same instant as the cancel
                self._release(seq)
            raise

    def _release(self, seq: Sequence) -> None:
        if not seq.slot:
            return
        seq.slot = False
        self.running.discard(seq)
        while self.waiting and len(self.running) < self.max_running:
            nxt, fut = self.waiting.popleft()
            if fut.done():
                continue
            self.running.add(nxt)
            nxt.slot = True
            fut.set_result(None)

    async def generate(self, max_new: int) -> AsyncIterator[int]:
        """Yield the number of tokens produced so far, once per decode step, ``max_new``
        in all (0 tokens: one step that yields 0, as a prefill-only request).

        Closing the generator (a client that went away) frees the slot at once, as
        SGLang aborts a request whose connection closed."""
        seq = Sequence(max_new)
        try:
            await self._acquire(seq)
            await self.alive()
            await asyncio.sleep(self.timing.ttft_s * self.slow_factor * self._jitter())
            while True:
                await self.alive()
                self.last_output = time.monotonic()
                if seq.done >= max_new:
                    if max_new == 0:
                        yield 0
                    return
                seq.done += 1
                yield seq.done
                if seq.done >= max_new:
                    return
                step = self._per_token_s() * self._jitter()
                if step > 0:
                    await asyncio.sleep(step)
        finally:
            self._release(seq)

    async def tokens_all_at_once(self, max_new: int) -> None:
        """Run a request to its end without streaming (whole answers)."""
        async for _ in self.generate(max_new):
            pass
