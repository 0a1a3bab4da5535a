"""The task store: what is on disk at each step, what callers read, and recovery after a crash."""

from __future__ import annotations

import asyncio

import pytest
from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.types import ListTasksRequest, Task, TaskState, TaskStatus

from molecule_codex.task_store import TaskStore, create_task_store, task_store_url


class _Caller(User):
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._name


def _context(name: str) -> ServerCallContext:
    return ServerCallContext(user=_Caller(name))


def _task(state: int, task_id: str = "t1") -> Task:
    return Task(id=task_id, context_id="c1", status=TaskStatus(state=state))


async def _on_disk(url: str, task_id: str, context: ServerCallContext) -> int | None:
    """What a fresh process would read (no in-memory versions)."""
    fresh = create_task_store(url)
    try:
        task = await fresh.get(task_id, context)
        return task.status.state if task else None
    finally:
        await fresh.close()


async def test_written_when_it_appears_and_when_it_settles(tmp_path):
    url = task_store_url(tmp_path, None)
    store = create_task_store(url)
    alice = _context("alice")
    try:
        await store.save(_task(TaskState.TASK_STATE_SUBMITTED), alice)
        assert await _on_disk(url, "t1", alice) == TaskState.TASK_STATE_SUBMITTED
        await store.save(_task(TaskState.TASK_STATE_WORKING), alice)
        assert (await store.get("t1", alice)).status.state == TaskState.TASK_STATE_WORKING
        assert await _on_disk(url, "t1", alice) == TaskState.TASK_STATE_SUBMITTED  # no commit per event
        listed = await store.list(ListTasksRequest(), alice)
        assert [t.status.state for t in listed.tasks] == [TaskState.TASK_STATE_WORKING]
        await store.save(_task(TaskState.TASK_STATE_COMPLETED), alice)
        assert await _on_disk(url, "t1", alice) == TaskState.TASK_STATE_COMPLETED
        assert (await store.get("t1", alice)).status.state == TaskState.TASK_STATE_COMPLETED
    finally:
        await store.close()


async def test_in_flight_versions_are_scoped_per_caller(tmp_path):
    store = create_task_store(task_store_url(tmp_path, None))
    try:
        await store.save(_task(TaskState.TASK_STATE_SUBMITTED), _context("alice"))
        await store.save(_task(TaskState.TASK_STATE_WORKING), _context("alice"))
        assert await store.get("t1", _context("bob")) is None
    finally:
        await store.close()


async def test_the_sdk_mutating_its_task_does_not_change_what_we_hold(tmp_path):
    store = create_task_store(task_store_url(tmp_path, None))
    alice = _context("alice")
    try:
        task = _task(TaskState.TASK_STATE_SUBMITTED)
        await store.save(task, alice)
        task.status.state = TaskState.TASK_STATE_WORKING
        await store.save(task, alice)
        task.status.state = TaskState.TASK_STATE_COMPLETED  # mutated, not saved
        assert (await store.get("t1", alice)).status.state == TaskState.TASK_STATE_WORKING
    finally:
        await store.close()


