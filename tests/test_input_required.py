"""Approvals end to end: codex's questions as A2A ``input-required``, answered on the same taskId.

Every test runs the served stack (tests/a2a_rig.py: real a2a-sdk server and client, real codex
binary, scripted model) with ``approval_policy`` asking. The model asks for an escalated command
(``[escalate=…]``), a patch (``[patch=…]``) or an MCP tool call; the test plays the person with
ordinary A2A messages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from a2a.client import ClientCallContext
from a2a.types import CancelTaskRequest, GetTaskRequest, Part, StreamResponse, TaskState
from a2a_rig import Call, Served, final_answer, send, serve_codex, status_texts, terminal_state, user_message
from google.protobuf import json_format, struct_pb2
from test_approvals import mcp_toml

from molecule_codex.demo.scripted_model import PATCH_CONTENT, FunctionCall, ScriptedModel, Text

pytestmark = [pytest.mark.real_codex, pytest.mark.timeout(90)]

INPUT_REQUIRED = TaskState.TASK_STATE_INPUT_REQUIRED
COMPLETED = TaskState.TASK_STATE_COMPLETED
CATALOG_MODEL = "gpt-5.5"  # codex offers apply_patch only to catalog models



def is_asking(item: StreamResponse) -> bool:
    return item.WhichOneof("payload") == "status_update" and item.status_update.status.state == INPUT_REQUIRED


def question(item: StreamResponse) -> tuple[str, dict[str, Any]]:
    """The text and the data part of an input-required status (or task snapshot)."""
    status = item.status_update.status if item.WhichOneof("payload") == "status_update" else item.task.status
    text = "".join(part.text for part in status.message.parts if part.WhichOneof("content") == "text")
    [data] = [json_format.MessageToDict(p.data) for p in status.message.parts if p.WhichOneof("content") == "data"]
    return text, data


async def ask(served: Served, text: str, metadata: dict[str, Any] | None = None,
              **ids: str) -> tuple[Call, str, dict[str, Any]]:
    """Send ``text`` streaming and wait until codex's question arrives; the call then ends."""
    message = user_message(text, **ids)
    if metadata:
        message.metadata.update(metadata)
    call = Call(await served.client(), message)
    asked = await call.wait_for(is_asking, timeout=30)
    items = await call.result(timeout=10)  # the stream ends with the question: the answer is a new message
    assert terminal_state(items) == INPUT_REQUIRED
    return call, *question(asked)


async def answer(served: Served, call: Call, text: str = "", *, data: dict[str, Any] | None = None,
                 streaming: bool = True) -> list[StreamResponse]:
    parts = [Part(text=text)] if text else []
    if data is not None:
        parts.append(Part(data=json_format.ParseDict(data, struct_pb2.Value())))
    message = user_message(text, task_id=call.task_id, context_id=call.items[0].task.context_id, parts=parts)
    return await send(await served.client(streaming=streaming), message)


async def task_state(served: Served, task_id: str) -> Any:
    client = await served.client(streaming=False)
    return await client.get_task(GetTaskRequest(id=task_id))


async def wait_terminal(served: Served, task_id: str, timeout: float = 30) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            task = await task_state(served, task_id)
            if task.status.state not in (INPUT_REQUIRED, TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_SUBMITTED):
                return task
            await asyncio.sleep(0.1)


async def test_approved_command_runs_and_the_answer_streams(model: ScriptedModel, tmp_path: Path) -> None:
    target = tmp_path / "approved.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request") as served:
        call, text, data = await ask(served, f"[escalate=printf ran > {target}]")
        assert text.startswith("Codex wants to run a command:\n")
        assert f"printf ran > {target}" in text and f"in {served.workspace}" in text
        assert text.endswith("Reply approve / approve for session / deny.")
        assert data["type"] == "codex.approval" and data["kind"] == "command"
        assert data["allowedAnswers"] == ["approve", "approve for session", "deny"]
        assert not target.exists()  # codex waits for the person
        assert (await task_state(served, call.task_id)).status.state == INPUT_REQUIRED

        items = await answer(served, call, "Approve")

    assert terminal_state(items) == COMPLETED
    assert target.read_text() == "ran"
    assert "Answer received (accept); codex continues." in status_texts(items)
    assert final_answer(items).startswith(f"echo: [escalate=printf ran > {target}]\n[tool exit=0]")


async def test_denied_command_does_not_run_and_codex_says_so(model: ScriptedModel, tmp_path: Path) -> None:
    target = tmp_path / "denied.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request") as served:
        call, _, _ = await ask(served, f"[escalate=printf ran > {target}]")
        items = await answer(served, call, "no")

    assert terminal_state(items) == COMPLETED
    assert not target.exists()
    assert final_answer(items).startswith("echo: [escalate=")  # the model answered after the refusal
    tool_output = next(i for i in reversed(model.requests[-1].input) if i.get("type") == "function_call_output")
    assert "rejected" in str(tool_output["output"])


