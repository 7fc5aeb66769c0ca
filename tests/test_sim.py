"""The simulator behaves like the SGLang server the daemon and the client expect,
including every way it is told to fail."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from simtools import (
    free_port,
    http_json,
    http_sse,
    http_status,
    pid_alive,
    port_accepts,
    start_sim,
    wait_until,
)

from supervisord_ms.gpus import FileGpuView, write_file_gpu_view
from supervisord_ms.sim.options import gpu_indexes, parse_options

FAST = ("--sim-ttft-s", "0", "--sim-token-latency-s", "0", "--sim-drain-poll-s", "0.1")


@pytest.fixture(scope="module")
def fast_sim(tmp_path_factory):
    """One zero-latency sim shared by the read-only tests of this module, started with
    SGLang flags it does not simulate (they must be accepted)."""
    log = tmp_path_factory.mktemp("fast-sim") / "sim.log"
    sim = start_sim(
        free_port(),
        *FAST,
        "--sim-output-tokens",
        "10",
        "--served-model-name",
        "sim-8b",
        "--tp-size",
        "1",
        "--nccl-port",
        str(free_port()),
        "--mem-fraction-static",
        "0.8",
        "--trust-remote-code",
        "--context-length",
        "4096",
        "--enable-metrics",
        log_path=log,
    )
    try:
        sim.wait_ready()
        yield sim
    finally:
        sim.cleanup()


def assert_hung(sim, path="/health"):
    """A hung server accepts connections but never answers."""
    assert port_accepts(sim.host, sim.port)
    began = time.monotonic()
    with pytest.raises(OSError):
        http_json("GET", sim.url + path, timeout=1)
    assert time.monotonic() - began >= 0.9


def generate(sim, text="one two three", max_new_tokens=None, timeout=5):
    params = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    return http_json(
        "POST", sim.url + "/generate", {"text": text, "sampling_params": params}, timeout
    )


# --- startup ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "warming"),
    [
        # http_server.py health_generate: 503 while the status is Starting (current)
        ("current", 503),
        # before SGLang PR #8444, /health was the front's plain 200, warm-up or not
        ("legacy", 200),
    ],
)
def test_startup_refuses_then_health_per_profile(sim_factory, profile, warming):
    sim = sim_factory(
        None,
        *FAST,
        "--sim-startup-s",
        "1.0",
        "--sim-warmup-s",
        "1.5",
        "--sim-sglang-profile",
        profile,
    )
    seen = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = http_status(sim.url + "/health", timeout=5)
        if not seen or seen[-1] != status:
            seen.append(status)
            if status is not None and "ready" not in sim.log():
                # the scheduler is up once the port opens: generation is served
                assert generate(sim)[0] == 200
        if status == 200 and "sim: ready" in sim.log():
            break
        time.sleep(0.02)
    assert seen == ([None, 503, 200] if warming == 503 else [None, 200])
    log = sim.log()
    assert "modelserverd simulator (not a real model)" in log
    assert f"sim: pid={sim.pid} listening on http://127.0.0.1:{sim.port}" in log
    assert log.index("listening on") < log.index("sim: ready")


def test_unknown_sglang_flags_are_accepted_and_noted(fast_sim):
    assert "--trust-remote-code --context-length 4096" in fast_sim.log()
    status, info = http_json("GET", fast_sim.url + "/get_server_info")
    assert status == 200
    assert info["sim"]["ignored_flags"] == [
        "--trust-remote-code",
        "--context-length",
        "4096",
    ]
    assert info["mem_fraction_static"] == 0.8 and info["simulation"] is True
    assert info["enable_metrics"] is True and info["version"] == "0.5.9"


def test_parse_options_maps_sglang_flags():
    opts = parse_options(["--model-path", "/m", "--tp", "2", "--base-gpu-id", "3", "--foo"])
    assert (opts.tp_size, opts.base_gpu_id, opts.ignored) == (2, 3, ("--foo",))
    assert gpu_indexes(opts, {}) == [3, 4]
    assert gpu_indexes(opts, {"CUDA_VISIBLE_DEVICES": "5,1"}) == [5, 1]
    with pytest.raises(SystemExit):
        parse_options(["--sim-crash-afterr", "2"])  # a typo must not silently disable a fault
    with pytest.raises(ValueError, match="not a GPU index"):
        gpu_indexes(opts, {"CUDA_VISIBLE_DEVICES": "GPU-1234"})


def test_busy_port_exits_with_a_message(sim_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        sim = sim_factory(s.getsockname()[1], *FAST)
        assert sim.wait_exit(15) == 1
    assert "cannot listen on 127.0.0.1" in sim.log()


# --- API shapes ---------------------------------------------------------------------


def test_generate_meta_info_counts(fast_sim):
    status, body = generate(fast_sim, "a b c d", max_new_tokens=5)
    assert status == 200
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == 5  # four words + one begin-of-sequence token
    assert meta["completion_tokens"] == 5 == len(body["text"].split())
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["e2e_latency"] >= 0 and meta["id"]

    status, body = generate(fast_sim, "a b")
    assert body["meta_info"]["completion_tokens"] == 10  # --sim-output-tokens
    assert body["meta_info"]["finish_reason"]["type"] == "stop"
    assert generate(fast_sim, "a b")[1]["text"] == body["text"]  # deterministic

    status, body = http_json("POST", fast_sim.url + "/generate", {"input_ids": [1, 2, 3]})
    assert status == 200 and body["meta_info"]["prompt_tokens"] == 3

    assert http_json("POST", fast_sim.url + "/generate", {"nothing": 1})[0] == 400
    bad = {"text": "x", "sampling_params": {"max_new_tokens": -1}}
    assert http_json("POST", fast_sim.url + "/generate", bad)[0] == 400


def test_chat_and_completion_usage(fast_sim):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "say hello please"}]},
    ]
    status, body = http_json(
        "POST",
        fast_sim.url + "/v1/chat/completions",
        {"model": "x", "messages": messages, "max_tokens": 4},
    )
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "sim-8b"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 4
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 3 + (4 + 2) + (4 + 3)
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4

    status, body = http_json(
        "POST", fast_sim.url + "/v1/completions", {"prompt": "hello there", "max_tokens": 50}
    )
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}

    bad = {"messages": "hello"}
    assert http_json("POST", fast_sim.url + "/v1/chat/completions", bad)[0] == 400


def test_streams_end_with_done(fast_sim):
    whole = generate(fast_sim, "x", max_new_tokens=6)[1]["text"]

    status, events = http_sse(
        fast_sim.url + "/generate",
        {"text": "x", "sampling_params": {"max_new_tokens": 6}, "stream": True},
    )
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["text"] == whole
    assert chunks[-1]["meta_info"]["completion_tokens"] == 6
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"

    status, events = http_sse(
        fast_sim.url + "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6

    status, events = http_sse(
        fast_sim.url + "/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True}
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " ".join(whole.split()[:3])
    assert all("usage" not in c for c in chunks)  # only with include_usage


def test_info_endpoints_say_simulation(fast_sim):
    status, models = http_json("GET", fast_sim.url + "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "sim-8b"
    assert "not a real model" in json.dumps(models)
    status, info = http_json("GET", fast_sim.url + "/get_model_info")
    assert info["model_path"] == "/tmp/sim-model" and info["is_generation"] is True
    assert "not a real model" in info["note"]
    status, metrics = http_json("GET", fast_sim.url + "/metrics")
    assert status == 200 and 'sglang:num_requests_total{model_name="sim-8b"}' in metrics
    state = fast_sim.state()
    assert state["mode"] == "normal" and state["ready"] is True and state["simulation"] is True
    assert http_status(fast_sim.url + "/health_generate") == 200


# --- latency --------------------------------------------------------------------------


def test_latency_follows_ttft_tokens_and_slow_factor(sim_factory):
    sim = sim_factory(
        None, "--sim-ttft-s", "0.1", "--sim-token-latency-s", "0.02", "--sim-output-tokens", "5"
    ).wait_ready()
    began = time.monotonic()
    status, body = generate(sim)
    elapsed = time.monotonic() - began
    assert status == 200
    # the first token at ttft, each of the other four one token time later
    assert 0.17 <= body["meta_info"]["e2e_latency"] <= elapsed < 1.5

    # streaming: first token after ttft, the rest spaced by the token latency
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    began = time.monotonic()
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "x", "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    first = response.readline()
    first_at = time.monotonic() - began
    rest = response.read()
    total = time.monotonic() - began
    conn.close()
    assert first.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")
    assert 0.09 <= first_at < total and total >= 0.17

    assert sim.fault("slow", slow_factor=4)[1]["mode"] == "slow"
    status, body = generate(sim)
    assert body["meta_info"]["e2e_latency"] >= 0.7
    assert sim.fault("normal")[1]["slow_factor"] == 1.0


def test_requests_are_served_concurrently(sim_factory):
    sim = sim_factory(None, "--sim-ttft-s", "0.5", "--sim-token-latency-s", "0").wait_ready()
    began = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda _: generate(sim, timeout=10)[0], range(40)))
    assert statuses == [200] * 40
    assert time.monotonic() - began < 3.0  # 40 x 0.5 s would be 20 s if serial


# --- faults by flag -------------------------------------------------------------------


def test_crash_after_n_requests(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-crash-after", "2", "--sim-exit-code", "7").wait_ready()
    assert generate(sim)[0] == 200
    assert generate(sim)[0] == 200  # the Nth request is answered, then the process exits
    assert sim.wait_exit(10) == 7
    assert "crashing" in sim.log()


def test_crash_during_startup(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-crash-after", "0", "--sim-exit-code", "3")
    assert sim.wait_exit(15) == 3
    assert "listening" not in sim.log()


def test_hang_after_n_requests_is_a_scheduler_hang(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-hang-after", "1").wait_ready()
    assert generate(sim)[0] == 200
    # the front answers, everything the scheduler answers waits
    assert http_json("GET", sim.url + "/get_model_info", timeout=2)[0] == 200
    with pytest.raises(OSError):
        generate(sim, timeout=1)
    assert_hung(sim, "/get_load")
    assert sim.proc.poll() is None
    # SIGTERM: the drain waits for the stuck request, so only SIGKILL ends it
    sim.proc.send_signal(signal.SIGTERM)
    sim.wait_log("gracefully exiting: 1 requests left")
    assert sim.proc.poll() is None
    assert sim.kill() == -signal.SIGKILL


def test_hang_kind_freeze_stops_the_whole_process(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-hang-after", "1", "--sim-hang-kind", "freeze")
    sim.wait_ready()
    assert generate(sim)[0] == 200
    wait_until(lambda: psutil.Process(sim.pid).status() == psutil.STATUS_STOPPED, 5)
    assert_hung(sim, "/get_model_info")
    os.kill(sim.pid, signal.SIGCONT)
    assert http_json("GET", sim.url + "/get_model_info", timeout=2)[0] == 200


def test_error_after_n_requests(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-error-after", "1").wait_ready()
    assert generate(sim)[0] == 200
    assert [generate(sim)[0] for _ in range(3)] == [500, 500, 500]
    status, body = http_json("POST", sim.url + "/v1/chat/completions", {"messages": []})
    assert status == 500 and "simulated" in body["message"]
    assert http_status(sim.url + "/health") == 200  # only generation fails
    assert sim.state()["requests"]["errors"] == 4


def test_error_rate(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-error-rate", "0.5", "--sim-seed", "1").wait_ready()
    statuses = [generate(sim)[0] for _ in range(40)]
    assert set(statuses) == {200, 500}
    assert 5 <= statuses.count(500) <= 35


def test_ignore_sigterm_needs_sigkill(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-ignore-sigterm").wait_ready()
    sim.proc.send_signal(signal.SIGTERM)
    sim.wait_log("SIGTERM ignored")
    assert sim.proc.poll() is None and http_status(sim.url + "/health") == 200
    assert sim.kill() == -signal.SIGKILL


# --- faults at run time -----------------------------------------------------------------


def test_fault_crash_answers_then_exits(sim_factory):
    sim = sim_factory(None, *FAST).wait_ready()
    status, body = sim.fault("crash", exit_code=9)
    assert status == 200 and body["mode"] == "crash"
    assert sim.wait_exit(10) == 9


@pytest.mark.parametrize("mode", ["scheduler_hang", "hang"])
def test_fault_scheduler_hang_leaves_the_front_alive(sim_factory, mode):
    sim = sim_factory(None, *FAST, "--enable-metrics").wait_ready()
    assert sim.fault(mode)[1]["mode"] == "scheduler_hang"
    for path in ("/v1/models", "/get_model_info", "/metrics", "/sim/state"):
        assert http_json("GET", sim.url + path, timeout=2)[0] == 200, path
    for path in ("/get_load", "/v1/loads", "/get_server_info"):
        assert_hung(sim, path)
    with pytest.raises(OSError):
        generate(sim, timeout=1)
    assert sim.proc.poll() is None


def test_fault_freeze_is_sigstop(sim_factory):
    sim = sim_factory(None, *FAST).wait_ready()
    assert sim.fault("freeze")[1]["mode"] == "freeze"
    wait_until(lambda: psutil.Process(sim.pid).status() == psutil.STATUS_STOPPED, 5)
    assert_hung(sim, "/v1/models")
    assert sim.kill() == -signal.SIGKILL


def test_fault_error_unhealthy_and_back_to_normal(sim_factory):
    sim = sim_factory(None, *FAST).wait_ready()
    assert sim.fault("error")[1]["error_rate"] == 1.0
    assert generate(sim)[0] == 500
    assert sim.fault("error", error_rate=0.0)[0] == 200
    assert generate(sim)[0] == 200
    assert sim.fault("unhealthy")[1]["mode"] == "unhealthy"
    assert http_status(sim.url + "/health") == 503
    assert generate(sim)[0] == 503
    assert sim.fault("normal")[1]["mode"] == "normal"
    assert http_status(sim.url + "/health") == 200
    assert generate(sim)[0] == 200
    assert sim.fault("explode")[0] == 400
    assert sim.fault("slow", slow_factor=0)[0] == 400
    assert sim.fault(error_rate=2)[0] == 400


# --- GPU memory and children ------------------------------------------------------------


def used_by(view, index):
    return {p.pid: p.used_mib for p in view.snapshot()[index].processes}


def test_gpu_memory_held_while_alive_released_on_sigterm(sim_factory, tmp_path):
    gpus = tmp_path / "gpus.json"
    write_file_gpu_view(gpus, 2, total_mib=10000)
    view = FileGpuView(gpus)
    sim = sim_factory(
        None,
        *FAST,
        "--sim-children",
        "0",
        "--sim-gpu-mib",
        "3000",
        gpu_file=gpus,
        env={"CUDA_VISIBLE_DEVICES": "1"},
    ).wait_ready()
    assert used_by(view, 1) == {sim.pid: 3000}
    assert used_by(view, 0) == {}
    assert view.snapshot()[1].used_mib == 3000

    # a second server on the same GPU runs out of (simulated) memory
    other = sim_factory(
        None, *FAST, "--sim-gpu-mib", "8000", gpu_file=gpus, env={"CUDA_VISIBLE_DEVICES": "1"}
    )
    assert other.wait_exit(15) == 1
    assert "out of memory on simulated GPU 1" in other.log()

    # SGLang ends a drained SIGTERM by SIGKILLing its own tree (utils kill_process_tree)
    assert sim.stop() == -signal.SIGKILL
    wait_until(lambda: view.snapshot()[1].used_mib == 0, 5, message="memory not released")


def test_gpus_from_tp_size_and_mem_fraction(sim_factory, tmp_path):
    gpus = tmp_path / "gpus.json"
    write_file_gpu_view(gpus, 4, total_mib=10000)
    view = FileGpuView(gpus)
    sim = sim_factory(
        None,
        *FAST,
        "--tp-size",
        "2",
        "--base-gpu-id",
        "1",
        "--mem-fraction-static",
        "0.5",
        gpu_file=gpus,
    ).wait_ready()
    assert [g.used_mib for g in view.snapshot()] == [0, 5000, 5000, 0]
    assert sim.state()["gpus"] == [1, 2]
    # one scheduler child per TP rank holds the memory, as in SGLang
    assert len(sim.children()) == 2
    # SIGKILL: the children die with their parent; the entries stay in the file but
    # a dead pid holds nothing
    sim.kill()
    wait_until(
        lambda: [g.used_mib for g in view.snapshot()] == [0, 0, 0, 0],
        5,
        message="memory not released",
    )


def test_surviving_children_hold_memory_after_parent_sigkill(sim_factory, tmp_path):
    gpus = tmp_path / "gpus.json"
    write_file_gpu_view(gpus, 1, total_mib=10000)
    view = FileGpuView(gpus)
    sim = sim_factory(
        None,
        *FAST,
        "--sim-children",
        "2",
        "--sim-children-survive",
        "--sim-gpu-mib",
        "4000",
        gpu_file=gpus,
        env={"CUDA_VISIBLE_DEVICES": "0"},
    ).wait_ready()
    children = sim.children()
    assert len(children) == 2 and sim.state()["children"] == children
    assert used_by(view, 0) == {children[0]: 2000, children[1]: 2000}
    assert all(os.getpgid(c) == os.getpgid(sim.pid) for c in children)

    sim.kill()
    for child in children:
        os.kill(child, signal.SIGTERM)  # ignored, like a stuck scheduler
    wait_until(lambda: "surviving as an orphan" in sim.log(), 5, message="children did not notice")
    assert all(pid_alive(c) for c in children)
    assert all(psutil.Process(c).ppid() != sim.pid for c in children)
    assert view.snapshot()[0].used_mib == 4000  # orphans keep the GPU busy

    for child in children:
        os.kill(child, signal.SIGKILL)
    wait_until(lambda: view.snapshot()[0].used_mib == 0, 5, message="memory not released")


def test_children_follow_their_parent(sim_factory, tmp_path):
    gpus = tmp_path / "gpus.json"
    write_file_gpu_view(gpus, 1, total_mib=10000)
    view = FileGpuView(gpus)
    sim = sim_factory(
        None, *FAST, "--sim-children", "1", "--sim-gpu-mib", "1000", gpu_file=gpus
    ).wait_ready()
    (child,) = sim.children()
    assert used_by(view, 0) == {child: 1000}
    sim.kill()
    wait_until(lambda: not pid_alive(child), 5, message="child outlived its parent")
    assert view.snapshot()[0].used_mib == 0

    sim2 = sim_factory(
        None, *FAST, "--sim-children", "1", "--sim-gpu-mib", "1000", gpu_file=gpus
    ).wait_ready()
    (child2,) = sim2.children()
    assert sim2.stop() == -signal.SIGKILL  # the drain ends by killing the whole tree
    wait_until(lambda: not pid_alive(child2), 5, message="child outlived the stop")
    assert view.snapshot()[0].used_mib == 0


def test_children_leaving_the_group(sim_factory):
    sim = sim_factory(None, *FAST, "--sim-children", "1", "--sim-children-leave-group")
    sim.wait_ready()
    (child,) = sim.children()
    assert os.getpgid(child) != os.getpgid(sim.pid)
    sim.kill()
    wait_until(lambda: not pid_alive(child), 5, message="child outlived its parent")
