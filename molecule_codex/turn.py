"""One codex turn, normalized: codex notifications in, small typed events and an outcome out.

This module knows the codex v2 protocol (``turn/*``, ``item/*``, ``error``) and nothing of A2A;
the executor maps its events to A2A. Rules it keeps (each broke an older bridge):

* Text comes from ``item/agentMessage/delta`` accumulated per ``itemId``; the ``item/completed``
  text is authoritative and *replaces* the deltas, never adds to them.
* Only ``turn/completed`` ends a turn; ``error`` with ``willRetry: true`` is progress, with
  ``willRetry: false`` it only records the reason the coming ``turn/completed`` will carry.
* Usage is the sum of ``tokenUsage.last`` over the turn's updates (one per model response).
* Items started but never completed (interrupts, aborted streams) are closed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from molecule_codex.app_server import Notification

#: tool_trace bounds: the platform stores the list with each activity row.
MAX_TRACE_ENTRIES = 200
MAX_TRACE_INPUT_CHARS = 500
MAX_TRACE_OUTPUT_CHARS = 1000
#: Status lines stay one readable line.
MAX_STATUS_CHARS = 300


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the agent's reply text."""

    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class MessageStarted:
    """A new agent message begins (the executor separates messages in the answer)."""

    item_id: str


@dataclass(frozen=True, slots=True)
class Progress:
    """A one-line, operator-readable account of tool activity, a plan, or a retry."""

    text: str


TurnEvent = TextDelta | MessageStarted | Progress


@dataclass(slots=True)
class Usage:
    """Token counts of one turn, in the names the platform reads."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_output_tokens: int = 0

    def add(self, breakdown: Mapping[str, Any]) -> None:
        """Add one ``TokenUsageBreakdown`` (camelCase, from codex)."""
        self.input_tokens += int(breakdown.get("inputTokens") or 0)
        self.output_tokens += int(breakdown.get("outputTokens") or 0)
        self.cached_input_tokens += int(breakdown.get("cachedInputTokens") or 0)
        self.reasoning_output_tokens += int(breakdown.get("reasoningOutputTokens") or 0)

    def as_dict(self) -> dict[str, int]:
        """The metadata shape: ``usage.input_tokens`` / ``output_tokens`` are what the platform reads."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "reasoning_output_tokens": self.reasoning_output_tokens,
        }


@dataclass(frozen=True, slots=True)
class ToolTrace:
    """One tool call for the platform's activity log."""

    tool: str
    input: str
    output_preview: str

    def as_dict(self) -> dict[str, str]:
        return {"tool": self.tool, "input": self.input, "output_preview": self.output_preview}


@dataclass(frozen=True, slots=True)
class TurnFailure:
    """Why a turn failed, already phrased for a user."""

    message: str
    category: str  # auth | rate_limit | provider | connection | context | codex