async def test_tasks_unfinished_at_a_crash_are_failed_on_the_next_start(tmp_path):
    url = task_store_url(tmp_path, None)
    crashed: TaskStore = create_task_store(url)
    await crashed.save(_task(TaskState.TASK_STATE_SUBMITTED, "running"), _context("alice"))
    await crashed.save(_task(TaskState.TASK_STATE_WORKING, "running"), _context("alice"))
    await crashed.save(_task(TaskState.TASK_STATE_SUBMITTED, "done"), _context("bob"))
    await crashed.save(_task(TaskState.TASK_STATE_COMPLETED, "done"), _context("bob"))
    await crashed.save(_task(TaskState.TASK_STATE_SUBMITTED, "asking"), _context("carol"))
    await crashed.save(_task(TaskState.TASK_STATE_INPUT_REQUIRED, "asking"), _context("carol"))
    await crashed.close()  # the process "dies" here
    restarted = create_task_store(url)
    try:
        assert await restarted.fail_unfinished() == 2  # nobody is left to act on a person's answer either
        for task_id, caller in (("running", "alice"), ("asking", "carol")):
            task = await restarted.get(task_id, _context(caller))
            assert task.status.state == TaskState.TASK_STATE_FAILED
            assert "restarted" in task.status.message.parts[0].text
        assert (await restarted.get("done", _context("bob"))).status.state == TaskState.TASK_STATE_COMPLETED
    finally:
        await restarted.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task ids the store really reads from its database, in order."""
    seen: list[str] = []
    real_read = TaskStore._read

    async def counting_read(self, task_id, owner, context):
        seen.append(task_id)
        return await real_read(self, task_id, owner, context)

    monkeypatch.setattr(TaskStore, "_read", counting_read)
    return seen


async def test_an_absent_task_is_read_once_then_remembered_until_saved_or_expired(tmp_path, monkeypatch, reads):
    from molecule_codex import task_store

    url = task_store_url(tmp_path, None)
    store, other = create_task_store(url), create_task_store(url)
    alice = _context("alice")
    try:
        assert store._sqlite is not None  # an SQLite file: single-task I/O on the store's own thread
        for _ in range(3):  # the SDK looks a new task up several times before it exists
            assert await store.get("new", alice) is None
        assert reads == ["new"]
        await store.save(_task(TaskState.TASK_STATE_SUBMITTED, "new"), alice)  # our own save forgets "absent"
        assert (await store.get("new", alice)).status.state == TaskState.TASK_STATE_SUBMITTED

        monkeypatch.setattr(task_store, "ABSENT_TTL_S", 0.0)  # another agent's write shows once "absent" expires
        assert await store.get("elsewhere", alice) is None
        await other.save(_task(TaskState.TASK_STATE_COMPLETED, "elsewhere"), alice)
        assert (await store.get("elsewhere", alice)).status.state == TaskState.TASK_STATE_COMPLETED
        assert await store.get("new", _context("bob")) is None  # absent per owner, like the table
    finally:
        await store.close()
        await other.close()


async def test_a_read_that_overlaps_a_save_is_not_remembered_as_absent(tmp_path, monkeypatch):
    """On a server database a read and a save run on different connections: a read that began
    before the save committed finds nothing, and must not then hide the saved task for ABSENT_TTL_S."""
    store = create_task_store(task_store_url(tmp_path, None))
    alice = _context("alice")
    real_read = TaskStore._read
    read_done, release = asyncio.Event(), asyncio.Event()

    async def slow_read(self, task_id, owner, context):
        found = await real_read(self, task_id, owner, context)
        read_done.set()
        await release.wait()  # the answer arrives after the save below
        return found

    monkeypatch.setattr(TaskStore, "_read", slow_read)
    try:
        reader = asyncio.create_task(store.get("t1", alice))
        await asyncio.wait_for(read_done.wait(), 10)
        await store.save(_task(TaskState.TASK_STATE_COMPLETED), alice)
        release.set()
        assert await asyncio.wait_for(reader, 10) is None  # true when it was read
        assert (await store.get("t1", alice)).status.state == TaskState.TASK_STATE_COMPLETED

        # And a read that answers while a save's write is still on its way: "absent" goes with the write.
        monkeypatch.setattr(TaskStore, "_read", real_read)
        real_write, write_started, commit = TaskStore._write, asyncio.Event(), asyncio.Event()

        async def slow_write(self, task, owner, context):
            write_started.set()
            await commit.wait()
            await real_write(self, task, owner, context)

        monkeypatch.setattr(TaskStore, "_write", slow_write)
        saver = asyncio.create_task(store.save(_task(TaskState.TASK_STATE_COMPLETED, "t2"), alice))
        await asyncio.wait_for(write_started.wait(), 10)
        assert await store.get("t2", alice) is None  # not written yet
        commit.set()
        await asyncio.wait_for(saver, 10)
        assert (await store.get("t2", alice)).status.state == TaskState.TASK_STATE_COMPLETED
    finally:
        await store.close()


async def test_absent_ids_are_bounded(tmp_path, monkeypatch):
    from molecule_codex import task_store

    monkeypatch.setattr(task_store, "ABSENT_MAX", 8)
    store = create_task_store(task_store_url(tmp_path, None))
    try:
        for index in range(50):
            assert await store.get(f"missing-{index}", _context("alice")) is None
        assert len(store._absent) <= 8
    finally:
        await store.close()


async def test_an_in_memory_database_keeps_the_async_path():
    store = create_task_store("sqlite+aiosqlite://")
    alice = _context("alice")
    try:
        assert store._sqlite is None
        await store.save(_task(TaskState.TASK_STATE_COMPLETED), alice)
        assert (await store.get("t1", alice)).status.state == TaskState.TASK_STATE_COMPLETED
    finally:
        await store.close()


async def test_a_task_id_the_sdk_just_made_is_never_read(tmp_path, reads):
    store = create_task_store(task_store_url(tmp_path, None))
    alice = _context("alice")
    try:
        store.note_new_task("fresh", alice)
        assert await store.get("fresh", alice) is None
        await store.save(_task(TaskState.TASK_STATE_SUBMITTED, "fresh"), alice)
        assert (await store.get("fresh", alice)).status.state == TaskState.TASK_STATE_SUBMITTED
        assert reads == []
        assert await store.get("fresh", _context("bob")) is None  # another owner still reads
        assert reads == ["fresh"]
    finally:
        await store.close()
