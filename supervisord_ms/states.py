"""Server states, shared by every module (stdlib only, so anything may import it).

Local servers move through the supervisor's state machine; servers that this
host does not manage (another host's, or ``managed = false``) are only probed
and are either READY or UNREACHABLE.
"""

from __future__ import annotations

STOPPED = "stopped"
WAITING_GPU = "waiting_gpu"
PORT_BUSY = "port_busy"
STARTING = "starting"
READY = "ready"
UNHEALTHY = "unhealthy"
STOPPING = "stopping"
BACKOFF = "backoff"
FATAL = "fatal"
UNREACHABLE = "unreachable"

LOCAL_STATES = (
    STOPPED,
    WAITING_GPU,
    PORT_BUSY,
    STARTING,
    READY,
    UNHEALTHY,
    STOPPING,
    BACKOFF,
    FATAL,
)
REMOTE_STATES = (READY, UNREACHABLE)
ALL_STATES = LOCAL_STATES + (UNREACHABLE,)

# A process of ours exists in these states (it may have to be stopped).
RUNNING_STATES = (STARTING, READY, UNHEALTHY, STOPPING)
# States in which the server may receive traffic.
SERVING_STATES = (READY,)

RESTART_REASONS = (
    "crash",
    "hang",
    "unhealthy",
    "startup_timeout",
    "manual",
    "config_change",
    "gpu_lost",
)
