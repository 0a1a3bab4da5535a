"""Which conversation an A2A message continues, and what history the sender brought with it.

The April/May Molecule platforms send **no contextId** from any sender, so the A2A SDK invents a
fresh random one per message and every canvas message would start a new codex thread (forgetting
everything, and spawning another MCP server). What those platforms do send, in ``params.metadata``:

| sender                                   | what identifies the conversation        | key               |
|------------------------------------------|-----------------------------------------|-------------------|
| any client that sent a contextId         | the contextId                           | ``<contextId>``   |
| channel (Telegram, Slack, …)             | ``chat_id``                             | ``chat-<id>``     |
| delegation from a peer workspace         | ``source_workspace_id``                 | ``peer-<id>``     |
| canvas (``source: canvas_user``, a       | the workspace itself                    | ``canvas-<WS>``   |
| ``history`` list, or no ``source``)      |                                         |                   |
| anything else under the platform         | the sender named in ``source``          | ``<source>-<WS>`` |
| outside the platform (no WORKSPACE_ID)   | nothing: the SDK's fresh context id     | new conversation  |

``canvas-<WORKSPACE_ID>`` is what the newest platform sends as contextId, so upgrading the platform
keeps the canvas conversation. Every key is scoped per authenticated caller (``<caller>/<key>``),
so a key another caller also uses neither shares nor reveals that caller's codex thread.

**What the client really sent.** The SDK writes its generated context id back into the message
before the executor sees it, so ``context.message.context_id`` cannot tell "sent" from "invented".
A host we own records the truth in the call context (:data:`CLIENT_CONTEXT_ID_STATE`, set by
``host.ClientContextRecorder``). Inside the platform's runtime (which builds its own request
handler) that record is absent, and an id shaped exactly like the SDK's own (a lowercase uuid4) is
taken as invented when the message came through the platform; any other id (``canvas-…``,
``sess-…``, a client's own name) is honoured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from a2a.server.agent_execution import RequestContext
from google.protobuf.json_format import MessageToDict

#: Call-context state key under which a host we own records the contextId the client sent
#: ("" when it sent none). Absent when the SDK handler was built by someone else (the runtime).
CLIENT_CONTEXT_ID_STATE = "molecule_codex.client_context_id"

#: Prior turns rendered for seeding: at most this many turns (the canvas sends 20) ...
HISTORY_MAX_TURNS = 20
#: ... each cut to this many characters ...
HISTORY_MAX_TURN_CHARS = 4_000
#: ... and the whole block to this many (the newest turns are kept).
HISTORY_MAX_CHARS = 24_000
#: Longest id taken from metadata into a key; longer ones are cut (keys are stored and logged).
KEY_PART_MAX_CHARS = 200

_SDK_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_CANVAS_SOURCES = frozenset({"", "canvas", "canvas_user"})


@dataclass(frozen=True, slots=True)
class Identity:
    """The conversation a message belongs to."""

    #: Conversation key, already scoped per caller.
    key: str
    #: Prior turns from ``params.metadata.history`` as plain text, to seed a *new* codex thread
    #: once (the caller frames it as history); None when the sender brought none.
    history: str | None


def identify(context: RequestContext, *, workspace_id: str | None) -> Identity:
    """The conversation key and seed history for one request (see the module table)."""
    metadata = request_metadata(context)
    key = _client_context_id(context, workspace_id)
    if key is None:
        key = _platform_key(metadata, workspace_id) if workspace_id else _sdk_context_id(context)
    return Identity(key=_per_caller(context, key), history=render_history(metadata.get("history")))


def request_metadata(context: RequestContext) -> dict[str, Any]:
    """``params.metadata`` (where the platform puts chat_id, history, …), with the message's own
    metadata as a fallback for senders that put it there."""
    merged: dict[str, Any] = {}
    message = context.message
    if message is not None and message.HasField("metadata"):
        merged.update(MessageToDict(message.metadata))
    merged.update(context.metadata)
    return merged


def _client_context_id(context: RequestContext, workspace_id: str | None) -> str | None:
    """The context id the client chose (or its stored task carries), or None if it chose none."""
    state = getattr(context.call_context, "state", None) or {}
    recorded = state.get(CLIENT_CONTEXT_ID_STATE)
    if recorded:
        return str(recorded)
    task = context.current_task
    if task is not None and task.context_id:
        # A follow-up without contextId gets a fresh random one from the SDK; the task knows better.
        candidate = task.context_id
    elif CLIENT_CONTEXT_ID_STATE in state:
        return None  # recorded: the client sent none
    else:
        candidate = context.message.context_id if context.message is not None else ""
    if not candidate or _looks_invented(candidate, workspace_id):
        return None
    return candidate


def _looks_invented(context_id: str, workspace_id: str | None) -> bool:
    """Inside the platform, an id shaped like the SDK's own uuid4 cannot be told from one the SDK
    made up for a message without contextId (which is every platform message before August)."""
    return workspace_id is not None and bool(_SDK_UUID.match(context_id))


def _sdk_context_id(context: RequestContext) -> str:
    """Outside the platform: today's behaviour, the SDK's (fresh) context id, i.e. a new
    conversation per message without contextId."""
    return context.context_id or (context.message.context_id if context.message is not None else "") or ""


def _platform_key(metadata: Mapping[str, Any], workspace_id: str) -> str:
    chat_id = _id_text(metadata.get("chat_id"))
    if chat_id:
        return f"chat-{chat_id}"
    peer = _id_text(metadata.get("source_workspace_id"))
    if peer:
        return f"peer-{peer}"
    source = _id_text(metadata.get("source")) or ""
    if source in _CANVAS_SOURCES or metadata.get("history"):
        return f"canvas-{workspace_id}"
    return f"{source}-{workspace_id}"


def _id_text(value: Any) -> str | None:
    """An id from metadata as text: protobuf ``Struct`` turns JSON integers into floats
    (Telegram chat ``-1001234`` arrives as ``-1001234.0``), so whole floats are written back as
    integers. Non-scalar values are not ids."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        return text[:KEY_PART_MAX_CHARS] or None
    return None