@dataclass(slots=True)
class TurnState:
    """Accumulates one turn's notifications; ``feed`` returns the events to publish."""

    thread_id: str
    turn_id: str | None = None
    status: str | None = None  # completed | failed | interrupted, once turn/completed arrived
    usage: Usage = field(default_factory=Usage)
    trace: list[ToolTrace] = field(default_factory=list)
    trace_dropped: int = 0
    failure: TurnFailure | None = None
    _messages: dict[str, str] = field(default_factory=dict)  # itemId -> text, in arrival order
    _completed: set[str] = field(default_factory=set)  # agent messages codex finished (item/completed)
    _open_items: dict[str, str] = field(default_factory=dict)  # itemId -> item type
    _commands: list[tuple[str, int | None]] = field(default_factory=list)
    _files: list[str] = field(default_factory=list)
    _pending_error: TurnFailure | None = None

    @property
    def done(self) -> bool:
        """Whether ``turn/completed`` arrived."""
        return self.status is not None

    def feed(self, event: Notification) -> list[TurnEvent]:
        """Take one notification of this thread; return what the caller should publish."""
        method, params = event.method, event.params
        if method == "item/agentMessage/delta":
            item_id = str(params.get("itemId", ""))
            delta = str(params.get("delta", ""))
            started = item_id not in self._messages
            self._messages[item_id] = self._messages.get(item_id, "") + delta
            out: list[TurnEvent] = [MessageStarted(item_id)] if started else []
            if delta:
                out.append(TextDelta(item_id, delta))
            return out
        if method == "item/started":
            return self._item_started(params.get("item") or {})
        if method == "item/completed":
            return self._item_completed(params.get("item") or {})
        if method == "thread/tokenUsage/updated":
            last = (params.get("tokenUsage") or {}).get("last")
            if isinstance(last, Mapping):
                self.usage.add(last)
            return []
        if method == "turn/plan/updated":
            steps = params.get("plan") or []
            lines = [
                f"[{step.get('status', '?')}] {step.get('step', '')}" for step in steps if isinstance(step, Mapping)
            ]
            return [Progress(_clip("plan: " + "; ".join(lines), MAX_STATUS_CHARS))] if lines else []
        if method == "error":
            failure = describe_error(params.get("error") or {})
            if params.get("willRetry"):
                return [Progress(_clip(f"retrying: {failure.message}", MAX_STATUS_CHARS))]
            self._pending_error = failure
            return []
        if method == "turn/completed":
            self._complete(params.get("turn") or {})
            return []
        return []

    def _item_started(self, item: Mapping[str, Any]) -> list[TurnEvent]:
        item_type = str(item.get("type", ""))
        item_id = str(item.get("id", ""))
        if item_type in ("agentMessage", "userMessage", "reasoning"):
            return []
        self._open_items[item_id] = item_type
        if item_type == "commandExecution":
            return [Progress(_clip(f"$ {item.get('command', '')}", MAX_STATUS_CHARS))]
        if item_type == "fileChange":
            return [Progress(_clip("editing " + ", ".join(_change_paths(item)), MAX_STATUS_CHARS))]
        if item_type == "mcpToolCall":
            return [Progress(_clip(f"calling tool {item.get('server')}.{item.get('tool')}", MAX_STATUS_CHARS))]
        if item_type == "dynamicToolCall":
            return [Progress(_clip(f"calling tool {item.get('tool')}", MAX_STATUS_CHARS))]
        if item_type == "webSearch":
            return [Progress(_clip(f"searching the web: {item.get('query', '')}", MAX_STATUS_CHARS))]
        return []

    def _item_completed(self, item: Mapping[str, Any]) -> list[TurnEvent]:
        item_type = str(item.get("type", ""))
        item_id = str(item.get("id", ""))
        self._open_items.pop(item_id, None)
        if item_type == "agentMessage":
            # The completed text is authoritative; it replaces whatever the deltas built.
            text = str(item.get("text") or "")
            known = item_id in self._messages
            self._messages[item_id] = text
            self._completed.add(item_id)
            return [] if known or not text else [MessageStarted(item_id), TextDelta(item_id, text)]
        if item_type == "commandExecution":
            command = str(item.get("command", ""))
            exit_code = item.get("exitCode")
            status = str(item.get("status", ""))
            self._commands.append((command, exit_code))
            self._record(
                "shell", command, str(item.get("aggregatedOutput") or ""),
            )
            outcome = f"exit {exit_code}" if exit_code is not None else status
            return [Progress(_clip(f"$ {command} → {outcome}", MAX_STATUS_CHARS))]
        if item_type == "fileChange":
            paths = _change_paths(item)
            self._files.extend(paths)
            self._record("apply_patch", ", ".join(paths), str(item.get("status", "")))
            return [Progress(_clip(f"edited {', '.join(paths)} ({item.get('status', '')})", MAX_STATUS_CHARS))]
        if item_type in ("mcpToolCall", "dynamicToolCall"):
            name = f"{item.get('server')}.{item.get('tool')}" if item_type == "mcpToolCall" else str(item.get("tool"))
            result = item.get("error") or item.get("result") or item.get("contentItems") or ""
            self._record(name, _as_text(item.get("arguments")), _as_text(result))
            return [Progress(_clip(f"tool {name} {item.get('status', '')}", MAX_STATUS_CHARS))]
        return []

    def _record(self, tool: str, tool_input: str, output: str) -> None:
        if len(self.trace) >= MAX_TRACE_ENTRIES:
            self.trace_dropped += 1
            return
        self.trace.append(
            ToolTrace(tool, _clip(tool_input, MAX_TRACE_INPUT_CHARS), _clip(output, MAX_TRACE_OUTPUT_CHARS))
        )

    def _complete(self, turn: Mapping[str, Any]) -> None:
        self.status = str(turn.get("status") or "completed")
        for item in turn.get("items") or []:
            if isinstance(item, Mapping) and item.get("type") == "agentMessage" and item.get("text"):
                self._messages[str(item.get("id", ""))] = str(item["text"])
                self._completed.add(str(item.get("id", "")))
        self._open_items.clear()
        if self.status == "failed":
            error = turn.get("error")
            self.failure = describe_error(error) if isinstance(error, Mapping) else self._pending_error
            if self.failure is None:
                self.failure = TurnFailure("codex reported the turn as failed without a reason", "codex")

    def text(self) -> str:
        """The reply: the turn's agent messages, in order, separated by a blank line.

        A message codex never completed was abandoned (a steer or a second ``turn/start``
        aborts the stream and re-samples), so it is left out whenever a completed one exists.
        """
        finished = [text for item_id, text in self._messages.items() if item_id in self._completed and text]
        return "\n\n".join(finished or [text for text in self._messages.values() if text])

    def answer(self) -> str:
        """The reply, or a summary of the tool work when the agent wrote no text."""
        text = self.text()
        if text:
            return text
        parts = []
        if self._commands:
            ran = "; ".join(
                f"`{_clip(cmd, 120)}` (exit {code})" if code is not None else f"`{_clip(cmd, 120)}`"
                for cmd, code in self._commands[:10]
            )
            parts.append(f"Ran {len(self._commands)} command(s): {ran}.")
        if self._files:
            parts.append(f"Changed {len(self._files)} file(s): {', '.join(self._files[:10])}.")
        return " ".join(parts) or "The agent finished without writing a reply."

    def trace_dicts(self) -> list[dict[str, str]]:
        return [entry.as_dict() for entry in self.trace]