async def test_garbage_reprompts_then_a_data_part_answers(model: ScriptedModel, tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request") as served:
        call, prompt, _ = await ask(served, f"[escalate=printf ran > {target}]")
        again = await answer(served, call, "what does this do?")
        assert terminal_state(again) == INPUT_REQUIRED
        reprompt, data = question(next(item for item in again if is_asking(item)))
        assert reprompt == f'"what does this do?" is not an answer, and codex is still waiting.\n{prompt}'
        assert data["kind"] == "command"
        assert not target.exists()  # a non-answer is never a silent decision

        items = await answer(served, call, data={"decision": "approve"})

    assert terminal_state(items) == COMPLETED
    assert target.read_text() == "ran"


async def test_blocking_send_returns_input_required_then_the_answer_completes(
    model: ScriptedModel, tmp_path: Path
) -> None:
    target = tmp_path / "blocking.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request") as served:
        client = await served.client(streaming=False)
        [first] = await send(client, user_message(f"[escalate=printf ran > {target}]"))
        assert first.task.status.state == INPUT_REQUIRED
        text, _ = question(first)
        assert text.startswith("Codex wants to run a command:")
        message = user_message("yes", task_id=first.task.id, context_id=first.task.context_id)
        [done] = await send(client, message)

    assert done.task.status.state == COMPLETED
    assert target.read_text() == "ran"
    assert "".join(p.text for p in done.task.artifacts[0].parts).startswith("echo: [escalate=")
    assert [m.parts[0].text for m in done.task.history if m.role == 1][-1] == "yes"  # the answer is in history


async def test_no_answer_is_declined_after_approval_timeout(model: ScriptedModel, tmp_path: Path) -> None:
    target = tmp_path / "late.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request", approval_timeout=1.0) as served:
        call, _, _ = await ask(served, f"[escalate=printf ran > {target}]")
        task = await wait_terminal(served, call.task_id)
        assert call.task_id not in served.executor._requests  # ended with no execute() running: still forgotten
        late = user_message("approve", task_id=call.task_id, context_id=task.context_id)
        with pytest.raises(Exception, match="terminal state"):
            await send(await served.client(streaming=False), late)

    sentence = "No answer to codex's request within 1 seconds, so it was declined."
    assert task.status.state == COMPLETED
    text = "".join(part.text for part in task.artifacts[0].parts)
    assert text.startswith("echo: [escalate=") and text.endswith(sentence)
    assert not target.exists()


async def test_cancel_while_waiting_interrupts_codex_and_keeps_history(model: ScriptedModel, tmp_path: Path) -> None:
    target = tmp_path / "cancelled.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request") as served:
        call, _, _ = await ask(served, f"[escalate=printf ran > {target}]")
        client = await served.client(streaming=False)
        canceled = await client.cancel_task(CancelTaskRequest(id=call.task_id),
                                            context=ClientCallContext(timeout=30))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        context_id = call.items[0].task.context_id
        [after] = await send(client, user_message("still there?", context_id=context_id))
        stored = await task_state(served, call.task_id)

    assert stored.status.state == TaskState.TASK_STATE_CANCELED
    assert after.task.status.state == COMPLETED  # the codex turn ended: the conversation goes on
    assert "".join(p.text for p in after.task.artifacts[0].parts) == "echo: still there?"
    assert any("[escalate=" in text for text in model.requests[-1].all_user_texts)  # history kept
    assert not target.exists()


async def test_a_new_message_on_the_conversation_waits_and_names_the_question(
    model: ScriptedModel, tmp_path: Path
) -> None:
    target = tmp_path / "first.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request") as served:
        call, _, _ = await ask(served, f"[escalate=printf ran > {target}]")
        context_id = call.items[0].task.context_id
        second = Call(await served.client(), user_message("and this?", context_id=context_id))
        await second.wait_status("Waiting for an answer on an earlier request: Codex wants to run a command.")
        first = await answer(served, call, "approve")
        rest = await second.result(timeout=30)

    assert terminal_state(first) == COMPLETED and target.read_text() == "ran"
    assert terminal_state(rest) == COMPLETED
    assert final_answer(rest) == "echo: and this?"


async def test_file_change_question_carries_a_diff_summary(model: ScriptedModel, tmp_path: Path) -> None:
    async with serve_codex(tmp_path, model, approval_policy="untrusted") as served:
        # A per-message model override: codex offers apply_patch only to catalog models.
        call, text, data = await ask(served, "[patch=new.txt]", {"model": CATALOG_MODEL})
        path = served.workspace / "new.txt"
        assert text.startswith("Codex wants to change 1 file(s):\n")
        assert f"add {path} (+1 -0)" in text and PATCH_CONTENT in text
        assert data["kind"] == "fileChange"
        assert data["files"][0]["path"] == str(path) and data["files"][0]["added"] == 1
        assert not path.exists()
        items = await answer(served, call, "approve")

    assert terminal_state(items) == COMPLETED
    assert path.read_text() == PATCH_CONTENT + "\n"


async def test_mcp_tool_call_decline_then_accept(model: ScriptedModel, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    async with serve_codex(tmp_path, model, approval_policy="on-request", extra_toml=mcp_toml(notes)) as served:
        model.enqueue(FunctionCall("save_note", {"text": "first"}, namespace="mcp__notes"), Text("declined one"))
        call, text, data = await ask(served, "save first")
        assert text.startswith('Codex wants to call the MCP tool "save_note" of server "notes"')
        assert data["kind"] == "mcpTool" and data["arguments"] == {"text": "first"}
        declined = await answer(served, call, "deny")

        context_id = call.items[0].task.context_id
        model.enqueue(FunctionCall("save_note", {"text": "second"}, namespace="mcp__notes"), Text("saved"))
        call, _, _ = await ask(served, "save second", context_id=context_id)
        accepted = await answer(served, call, data={"decision": "approve"})

    assert final_answer(declined) == "declined one"
    assert final_answer(accepted) == "saved"
    assert notes.read_text().split() == ["second"]
