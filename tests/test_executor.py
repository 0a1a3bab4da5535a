"""The executor through a real a2a-sdk server and client, real codex, and the scripted model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from a2a.types import CancelTaskRequest, SendMessageRequest, TaskState
from a2a_rig import send, serve_codex, streamed_text, terminal_state, user_message

from molecule_codex.demo.scripted_model import Hold, Text, ToolCall

pytestmark = pytest.mark.real_codex



async def test_streaming_text_then_completed_task_with_full_answer(tmp_path, model):
    model.enqueue(Text("Hello from codex, streamed in pieces.", chunks=5))
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("say hello"))
        kinds = [item.WhichOneof("payload") for item in items]
        assert kinds[0] == "task"
        assert "artifact_update" in kinds
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        # The last artifact event replaces the answer with the full text, as one part.
        last_artifact = [i.artifact_update for i in items if i.WhichOneof("payload") == "artifact_update"][-1]
        assert not last_artifact.append and last_artifact.last_chunk
        assert [p.text for p in last_artifact.artifact.parts] == ["Hello from codex, streamed in pieces."]
        final = items[-1].status_update
        assert final.status.message.parts[0].text == "Hello from codex, streamed in pieces."
        usage = dict(final.metadata["usage"])
        assert usage["input_tokens"] == model.requests[-1].usage.input_tokens


async def test_non_streaming_reply_and_history_continuity(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        first = await send(client, user_message("first question", context_id="ctx-a"))
        task = first[-1].task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert task.artifacts[0].parts[0].text == "echo: first question"
        await send(client, user_message("second question", context_id="ctx-a"))
        assert model.requests[-1].all_user_texts == ["first question", "second question"]


async def test_tool_turn_runs_command_and_reports_progress(tmp_path, model):
    model.enqueue(ToolCall("printf made > made.txt"), Text("I made the file."))
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("make a file"))
        assert (served.workspace / "made.txt").read_text() == "made"
        progress = [
            i.status_update.status.message.parts[0].text
            for i in items
            if i.WhichOneof("payload") == "status_update" and i.status_update.status.message.parts
        ]
        assert any(line.startswith("$ ") and "printf made" in line for line in progress)
        assert any("exit 0" in line for line in progress)
        final = items[-1].status_update
        trace = final.metadata["tool_trace"]
        assert trace[0]["tool"] == "shell" and "printf made" in trace[0]["input"]


async def test_two_contexts_run_in_parallel(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        await send(client, user_message("warm up", context_id="warm"))
        started = time.perf_counter()
        await asyncio.gather(
            send(client, user_message("one [sleep=1.5]", context_id="c1")),
            send(client, user_message("two [sleep=1.5]", context_id="c2")),
        )
        assert time.perf_counter() - started < 2.8


async def test_cancel_mid_stream_then_history_survives(tmp_path, model):
    gate = threading.Event()
    reached = threading.Event()
    model.enqueue(Hold(gate, Text("never finished " * 20, chunks=20), after_deltas=2, reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        message = user_message("long job", context_id="ctx-cancel")
        collected = []
        first_event = asyncio.Event()

        async def consume():
            async for item in client.send_message(SendMessageRequest(message=message)):
                collected.append(item)
                first_event.set()

        consumer = asyncio.create_task(consume())
        assert await asyncio.to_thread(reached.wait, 20)
        await asyncio.wait_for(first_event.wait(), 10)
        task_id = collected[0].task.id
        started = time.perf_counter()
        await client.cancel_task(CancelTaskRequest(id=task_id))
        await asyncio.wait_for(consumer, 10)
        assert terminal_state(collected) == TaskState.TASK_STATE_CANCELED
        record = model.requests[-1]
        assert record.wait_finished(5)
        assert record.client_disconnected
        assert time.perf_counter() - started < 2.5
        gate.set()
        items = await send(client, user_message("after cancel", context_id="ctx-cancel"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        assert model.requests[-1].all_user_texts[:1] == ["long job"]
        assert streamed_text(items).startswith("echo: after cancel")
