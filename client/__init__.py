"""ms_client: completions from the best SGLang server, chosen by modelserverd.

    from ms_client import ModelServer
    server = ModelServer("8B")
    print(server.get_completion("Say hello").text)

Imports only the standard library (and the daemon's stdlib-only config loader), so
it costs a program nothing to use. The ``ms-client`` command lives in ``ms_client.cli``.
"""

from supervisord_ms import __version__

from ._client import CompletionStream, ModelServer
from ._exceptions import (
    Attempt,
    ClientError,
    ConfigProblem,
    DaemonError,
    NoServerAvailable,
    RequestRejected,
    StreamInterrupted,
)
from ._models import Completion

__all__ = [
    "Attempt",
    "ClientError",
    "Completion",
    "CompletionStream",
    "ConfigProblem",
    "DaemonError",
    "ModelServer",
    "NoServerAvailable",
    "RequestRejected",
    "StreamInterrupted",
    "__version__",
]