def _per_caller(context: RequestContext, key: str) -> str:
    """Scope a key to the authenticated caller, so a key another caller also uses neither shares
    nor reveals that caller's codex thread."""
    user = getattr(context.call_context, "user", None)
    if user is None or not user.is_authenticated or not user.user_name:
        return key
    return f"{user.user_name}/{key}"


def render_history(history: Any) -> str | None:
    """Prior turns as ``role: text`` lines, oldest first, bounded; None when there are none.

    Shapes accepted (senders differ): the canvas's ``[{role: user|agent, parts: [{kind: text,
    text}]}]`` (oldest first), ``{role, content|text}`` entries, and channel entries
    ``{user, message, reply, time}`` (the platform keeps those newest first; ``time`` orders them).
    """
    if not isinstance(history, list):
        return None
    entries = [entry for entry in history if isinstance(entry, Mapping)]
    if entries and all(isinstance(entry.get("time"), str) for entry in entries):
        entries.sort(key=lambda entry: entry["time"])
    turns: list[tuple[str, str]] = []
    for entry in entries:
        turns.extend(_turns(entry))
    turns = turns[-HISTORY_MAX_TURNS:]
    lines: list[str] = []
    total = 0
    for role, text in reversed(turns):
        line = f"{role}: {_cut(text, HISTORY_MAX_TURN_CHARS)}"
        if total + len(line) > HISTORY_MAX_CHARS:
            break
        lines.append(line)
        total += len(line) + 1
    return "\n".join(reversed(lines)) or None


def _turns(entry: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One history entry as (role, text) turns; a channel entry holds a user turn and a reply."""
    if "message" in entry or "reply" in entry:
        pairs = [("user", _text(entry.get("message"))), ("agent", _text(entry.get("reply")))]
        return [(role, text) for role, text in pairs if text]
    role = _role(entry.get("role"))
    text = _text(entry.get("parts")) or _text(entry.get("content")) or _text(entry.get("text"))
    return [(role, text)] if text else []


def _role(value: Any) -> str:
    role = str(value or "").lower().removeprefix("role_")
    return "agent" if role in {"agent", "assistant", "model"} else "user"


def _text(value: Any) -> str:
    """Text from a string, a part, or a list of parts (v0.3 ``{kind, text}`` or v1 ``{text}``)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Mapping):
        return _text(value.get("text"))
    if isinstance(value, list):
        return "\n".join(text for text in (_text(item) for item in value) if text)
    return ""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
