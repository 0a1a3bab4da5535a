"""Stand-in for the runtime's executor helpers, recording ``set_current_task`` calls."""

from __future__ import annotations

from typing import Any

FAKE_RUNTIME = True

#: ``(heartbeat, task)`` per call, in order.
CURRENT_TASK_CALLS: list[tuple[Any, str]] = []


async def set_current_task(heartbeat: Any, task: str) -> None:
    """Count the task in/out on the heartbeat object, as the runtime does, and record the call."""
    CURRENT_TASK_CALLS.append((heartbeat, task))
    if heartbeat is None:
        return
    if task:
        heartbeat.active_tasks = getattr(heartbeat, "active_tasks", 0) + 1
        heartbeat.current_task = task
    else:
        heartbeat.active_tasks = max(0, getattr(heartbeat, "active_tasks", 0) - 1)
        if heartbeat.active_tasks == 0:
            heartbeat.current_task = ""


def extract_message_text(message: Any) -> str:
    """Join the text parts of a message (``part.text`` or ``part.root.text``) with spaces."""
    texts: list[str] = []
    for part in getattr(message, "parts", None) or []:
        text = getattr(part, "text", None) or getattr(getattr(part, "root", None), "text", None)
        if text:
            texts.append(text)
    return " ".join(texts).strip()
