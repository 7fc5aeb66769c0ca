"""Command line of the simulator: SGLang's launch flags plus ``--sim-*`` knobs.

The daemon launches the simulator exactly as it launches SGLang, so the SGLang
flags it passes must be accepted; flags the simulator has no use for are
accepted and ignored (and reported), the way an upgrade that adds flags to
``extra_args`` must not break a simulated host.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .profiles import DEFAULT_PROFILE, PROFILES

DEFAULT_MEM_FRACTION = 0.88
# server_args.py computes --max-running-requests from GPU memory; a few hundred is
# typical for an 8B model on one large GPU.
DEFAULT_MAX_RUNNING = 256
# The per-token time a full batch adds, as a share per other running request:
# decode steps grow with the batch (more KV cache to read per step).
DEFAULT_BATCH_SLOWDOWN = 0.01
# managers/tokenizer_manager.py sigterm_watchdog: it looks every 5 s whether a
# SIGTERM arrived and then whether the drain is over.
DEFAULT_DRAIN_POLL_S = 5.0


@dataclass(frozen=True)
class SimOptions:
    model_path: str
    host: str
    port: int
    tp_size: int
    nccl_port: int | None
    base_gpu_id: int
    mem_fraction_static: float
    served_model_name: str | None
    max_running_requests: int
    max_total_tokens: int | None
    chunked_prefill_size: int | None
    enable_metrics: bool
    reasoning_parser: str | None
    tool_call_parser: str | None
    incremental_streaming_output: bool
    profile: str
    startup_s: float
    warmup_s: float
    ttft_s: float
    token_latency_s: float
    batch_slowdown: float
    reasoning_tokens: int
    drain_poll_s: float
    noise: float
    seed: int | None
    output_tokens: int
    slow_factor: float
    crash_after: int | None
    hang_after: int | None
    hang_kind: str
    error_after: int | None
    error_rate: float
    exit_code: int
    gpu_file: str | None
    gpu_mib: int | None
    children: int
    children_survive: bool
    children_leave_group: bool
    orphan_lifetime_s: float
    ignore_sigterm: bool
    ignored: tuple[str, ...] = ()

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


EPILOG = """\
endpoints (SGLang's paths and shapes):
  GET  /health, /health_generate    200 ready, 503 warming up or unhealthy
  POST /generate                    {"text" | "input_ids", "sampling_params", "stream"}
  POST /v1/chat/completions, /v1/completions   OpenAI shape, "stream": true for SSE
  GET  /v1/models, /get_model_info, /get_server_info, /metrics
  GET  /sim/state                   counters, fault mode, children, GPUs
  POST /sim/fault                   {"mode": "normal" | "hang" | "crash" | "error" | "slow"
                                     | "unhealthy", "slow_factor", "error_rate", "exit_code"}
    normal clears every fault (and pending --sim-*-after triggers); hang stops all
    answers for good; crash exits right after answering; unhealthy answers 503.

log lines tests wait for: "sim: pid=N listening on http://HOST:PORT", "sim: ready".
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisord_ms.sim",
        formatter_class=_HelpFormatter,
        epilog=EPILOG,
        description=(
            "modelserverd simulator (not a real model): an SGLang stand-in that speaks "
            "SGLang's HTTP API with configurable latency and faults, for hosts without "
            "GPUs. SGLang launch flags it does not simulate are accepted and ignored."
        ),
    )
    sg = parser.add_argument_group("SGLang launch flags (same meaning as sglang.launch_server)")
    sg.add_argument("--model-path", default="simulated-model", help="shown in model info")
    sg.add_argument("--host", default="127.0.0.1")
    sg.add_argument("--port", type=int, default=30000)
    sg.add_argument(
        "--tp-size",
        "--tensor-parallel-size",
        dest="tp_size",
        type=_positive_int,
        default=1,
        help="GPUs used when CUDA_VISIBLE_DEVICES is not set",
    )
    sg.add_argument("--nccl-port", type=int, default=None, help="accepted, unused")
    sg.add_argument(
        "--base-gpu-id",
        type=_non_negative_int,
        default=0,
        help="first GPU used when CUDA_VISIBLE_DEVICES is not set",
    )
    sg.add_argument(
        "--mem-fraction-static",
        type=_ratio,
        default=DEFAULT_MEM_FRACTION,
        help="share of each GPU held when --sim-gpu-mib is not given",
    )
    sg.add_argument("--served-model-name", default=None)
    sg.add_argument(
        "--max-running-requests",
        type=_positive_int,
        default=DEFAULT_MAX_RUNNING,
        help="requests decoded together; the rest wait in the queue",
    )
    sg.add_argument(
        "--max-total-tokens",
        type=_positive_int,
        default=None,
        help="KV cache size in tokens (only reported as token_usage)",
    )
    sg.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="tokens prefilled per scheduler step; -1 turns chunking off (reported only; "
        "the default follows GPU memory as server_args.py does)",
    )
    sg.add_argument(
        "--enable-metrics",
        action="store_true",
        help="serve /metrics (without it SGLang has no /metrics)",
    )
    sg.add_argument(
        "--reasoning-parser",
        default=None,
        help="chat answers think first: delta.reasoning_content before delta.content",
    )
    sg.add_argument(
        "--tool-call-parser",
        default=None,
        help="chat requests with tools are answered with delta.tool_calls",
    )
    sg.add_argument(
        "--incremental-streaming-output",
        "--stream-output",
        dest="incremental_streaming_output",
        action="store_true",
        help="/generate stream chunks carry only the new text, not the text so far",
    )

    sim = parser.add_argument_group("simulation knobs")
    sim.add_argument(
        "--sim-sglang-profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="which SGLang generation to behave as (see supervisord_ms/sim/profiles.py)",
    )
    sim.add_argument(
        "--sim-startup-s",
        type=_non_negative_float,
        default=0.0,
        help="seconds before the port is bound (connections refused, like weight loading)",
    )
    sim.add_argument(
        "--sim-warmup-s",
        type=_non_negative_float,
        default=0.0,
        help="seconds after binding during which /health answers 503",
    )
    sim.add_argument(
        "--sim-ttft-s",
        type=_non_negative_float,
        default=0.02,
        help="time to first token of each generation request",
    )
    sim.add_argument(
        "--sim-token-latency-s",
        type=_non_negative_float,
        default=0.005,
        help="time per output token",
    )
    sim.add_argument(
        "--sim-batch-slowdown",
        type=_non_negative_float,
        default=DEFAULT_BATCH_SLOWDOWN,
        help="per-token time grows by this share for each other running request",
    )
    sim.add_argument(
        "--sim-reasoning-tokens",
        type=_non_negative_int,
        default=24,
        help="with --reasoning-parser: tokens of reasoning before the answer",
    )
    sim.add_argument(
        "--sim-drain-poll-s",
        type=_positive_float,
        default=DEFAULT_DRAIN_POLL_S,
        help="after SIGTERM, how often the drain looks for the end (SGLang: 5 s)",
    )
    sim.add_argument(
        "--sim-noise",
        type=_ratio,
        default=0.0,
        help="each request's latency is multiplied by uniform(1-NOISE, 1+NOISE)",
    )
    sim.add_argument("--sim-seed", type=int, default=None, help="seed of noise and error rate")
    sim.add_argument(
        "--sim-output-tokens",
        type=_non_negative_int,
        default=32,
        help="answer length in tokens; a request's max tokens caps it",
    )
    sim.add_argument(
        "--sim-slow-factor",
        type=_positive_float,
        default=1.0,
        help="multiplies every latency (also set by POST /sim/fault mode=slow)",
    )
    sim.add_argument(
        "--sim-crash-after",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="exit with --sim-exit-code after answering N generation requests "
        "(0: right after --sim-startup-s, before binding the port)",
    )
    sim.add_argument(
        "--sim-hang-after",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="after N generation requests the server hangs (0: hung from the start); "
        "--sim-hang-kind says how",
    )
    sim.add_argument(
        "--sim-hang-kind",
        choices=("scheduler", "freeze"),
        default="scheduler",
        help="scheduler: the scheduler stops while the HTTP front answers (the usual "
        "GPU/NCCL hang); freeze: the whole process is stopped (SIGSTOP)",
    )
    sim.add_argument(
        "--sim-error-after",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="answer generation requests with 500 after N of them",
    )
    sim.add_argument(
        "--sim-error-rate",
        type=_ratio,
        default=0.0,
        metavar="P",
        help="each generation request fails with 500 with probability P",
    )
    sim.add_argument("--sim-exit-code", type=int, default=1, help="exit code of a simulated crash")
    sim.add_argument(
        "--sim-gpu-file",
        default=None,
        metavar="PATH",
        help="file: GPU view (gpus.json) in which to hold GPU memory while alive",
    )
    sim.add_argument(
        "--sim-gpu-mib",
        type=_non_negative_int,
        default=None,
        metavar="MIB",
        help="MiB held on each GPU used (CUDA_VISIBLE_DEVICES, else --tp-size GPUs from "
        "--base-gpu-id); default: --mem-fraction-static of the GPU. With --sim-children "
        "the children hold it, split evenly, as SGLang's scheduler processes do",
    )
    sim.add_argument(
        "--sim-children",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="child processes, like SGLang's schedulers (default: one per TP rank, "
        "--tp-size); they hold the GPU memory, and one that dies takes the server down",
    )
    sim.add_argument(
        "--sim-children-survive",
        action="store_true",
        help="children ignore SIGTERM/SIGHUP and outlive their parent, holding GPU "
        "memory as SGLang's orphaned schedulers do",
    )
    sim.add_argument(
        "--sim-children-leave-group",
        action="store_true",
        help="children call setsid(), leaving the parent's process group",
    )
    sim.add_argument(
        "--sim-orphan-lifetime-s",
        type=_non_negative_float,
        default=3600.0,
        help="a surviving child whose parent is gone exits after this long, so a "
        "forgotten test leaves nothing behind for good (0: never)",
    )
    sim.add_argument(
        "--sim-ignore-sigterm",
        action="store_true",
        help="the main process ignores SIGTERM (only SIGKILL stops it)",
    )
    return parser


