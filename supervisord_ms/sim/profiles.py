"""What changed between SGLang versions, as the simulator plays it.

A profile is one SGLang generation's answer to each question the daemon and the
client depend on. ``current`` follows SGLang's main branch as of 2026; ``legacy``
follows the 0.4 releases that many hosts still run. Each field names the SGLang
source it follows (paths are under ``python/sglang/srt/`` in sgl-project/sglang);
docs/sglang.md links the lines.

Behaviours that did not change between the two are not here: the port refuses
connections while weights load, ``/generate`` streams send their headers at once,
SIGTERM drains then kills the tree (``managers/tokenizer_manager.py``
``sigterm_watchdog`` and ``utils`` ``kill_process_tree``), a dead scheduler child
takes the server down.
"""

from __future__ import annotations

from dataclasses import dataclass

# entrypoints/http_server.py: HEALTH_CHECK_TIMEOUT, read from the environment.
HEALTH_CHECK_TIMEOUT_ENV = "SGLANG_HEALTH_CHECK_TIMEOUT"
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 20.0
# environ.py: when false, plain /health answers 200 without generating.
HEALTH_GENERATION_ENV = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"


@dataclass(frozen=True)
class Profile:
    name: str
    version: str
    # entrypoints/http_server.py health_generate: since SGLang PR #8444 (2025-07)
    # /health and /health_generate share one handler that answers 503 while the server is
    # starting or shutting down and otherwise submits a one-token request, looks for
    # output once a second and gives up after SGLANG_HEALTH_CHECK_TIMEOUT. Before,
    # /health was a plain 200 from the HTTP front.
    health_generates: bool
    # entrypoints/openai/serving_chat.py and serving_completions.py (SGLang PR
    # #21900, merged 2026-04-02): an OpenAI stream awaits its first chunk before the
    # response starts, so that a validation error can still be an HTTP 400; the
    # headers leave with the role chunk, at time to first token. Before, at once.
    chat_headers_at_first_chunk: bool
    # entrypoints/http_server.py: /v1/loads (SGLang PR #16976, 2026-01) is the newer
    # load endpoint; /get_load is older (a shim over /v1/loads since PR #23010).
    has_v1_loads: bool
    # server_args.py: the server argument /get_server_info reports for chunks that
    # carry only new text; "stream_output" until its rename to
    # "incremental_streaming_output" (PR #20614).
    streaming_flag: str


LEGACY = Profile(
    name="legacy",
    version="0.4.6.post5",
    health_generates=False,
    chat_headers_at_first_chunk=False,
    has_v1_loads=False,
    streaming_flag="stream_output",
)
CURRENT = Profile(
    name="current",
    version="0.5.9",
    health_generates=True,
    chat_headers_at_first_chunk=True,
    has_v1_loads=True,
    streaming_flag="incremental_streaming_output",
)
PROFILES = {p.name: p for p in (LEGACY, CURRENT)}
DEFAULT_PROFILE = CURRENT.name
