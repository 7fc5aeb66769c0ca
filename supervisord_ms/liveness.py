"""When a ready server counts as hung: a pure policy, table-tested.

SGLang's usual hang is a stuck scheduler behind a live HTTP front: the process
lives, ``/v1/models`` answers, streams get no tokens. Its own ``/health`` notices
only after ``SGLANG_HEALTH_CHECK_TIMEOUT`` (20 s), and legacy versions never do.
The scheduler answers load queries (``/v1/loads``, ``/get_load``) between batches
even when it is busy with a long queue, so a load query that stays unanswered is
the evidence: a busy server answers it, a hung one does not.

How long a silence is evidence depends on how long one batch can take, since the
answer waits for the batch in progress. With chunked prefill (SGLang's default,
``chunked_prefill_size`` 2048 to 16384 tokens by GPU memory) no step is long, so a
server whose every answer came quickly is called hung after half of
``hang_timeout_s``; one that has shown a slow step gets ``STEP_MARGIN`` times that
step; and a server without chunked prefill (``--chunked-prefill-size -1``, where one
long prompt is one step) or that did not say gets the whole ``hang_timeout_s``.
The sooner a hung server is killed, the sooner the requests stuck on it fail over:
a gateway retries them on another worker, a client falls back.
"""

from __future__ import annotations

# A silence this many times the slowest load answer seen is no longer one step.
STEP_MARGIN = 4.0
# The shortest silence called a hang, as a share of hang_timeout_s.
FLOOR_SHARE = 0.5


def hang_silence_s(*, hang_timeout_s: float, slowest_answer_s: float, steps_bounded: bool) -> float:
    """How long the scheduler may stay silent before it counts as hung: never more
    than ``hang_timeout_s``; less when its steps are known to be short."""
    if not steps_bounded:
        return hang_timeout_s
    return min(hang_timeout_s, max(hang_timeout_s * FLOOR_SHARE, STEP_MARGIN * slowest_answer_s))


def scheduler_hung(
    *,
    last_answer_at: float,
    pending_since: float | None,
    now: float,
    silence_s: float,
) -> bool:
    """True when the scheduler has answered no load query for ``silence_s`` (see
    :func:`hang_silence_s`) and the query now outstanding was sent at least half of
    that ago (so that a pause in the daemon's own asking is never taken for
    silence)."""
    if pending_since is None:
        return False
    return now - last_answer_at >= silence_s and now - pending_since >= silence_s / 2
