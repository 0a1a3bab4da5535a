"""Contract tests for :mod:`app_server` against the real pinned codex binary and the scripted model.

Every test marked ``real_codex`` spawns ``codex app-server`` from the ``openai-codex-cli-bin``
wheel; the model is :class:`scripted_model.ScriptedModel` on loopback. Framing cases the real
binary cannot produce live in ``test_app_server_framing.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import codex_rig as rig
import pytest

from molecule_codex import codex_binary
from molecule_codex.app_server import AppServer, AppServerError, AppServerExited, ThreadSubscription
from molecule_codex.demo.scripted_model import Hold, ScriptedModel, Text, ToolCall
from molecule_codex.server_requests import COMMAND_APPROVAL, Answer, PolicyCallable, ServerRequest, ServerRequestPolicy

pytestmark = pytest.mark.timeout(20)

#: Bound for a scripted-model hold to be reached (codex opens the stream in well under a second).
HOLD_REACHED_TIMEOUT_S = 10.0



@pytest.fixture
async def app(tmp_path: Path, model: ScriptedModel) -> AsyncIterator[AppServer]:
    server = await rig.started_app_server(tmp_path, model)
    try:
        yield server
    finally:
        await server.close()


class RecordingPolicy:
    """Wraps a policy and records every server request it was asked about."""

    def __init__(self, inner: PolicyCallable) -> None:
        self.inner = inner
        self.requests: list[ServerRequest] = []

    async def __call__(self, request: ServerRequest) -> Answer:
        self.requests.append(request)
        return await self.inner(request)


async def wait_thread_event(event: threading.Event, timeout: float = HOLD_REACHED_TIMEOUT_S) -> None:
    """Wait for a scripted-model threading.Event without blocking the loop."""
    assert await asyncio.to_thread(event.wait, timeout), "scripted model never reached the hold"


# --------------------------------------------------------------------------- 1. handshake and version


@pytest.mark.real_codex
async def test_handshake_reports_pinned_version(app: AppServer) -> None:
    assert codex_binary.PINNED_CODEX_VERSION in app.init_result["userAgent"]
    assert app.init_result["userAgent"].startswith("molecule-codex/")
    assert Path(app.init_result["codexHome"]) == app.codex_home
    assert app.running and app.generation == 1
    assert app.binary.check_version() == codex_binary.parse_version(codex_binary.PINNED_CODEX_VERSION)


def test_unsupported_version_error_names_both_versions(tmp_path: Path) -> None:
    assert codex_binary.parse_version("codex-cli 0.1.0") == (0, 1, 0)
    assert codex_binary.is_supported(codex_binary.parse_version(codex_binary.PINNED_CODEX_VERSION))
    assert not codex_binary.is_supported((0, 1, 0))
    assert not codex_binary.is_supported(codex_binary.SUPPORTED_BELOW)

    fake = tmp_path / "old-codex"
    fake.write_text("#!/bin/sh\necho 'codex-cli 0.1.0'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    binary = codex_binary.resolve_codex_binary({**os.environ, "CODEX_BIN": str(fake)})
    assert binary.source == "CODEX_BIN"
    with pytest.raises(codex_binary.CodexBinaryError) as caught:
        binary.check_version()
    assert "0.1.0" in str(caught.value)
    assert codex_binary.PINNED_CODEX_VERSION in str(caught.value)


# --------------------------------------------------------------------------- 2-4. threads and turns


@pytest.mark.real_codex
async def test_thread_start_applies_sandbox_approval_and_cwd(app: AppServer, tmp_path: Path) -> None:
    cwd = rig.workspace(tmp_path)
    thread_id, result = await rig.start_thread(app, cwd)
    assert thread_id
    assert result["sandbox"]["type"] == "workspaceWrite"
    assert result["approvalPolicy"] == "never"
    assert result["cwd"] == str(cwd)
    assert result["thread"]["cwd"] == str(cwd)


@pytest.mark.real_codex
async def test_text_turn_streams_deltas_and_completes(app: AppServer, model: ScriptedModel, tmp_path: Path) -> None:
    scripted = "The quick brown fox jumps over the lazy dog"
    model.enqueue(Text(scripted))
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path))

    final, turn = await rig.run_text_turn(app, thread_id, "tell me about foxes")

    assert turn.status == "completed"
    assert final == scripted
    assert turn.delta_text == scripted
    assert turn.methods().count("item/agentMessage/delta") == len(scripted.split())
    assert turn.methods()[-1] == "turn/completed"
    assert model.requests[-1].last_user_text == "tell me about foxes"


@pytest.mark.real_codex
async def test_tool_turn_runs_command_in_cwd(app: AppServer, model: ScriptedModel, tmp_path: Path) -> None:
    cwd = rig.workspace(tmp_path)
    model.enqueue(ToolCall(cmd="printf 'made by codex' > made.txt"), Text("file written"))
    thread_id, _ = await rig.start_thread(app, cwd)

    final, turn = await rig.run_text_turn(app, thread_id, "write the file")

    assert turn.status == "completed"
    assert final == "file written"
    assert (cwd / "made.txt").read_text() == "made by codex"
    [command] = turn.items("commandExecution")
    assert command["status"] == "completed"
    assert command["exitCode"] == 0
    assert command["cwd"] == str(cwd)
    assert "exited with code 0" in model.requests[-1].function_call_outputs[-1]["output"]


# --------------------------------------------------------------------------- 5. concurrency


@pytest.mark.real_codex
async def test_eight_threads_run_turns_in_parallel(app: AppServer, model: ScriptedModel, tmp_path: Path) -> None:
    threads = 8
    # Each reply streams for 1 s (0.5 s before the first delta, 0.5 s before the second).
    model.enqueue(*(Text("slow reply", chunks=2, first_delay=0.5, chunk_delay=0.5) for _ in range(threads)))
    cwd = rig.workspace(tmp_path)
    thread_ids = [tid for tid, _ in await asyncio.gather(*(rig.start_thread(app, cwd) for _ in range(threads)))]

    started = time.monotonic()
    results = await asyncio.gather(*(rig.run_text_turn(app, tid, f"prompt {tid}") for tid in thread_ids))
    elapsed = time.monotonic() - started

    assert [final for final, _ in results] == ["slow reply"] * threads
    assert all(turn.status == "completed" for _, turn in results)
    durations = [record.finished_at - record.received_at for record in model.requests]
    assert len(durations) == threads and min(durations) >= 0.9  # sequential would take >= 8 s
    assert elapsed < 5.0, f"8 one-second turns took {elapsed:.1f}s"


# --------------------------------------------------------------------------- 6. interrupt


@pytest.mark.real_codex
async def test_interrupt_mid_stream_completes_interrupted(app: AppServer, model: ScriptedModel, tmp_path: Path) -> None:
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("one two three four"), after_deltas=1, reached=reached))
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path))
    sub = app.subscribe(thread_id)
    try:
        turn_id = await rig.start_turn(app, thread_id, "start talking")
        await wait_thread_event(reached)

        started = time.monotonic()
        assert await app.request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id}, timeout=5) == {}
        turn = await rig.collect_turn(sub, turn_id, timeout=5)
        elapsed = time.monotonic() - started
    finally:
        gate.set()
        sub.close()

    assert turn.status == "interrupted"
    assert elapsed < 2.0
    record = model.requests[-1]
    assert record.wait_finished(5)
    assert record.client_disconnected


# --------------------------------------------------------------------------- 7. resume in a new process


@pytest.mark.real_codex
async def test_resume_in_new_process_replays_history(model: ScriptedModel, tmp_path: Path) -> None:
    cwd = rig.workspace(tmp_path)
    first = await rig.started_app_server(tmp_path, model)
    try:
        thread_id, _ = await rig.start_thread(first, cwd)
        final, _ = await rig.run_text_turn(first, thread_id, "first prompt: remember the word heliotrope")
        assert final.startswith("echo: first prompt")
        first_pid = first.pid
    finally:
        await first.close()

    second = await rig.started_app_server(tmp_path, model)  # same CODEX_HOME, new process
    try:
        assert second.pid != first_pid
        with pytest.raises(AppServerError, match="thread not found"):
            await rig.start_turn(second, thread_id, "too early")
        resumed = await rig.resume_thread(second, thread_id, cwd)
        assert resumed["thread"]["id"] == thread_id
        assert resumed["sandbox"]["type"] == "workspaceWrite"
        assert resumed["cwd"] == str(cwd)
        final, turn = await rig.run_text_turn(second, thread_id, "second prompt: what was the word?")
    finally:
        await second.close()

    assert turn.status == "completed"
    assert final == "echo: second prompt: what was the word?"
    assert model.requests[-1].all_user_texts == [
        "first prompt: remember the word heliotrope",
        "second prompt: what was the word?",
    ]


# --------------------------------------------------------------------------- 8. big lines


@pytest.mark.real_codex
async def test_multi_megabyte_lines_keep_the_channel_working(
    app: AppServer, model: ScriptedModel, tmp_path: Path
) -> None:
    five_mb = 5 * 1024 * 1024
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path))

    # Outgoing 5 MB line: codex reads all of it and answers (it caps input at 1 MiB characters).
    with pytest.raises(AppServerError, match="maximum length"):
        await rig.start_turn(app, thread_id, "p" * five_mb)

    # Incoming ~1 MB lines: the largest prompt codex accepts is echoed in the userMessage item.
    prompt = "q" * (1024 * 1024 - 8) + "-the-end"
    model.enqueue(Text("got it"))
    final, turn = await rig.run_text_turn(app, thread_id, prompt)
    assert final == "got it"
    started = [e.params["item"] for e in turn.events if e.method == "item/started"]
    [echoed] = [item for item in started if item["type"] == "userMessage"]
    assert echoed["content"][0]["text"] == prompt

    # Incoming 5 MB lines: a 5 MB model reply arrives as one delta, one item, one turn/completed.
    reply = "r" * five_mb + "-the-end"
    model.enqueue(Text(reply, chunks=1))
    final, turn = await rig.run_text_turn(app, thread_id, "now a long answer")
    assert final == reply
    assert turn.delta_text == reply
    assert turn.completed["items"][-1]["text"] == reply

    # And an ordinary turn afterwards still works, with the whole history sent to the model.
    final, turn = await rig.run_text_turn(app, thread_id, "short again")
    assert final == "echo: short again"
    assert app.running
    assert len(json.dumps(model.requests[-1].body)) > five_mb


# --------------------------------------------------------------------------- 9. crash and restart


async def read_until_failure(sub: ThreadSubscription) -> None:
    """Consume events until the subscription fails; the failure is the result."""
    while True:
        await sub.get(timeout=10)


@pytest.mark.real_codex
async def test_kill_9_fails_waiters_then_restart_works(app: AppServer, model: ScriptedModel, tmp_path: Path) -> None:
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("never finished"), reached=reached))
    cwd = rig.workspace(tmp_path)
    thread_id, _ = await rig.start_thread(app, cwd)
    sub = app.subscribe(thread_id)
    old_pid = app.pid
    assert old_pid is not None
    try:
        await rig.start_turn(app, thread_id, "hold on")
        await wait_thread_event(reached)
        # Freeze the child so the next request is certainly still pending when it dies.
        os.kill(old_pid, signal.SIGSTOP)
        pending = asyncio.ensure_future(app.request("thread/list", {}, timeout=10))
        reader = asyncio.ensure_future(read_until_failure(sub))
        await asyncio.sleep(0.05)
        assert not pending.done() and not reader.done()

        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(reader, pending, return_exceptions=True), 5)
        elapsed = time.monotonic() - killed_at
    finally:
        gate.set()

    for result in results:
        assert isinstance(result, AppServerExited), result
        assert result.returncode == -signal.SIGKILL
    assert elapsed < 1.0
    assert not app.running
    with pytest.raises(AppServerExited):
        await app.request("thread/list", {})
    assert old_pid not in rig.codex_pids()

    await app.ensure_running()  # backoff: 1 s before the first restart
    assert app.running and app.generation == 2 and app.pid != old_pid
    new_thread, _ = await rig.start_thread(app, cwd)
    final, turn = await rig.run_text_turn(app, new_thread, "after the crash")
    assert turn.status == "completed"
    assert final == "echo: after the crash"


# --------------------------------------------------------------------------- 10-11. server requests


@pytest.mark.real_codex
async def test_approval_request_is_declined_by_policy(model: ScriptedModel, tmp_path: Path) -> None:
    policy = RecordingPolicy(ServerRequestPolicy(approval_policy="on-request"))
    app = await rig.started_app_server(tmp_path, model, policy=policy)
    cwd = rig.workspace(tmp_path)
    model.enqueue(
        ToolCall(cmd="printf escaped > escalated.txt", sandbox_permissions="require_escalated", justification="test"),
        Text("understood, not writing"),
    )
    try:
        thread_id, _ = await rig.start_thread(app, cwd, approval="on-request")
        final, turn = await rig.run_text_turn(app, thread_id, "write outside please")
    finally:
        await app.close()

    assert [request.method for request in policy.requests] == [COMMAND_APPROVAL]
    assert policy.requests[0].thread_id == thread_id
    assert turn.status == "completed"
    assert final == "understood, not writing"
    [command] = turn.items("commandExecution")
    assert command["status"] == "declined"
    assert "serverRequest/resolved" in turn.methods()
    assert not (cwd / "escalated.txt").exists()
    assert "rejected" in model.requests[-1].function_call_outputs[-1]["output"]


@pytest.mark.real_codex
async def test_hanging_policy_is_declined_after_deadline(model: ScriptedModel, tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def never_decides(_request: ServerRequest) -> Answer:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    policy = RecordingPolicy(never_decides)
    app = await rig.started_app_server(tmp_path, model, policy=policy, server_request_deadline=1.0)
    cwd = rig.workspace(tmp_path)
    model.enqueue(
        ToolCall(cmd="printf escaped > escalated.txt", sandbox_permissions="require_escalated", justification="test"),
        Text("carried on"),
    )
    try:
        thread_id, _ = await rig.start_thread(app, cwd, approval="on-request")
        started = time.monotonic()
        final, turn = await rig.run_text_turn(app, thread_id, "try the escalated write")
        elapsed = time.monotonic() - started
    finally:
        await app.close()

    assert [request.method for request in policy.requests] == [COMMAND_APPROVAL]
    assert cancelled.is_set()
    assert elapsed >= 1.0  # the answer waited for the deadline
    assert turn.status == "completed"
    assert final == "carried on"
    assert turn.items("commandExecution")[0]["status"] == "declined"
    assert not (cwd / "escalated.txt").exists()


# --------------------------------------------------------------------------- 12. close


def app_server_tasks() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("app-server-") and not task.done()]


@pytest.mark.real_codex
async def test_close_leaves_no_process_or_task(model: ScriptedModel, tmp_path: Path) -> None:
    app = await rig.started_app_server(tmp_path, model)
    assert app.pid in rig.codex_pids()
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path))
    final, _ = await rig.run_text_turn(app, thread_id, "hello")
    assert final == "echo: hello"
    ours = rig.process_tree(app.pid)  # other suites may run codex too: look only at ours
    assert app_server_tasks()  # reader, stderr drain and exit watcher are running

    await app.close()
    assert rig.alive(ours) == set()
    assert not (ours & rig.codex_pids())
    assert app_server_tasks() == []
    assert not app.running

    await app.close()  # idempotent
    with pytest.raises(AppServerExited):
        await app.request("thread/list", {})
    with pytest.raises(AppServerExited):
        await app.start()
    with pytest.raises(AppServerExited):
        await app.ensure_running()
