"""Idle conversations are unloaded (bounded memory) and resumed on demand with their history."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from a2a.types import TaskState
from a2a_rig import Call, send, serve_codex, terminal_state, user_message

from molecule_codex.demo.scripted_model import Hold, Text

pytestmark = pytest.mark.real_codex



async def test_idle_thread_is_unloaded_then_resumed_with_history(tmp_path, model):
    async with serve_codex(tmp_path, model, idle_unload_after=600) as served:
        client = await served.client(streaming=False)
        await send(client, user_message("remember the word pelican", context_id="idle"))
        assert await served.executor.unload_idle(now=time.monotonic() + 60) == 0  # not idle yet
        assert await served.executor.unload_idle(now=time.monotonic() + 3600) == 1
        items = await send(client, user_message("what was the word?", context_id="idle"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        assert model.requests[-1].all_user_texts == ["remember the word pelican", "what was the word?"]


async def test_a_running_conversation_is_never_unloaded(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("slow answer"), reached=reached))
    async with serve_codex(tmp_path, model, idle_unload_after=600, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        call = Call(client, user_message("long job", context_id="busy"))
        assert await asyncio.to_thread(reached.wait, 20)
        assert await served.executor.unload_idle(now=time.monotonic() + 3600) == 0
        gate.set()
        assert terminal_state(await call.result(timeout=20)) == TaskState.TASK_STATE_COMPLETED


async def test_zero_means_never_unload(tmp_path, model):
    async with serve_codex(tmp_path, model, idle_unload_after=0) as served:
        client = await served.client(streaming=False)
        await send(client, user_message("hello", context_id="keep"))
        assert served.executor._sweeper is None