def _change_paths(item: Mapping[str, Any]) -> list[str]:
    changes = item.get("changes") or []
    return [str(change.get("path", "?")) for change in changes if isinstance(change, Mapping)] or ["(no path)"]


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _http_status(info: Any) -> int | None:
    """Find an HTTP status code inside codex's ``codexErrorInfo`` (its variants nest it)."""
    if isinstance(info, Mapping):
        for value in info.values():
            if isinstance(value, Mapping) and isinstance(value.get("httpStatusCode"), int):
                return value["httpStatusCode"]
            found = _http_status(value)
            if found is not None:
                return found
    return None


def describe_error(error: Mapping[str, Any]) -> TurnFailure:
    """Phrase codex's ``TurnError`` for a user: what went wrong and what to do, codex's text included."""
    message = str(error.get("message") or "unknown error").strip()
    info = error.get("codexErrorInfo")
    kind = info if isinstance(info, str) else next(iter(info), "") if isinstance(info, Mapping) else ""
    status = _http_status(info)
    detail = _clip(message, 400)
    if status == 401 or kind == "unauthorized":
        return TurnFailure(
            f"The model provider rejected the credential (HTTP 401). Check the API key or auth.json. ({detail})",
            "auth",
        )
    if status == 429 or kind in ("rateLimitExceeded", "usageLimitExceeded"):
        return TurnFailure(f"The model provider is rate limiting requests (HTTP 429); try again later. ({detail})",
                           "rate_limit")
    if (status is not None and status >= 500) or kind in ("internalServerError", "serverOverloaded"):
        code = f"HTTP {status}" if status else "server error"
        return TurnFailure(f"The model provider is unavailable ({code}); try again later. ({detail})", "provider")
    if kind in ("responseStreamDisconnected", "responseStreamConnectionFailed", "httpConnectionFailed") or (
        "stream disconnected" in message or "connection" in message.lower()
    ):
        return TurnFailure(f"The connection to the model provider failed. ({detail})", "connection")
    if kind == "contextWindowExceeded":
        return TurnFailure(f"The conversation no longer fits the model's context window. ({detail})", "context")
    return TurnFailure(f"codex could not complete the turn: {detail}", "codex")
