"""Approvals: codex's requests for a person, answered through :mod:`molecule_codex.approvals`.

The ``real_codex`` tests drive the pinned binary at the AppServer level with the scripted model. A
:class:`Person` policy does what the executor will do (build a :class:`PendingApproval`, wait for
it), and the test plays the person through :meth:`PendingApproval.offer`. The rest are unit tests of
parsing and answer shapes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import codex_rig as rig
import pytest

from molecule_codex import approvals
from molecule_codex.app_server import AppServer, Notification
from molecule_codex.approvals import FileChangeTracker, PendingApproval, Resolution
from molecule_codex.demo.scripted_model import PATCH_CONTENT, FunctionCall, ScriptedModel, Text
from molecule_codex.server_requests import (
    COMMAND_APPROVAL,
    FILE_CHANGE_APPROVAL,
    MCP_ELICITATION,
    Answer,
    ServerRequest,
    ServerRequestPolicy,
)

pytestmark = pytest.mark.timeout(40)

#: A catalog slug: codex offers apply_patch (and Plan mode) only to models it knows.
CATALOG_MODEL = "gpt-5.5"
PROMPT_TIMEOUT_S = 10.0
MCP_STUB = Path(__file__).with_name("mcp_stub_server.py")


class Person:
    """The AppServer policy the executor will install: a person answers what needs one."""

    def __init__(self, approval_policy: str = "on-request", timeout: float = 30.0) -> None:
        self.approval_policy = approval_policy
        self.timeout = timeout
        self.tracker = FileChangeTracker()
        self.prompts: asyncio.Queue[PendingApproval] = asyncio.Queue()
        self.resolutions: list[Resolution] = []
        self.automatic = ServerRequestPolicy(approval_policy=approval_policy)

    async def __call__(self, request: ServerRequest) -> Answer:
        if not approvals.needs_person(
            request, approval_policy=self.approval_policy, trusted_mcp_servers=self.automatic.trusted_mcp_servers
        ):
            return await self.automatic(request)
        pending = await PendingApproval.from_request(request, self.tracker)
        await self.prompts.put(pending)
        resolution = await pending.wait(self.timeout)
        self.resolutions.append(resolution)
        return resolution.answer

    async def next_prompt(self) -> PendingApproval:
        return await asyncio.wait_for(self.prompts.get(), PROMPT_TIMEOUT_S)


async def run_turn(app: AppServer, person: Person, thread_id: str, text: str, **extra: Any) -> rig.TurnRecord:
    """One turn, every event shown to the person's file-change tracker (as the executor's router will)."""
    sub = app.subscribe(thread_id)
    try:
        params = {"threadId": thread_id, "input": [{"type": "text", "text": text}], **extra}
        turn_id = (await app.request("turn/start", params, timeout=rig.REQUEST_TIMEOUT_S))["turn"]["id"]
        record = rig.TurnRecord()
        deadline = time.monotonic() + 30
        while True:
            event: Notification = await sub.get(timeout=max(0.01, deadline - time.monotonic()))
            person.tracker.observe(event)
            record.events.append(event)
            if event.method == "turn/completed" and event.turn_id == turn_id:
                record.completed = event.params["turn"]
                return record
    finally:
        sub.close()



@pytest.fixture
def person() -> Person:
    return Person()


@pytest.fixture
async def app(tmp_path: Path, model: ScriptedModel, person: Person) -> AsyncIterator[AppServer]:
    server = await rig.started_app_server(tmp_path, model, policy=person, server_request_deadline=60)
    try:
        yield server
    finally:
        await server.close()


def last_tool_output(model: ScriptedModel) -> str:
    """What codex told the model about the last tool call."""
    outputs = [
        item
        for item in model.requests[-1].input
        if item.get("type") in ("function_call_output", "custom_tool_call_output")
    ]
    output = outputs[-1]["output"]
    return output if isinstance(output, str) else json.dumps(output)


# --------------------------------------------------------------------------- commands (real binary)


@pytest.mark.real_codex
async def test_approved_command_runs_and_prompt_reads_as_text(
    app: AppServer, person: Person, model: ScriptedModel, tmp_path: Path
) -> None:
    target = tmp_path / "approved.txt"
    cwd = rig.workspace(tmp_path)
    thread_id, _ = await rig.start_thread(app, cwd, approval="on-request")

    turn = asyncio.create_task(run_turn(app, person, thread_id, f"[escalate=printf ran > {target}]"))
    pending = await person.next_prompt()
    assert pending.kind == "command"
    assert f"printf ran > {target}" in pending.prompt_text
    assert f"in {cwd}" in pending.prompt_text
    assert "Why: scripted: run" in pending.prompt_text
    assert pending.prompt_text.endswith("Reply approve / approve for session / deny.")
    assert pending.prompt_data["type"] == approvals.DATA_TYPE
    assert pending.prompt_data["allowedAnswers"] == ["approve", "approve for session", "deny"]
    assert pending.prompt_data["threadId"] == thread_id
    assert pending.prompt_data["cwd"] == str(cwd)
    assert not target.exists()  # codex waits for the person

    assert pending.offer("  Approve. ").accepted
    record = await turn

    assert record.status == "completed"
    assert target.read_text() == "ran"
    [command] = record.items("commandExecution")
    assert command["status"] == "completed"
    assert person.resolutions[0].how == "answered"
    assert person.resolutions[0].answer.result == {"decision": "accept"}


@pytest.mark.real_codex
async def test_denied_command_does_not_run_and_codex_carries_on(
    app: AppServer, person: Person, model: ScriptedModel, tmp_path: Path
) -> None:
    target = tmp_path / "denied.txt"
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")

    turn = asyncio.create_task(run_turn(app, person, thread_id, f"[escalate=printf ran > {target}]"))
    assert (await person.next_prompt()).offer("NO").accepted
    record = await turn

    assert record.status == "completed"
    assert not target.exists()
    assert record.items("commandExecution")[0]["status"] == "declined"
    assert record.final_text.startswith("echo: [escalate=")  # the model answered after the refusal
    assert "rejected" in last_tool_output(model)


@pytest.mark.real_codex
async def test_garbage_reply_reprompts_then_data_part_answers(app: AppServer, person: Person, tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")

    turn = asyncio.create_task(run_turn(app, person, thread_id, f"[escalate=printf ran > {target}]"))
    pending = await person.next_prompt()
    reply = pending.offer("what does this do?")
    assert not reply.accepted
    assert reply.reprompt.startswith('"what does this do?" is not an answer, and codex is still waiting.')
    assert pending.prompt_text in reply.reprompt
    assert not pending.offer("", [{"decision": "maybe"}]).accepted
    await asyncio.sleep(0.3)
    assert not target.exists()  # a non-answer is never a silent decision

    assert pending.offer("", [{"decision": "approve"}]).accepted
    record = await turn
    assert record.status == "completed"
    assert target.read_text() == "ran"
    assert not pending.offer("deny").accepted  # a second answer changes nothing


@pytest.mark.real_codex
async def test_approve_for_session_skips_the_second_prompt(app: AppServer, person: Person, tmp_path: Path) -> None:
    target = tmp_path / "twice.txt"
    command = f"printf x >> {target}"
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")

    turn = asyncio.create_task(run_turn(app, person, thread_id, f"[escalate={command}] [escalate={command}]"))
    assert (await person.next_prompt()).offer("approve for session").accepted
    record = await turn

    assert record.status == "completed"
    assert target.read_text() == "xx"  # both ran
    assert person.prompts.empty() and len(person.resolutions) == 1  # asked once
    assert person.resolutions[0].answer.result == {"decision": "acceptForSession"}


@pytest.mark.real_codex
async def test_unanswered_command_is_declined_after_the_timeout(model: ScriptedModel, tmp_path: Path) -> None:
    person = Person(timeout=0.5)
    target = tmp_path / "late.txt"
    app = await rig.started_app_server(tmp_path, model, policy=person, server_request_deadline=60)
    try:
        thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")
        turn = asyncio.create_task(run_turn(app, person, thread_id, f"[escalate=printf ran > {target}]"))
        pending = await person.next_prompt()
        record = await turn
    finally:
        await app.close()

    [resolution] = person.resolutions
    assert resolution.how == "timeout"
    assert resolution.sentence == "No answer to codex's request within 0.5 seconds, so it was declined."
    assert resolution.answer.result == {"decision": "decline"}
    assert record.status == "completed"
    assert record.items("commandExecution")[0]["status"] == "declined"
    assert not target.exists()
    assert not pending.offer("approve").accepted  # too late: codex already has its answer


@pytest.mark.real_codex
async def test_cancel_while_waiting_interrupts_the_turn_and_keeps_history(
    app: AppServer, person: Person, model: ScriptedModel, tmp_path: Path
) -> None:
    target = tmp_path / "cancelled.txt"
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")

    turn = asyncio.create_task(run_turn(app, person, thread_id, f"[escalate=printf ran > {target}]"))
    pending = await person.next_prompt()
    assert pending.cancel()
    assert not pending.cancel()  # once
    record = await turn

    assert record.status == "interrupted"
    assert person.resolutions[0].how == "cancelled"
    assert person.resolutions[0].answer.result == {"decision": "cancel"}
    assert not target.exists()
    final, after = await rig.run_text_turn(app, thread_id, "still there?")
    assert after.status == "completed" and final == "echo: still there?"
    assert any("[escalate=" in text for text in model.requests[-1].all_user_texts)  # history kept


# --------------------------------------------------------------------------- file changes (real binary)


@pytest.mark.real_codex
async def test_file_change_prompt_carries_the_diff_and_deny_keeps_the_file_away(
    model: ScriptedModel, tmp_path: Path
) -> None:
    person = Person(approval_policy="untrusted")  # untrusted asks even for patches inside the workspace
    cwd = rig.workspace(tmp_path)
    app = await rig.started_app_server(tmp_path, model, policy=person, server_request_deadline=60)
    try:
        thread_id, _ = await rig.start_thread(app, cwd, approval="untrusted")
        turn = asyncio.create_task(run_turn(app, person, thread_id, "[patch=denied.txt]", model=CATALOG_MODEL))
        pending = await person.next_prompt()
        assert pending.kind == "fileChange"
        assert f"add {cwd / 'denied.txt'} (+1 -0)" in pending.prompt_text
        assert PATCH_CONTENT in pending.prompt_text
        [changed] = pending.prompt_data["files"]
        assert changed == {
            "path": str(cwd / "denied.txt"),
            "kind": "add",
            "added": 1,
            "removed": 0,
            "diff": PATCH_CONTENT + "\n",
        }
        assert pending.offer("deny").accepted
        denied = await turn

        turn = asyncio.create_task(run_turn(app, person, thread_id, "[patch=approved.txt]", model=CATALOG_MODEL))
        assert (await person.next_prompt()).offer("yes").accepted
        approved = await turn
    finally:
        await app.close()

    assert denied.status == "completed"
    assert denied.items("fileChange")[0]["status"] == "declined"
    assert not (cwd / "denied.txt").exists()
    assert "patch rejected by user" in denied.final_text
    assert approved.items("fileChange")[0]["status"] == "completed"
    assert (cwd / "approved.txt").read_text() == PATCH_CONTENT + "\n"


# --------------------------------------------------------------------------- MCP elicitation (real binary)


def mcp_toml(notes: Path) -> str:
    """config.toml table for the stub MCP server (approval tests need a real MCP tool call)."""
    return f"""[mcp_servers.notes]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(MCP_STUB))}]
