"""Failures a caller must see as a readable FAILED task, and the conversation carrying on after them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import threading
import time
import zlib

import pytest
from a2a.types import GetTaskRequest, Part, TaskState
from a2a_rig import (
    Call,
    final_answer,
    final_message,
    send,
    serve_codex,
    status_texts,
    terminal_state,
    user_message,
)
from google.protobuf import struct_pb2

from molecule_codex.demo.scripted_model import Hold, HttpError, Stall, StreamCut, Text, ToolCall

pytestmark = pytest.mark.real_codex



def assert_readable(text: str) -> None:
    """A message for a person: no protocol frames, no stack traces."""
    assert text.strip()
    for raw in ('"jsonrpc"', "Traceback", 'File "', "AppServerError", "Exception"):
        assert raw not in text, text


def tiny_png() -> bytes:
    """A valid 1×1 RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------- model failures


@pytest.mark.parametrize(
    ("reply", "phrase", "category"),
    [
        (HttpError(401), "rejected the credential", "auth"),
        (HttpError(429), "rate limiting", "rate_limit"),
        (HttpError(500), "provider is unavailable", "provider"),
        (StreamCut("partial answer"), "connection to the model provider failed", "connection"),
    ],
    ids=["401", "429", "500", "stream-cut"],
)
async def test_model_error_fails_task_readably_then_next_message_works(tmp_path, model, reply, phrase, category):
    model.enqueue(reply)
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("first try", context_id="ctx-err"))
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        text = final_message(items)
        assert phrase in text, text
        assert_readable(text)
        assert items[-1].status_update.metadata["error_category"] == category
        stored = await client.get_task(GetTaskRequest(id=items[0].task.id))
        if category == "connection":  # text was streamed before the cut: the reason replaces the fragment
            assert [part.text for part in stored.artifacts[0].parts] == [text]
        after = await send(client, user_message("second try", context_id="ctx-err"))
        assert terminal_state(after) == TaskState.TASK_STATE_COMPLETED, final_message(after)
        assert final_answer(after) == "echo: second try"
        assert model.requests[-1].all_user_texts == ["first try", "second try"]


async def test_app_server_killed_mid_turn_fails_fast_then_resumes(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        done = await send(client, user_message("before the crash", context_id="ctx-k"))
        assert terminal_state(done) == TaskState.TASK_STATE_COMPLETED
        model.enqueue(Hold(gate, Text("never sent " * 5, chunks=5), after_deltas=1, reached=reached))
        call = Call(client, user_message("during the crash", context_id="ctx-k"))
        assert await asyncio.to_thread(reached.wait, 20)
        old_pid = served.app.pid
        assert old_pid
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        items = await call.result(timeout=10)
        assert time.monotonic() - killed_at < 2.0
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        text = final_message(items)
        assert "codex process stopped unexpectedly" in text, text
        assert_readable(text)
        gate.set()
        after = await send(client, user_message("after the crash", context_id="ctx-k"))
        assert terminal_state(after) == TaskState.TASK_STATE_COMPLETED, final_message(after)
        assert final_answer(after) == "echo: after the crash"
        assert served.app.pid != old_pid
        history = model.requests[-1].all_user_texts
        assert history[0] == "before the crash" and history[-1] == "after the crash", history


async def test_inactivity_watchdog_fails_stalled_turn_then_next_message_works(tmp_path, model):
    model.enqueue(Stall(20))
    async with serve_codex(tmp_path, model, inactivity_timeout=2, stream_idle_timeout_ms=60000) as served:
        client = await served.client(streaming=True)
        started = time.monotonic()
        items = await send(client, user_message("stall please", context_id="ctx-w"))
        elapsed = time.monotonic() - started
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        text = final_message(items)
        assert "no progress" in text, text
        assert_readable(text)
        assert 2 <= elapsed < 6, elapsed
        assert model.requests[0].wait_finished(5) and model.requests[0].client_disconnected
        after = await send(client, user_message("are you there?", context_id="ctx-w"))
        assert terminal_state(after) == TaskState.TASK_STATE_COMPLETED, final_message(after)
        assert final_answer(after) == "echo: are you there?"


async def test_tool_only_turn_answers_with_summary_of_what_ran(tmp_path, model):
    model.enqueue(ToolCall("printf quiet > quiet.txt"), Text(""))
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        items = await send(client, user_message("do it silently"))
        task = items[-1].task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        answer = final_answer(items)
        assert answer and "printf quiet" in answer and "exit 0" in answer, answer
        assert task.status.message.parts[0].text == answer
        assert (served.workspace / "quiet.txt").read_text() == "quiet"


# ---------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("text", ["", "   \n"], ids=["empty", "blank"])
async def test_empty_message_fails_without_a_codex_turn(tmp_path, model, text):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message(text))
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        assert "empty" in final_message(items)
        assert_readable(final_message(items))
        assert model.requests == []


async def test_oversized_message_fails_with_the_limit(tmp_path, model):
    async with serve_codex(tmp_path, model, max_input_chars=100) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("x" * 101))
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        assert "limit is 100" in final_message(items), final_message(items)
        exact = await send(client, user_message("y" * 100))
        assert terminal_state(exact) == TaskState.TASK_STATE_COMPLETED
        assert len(model.requests) == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "../outside.txt"])
async def test_file_reference_outside_workspace_is_refused(tmp_path, model, url):
    (tmp_path / "outside.txt").write_text("secret")
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        message = user_message("", parts=[Part(text="read this"), Part(url=url, media_type="text/plain")])
        items = await send(client, message)
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        assert "outside the workspace" in final_message(items), final_message(items)
        assert model.requests == []


async def test_image_part_reaches_model_as_input_image(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        image = Part(raw=tiny_png(), media_type="image/png", filename="dot.png")
        items = await send(client, user_message("", parts=[Part(text="what is this?"), image]))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, final_message(items)
        record = model.requests[-1]
        kinds = [
            part.get("type")
            for item in record.input
            if item.get("role") == "user"
            for part in (item.get("content") if isinstance(item.get("content"), list) else [])
        ]
        assert "input_image" in kinds, record.input
        assert record.last_user_text.startswith("what is this?")


async def test_data_part_reaches_model_as_json_text(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        data = struct_pb2.Value()
        data.struct_value.update({"ticket": "ABC-1", "priority": 2, "ratio": 0.5, "tags": [1, "a"]})
        items = await send(client, user_message("", parts=[Part(data=data)]))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, final_message(items)
        prompt = model.requests[-1].last_user_text
        # Whole numbers stay whole (protobuf's Value would make 2 into 2.0).
        assert json.loads(prompt) == {"priority": 2, "ratio": 0.5, "tags": [1, "a"], "ticket": "ABC-1"}
        assert '"priority": 2,' in prompt, prompt
        assert not any("empty" in text for text in status_texts(items))
