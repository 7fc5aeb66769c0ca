"""When a ready server counts as hung: a pure policy, table-tested.

SGLang's usual hang is a stuck scheduler behind a live HTTP front: the process
lives, ``/v1/models`` answers, streams get no tokens. Its own ``/health`` notices
only after ``SGLANG_HEALTH_CHECK_TIMEOUT`` (20 s), and legacy versions never do.
The scheduler answers load queries (``/v1/loads``, ``/get_load``) between batches
even when it is busy with a long queue, so a load query that stays unanswered is
the evidence: a busy server answers it, a hung one does not.
"""

from __future__ import annotations


def scheduler_hung(
    *,
    last_answer_at: float,
    pending_since: float | None,
    now: float,
    hang_timeout_s: float,
) -> bool:
    """True when the scheduler has answered no load query for ``hang_timeout_s`` and
    the query now outstanding was sent at least half of that ago (so that a pause
    in the daemon's own asking is never taken for silence)."""
    if pending_since is None:
        return False
    return now - last_answer_at >= hang_timeout_s and now - pending_since >= hang_timeout_s / 2
