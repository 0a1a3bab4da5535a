"""Stand-in for the runtime's heartbeat loop: only the fields executors touch."""

from __future__ import annotations

FAKE_RUNTIME = True


class HeartbeatLoop:
    """Holds what ``set_current_task`` updates; sends nothing."""

    def __init__(self, platform_url: str = "", workspace_id: str = "") -> None:
        self.platform_url = platform_url
        self.workspace_id = workspace_id
        self.current_task = ""
        self.active_tasks = 0
