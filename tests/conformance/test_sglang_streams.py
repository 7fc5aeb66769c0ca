"""Streams and request errors as the client and the prober read them: the chat stream's
order, ``/generate`` chunks, when headers leave, and what an invalid request gets
(docs/sglang.md sections 2, 3 and 9)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from supervisord_ms.sglang_api import parse_server_info

from .sglang_http import SSE_DONE, SGLang, Stream, error_message

PROMPT = "Say hello in one short sentence."
MAX_TOKENS = 16
# serving_chat.py: what a delta may carry; any of them is output (client/_sglang.py).
DELTA_KEYS = ("role", "content", "reasoning_content", "tool_calls")


def _chat_body(model_path: str, **extra: Any) -> dict[str, Any]:
    body = {
        "model": model_path,  # what the client sends (client/_sglang.py ChatApi)
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    body.update(extra)
    return body


def _generate_body(**params: Any) -> dict[str, Any]:
    sampling = {"max_new_tokens": MAX_TOKENS, "temperature": 0}
    sampling.update(params)
    return {"text": PROMPT, "sampling_params": sampling}


def _timings(stream: Stream) -> dict[str, Any]:
    first = stream.first_chunk_s
    return {
        "headers_s": stream.headers_s,
        "first_chunk_s": first,
        "headers_before_first_chunk_s": None if first is None else first - stream.headers_s,
        "end_s": stream.end_s,
    }


def _ends_with_done(stream: Stream) -> None:
    assert stream.data and stream.data[-1] == SSE_DONE, (
        f"the stream does not end with data: [DONE]: {stream.describe()}"
    )
    assert stream.data.count(SSE_DONE) == 1, f"[DONE] more than once: {stream.describe()}"


def test_chat_stream_role_first_then_deltas_finish_usage_done(
    sglang: SGLang, server_info: dict[str, Any], model_path: str, report
) -> None:
    """entrypoints/openai/serving_chat.py ``_generate_chat_stream``: the first chunk of
    a choice has ``delta.role == "assistant"``; then ``delta.content`` (or
    ``reasoning_content`` with ``--reasoning-parser``, ``tool_calls`` with
    ``--tool-call-parser``); a chunk with ``finish_reason``; with
    ``stream_options.include_usage`` a chunk with ``choices: []`` and ``usage``; then
    ``data: [DONE]`` (docs/sglang.md section 3). When the headers leave (at once, or
    with the first chunk since SGLang PR #21900, 2026-04, section 2) is reported, not
    asserted: it depends on the version."""
    stream = sglang.stream(
        "/v1/chat/completions",
        _chat_body(model_path, stream=True, stream_options={"include_usage": True}),
    )
    assert stream.status == 200, stream.describe()
    assert "text/event-stream" in stream.headers.get("content-type", ""), stream.describe()
    _ends_with_done(stream)
    chunks = stream.chunks()
    for chunk in chunks:
        assert isinstance(chunk, dict), f"a chunk is not a JSON object: {stream.describe()}"
        assert "error" not in chunk, f"an error chunk: {chunk}"

    first = chunks[0]
    assert first.get("choices"), f"the first chunk has no choice: {first}"
    assert first["choices"][0].get("delta", {}).get("role") == "assistant", (
        f"the first chunk's delta does not carry role=assistant: {first}"
    )

    kinds = dict.fromkeys(DELTA_KEYS, 0)
    finish_at: list[int] = []
    usage_at: list[int] = []
    for i, chunk in enumerate(chunks):
        choices = chunk.get("choices")
        assert isinstance(choices, list), f"chunk {i} has no choices list: {chunk}"
        if not choices:
            if chunk.get("usage"):
                usage_at.append(i)
            continue
        for choice in choices:
            delta = choice.get("delta") or {}
            carried = [k for k in DELTA_KEYS if delta.get(k) is not None]
            for k in carried:
                kinds[k] += 1
            if choice.get("finish_reason"):
                finish_at.append(i)
            else:
                assert carried, f"chunk {i}'s delta carries none of {DELTA_KEYS}: {chunk}"

    report(
        **_timings(stream),
        version=server_info.get("version"),
        chunks=len(chunks),
        deltas=kinds,
        finish_reason=chunks[finish_at[-1]]["choices"][0]["finish_reason"] if finish_at else None,
    )
    assert finish_at, f"no chunk has a finish_reason: {stream.describe()}"
    assert len(usage_at) == 1, f"expected one usage chunk with choices=[]: {stream.describe()}"
    assert usage_at[0] == len(chunks) - 1 and usage_at[0] > finish_at[-1], (
        f"the usage chunk is not last, after the finish: {stream.describe()}"
    )
    usage = chunks[usage_at[0]]["usage"]
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    assert isinstance(prompt, int) and prompt > 0, f"usage: {usage}"
    assert isinstance(completion, int) and 0 <= completion <= MAX_TOKENS, f"usage: {usage}"


def test_generate_stream_chunks_carry_text_and_meta_info(
    sglang: SGLang, server_info: dict[str, Any], report
) -> None:
    """entrypoints/http_server.py ``generate_request`` with ``stream: true``: a
    ``StreamingResponse`` returned at once, so the headers leave before the first
    token (every version read; docs/sglang.md section 2). Each chunk has ``text`` and
    ``meta_info`` (``prompt_tokens``, ``completion_tokens``, ``finish_reason`` on the
    last); ``text`` is the text so far, or only the new part with
    ``--incremental-streaming-output`` (``--stream-output`` before the rename; section
    9), as ``/get_server_info`` says."""
    incremental = parse_server_info(server_info).incremental_streaming_output
    stream = sglang.stream("/generate", {**_generate_body(), "stream": True})
    assert stream.status == 200, stream.describe()
    assert "text/event-stream" in stream.headers.get("content-type", ""), stream.describe()
    _ends_with_done(stream)
    chunks = stream.chunks()
    assert chunks, f"no chunk before [DONE]: {stream.describe()}"
    texts: list[str] = []
    completion = 0
    for i, chunk in enumerate(chunks):
        assert isinstance(chunk, dict) and "error" not in chunk, f"chunk {i}: {chunk}"
        assert isinstance(chunk.get("text"), str), f"chunk {i} has no text: {chunk}"
        meta = chunk.get("meta_info")
        assert isinstance(meta, dict), f"chunk {i} has no meta_info: {chunk}"
        for key in ("prompt_tokens", "completion_tokens"):
            assert isinstance(meta.get(key), int), f"chunk {i}: meta_info.{key}: {meta}"
        assert meta["completion_tokens"] >= completion, (
            f"chunk {i}: completion_tokens went down: {stream.describe()}"
        )
        completion = meta["completion_tokens"]
        texts.append(chunk["text"])
    last = chunks[-1]["meta_info"]
    assert last.get("finish_reason"), f"the last chunk has no finish_reason: {last}"
    assert 0 < completion <= MAX_TOKENS, f"completion_tokens={completion}"
    assert last["prompt_tokens"] > 0, f"prompt_tokens: {last}"

    # Whether each text extends the text so far (cumulative) or is only the new part.
    so_far = ""
    extends = []
    for text in texts:
        if not text:
            continue
        extends.append(text.startswith(so_far))
        so_far = so_far + text if incremental else text
    report(
        **_timings(stream),
        incremental_streaming_output=incremental,
        chunks=len(chunks),
        completion_tokens=completion,
        pieces_extending_the_text_so_far=f"{sum(extends)}/{len(extends)}",
    )
    if incremental is False:
        assert all(extends), f"cumulative text did not grow by its end: {texts}"
    elif incremental is True and len(extends) >= 3:
        # A piece that repeats the whole text so far is possible but never for every
        # piece after the second.
        assert not all(extends[2:]), f"incremental pieces look cumulative: {texts}"


def test_generate_stream_answers_200_before_any_output(sglang: SGLang, report) -> None:
    """entrypoints/http_server.py ``generate_request``: a stream's headers leave at
    once, before any output exists. Seen from outside with a request the tokenizer
    manager refuses (``SamplingParams.verify``: ``max_new_tokens`` < 0 is a
    ``ValueError``): HTTP 200 is already out, so the error comes as a chunk
    ``data: {"error": {"message": ...}}`` followed by ``data: [DONE]``
    (docs/sglang.md section 2). Whether later versions hold ``/generate``'s headers
    back like chat streams (PR #21900) is not confirmed: a 400 here would say so."""
    stream = sglang.stream("/generate", {**_generate_body(max_new_tokens=-1), "stream": True})
    report(**_timings(stream), status=stream.status)
    assert stream.status == 200, (
        f"/generate held its headers until the request was validated: {stream.describe()}"
    )
    _ends_with_done(stream)
    chunks = stream.chunks()
    assert len(chunks) == 1 and error_message(chunks[0]) is not None, (
        f"expected one error chunk, then [DONE]: {stream.describe()}"
    )


def test_chat_stream_refused_request_is_400_or_an_error_chunk(
    sglang: SGLang, server_info: dict[str, Any], model_path: str, report
) -> None:
    """A chat stream whose request is refused (``max_tokens: -1``): since SGLang PR
    #21900 (2026-04, entrypoints/openai/serving_chat.py) an HTTP 400; before, HTTP 200
    and an error chunk ``{"error": {"message", "type", "code", ...}}``
    (serving_base.py ``create_streaming_error_response``) then ``data: [DONE]``
    (docs/sglang.md sections 2 and 3). The client handles both; which one came is
    reported."""
    body = _chat_body(model_path, stream=True, max_tokens=-1)
    stream = sglang.stream("/v1/chat/completions", body)
    report(status=stream.status, version=server_info.get("version"), headers_s=stream.headers_s)
    if stream.status == 400:
        try:
            body = json.loads(stream.body)
        except ValueError:
            body = None
        assert error_message(body) is not None, stream.describe()
        return
    assert stream.status == 200, f"expected 400, or 200 and an error chunk: {stream.describe()}"
    _ends_with_done(stream)
    errors = [c for c in stream.chunks() if isinstance(c, dict) and "error" in c]
    assert errors and error_message(errors[0]) is not None, stream.describe()


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/generate"])
def test_an_invalid_request_is_400(sglang: SGLang, model_path: str, route: str, report) -> None:
    """A request SGLang refuses (``max_tokens`` / ``max_new_tokens`` = -1, a
    ``ValueError`` from ``SamplingParams.verify``) gets HTTP 400 when not streamed:
    entrypoints/openai/serving_chat.py (``create_error_response``) and
    entrypoints/http_server.py ``generate_request`` (docs/sglang.md section 2). The
    client moves on at once on a 4xx instead of waiting."""
    if route == "/generate":
        body = _generate_body(max_new_tokens=-1)
    else:
        body = _chat_body(model_path, max_tokens=-1)
    answer = sglang.post(route, body)
    report(status=answer.status, seconds=answer.seconds)
    assert answer.status == 400, answer.describe()
    assert isinstance(answer.json(), dict), answer.describe()
