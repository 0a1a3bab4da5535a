"""Ordering per conversation, parallelism across them, and history across restarts."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest
from a2a.types import CancelTaskRequest, TaskState
from a2a_rig import (
    Call,
    final_answer,
    final_message,
    send,
    serve_codex,
    status_texts,
    streamed_text,
    terminal_state,
    user_message,
)

from molecule_codex.demo.scripted_model import Hold, RecordedRequest, Text

pytestmark = pytest.mark.real_codex

WAITING = "Waiting for the previous message"


def reply_for(prompt: str) -> str:
    """A distinct, several-chunk answer per prompt."""
    return f"answer to {prompt}: " + " ".join(f"{prompt}-word{i}" for i in range(8))


def keyed_responder(record: RecordedRequest) -> Text:
    return Text(reply_for(record.last_user_text), chunks=6, chunk_delay=0.05)


def peak_overlap(records: list[RecordedRequest]) -> int:
    """Most model streams open at the same moment."""
    edges = sorted([(r.received_at, 1) for r in records] + [(r.finished_at or r.received_at, -1) for r in records])
    peak = current = 0
    for _when, step in edges:
        current += step
        peak = max(peak, current)
    return peak



async def test_32_conversations_stream_at_once_without_mixing(tmp_path, model):
    model.responder = keyed_responder
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=True)
        prompts = [f"conv{n:02d}" for n in range(32)]
        results = await asyncio.gather(*(send(client, user_message(p, context_id=f"ctx-{p}")) for p in prompts))
        for prompt, items in zip(prompts, results, strict=True):
            expected = reply_for(prompt)
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, (prompt, final_message(items))
            # Chunks may merge deltas that arrived together; reassembled, nothing is lost or doubled.
            assert streamed_text(items) == expected, prompt
            assert final_answer(items) == expected, prompt
            assert final_message(items) == expected, prompt
        assert len(model.requests) == 32
        assert sorted(r.last_user_text for r in model.requests) == prompts
        assert peak_overlap(model.requests) >= 2  # the turns really ran at the same time


async def test_queue_runs_second_message_after_first_with_its_history(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("first answer in pieces", chunks=4), after_deltas=1, reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-q"))
        assert await asyncio.to_thread(reached.wait, 20)
        second = Call(client, user_message("second prompt", context_id="ctx-q"))
        await second.wait_status(WAITING)
        assert len(model.requests) == 1  # the second turn waits for the first
        gate.set()
        first_items, second_items = await first.result(), await second.result()
        assert terminal_state(first_items) == TaskState.TASK_STATE_COMPLETED
        assert terminal_state(second_items) == TaskState.TASK_STATE_COMPLETED
        assert final_answer(first_items) == "first answer in pieces"
        assert streamed_text(first_items) == "first answer in pieces"
        assert final_answer(second_items) == "echo: second prompt"
        assert streamed_text(second_items) == "echo: second prompt"
        one, two = model.requests
        assert two.received_at >= one.finished_at
        assert two.all_user_texts == ["first prompt", "second prompt"]
        assert first_items[0].task.id != second_items[0].task.id


async def test_steer_joins_running_turn_and_both_get_its_reply(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("held answer " * 4, chunks=4), after_deltas=1, reached=reached))
    async with serve_codex(tmp_path, model, on_busy="steer", stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-s"))
        assert await asyncio.to_thread(reached.wait, 20)
        second = Call(client, user_message("also this", context_id="ctx-s"))
        await second.wait_status("Added to the running turn")
        gate.set()
        first_items, second_items = await first.result(), await second.result()
        assert terminal_state(first_items) == TaskState.TASK_STATE_COMPLETED, final_message(first_items)
        assert terminal_state(second_items) == TaskState.TASK_STATE_COMPLETED, final_message(second_items)
        reply = final_answer(first_items)
        assert reply == "echo: also this", reply  # the aborted first stream leaves no fragment behind
        assert final_message(first_items) == reply
        assert final_answer(second_items) == reply
        assert final_message(second_items) == reply
        last = model.requests[-1]
        assert last.all_user_texts == ["first prompt", "also this"]
        # One turn: the joined message never became a turn of its own.
        assert first_items[-1].status_update.metadata["turn_id"] == second_items[-1].status_update.metadata["turn_id"]


async def test_cancel_queued_message_never_reaches_model(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("first answer", chunks=2), after_deltas=1, reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-c"))
        assert await asyncio.to_thread(reached.wait, 20)
        queued = Call(client, user_message("queued prompt", context_id="ctx-c"))
        await queued.wait_status(WAITING)
        canceled = await client.cancel_task(CancelTaskRequest(id=queued.task_id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        queued_items = await queued.result(timeout=10)
        assert terminal_state(queued_items) == TaskState.TASK_STATE_CANCELED
        gate.set()
        first_items = await first.result()
        assert terminal_state(first_items) == TaskState.TASK_STATE_COMPLETED
        assert final_answer(first_items) == "first answer"
        # The next message runs right after the first: the canceled one was never a turn.
        after = await send(client, user_message("third prompt", context_id="ctx-c"))
        assert terminal_state(after) == TaskState.TASK_STATE_COMPLETED
        assert len(model.requests) == 2
        assert model.requests[-1].all_user_texts == ["first prompt", "third prompt"]


async def test_server_restart_resumes_conversation_history(tmp_path, model):
    state_dir, codex_home = tmp_path / "state", tmp_path / "codex-home"
    async with serve_codex(tmp_path, model, state_dir=state_dir, codex_home=codex_home) as served:
        client = await served.client(streaming=False)
        first = await send(client, user_message("remember the word apple", context_id="ctx-r"))
        assert first[-1].task.status.state == TaskState.TASK_STATE_COMPLETED
        thread_id = first[-1].task.status.message.metadata["thread_id"]
    async with serve_codex(tmp_path, model, state_dir=state_dir, codex_home=codex_home) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("which word?", context_id="ctx-r"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, final_message(items)
        assert model.requests[-1].all_user_texts == ["remember the word apple", "which word?"]
        assert items[-1].status_update.metadata["thread_id"] == thread_id
        assert not any("could not be restored" in text for text in status_texts(items))


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
async def test_failed_resume_continues_in_new_thread_with_notice(tmp_path, model, damage):
    state_dir, codex_home = tmp_path / "state", tmp_path / "codex-home"
    async with serve_codex(tmp_path, model, state_dir=state_dir, codex_home=codex_home) as served:
        client = await served.client(streaming=False)
        first = await send(client, user_message("remember the word apple", context_id="ctx-f"))
        assert first[-1].task.status.state == TaskState.TASK_STATE_COMPLETED
        thread_id = first[-1].task.status.message.metadata["thread_id"]
    rollouts = list((codex_home / "sessions").rglob("*.jsonl"))
    assert rollouts, "codex wrote no rollout file"
    if damage == "delete":
        shutil.rmtree(codex_home / "sessions")
    else:
        for path in rollouts:
            path.write_text("not json at all\n{\n")
    async with serve_codex(tmp_path, model, state_dir=state_dir, codex_home=codex_home) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("which word?", context_id="ctx-f"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, final_message(items)
        assert final_answer(items) == "echo: which word?"
        assert any("could not be restored" in text for text in status_texts(items)), status_texts(items)
        assert model.requests[-1].all_user_texts == ["which word?"]
        new_thread = items[-1].status_update.metadata["thread_id"]
        assert new_thread and new_thread != thread_id
        # The new thread is the conversation's thread from now on.
        again = await send(client, user_message("and now?", context_id="ctx-f"))
        assert terminal_state(again) == TaskState.TASK_STATE_COMPLETED
        assert model.requests[-1].all_user_texts == ["which word?", "and now?"]
        assert not any("could not be restored" in text for text in status_texts(again))


async def test_cancel_running_turn_lets_queued_message_run_next(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("never finished " * 4, chunks=4), after_deltas=1, reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("long job", context_id="ctx-cq"))
        assert await asyncio.to_thread(reached.wait, 20)
        queued = Call(client, user_message("next job", context_id="ctx-cq"))
        await queued.wait_status(WAITING)
        await first.wait_for(lambda item: item.WhichOneof("payload") == "artifact_update")
        await client.cancel_task(CancelTaskRequest(id=first.task_id))
        first_items, queued_items = await first.result(timeout=10), await queued.result()
        assert terminal_state(first_items) == TaskState.TASK_STATE_CANCELED
        assert terminal_state(queued_items) == TaskState.TASK_STATE_COMPLETED, final_message(queued_items)
        assert final_answer(queued_items) == "echo: next job"
        held, second = model.requests
        assert held.client_disconnected
        assert second.all_user_texts == ["long job", "next job"]
        gate.set()


async def test_steer_joined_request_ends_when_the_turn_hits_an_internal_error(tmp_path, model):
    gate, reached, resampled = threading.Event(), threading.Event(), threading.Event()
    # The steer aborts the first model stream; codex's re-sample is held too, so the turn stays open.
    model.enqueue(Hold(gate, Text("held answer"), reached=reached), Hold(gate, Text("re-sampled"), reached=resampled))
    async with serve_codex(tmp_path, model, on_busy="steer", stream_idle_timeout_ms=30000) as served:
        executor = served.executor
        original_follow = executor._follow
        failing = asyncio.Event()

        async def follow_once_then_fail(conversation, turn):
            if failing.is_set():
                return await original_follow(conversation, turn)
            failing.set()
            async with asyncio.timeout(20):
                while len(turn.riders) < 2:  # what the real loop does: join the waiting message
                    await executor._steer_waiting(conversation, turn)
                    await asyncio.sleep(0.05)
                await steered.wait()
            raise RuntimeError("simulated executor bug")

        steered = asyncio.Event()
        executor._follow = follow_once_then_fail
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-bug"))
        assert await asyncio.to_thread(reached.wait, 20)
        second = Call(client, user_message("joined prompt", context_id="ctx-bug"))
        await second.wait_status("Added to the running turn")
        assert await asyncio.to_thread(resampled.wait, 20)
        steered.set()
        first_items, second_items = await first.result(timeout=10), await second.result(timeout=10)
        for items in (first_items, second_items):
            assert terminal_state(items) == TaskState.TASK_STATE_FAILED
            assert "internal error" in final_message(items), final_message(items)
            assert "simulated executor bug" not in final_message(items)
        # The abandoned codex turn was interrupted: the next message is a turn of its own.
        after = await send(client, user_message("after the bug", context_id="ctx-bug"))
        assert terminal_state(after) == TaskState.TASK_STATE_COMPLETED, final_message(after)
        assert final_answer(after) == "echo: after the bug"
        abandoned_turn = json.loads(model.requests[1].headers["x-codex-turn-metadata"])["turn_id"]
        assert after[-1].status_update.metadata["turn_id"] != abandoned_turn
        assert model.requests[1].client_disconnected
        gate.set()
