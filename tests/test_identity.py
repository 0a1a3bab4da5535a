"""Conversation identity from what the Molecule platform's senders really send.

Request bodies are the ones the April/May platform sources build (quoted in the comments), fed
through the SDK's own v0.3 → v1 conversion and ``RequestContext`` (which invents the missing ids
exactly as the served handler does).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from a2a.compat.v0_3 import conversions
from a2a.compat.v0_3 import types as types_v03
from a2a.server.agent_execution import RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.routes.common import StarletteUser
from a2a.types import Task, TaskState, TaskStatus
from starlette.authentication import SimpleUser

from molecule_codex.identity import (
    CLIENT_CONTEXT_ID_STATE,
    HISTORY_MAX_CHARS,
    HISTORY_MAX_TURN_CHARS,
    HISTORY_MAX_TURNS,
    KEY_PART_MAX_CHARS,
    identify,
    render_history,
)

WS = "6f1c2a3b-0d4e-4f5a-9b8c-7d6e5f4a3b2c"
PEER = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"


def canvas_body(text: str, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """canvas/src/components/tabs/ChatTab.tsx (May 2026): no contextId, the last 20 chat
    messages as ``metadata.history``; the platform proxy adds ``jsonrpc`` and ``id``."""
    return {
        "jsonrpc": "2.0",
        "id": str(uuid.uuid4()),
        "method": "message/send",
        "params": {
            "message": {"role": "user", "messageId": str(uuid.uuid4()), "parts": [{"kind": "text", "text": text}]},
            "metadata": {"history": history or []},
        },
    }


def canvas_turn(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"kind": "text", "text": text}]}


def channel_body(text: str, chat_id: str = "-1001234567890", history: list[dict[str, str]] | None = None,
                 message_id: str = "42") -> dict[str, Any]:
    """workspace-server/internal/channels/manager.go HandleInbound: chat identity in metadata,
    the Redis history (newest first) as ``{user, message, reply, time}``."""
    return {
        "jsonrpc": "2.0",
        "id": str(uuid.uuid4()),
        "method": "message/send",
        "params": {
            "message": {"role": "user", "messageId": f"channel-telegram-{message_id}",
                        "parts": [{"kind": "text", "text": text}]},
            "metadata": {
                "source": "telegram",
                "channel_id": "c0ffee00-0000-4000-8000-000000000001",
                "chat_id": chat_id,
                "user_id": "777",
                "username": "alice",
                "message_id": message_id,
                "history": history or [],
                "extra": {},
            },
        },
    }


def delegation_body(text: str, source_workspace_id: str = PEER) -> dict[str, Any]:
    """workspace/builtin_tools/delegation.py _execute_delegation (the runtime's delegate tool)."""
    task_id = str(uuid.uuid4())
    return {
        "jsonrpc": "2.0",
        "method": "message/send",
        "id": f"delegation-{task_id}-0",
        "params": {
            "message": {"role": "user", "parts": [{"kind": "text", "text": text}], "messageId": f"msg-{task_id}-0"},
            "metadata": {
                "parent_task_id": task_id,
                "source_workspace_id": source_workspace_id,
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            },
        },
    }


def platform_delegation_body(text: str) -> dict[str, Any]:
    """The platform's own delegation (external-connect brief): ``messageId = delegation_id`` and
    ``delegation_id`` in metadata, no source workspace."""
    delegation_id = str(uuid.uuid4())
    return {
        "jsonrpc": "2.0",
        "id": str(uuid.uuid4()),
        "method": "message/send",
        "params": {
            "message": {"role": "user", "messageId": delegation_id, "parts": [{"kind": "text", "text": text}]},
            "metadata": {"delegation_id": delegation_id},
        },
    }


def request_context(body: dict[str, Any], *, user: str | None = None, recorded: str | None = None,
                    task: Task | None = None) -> RequestContext:
    """What the executor receives for ``body``: the SDK's v0.3 conversion and its id invention."""
    core = conversions.to_core_send_message_request(types_v03.SendMessageRequest.model_validate(body))
    call = ServerCallContext(user=StarletteUser(SimpleUser(user))) if user else ServerCallContext()
    if recorded is not None:
        call.state[CLIENT_CONTEXT_ID_STATE] = recorded
    context = RequestContext(
        call_context=call,
        request=core,
        task_id=core.message.task_id or None,
        context_id=core.message.context_id or None,
    )
    context.current_task = task
    return context


def key_of(body: dict[str, Any], workspace_id: str | None = WS, **kwargs: Any) -> str:
    return identify(request_context(body, **kwargs), workspace_id=workspace_id).key


# ---------------------------------------------------------------------------- the SDK's behaviour


def test_sdk_writes_its_invented_context_id_into_the_message() -> None:
    """Why identify() cannot read ``message.context_id``: the SDK fills it in before execute()."""
    context = request_context(canvas_body("hi"))
    assert context.message is not None
    assert context.message.context_id == context.context_id
    assert uuid.UUID(context.context_id).version == 4


def test_params_metadata_reaches_the_request_context() -> None:
    context = request_context(channel_body("hi"))
    assert context.metadata["chat_id"] == "-1001234567890"
    assert context.metadata["source"] == "telegram"


# ---------------------------------------------------------------------------- each sender


def test_canvas_messages_share_one_conversation_per_workspace() -> None:
    history: list[dict[str, Any]] = []
    keys = []
    for text in ("my name is Ada", "what is my name?", "and again?"):
        keys.append(key_of(canvas_body(text, history)))
        history += [canvas_turn("user", text), canvas_turn("agent", "ok")]
    assert keys == [f"canvas-{WS}"] * 3


def test_newest_canvas_context_id_is_the_same_conversation() -> None:
    """The August platform sends ``contextId = canvas-<ws>``: upgrading keeps the conversation."""
    body = canvas_body("hi")
    body["params"]["message"]["contextId"] = f"canvas-{WS}"
    assert key_of(body) == key_of(canvas_body("hi"))


def test_new_session_context_id_is_its_own_conversation() -> None:
    body = canvas_body("hi")
    session = f"sess-{WS}-{uuid.uuid4()}"
    body["params"]["message"]["contextId"] = session
    assert key_of(body) == session


def test_canvas_source_without_history_is_the_canvas() -> None:
    body = canvas_body("hi")
    body["params"]["metadata"] = {"source": "canvas_user", "user_id": "u1", "email": "a@b.c", "username": "ada"}
    assert key_of(body) == f"canvas-{WS}"


def test_message_without_any_metadata_is_the_canvas() -> None:
    body = canvas_body("hi")
    del body["params"]["metadata"]
    assert key_of(body) == f"canvas-{WS}"


def test_channel_chats_are_separate_conversations() -> None:
    first = [key_of(channel_body(text, message_id=str(n))) for n, text in enumerate(("a", "b", "c"))]
    assert first == ["chat--1001234567890"] * 3
    assert key_of(channel_body("x", chat_id="555")) == "chat-555"


def test_numeric_chat_id_has_no_float_suffix() -> None:
    """protobuf Struct reads JSON 555 as 555.0; the key must not change with the JSON type."""
    body = channel_body("x")
    body["params"]["metadata"]["chat_id"] = 555
    assert key_of(body) == "chat-555"


def test_channel_wins_over_its_history() -> None:
    body = channel_body("x", history=[{"user": "alice", "message": "m", "reply": "r", "time": "2026-05-01T10:00:00Z"}])
    assert key_of(body) == "chat--1001234567890"


def test_delegations_are_one_conversation_per_peer() -> None:
    assert key_of(delegation_body("a")) == f"peer-{PEER}"
    assert key_of(delegation_body("b")) == f"peer-{PEER}"
    assert key_of(delegation_body("c", source_workspace_id="other-ws")) == "peer-other-ws"


def test_platform_delegation_without_source_falls_to_the_canvas_rule() -> None:
    """No chat, no peer, no source: the issue's order sends it to the workspace's canvas thread."""
    assert key_of(platform_delegation_body("a")) == f"canvas-{WS}"


def test_other_platform_sources_get_their_own_conversation() -> None:
    body = canvas_body("hi")
    body["params"]["metadata"] = {"source": "webhook"}
    assert key_of(body) == f"webhook-{WS}"


def test_senders_are_isolated_from_each_other() -> None:
    keys = {key_of(canvas_body("a")), key_of(channel_body("a")), key_of(delegation_body("a"))}
    assert len(keys) == 3


def test_metadata_on_the_message_is_a_fallback() -> None:
    body = canvas_body("hi")
    del body["params"]["metadata"]
    body["params"]["message"]["metadata"] = {"chat_id": "9"}
    assert key_of(body) == "chat-9"


def test_overlong_ids_are_cut() -> None:
    key = key_of(channel_body("x", chat_id="9" * 5000))
    assert key == "chat-" + "9" * KEY_PART_MAX_CHARS


def test_non_scalar_ids_are_ignored() -> None:
    body = channel_body("x")
    body["params"]["metadata"]["chat_id"] = {"nested": 1}
    assert key_of(body) == f"telegram-{WS}"


# ---------------------------------------------------------------------------- contextId rules


def test_outside_the_platform_a_message_without_context_id_is_new() -> None:
    first, second = key_of(canvas_body("a"), None), key_of(canvas_body("b"), None)
    assert first != second
    assert uuid.UUID(first).version == 4


def test_a_context_id_the_client_chose_is_kept() -> None:
    body = channel_body("x")
    body["params"]["message"]["contextId"] = "my-conversation"
    assert key_of(body) == "my-conversation"
    assert key_of(body, None) == "my-conversation"


def test_uuid_context_id_inside_the_platform_needs_the_host_record() -> None:
    """Without a record, a uuid4 under the platform is indistinguishable from the SDK's invention;
    a host we own records what the client sent, and then it is honoured."""
    chosen = str(uuid.uuid4())
    body = canvas_body("hi")
    body["params"]["message"]["contextId"] = chosen
    assert key_of(body) == f"canvas-{WS}"
    assert key_of(body, recorded=chosen) == chosen
    assert key_of(body, None) == chosen


def test_recorded_empty_context_id_means_the_client_sent_none() -> None:
    body = canvas_body("hi")
    body["params"]["message"]["contextId"] = "looks-chosen"  # the SDK could not invent this, but
    assert key_of(body, recorded="") == f"canvas-{WS}"  # the record is the truth


def test_follow_up_uses_its_stored_task() -> None:
    task = Task(id="t1", context_id="conv-7", status=TaskStatus(state=TaskState.TASK_STATE_INPUT_REQUIRED))
    body = canvas_body("more")
    body["params"]["message"]["taskId"] = "t1"
    assert key_of(body, recorded="", task=task) == "conv-7"
    assert key_of(body, task=task) == "conv-7"


def test_follow_up_of_an_invented_context_derives_the_key_again() -> None:
    task = Task(id="t1", context_id=str(uuid.uuid4()), status=TaskStatus(state=TaskState.TASK_STATE_INPUT_REQUIRED))
    body = channel_body("more")
    body["params"]["message"]["taskId"] = "t1"
    assert key_of(body, task=task) == "chat--1001234567890"
    assert key_of(body, None, task=task) == task.context_id


def test_keys_are_per_caller() -> None:
    assert key_of(canvas_body("a"), user="caller-1") == f"caller-1/canvas-{WS}"
    assert key_of(canvas_body("a"), user="caller-2") == f"caller-2/canvas-{WS}"
    body = canvas_body("a")
    body["params"]["message"]["contextId"] = "shared-name"
    assert key_of(body, user="caller-1") != key_of(body, user="caller-2")


# ---------------------------------------------------------------------------- history


def test_canvas_history_is_rendered_oldest_first() -> None:
    history = [canvas_turn("user", "my name is Ada"), canvas_turn("agent", "Hello Ada"),
               canvas_turn("user", "I like tea")]
    identity = identify(request_context(canvas_body("what do I like?", history)), workspace_id=WS)
    assert identity.history == "user: my name is Ada\nagent: Hello Ada\nuser: I like tea"


def test_no_history_is_none() -> None:
    assert identify(request_context(canvas_body("hi")), workspace_id=WS).history is None
    assert identify(request_context(delegation_body("hi")), workspace_id=WS).history is None


def test_channel_history_is_put_in_time_order() -> None:
    newest_first = [
        {"user": "alice", "message": "second", "reply": "r2", "time": "2026-05-01T10:05:00Z"},
        {"user": "alice", "message": "first", "reply": "r1", "time": "2026-05-01T10:00:00Z"},
    ]
    identity = identify(request_context(channel_body("third", history=newest_first)), workspace_id=WS)
    assert identity.history == "user: first\nagent: r1\nuser: second\nagent: r2"


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ({"role": "assistant", "content": "c"}, "agent: c"),
        ({"role": "ROLE_AGENT", "parts": [{"text": "v1 part"}]}, "agent: v1 part"),
        ({"role": "user", "text": "t"}, "user: t"),
        ({"content": "no role"}, "user: no role"),
        ({"role": "user", "parts": [{"kind": "text", "text": "a"}, {"kind": "text", "text": "b"}]}, "user: a\nb"),
    ],
)
def test_history_shapes(entry: dict[str, Any], line: str) -> None:
    assert render_history([entry]) == line


@pytest.mark.parametrize(
    "history",
    [None, "text", 7, {"role": "user"}, [], ["a string"], [{"role": "user", "parts": [{"kind": "data", "data": {}}]}]],
)
def test_unusable_history_is_none(history: Any) -> None:
    assert render_history(history) is None


def test_history_is_bounded() -> None:
    many = [canvas_turn("user", f"turn {n}") for n in range(50)]
    lines = (render_history(many) or "").splitlines()
    assert len(lines) == HISTORY_MAX_TURNS
    assert lines[-1] == "user: turn 49"

    huge = [canvas_turn("user", "x" * 100_000) for _ in range(20)]
    text = render_history(huge) or ""
    assert len(text) <= HISTORY_MAX_CHARS
    assert all(len(line) <= HISTORY_MAX_TURN_CHARS + len("user: ") for line in text.splitlines())
    assert text.endswith("…")


def test_history_does_not_change_the_request() -> None:
    body = canvas_body("q", [canvas_turn("user", "a")])
    before = copy.deepcopy(body)
    identify(request_context(body), workspace_id=WS)
    assert body == before