env = {{ NOTES_FILE = {json.dumps(str(notes))} }}
startup_timeout_sec = 20
"""


@pytest.mark.real_codex
async def test_mcp_tool_call_accept_decline_and_session(model: ScriptedModel, tmp_path: Path) -> None:
    person = Person()
    notes = tmp_path / "notes.txt"
    app = await rig.started_app_server(
        tmp_path, model, policy=person, server_request_deadline=60, extra_toml=mcp_toml(notes)
    )

    async def call_tool(text: str) -> asyncio.Task[rig.TurnRecord]:
        model.enqueue(FunctionCall("save_note", {"text": text}, namespace="mcp__notes"), Text("done"))
        return asyncio.create_task(run_turn(app, person, thread_id, f"save {text}"))

    try:
        thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")
        turn = await call_tool("first")
        pending = await person.next_prompt()
        assert pending.kind == "mcpTool"
        assert pending.prompt_text.startswith('Codex wants to call the MCP tool "save_note" of server "notes"')
        assert '{"text": "first"}' in pending.prompt_text
        assert "Tool description: Save a short note." in pending.prompt_text
        assert pending.prompt_data["allowedAnswers"] == ["approve", "approve for session", "deny"]
        assert pending.offer("deny").accepted
        declined = await turn

        turn = await call_tool("second")
        assert (await person.next_prompt()).offer("approve").accepted
        accepted = await turn

        turn = await call_tool("third")
        assert (await person.next_prompt()).offer("approve for session").accepted
        session = await turn
        turn = await call_tool("fourth")  # no prompt: approved for this session
        remembered = await turn
    finally:
        await app.close()

    assert declined.items("mcpToolCall")[0]["status"] == "failed"
    assert "rejected" in json.dumps(declined.items("mcpToolCall")[0]["error"])
    assert accepted.items("mcpToolCall")[0]["status"] == "completed"
    assert session.status == remembered.status == "completed"
    assert notes.read_text().split() == ["second", "third", "fourth"]
    assert len(person.resolutions) == 3
    assert person.resolutions[2].answer.result == {"action": "accept", "content": {}, "_meta": {"persist": "session"}}


# --------------------------------------------------------------------------- request_user_input (real binary)


@pytest.mark.real_codex
async def test_plan_mode_question_answered_by_text(
    app: AppServer, person: Person, model: ScriptedModel, tmp_path: Path
) -> None:
    questions = [
        {
            "id": "go",
            "header": "Go",
            "question": "Proceed with the plan?",
            "options": [{"label": "Yes", "description": "go"}, {"label": "No", "description": "stop"}],
        }
    ]
    model.enqueue(FunctionCall("request_user_input", {"questions": questions}), Text("planned"))
    thread_id, _ = await rig.start_thread(app, rig.workspace(tmp_path), approval="on-request")
    plan = {"mode": "plan", "settings": {"model": CATALOG_MODEL}}
    turn = asyncio.create_task(run_turn(app, person, thread_id, "plan it", collaborationMode=plan))

    pending = await person.next_prompt()
    assert pending.kind == "userInput"
    assert "1. Proceed with the plan? (options: Yes, No)" in pending.prompt_text
    assert not pending.offer("yes\nand more").accepted  # two lines for one question
    assert pending.offer("yes").accepted
    record = await turn

    assert record.status == "completed"
    assert json.loads(last_tool_output(model)) == {"answers": {"go": {"answers": ["Yes"]}}}


# --------------------------------------------------------------------------- units: parsing and shapes


def request(method: str, **params: Any) -> ServerRequest:
    return ServerRequest(7, method, {"threadId": "t", "turnId": "u", **params})


async def pending_for(method: str, **params: Any) -> PendingApproval:
    return await PendingApproval.from_request(request(method, **params), FileChangeTracker())


@pytest.mark.parametrize(
    ("reply", "result"),
    [
        ("approve", {"decision": "accept"}),
        ("Yes!", {"decision": "accept"}),
        ("y", {"decision": "accept"}),
        ("Approve for  session.", {"decision": "acceptForSession"}),
        ("deny", {"decision": "decline"}),
        ("No", {"decision": "decline"}),
        ("decline", {"decision": "decline"}),
    ],
)
async def test_text_replies_map_to_codex_decisions(reply: str, result: Mapping[str, Any]) -> None:
    pending = await pending_for(COMMAND_APPROVAL, command="ls", cwd="/w", itemId="i")
    assert pending.offer(reply).accepted
    assert (await pending.wait(1)).answer.result == result


@pytest.mark.parametrize("reply", ["", "approve it please", "yes no", "cancel", "maybe"])
async def test_anything_else_is_not_an_answer(reply: str) -> None:
    pending = await pending_for(COMMAND_APPROVAL, command="ls", cwd="/w", itemId="i")
    result = pending.offer(reply)
    assert not result.accepted and result.summary == "not an answer"
    assert "codex is still waiting" in result.reprompt
    assert not pending.done


@pytest.mark.parametrize(
    ("data", "result"),
    [
        ({"decision": "approve"}, {"decision": "accept"}),
        ({"decision": "acceptForSession"}, {"decision": "acceptForSession"}),
        ({"decision": "approve_for_session"}, {"decision": "acceptForSession"}),
        ({"decision": "decline"}, {"decision": "decline"}),
    ],
)
async def test_data_part_decisions(data: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    pending = await pending_for(FILE_CHANGE_APPROVAL, itemId="i")
    assert pending.offer("", [data]).accepted
    assert (await pending.wait(1)).answer.result == result


async def test_mcp_tool_without_session_persistence_refuses_approve_for_session() -> None:
    pending = await pending_for(
        MCP_ELICITATION,
        serverName="s",
        mode="form",
        message='Allow the s MCP server to run tool "t"?',
        requestedSchema={"type": "object", "properties": {}},
        _meta={"codex_approval_kind": "mcp_tool_call"},
    )
    assert pending.prompt_data["allowedAnswers"] == ["approve", "deny"]
    assert 'tool "t" of server "s"' in pending.prompt_text
    assert not pending.offer("approve for session").accepted
    assert pending.offer("approve").accepted
    assert (await pending.wait(1)).answer.result == {"action": "accept", "content": {}, "_meta": None}


async def test_form_elicitation_takes_content_from_a_data_part() -> None:
    pending = await pending_for(
        MCP_ELICITATION,
        serverName="s",
        mode="form",
        message="Your name?",
        requestedSchema={"type": "object", "properties": {"name": {"type": "string"}}},
    )
    assert pending.kind == "elicitation"
    assert "It wants these fields: name." in pending.prompt_text
    assert pending.offer("", [{"decision": "approve", "content": {"name": "Ada"}}]).accepted
    assert (await pending.wait(1)).answer.result == {"action": "accept", "content": {"name": "Ada"}, "_meta": None}


async def test_user_input_answers_by_data_part_and_by_lines() -> None:
    questions = [{"id": "a", "question": "A?"}, {"id": "b", "question": "B?", "options": [{"label": "Blue"}]}]
    by_data = await pending_for(approvals.USER_INPUT, itemId="i", questions=questions, isBlocking=True)
    assert not by_data.offer("", [{"answers": {"a": "x"}}]).accepted  # every question needs an answer
    assert by_data.offer("", [{"answers": {"a": "x", "b": ["y", "z"]}}]).accepted
    assert (await by_data.wait(1)).answer.result == {"answers": {"a": {"answers": ["x"]}, "b": {"answers": ["y", "z"]}}}

    by_lines = await pending_for(approvals.USER_INPUT, itemId="i", questions=questions, isBlocking=True)
    assert "Reply with one answer per line" in by_lines.prompt_text
    assert not by_lines.offer("only one line").accepted
    assert by_lines.offer("first\nblue").accepted
    assert (await by_lines.wait(1)).answer.result == {
        "answers": {"a": {"answers": ["first"]}, "b": {"answers": ["Blue"]}}
    }


@pytest.mark.parametrize(
    ("method", "params", "timeout_result", "cancel_result"),
    [
        (COMMAND_APPROVAL, {"itemId": "i"}, {"decision": "decline"}, {"decision": "cancel"}),
        (FILE_CHANGE_APPROVAL, {"itemId": "i"}, {"decision": "decline"}, {"decision": "cancel"}),
        (
            MCP_ELICITATION,
            {"serverName": "s", "message": "m", "_meta": {"codex_approval_kind": "mcp_tool_call"}},
            {"action": "decline", "content": None, "_meta": None},
            {"action": "cancel", "content": None, "_meta": None},
        ),
        (approvals.USER_INPUT, {"itemId": "i", "questions": []}, {"answers": {}}, {"answers": {}}),
    ],
)
async def test_timeout_and_cancel_answers(
    method: str, params: dict[str, Any], timeout_result: Mapping[str, Any], cancel_result: Mapping[str, Any]
) -> None:
    timed_out = await pending_for(method, **params)
    resolution = await timed_out.wait(0.01)
    assert (resolution.how, resolution.answer.result) == ("timeout", timeout_result)
    cancelled = await pending_for(method, **params)
    waiter = asyncio.create_task(cancelled.wait(5))
    await asyncio.sleep(0)
    assert cancelled.cancel()
    resolution = await waiter
    assert (resolution.how, resolution.answer.result, resolution.sentence) == ("cancelled", cancel_result, "")


async def test_file_change_prompt_waits_briefly_for_its_item() -> None:
    tracker = FileChangeTracker()
    item = {
        "type": "fileChange",
        "id": "late",
        "changes": [{"path": "/w/f.py", "kind": {"type": "update", "move_path": None}, "diff": "@@\n-a\n+b\n+c\n"}],
    }
    building = asyncio.create_task(PendingApproval.from_request(request(FILE_CHANGE_APPROVAL, itemId="late"), tracker))
    await asyncio.sleep(0.05)
    tracker.observe(Notification("item/started", {"threadId": "t", "item": item}))
    pending = await building
    assert "update /w/f.py (+2 -1)" in pending.prompt_text

    unseen = await asyncio.wait_for(tracker.wait_changes("never", timeout=0.05), 1)
    assert unseen == [] and not tracker._waiters


def test_needs_person_only_under_asking_policies_and_not_for_trusted_mcp() -> None:
    trusted = frozenset({"molecule"})
    command = request(COMMAND_APPROVAL, itemId="i")
    assert approvals.needs_person(command, approval_policy="on-request", trusted_mcp_servers=trusted)
    assert approvals.needs_person(command, approval_policy="untrusted", trusted_mcp_servers=trusted)
    assert not approvals.needs_person(command, approval_policy="never", trusted_mcp_servers=trusted)
    meta = {"codex_approval_kind": "mcp_tool_call"}
    platform = request(MCP_ELICITATION, serverName="molecule", _meta=meta)
    other = request(MCP_ELICITATION, serverName="notes", _meta=meta)
    assert not approvals.needs_person(platform, approval_policy="on-request", trusted_mcp_servers=trusted)
    assert approvals.needs_person(other, approval_policy="on-request", trusted_mcp_servers=trusted)
    assert not approvals.needs_person(
        request("item/permissions/requestApproval"), approval_policy="on-request", trusted_mcp_servers=trusted
    )


def test_effective_timeout() -> None:
    assert approvals.effective_timeout(600, 1500) == 600
    assert approvals.effective_timeout(600, 100) == 100
    assert approvals.effective_timeout(0, 1200) == 1200
    assert approvals.effective_timeout(10, -5) == 0


async def test_waiting_line_names_the_request() -> None:
    pending = await pending_for(COMMAND_APPROVAL, command="rm -rf build", cwd="/w", itemId="i")
    assert pending.waiting_line() == "Waiting for an answer on an earlier request: Codex wants to run a command."


async def test_a_cancelled_wait_settles_the_request_so_a_late_reply_is_not_accepted() -> None:
    """AppServer cancels a policy past its own deadline and declines; the person must not see "accepted"."""
    pending = await pending_for(COMMAND_APPROVAL, command="ls", cwd="/w", itemId="i")
    waiter = asyncio.create_task(pending.wait(30))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    late = pending.offer("approve")
    assert not late.accepted and late.summary == "already answered"
