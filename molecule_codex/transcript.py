"""Readable lines from codex's rollout JSONL (the record codex keeps of every thread).

Backs the runtime's ``/transcript`` route. The cursor is the index of the next rollout line to
read, so a caller pages with ``since=<previous cursor>``. Only what a person wants to read is
shown: user and assistant messages, tool calls and their outputs; codex's own injected context
(environment blocks, developer instructions) and bookkeeping events are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: One transcript line stays readable; the rollout itself keeps everything.
MAX_LINE_CHARS = 2000


def find_rollout(codex_home: Path, thread_id: str) -> Path | None:
    """The rollout file of ``thread_id`` (codex names it ``rollout-<time>-<thread id>.jsonl``)."""
    sessions = Path(codex_home) / "sessions"
    matches = sorted(sessions.glob(f"**/rollout-*-{thread_id}.jsonl")) if sessions.is_dir() else []
    return matches[-1] if matches else None


def _texts(content: Any) -> str:
    if not isinstance(content, list):
        return ""
    return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("text"))


def _is_injected(text: str) -> bool:
    stripped = text.strip()
    return (stripped.startswith("<") and stripped.endswith(">")) or stripped.startswith("# AGENTS.md instructions")


def render_record(record: dict[str, Any]) -> str | None:
    """One rollout record as a readable line, or None when it is not for people."""
    if record.get("type") != "response_item":
        return None
    payload = record.get("payload") or {}
    kind = payload.get("type")
    if kind == "message":
        role = payload.get("role")
        text = _texts(payload.get("content"))
        if role not in ("user", "assistant") or not text or _is_injected(text):
            return None
        return f"{role}: {text}"
    if kind == "function_call":
        return f"tool call {payload.get('name')}: {payload.get('arguments', '')}"
    if kind == "function_call_output":
        output = payload.get("output")
        return f"tool output: {output if isinstance(output, str) else json.dumps(output)}"
    if kind == "custom_tool_call":
        return f"tool call {payload.get('name')}: {payload.get('input', '')}"
    return None


def read_transcript(rollout: Path, since: int = 0, limit: int = 100) -> tuple[list[str], int, bool]:
    """Lines from rollout line ``since`` on: (lines, next cursor, more left)."""
    lines: list[str] = []
    cursor = since
    with rollout.open(encoding="utf-8", errors="replace") as handle:
        for index, raw in enumerate(handle):
            if index < since:
                continue
            if len(lines) >= limit:
                return lines, cursor, True
            cursor = index + 1
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            line = render_record(record) if isinstance(record, dict) else None
            if line:
                lines.append(line[:MAX_LINE_CHARS])
    return lines, cursor, False