def parse_options(argv: Sequence[str] | None = None) -> SimOptions:
    """Parse the command line; unknown ``--flag [value]`` pairs are kept in ``ignored``."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    typos = [a for a in rest if a.startswith("--sim-")]
    if typos:
        # An SGLang flag may be new to us; a simulator flag we do not know is a typo
        # that would otherwise silently turn a fault test into a no-op.
        parser.error(f"unknown simulator flag {typos[0].split('=')[0]} (see --help)")
    return SimOptions(
        model_path=ns.model_path,
        host=ns.host,
        port=ns.port,
        tp_size=ns.tp_size,
        nccl_port=ns.nccl_port,
        base_gpu_id=ns.base_gpu_id,
        mem_fraction_static=ns.mem_fraction_static,
        served_model_name=ns.served_model_name,
        max_running_requests=ns.max_running_requests,
        max_total_tokens=ns.max_total_tokens,
        chunked_prefill_size=ns.chunked_prefill_size,
        enable_metrics=ns.enable_metrics,
        reasoning_parser=ns.reasoning_parser,
        tool_call_parser=ns.tool_call_parser,
        incremental_streaming_output=ns.incremental_streaming_output,
        profile=ns.sim_sglang_profile,
        startup_s=ns.sim_startup_s,
        warmup_s=ns.sim_warmup_s,
        ttft_s=ns.sim_ttft_s,
        token_latency_s=ns.sim_token_latency_s,
        batch_slowdown=ns.sim_batch_slowdown,
        reasoning_tokens=ns.sim_reasoning_tokens,
        drain_poll_s=ns.sim_drain_poll_s,
        noise=ns.sim_noise,
        seed=ns.sim_seed,
        output_tokens=ns.sim_output_tokens,
        slow_factor=ns.sim_slow_factor,
        crash_after=ns.sim_crash_after,
        hang_after=ns.sim_hang_after,
        hang_kind=ns.sim_hang_kind,
        error_after=ns.sim_error_after,
        error_rate=ns.sim_error_rate,
        exit_code=ns.sim_exit_code,
        gpu_file=ns.sim_gpu_file,
        gpu_mib=ns.sim_gpu_mib,
        children=ns.tp_size if ns.sim_children is None else ns.sim_children,
        children_survive=ns.sim_children_survive,
        children_leave_group=ns.sim_children_leave_group,
        orphan_lifetime_s=ns.sim_orphan_lifetime_s,
        ignore_sigterm=ns.sim_ignore_sigterm,
        ignored=tuple(rest),
    )


def gpu_indexes(opts: SimOptions, environ: dict[str, str] | None = None) -> list[int]:
    """The GPUs this server uses: ``CUDA_VISIBLE_DEVICES`` when set (the daemon sets it),
    else ``--tp-size`` GPUs from ``--base-gpu-id``. Non-numeric entries (GPU UUIDs)
    cannot name a simulated GPU and raise ValueError."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        out = []
        for part in visible.split(","):
            part = part.strip()
            if not part.isdigit():
                raise ValueError(
                    f"CUDA_VISIBLE_DEVICES entry {part!r} is not a GPU index; the "
                    "simulated GPU view only knows numeric indexes"
                )
            out.append(int(part))
        return out
    return list(range(opts.base_gpu_id, opts.base_gpu_id + opts.tp_size))
