"""Races and hangs of issue 12, one regression test per item, against the real codex binary.

Each test names its item; every one failed on the request/worker executor it replaced (commit
5a02321). Items 7 and 9's shared task store need no codex: tests/test_races_host.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import codex_rig as rig
import pytest
from a2a.client import ClientCallContext
from a2a.types import CancelTaskRequest, GetTaskRequest, SendMessageRequest, TaskState
from a2a_rig import Call, final_answer, final_message, send, serve_codex, status_texts, terminal_state, user_message
from google.protobuf import struct_pb2

from molecule_codex.app_server import AppServerError, descendants
from molecule_codex.codex_binary import CodexBinary
from molecule_codex.conversations import DB_FILENAME, ConversationStoreError
from molecule_codex.demo.scripted_model import Hold, HttpError, Text, ToolCall
from molecule_codex.executor import HISTORY_HEADER, SHUTTING_DOWN

pytestmark = pytest.mark.real_codex

COMPLETED, FAILED, CANCELED = (TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED,
                               TaskState.TASK_STATE_CANCELED)
TERMINAL = {COMPLETED, FAILED, CANCELED}
WAITING = "Waiting for the previous message"
JOINED = "Added to the running turn"
MCP_STUB = Path(__file__).with_name("mcp_stub_server.py")



def assert_readable(text: str, *forbidden: str) -> None:
    """A sentence for a person: no protocol frames, traces, or the internals named in ``forbidden``."""
    assert text.strip()
    for raw in ('"jsonrpc"', "Traceback", 'File "', "AppServerError", "Exception", *forbidden):
        assert raw not in text, text


async def stored(client, task_id: str):
    return await client.get_task(GetTaskRequest(id=task_id))


def artifact_text(task) -> str:
    """What readers that take the first text part of the first artifact show."""
    return task.artifacts[0].parts[0].text if task.artifacts and task.artifacts[0].parts else ""


def pids_running(argv: list[bytes], under: int | None = None) -> set[int]:
    """Live processes whose argv is exactly ``argv`` (optionally below pid ``under``)."""
    found = set()
    scope = set(descendants(under)) if under else None
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (scope is not None and int(entry) not in scope):
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1] == argv:
                found.add(int(entry))
    return rig.alive(found)


async def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


# ---------------------------------------------------------------------------- 1: a hung codex

INACTIVITY_S = 3.0
HUNG_BOUND_S = INACTIVITY_S + 5.0


async def test_item1_sigstop_with_300kb_message_in_flight_ends_every_task_then_recovers(tmp_path, model):
    """The 300 KB turn/start cannot be written to a stopped child: the write is bounded, the child
    is marked hung, every task ends within inactivity + 5 s, and the next message works."""
    async with serve_codex(tmp_path, model, inactivity_timeout=INACTIVITY_S, stream_idle_timeout_ms=60000) as served:
        client = await served.client(streaming=True)
        for context in ("big", "other"):
            assert terminal_state(await send(client, user_message(f"warm {context}", context_id=context))) == COMPLETED
        model.enqueue(Text("tick " * 300, chunk_delay=0.1))
        other = Call(client, user_message("long other", context_id="other"))
        await other.wait_for(lambda item: item.WhichOneof("payload") == "artifact_update")
        hung = served.app.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            big = Call(client, user_message("x" * 300_000, context_id="big"))
            for call in (big, other):
                items = await call.result(timeout=HUNG_BOUND_S + 10)
                assert time.monotonic() - stopped_at <= HUNG_BOUND_S, status_texts(items)
                assert terminal_state(items) == FAILED, status_texts(items)
                assert_readable(final_message(items))
            after = await send(client, user_message("after the hang", context_id="big"))
            assert terminal_state(after) == COMPLETED, status_texts(after)
            assert final_answer(after) == "echo: after the hang"
            history = model.requests[-1].all_user_texts
            assert history[0] == "warm big" and history[-1] == "after the hang", history[:1] + history[-1:]
            assert served.app.pid != hung
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)


# ---------------------------------------------------------------------------- 2: a running task id again


async def test_item2_message_for_a_running_task_id_never_runs_a_second_turn(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("the first answer", chunks=3), after_deltas=1, reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-task"))
        assert await asyncio.to_thread(reached.wait, 20)
        second = Call(client, user_message("second prompt", context_id="ctx-task", task_id=first.task_id))
        await asyncio.sleep(0.5)
        gate.set()
        first_items = await first.result(timeout=20)
        assert terminal_state(first_items) == COMPLETED and final_answer(first_items) == "the first answer"
        second_items = await second.result(timeout=20)  # ends: the caller gets that task's outcome
        assert terminal_state(second_items) in TERMINAL
        await asyncio.sleep(1.0)  # a second codex turn would have reached the model by now
        assert len(model.requests) == 1, [r.last_user_text for r in model.requests]
        task = await stored(client, first.task_id)
        assert task.status.state == COMPLETED
        assert artifact_text(task) == "the first answer"
        assert task.status.message.parts[0].text == "the first answer"


# ---------------------------------------------------------------------------- 3: the reply readers see


async def test_item3_cancel_leaves_the_canceled_sentence_in_the_answer_artifact(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("fragment then more " * 4, chunks=4), after_deltas=2, reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        call = Call(client, user_message("long job", context_id="ctx-cancel"))
        await call.wait_for(lambda item: item.WhichOneof("payload") == "artifact_update")
        assert await asyncio.to_thread(reached.wait, 20)
        await client.cancel_task(CancelTaskRequest(id=call.task_id))
        assert terminal_state(await call.result(timeout=10)) == CANCELED
        task = await stored(client, call.task_id)
        assert task.status.state == CANCELED
        assert [part.text for part in task.artifacts[0].parts] == ["Canceled by request."]
        gate.set()


async def test_item3_a_turn_failing_before_streaming_still_has_an_answer_artifact(tmp_path, model):
    model.enqueue(HttpError(500))
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        items = await send(client, user_message("fail please", context_id="ctx-fail"))
        task = items[-1].task
        assert task.status.state == FAILED
        reason = task.status.message.parts[0].text
        assert "provider is unavailable" in reason
        assert artifact_text(await stored(client, task.id)) == reason


# ---------------------------------------------------------------------------- 4: background commands

SLEEP = [b"sleep", b"300"]


@pytest.mark.parametrize("how", ["cancel", "watchdog"])
async def test_item4_cancel_and_watchdog_stop_the_agents_commands(tmp_path, model, how):
    model.enqueue(ToolCall("sleep 300"), Text("slept"))
    inactivity = 4.0 if how == "watchdog" else 300.0
    async with serve_codex(tmp_path, model, inactivity_timeout=inactivity) as served:
        client = await served.client(streaming=True)
        call = Call(client, user_message("run a long command", context_id=f"ctx-{how}"))
        assert await wait_until(lambda: pids_running(SLEEP, served.app.pid), 15), "the command never started"
        sleepers = pids_running(SLEEP, served.app.pid)
        # Seconds in, codex has made it a background terminal, which turn/interrupt leaves running
        # (interrupted in the first fraction of a second, codex still kills it itself).
        await asyncio.sleep(3.0)
        if how == "cancel":
            await client.cancel_task(CancelTaskRequest(id=call.task_id))
        items = await call.result(timeout=20)
        ended = time.monotonic()
        assert terminal_state(items) == (CANCELED if how == "cancel" else FAILED), status_texts(items)
        await asyncio.sleep(max(0.0, ended + 3.0 - time.monotonic()))
        assert not rig.alive(sleepers), f"{how}: sleep 300 still running 3 s later"
        assert served.app.running  # stopped by codex (backgroundTerminals/clean), not by a restart
        after = await send(client, user_message("still there?", context_id=f"ctx-{how}"))
        assert terminal_state(after) == COMPLETED, status_texts(after)


# ---------------------------------------------------------------------------- 5: shutdown with a queue


async def test_item5_shutdown_fails_the_queue_in_order_and_starts_no_turn(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("held answer"), reached=reached))
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        running = Call(client, user_message("running", context_id="ctx-down"))
        assert await asyncio.to_thread(reached.wait, 20)
        queued = []
        for index in range(3):
            queued.append(Call(client, user_message(f"queued {index}", context_id="ctx-down")))
            await queued[-1].wait_status(WAITING)
        requests_before = len(model.requests)
        await served.executor.shutdown()
        ended = []
        for call in [running, *queued]:
            items = await call.result(timeout=5)  # shutdown() returned: every task is already over
            ended.append(terminal_state(items))
            assert_readable(final_message(items))
        assert ended == [FAILED] * 4
        assert "shutting down" in final_message(running.items)
        assert [final_message(call.items) for call in queued] == [SHUTTING_DOWN] * 3
        await asyncio.sleep(0.5)
        assert len(model.requests) == requests_before, [r.last_user_text for r in model.requests]
        for call in [running, *queued]:
            assert (await stored(client, call.task_id)).status.state == FAILED
        gate.set()


# ---------------------------------------------------------------------------- 6: unload racing a message

ROUNDS = 200


async def test_item6_unload_racing_a_message_200_rounds(tmp_path, model):
    async with serve_codex(tmp_path, model, idle_unload_after=600) as served:
        client = await served.client(streaming=False)
        executor = served.executor
        assert terminal_state(await send(client, user_message("round start", context_id="ctx-u"))) == COMPLETED
        sent = ["round start"]
        unloaded = 0
        for index in range(ROUNDS):
            text = f"round {index}"
            message = asyncio.create_task(send(client, user_message(text, context_id="ctx-u")))
            await asyncio.sleep((index % 8) * 0.001)  # the unload starts before, during or after the message
            unloaded += await executor.unload_idle(now=time.monotonic() + 3600)
            items = await message
            sent.append(text)
            assert terminal_state(items) == COMPLETED, (index, final_message(items))
            assert final_answer(items) == f"echo: {text}", index
        records = sorted(model.requests, key=lambda record: record.received_at)
        for earlier, later in itertools.pairwise(records):
            assert later.received_at >= earlier.finished_at, "two turns of one thread overlapped"
        assert records[-1].all_user_texts == sent  # one thread, nothing lost
        assert unloaded > 0
        print(f"{ROUNDS} rounds: {unloaded} unloads raced a message")


# ---------------------------------------------------------------------------- 8: MCP servers per thread


def mcp_servers(app) -> set[int]:
    found = set()
    for pid in descendants(app.pid):
        with contextlib.suppress(OSError):
            if str(MCP_STUB).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return rig.alive(found)


async def test_item8_unloading_a_thread_stops_its_mcp_server(tmp_path, model):
    """Measured on 0.163: thread/unsubscribe leaves the thread loaded and its MCP server running
    (codex unloads it after 30 min); thread/archive unloads it at once, and unarchive + resume
    brings it back with its history."""
    notes = tmp_path / "notes.txt"
    toml = (f'[mcp_servers.molecule]\ncommand = "{sys.executable}"\nargs = ["{MCP_STUB}"]\n'
            f'env = {{ NOTES_FILE = "{notes}" }}\nstartup_timeout_sec = 20\n')
    async with serve_codex(tmp_path, model, idle_unload_after=600, extra_toml=toml) as served:
        client = await served.client(streaming=False)
        contexts = [f"mcp-{index}" for index in range(4)]
        for context in contexts:
            assert terminal_state(await send(client, user_message(f"hello {context}", context_id=context))) == COMPLETED
        assert await wait_until(lambda: len(mcp_servers(served.app)) == len(contexts), 10), mcp_servers(served.app)
        assert await served.executor.unload_idle(now=time.monotonic() + 3600) == len(contexts)
        assert await wait_until(lambda: not mcp_servers(served.app), 5), "MCP servers outlived their threads"
        loaded = await served.app.request("thread/loaded/list", {})
        assert loaded["data"] == []
        items = await send(client, user_message("back again", context_id=contexts[0]))
        assert terminal_state(items) == COMPLETED, final_message(items)
        assert model.requests[-1].all_user_texts == [f"hello {contexts[0]}", "back again"]
        assert await wait_until(lambda: len(mcp_servers(served.app)) == 1, 10)


# ---------------------------------------------------------------------------- 9: read in the code, each checked


def _take_pid(target: int, argv: list[str]) -> subprocess.Popen | None:
    """Start ``argv`` as pid ``target`` (in its own session) via ns_last_pid; None if another fork won."""
    for _attempt in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(target - 1))
        proc = subprocess.Popen(argv, start_new_session=True)
        if proc.pid == target:
            return proc
        proc.kill()
        proc.wait()
    return None


async def test_item9_late_restart_does_not_signal_a_process_that_reused_the_pid(tmp_path, model):
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("needs a writable /proc/sys/kernel/ns_last_pid (root in a pid namespace) to reuse a pid")
    app = await rig.started_app_server(tmp_path, model)
    victim = None
    try:
        old = app.pid
        os.kill(old, signal.SIGKILL)
        assert await wait_until(lambda: not app.running and not Path(f"/proc/{old}").exists(), 10)
        victim = _take_pid(old, ["bash", "-c", "sleep 60 & wait"])
        assert victim is not None, f"could not reuse pid {old}"
        assert await wait_until(lambda: bool(descendants(victim.pid)), 5)
        victims_child = set(descendants(victim.pid))
        await app.restart()  # late: the dead child's pid now names the victim
        assert victim.poll() is None, "the restart killed the process that reused codex's pid"
        assert rig.alive(victims_child) == victims_child, "the restart killed a child of that process"
        assert app.running and app.pid != old
    finally:
        if victim is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
        await app.close()


async def test_item9_resume_error_other_than_thread_gone_keeps_the_binding_and_history(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        first = await send(client, user_message("remember the word otter", context_id="ctx-keep"))
        thread_id = first[-1].task.status.message.metadata["thread_id"]
        await served.app.restart()  # the next message must resume the thread
        original = served.app.request
        failures = []

        async def overloaded_once(method, params=None, **kwargs):
            if method == "thread/resume" and not failures:
                failures.append(method)
                raise AppServerError(method, -32001, "Server overloaded; retry later.")
            return await original(method, params, **kwargs)

        served.app.request = overloaded_once
        items = await send(client, user_message("which word?", context_id="ctx-keep"))
        assert items[-1].task.status.state == FAILED
        assert_readable(items[-1].task.status.message.parts[0].text)
        assert served.executor.store.get("ctx-keep") == thread_id  # not rebound to an empty thread
        again = await send(client, user_message("which word, again?", context_id="ctx-keep"))
        assert again[-1].task.status.state == COMPLETED
        assert again[-1].task.status.message.metadata["thread_id"] == thread_id
        assert model.requests[-1].all_user_texts == ["remember the word otter", "which word, again?"]


async def test_item9_steered_request_counts_usage_once(tmp_path, model):
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("held answer " * 4, chunks=4), after_deltas=1, reached=reached))
    async with serve_codex(tmp_path, model, on_busy="steer", stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-usage"))
        assert await asyncio.to_thread(reached.wait, 20)
        second = Call(client, user_message("also this", context_id="ctx-usage"))
        await second.wait_status(JOINED)
        gate.set()
        first_items, second_items = await first.result(), await second.result()
        assert terminal_state(first_items) == terminal_state(second_items) == COMPLETED
        reported = [items[-1].status_update.metadata["usage"]["input_tokens"] for items in (first_items, second_items)]
        spent = sum(record.usage.input_tokens for record in model.requests if record.usage)
        assert sum(reported) == spent, (reported, spent)
        assert second_items[-1].status_update.metadata["usage_counted_on_task"] == first.task_id


async def test_item9_steered_request_does_not_inherit_the_cancel_of_the_turn_it_joined(tmp_path, model):
    held, reached, resampled = threading.Event(), threading.Event(), threading.Event()
    # The steer aborts the first stream; the re-sample (which answers both messages) is held too.
    model.enqueue(Hold(held, Text("first stream"), reached=reached),
                  Hold(held, Text("answer for both", chunks=2), reached=resampled))
    async with serve_codex(tmp_path, model, on_busy="steer", stream_idle_timeout_ms=30000) as served:
        client = await served.client(streaming=True)
        first = Call(client, user_message("first prompt", context_id="ctx-inherit"))
        assert await asyncio.to_thread(reached.wait, 20)
        second = Call(client, user_message("also this", context_id="ctx-inherit"))
        await second.wait_status(JOINED)
        assert await asyncio.to_thread(resampled.wait, 20)
        await client.cancel_task(CancelTaskRequest(id=first.task_id))
        assert terminal_state(await first.result(timeout=10)) == CANCELED
        held.set()
        second_items = await second.result(timeout=20)
        assert terminal_state(second_items) == COMPLETED, final_message(second_items)
        assert final_answer(second_items) == "answer for both"


async def test_item9_a_locked_conversation_map_does_not_freeze_other_conversations(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        assert terminal_state(await send(client, user_message("warm", context_id="ctx-free"))) == COMPLETED
        holder = sqlite3.connect(served.state_dir / DB_FILENAME, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the map's write lock
        try:
            new = asyncio.create_task(send(client, user_message("needs a binding", context_id="ctx-new")))
            await asyncio.sleep(0.3)  # its thread/start is done; its bind waits for the lock
            started = time.monotonic()
            items = await send(client, user_message("not blocked", context_id="ctx-free"))
            assert terminal_state(items) == COMPLETED
            assert time.monotonic() - started < 2.0, "a wait on the map froze the event loop"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        items = await new
        assert terminal_state(items) == COMPLETED, final_message(items)


async def test_item9_store_errors_and_binary_paths_do_not_reach_callers(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        secret_path = str(served.state_dir)

        def unwritable(key, thread_id):
            raise ConversationStoreError(f"cannot save the conversation map at {secret_path}/{DB_FILENAME}: disk I/O")

        served.executor.store.bind = unwritable
        items = await send(client, user_message("hello", context_id="ctx-store"))
        text = items[-1].task.status.message.parts[0].text
        assert items[-1].task.status.state == FAILED
        assert_readable(text, secret_path, DB_FILENAME)
        missing = tmp_path / "opt" / "no-such-codex"
        served.app._binary = CodexBinary(path=missing, source="CODEX_BIN")
        with contextlib.suppress(OSError):
            await served.app.restart()  # fails: the binary is gone; the next message sees it unavailable
        items = await send(client, user_message("hello again", context_id="ctx-store"))
        text = items[-1].task.status.message.parts[0].text
        assert items[-1].task.status.state == FAILED
        assert "codex is not available right now" in text
        assert_readable(text, str(missing), str(tmp_path))


# ---------------------------------------------------------------------------- issue 13: seed history once


def canvas_request(text: str, history: list[dict]) -> SendMessageRequest:
    """The April/May canvas shape: no contextId, prior turns in params.metadata.history."""
    metadata = struct_pb2.Struct()
    metadata.update({"source": "canvas_user", "history": history})
    return SendMessageRequest(message=user_message(text), metadata=metadata)


def turn(role: str, text: str) -> dict:
    return {"role": role, "parts": [{"kind": "text", "text": text}]}


async def test_history_seeds_a_new_thread_exactly_once(tmp_path, model):
    model.responder = lambda record: Text("noted")  # an echo would copy the history into the reply
    async with serve_codex(tmp_path, model, workspace_id="ws-seed") as served:
        client = await served.client(streaming=False)
        history = [turn("user", "my name is Ada Lovelace"), turn("agent", "Hello Ada")]
        for text in ("what is my name?", "and again?"):
            items = [item async for item in client.send_message(canvas_request(text, history),
                                                                   context=ClientCallContext(timeout=60))]
            assert items[-1].task.status.state == COMPLETED
            history = [*history, turn("user", text), turn("agent", final_message(items))]
        first, second = model.requests
        for record in (first, second):
            body = json.dumps(record.input)
            assert body.count("my name is Ada Lovelace") == 1, body
            assert body.count(HISTORY_HEADER) == 1
        assert second.body["prompt_cache_key"] == first.body["prompt_cache_key"]  # one codex thread

