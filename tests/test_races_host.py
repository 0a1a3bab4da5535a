"""Issue 12 items that need no codex: the bind address that counts as loopback (7) and boot
cleanup on a task store shared by several agents (9). Both failed on commit 5a02321."""

from __future__ import annotations

from a2a.server.context import ServerCallContext
from a2a.types import Task, TaskState, TaskStatus

from molecule_codex.standalone import is_loopback
from molecule_codex.task_store import create_task_store, task_store_url

FAILED = TaskState.TASK_STATE_FAILED


def test_item7_empty_host_is_not_loopback():
    """uvicorn binds every interface for "", so it must need a token like any public address."""
    assert not is_loopback("")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


async def test_item9_boot_cleanup_leaves_another_instances_running_tasks_alone(tmp_path):
    """Two instances on one shared task store (SQLite standing in for Postgres): the one that
    boots fails only the tasks its own previous run left unfinished."""
    url = task_store_url(tmp_path, None)
    alive, crashed = create_task_store(url, instance="replica-a"), create_task_store(url, instance="replica-b")
    context = ServerCallContext()
    try:
        running = Task(id="a-running", context_id="c", status=TaskStatus(state=TaskState.TASK_STATE_WORKING))
        await alive.save(running, context)
        left = Task(id="b-left", context_id="c", status=TaskStatus(state=TaskState.TASK_STATE_WORKING))
        await crashed.save(left, context)
        await crashed.close()  # replica b dies and comes back
        rebooted = create_task_store(url, instance="replica-b")
        try:
            assert await rebooted.fail_unfinished() == 1
            assert (await rebooted.get("b-left", context)).status.state == FAILED
            assert (await rebooted.get("a-running", context)).status.state == TaskState.TASK_STATE_WORKING
        finally:
            await rebooted.close()
    finally:
        await alive.close()
