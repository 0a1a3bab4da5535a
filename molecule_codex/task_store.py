"""Where standalone hosts keep A2A tasks: the SDK's SQLAlchemy store, made cheap per turn.

a2a-sdk's ``DatabaseTaskStore`` (SQLite by default, any async SQLAlchemy URL such as Postgres)
holds the schema, listing and paging. Per trivial turn the SDK asks it for the new task three
times before it exists and saves it on every event; through the async ORM on aiosqlite each of
those is a thread hop plus a greenlet switch per statement, 0.6 to 1 ms apiece, which was most of
the SDK's request path (measured: 6.7 ms per trivial turn with it, 2.0 ms with a dict). So:

* a task is written when it first appears (a crash then leaves it on disk as unfinished, and
  :meth:`TaskStore.fail_unfinished` reports it FAILED after the restart) and whenever it leaves
  submitted/working; in between its latest version lives in memory, scoped by owner like the
  table, and is what ``get`` returns;
* a task id just read as absent, or just made by the SDK for a message that named no task
  (:meth:`TaskStore.note_new_task`), is remembered as absent for :data:`ABSENT_TTL_S` or until it
  is saved, so the SDK's repeated look-ups of a brand-new task cost no read;
* on an SQLite file the single-task reads and writes run through a synchronous engine on one
  dedicated thread (the SDK's ORM mapping, written as one upsert statement: one hop and one
  statement per write); other databases keep the SDK's async path.

Callers never see SQL text: a failed write raises :class:`TaskStoreError` with a sentence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from a2a.server.context import ServerCallContext
from a2a.server.tasks import DatabaseTaskStore
from a2a.types import ListTasksRequest, ListTasksResponse, Message, Part, Role, Task, TaskState, TaskStatus
from sqlalchemy import and_, create_engine, event, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import sessionmaker

logger = logging.getLogger(__name__)

TASKS_DB_FILENAME = "tasks.sqlite3"
#: How long an SQLite write waits for another connection's transaction (the driver default is 5 s).
STORE_BUSY_TIMEOUT_S = 60.0
#: A task id read as absent stays "absent" this long unless saved: the SDK looks a new task up
#: several times within one request; another agent cannot create a uuid we are about to create.
ABSENT_TTL_S = 2.0
#: Absent ids remembered at most; expired ones are dropped first.
ABSENT_MAX = 4096
#: States that mean "still running": after a restart nothing is running any more.
UNFINISHED_STATES = frozenset(
    {TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_UNSPECIFIED}
)
#: States in which a task still needs the process that runs it (running, or waiting for a
#: person's answer): after a restart none of them can go on.
OPEN_STATES = UNFINISHED_STATES | {TaskState.TASK_STATE_INPUT_REQUIRED}
#: Task metadata naming the agent that runs a task on a shared store (see TaskStore.instance).
INSTANCE_METADATA_KEY = "molecule_codex_instance"
INTERRUPTED_BY_RESTART = "The agent restarted while this task was running; send the message again to continue."

T = TypeVar("T")


def _copy(task: Task) -> Task:
    """A deep copy: stored versions must not change when a caller mutates its object."""
    copy = Task()
    copy.CopyFrom(task)
    return copy


class TaskStoreError(RuntimeError):
    """A task could not be written; the text is what the A2A caller sees."""


class _SqliteThread:
    """Single-task reads and writes of an SQLite file on one thread, through a synchronous engine.

    One thread keeps SQLite's single writer uncontended within this process and costs one hop per
    operation (the async driver costs one per statement plus greenlet switches).
    """

    def __init__(self, path: str) -> None:
        self.engine = create_engine(
            f"sqlite:///{path}", connect_args={"timeout": STORE_BUSY_TIMEOUT_S, "check_same_thread": False}
        )
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")

    async def run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.engine.dispose()


class TaskStore(DatabaseTaskStore):
    """The SDK's SQLAlchemy task store, written when a task appears and when it settles (see the
    module docstring)."""

    def __init__(self, engine: Any, *, instance: str | None = None, sqlite_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._live: dict[tuple[str, str], Task] = {}  # (owner, task id) -> latest in-flight version
        self._absent: dict[tuple[str, str], float] = {}  # (owner, task id) -> monotonic expiry
        self._saves = 0  # counts saves: a read that overlapped one may be stale, so it is not remembered
        self._sqlite = _SqliteThread(sqlite_path) if sqlite_path else None
        #: On a store shared by several agents: this agent's name, stamped on the tasks it runs, so
        #: ``fail_unfinished`` at boot settles only its own (None: the store is this agent's alone).
        self.instance = instance

    async def save(self, task: Task, context: ServerCallContext) -> None:
        owner = self.owner_resolver(context)
        key = (owner, task.id)
        in_flight = task.status.state in UNFINISHED_STATES
        if key not in self._live or not in_flight:
            try:
                await self._write(self._stamped(task) if task.status.state in OPEN_STATES else task, owner, context)
            except SQLAlchemyError as exc:
                if not in_flight:
                    # Settled but not written (disk full, read-only): readers get the outcome, not the last
                    # in-flight version forever; after a restart fail_unfinished settles the row.
                    self._live[key] = _copy(task)
                # The SDK hands str(exc) to the caller: give it our sentence, not the SQL.
                logger.error("task store write failed task=%s: %s", task.id, exc)
                raise TaskStoreError(
                    "the agent could not save this task (its task database is full or not writable); "
                    "see the agent's log"
                ) from None
        # After the write: a get whose read overlapped it must neither keep nor add "absent".
        self._saves += 1
        self._absent.pop(key, None)
        if in_flight:
            self._live[key] = _copy(task)  # the SDK keeps mutating the object it passed us
        else:
            self._live.pop(key, None)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        owner = self.owner_resolver(context)
        key = (owner, task_id)
        live = self._live.get(key)
        if live is not None:
            return _copy(live)
        expiry = self._absent.get(key)
        if expiry is not None and expiry > time.monotonic():
            return None
        saves_before = self._saves
        found = await self._read(task_id, owner, context)
        if found is None and self._saves == saves_before:
            self._remember_absent(key)
        else:
            self._absent.pop(key, None)
        return found

    def note_new_task(self, task_id: str, context: ServerCallContext) -> None:
        """``task_id`` was just made by the SDK for a message that named no task: nothing can be
        stored under a fresh uuid4, so the look-ups that follow need no read at all."""
        self._remember_absent((self.owner_resolver(context), task_id))

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        response = await super().list(params, context)
        owner = self.owner_resolver(context)
        for stored in response.tasks:
            live = self._live.get((owner, stored.id))
            if live is not None:
                stored.CopyFrom(live)
        return response

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        self._live.pop((self.owner_resolver(context), task_id), None)
        await super().delete(task_id, context)

    async def close(self) -> None:
        """Release the database connections and the SQLite thread."""
        if self._sqlite is not None:
            await asyncio.to_thread(self._sqlite.close)
        await self.engine.dispose()

    async def _write(self, task: Task, owner: str, context: ServerCallContext) -> None:
        if self._sqlite is None:
            await super().save(task, context)
            return
        await self._ensure_initialized()  # the table, created once through the async engine
        statement = self._upsert(self._to_orm(task, owner))
        engine = self._sqlite.engine

        def write() -> None:
            with engine.begin() as connection:
                connection.execute(statement)

        await self._sqlite.run(write)

    def _upsert(self, row: Any) -> Any:
        """One ``INSERT … ON CONFLICT(id) DO UPDATE`` for ``row`` (an ORM instance from ``_to_orm``):
        the row the SDK's ``merge`` writes, without its SELECT and unit of work."""
        table = self.task_model.__table__
        columns = self.task_model.__mapper__.column_attrs
        values = {attribute.columns[0].name: getattr(row, attribute.key) for attribute in columns}
        statement = sqlite_insert(table).values(values)
        return statement.on_conflict_do_update(
            index_elements=[table.c.id], set_={name: statement.excluded[name] for name in values if name != "id"}
        )

    async def _read(self, task_id: str, owner: str, context: ServerCallContext) -> Task | None:
        if self._sqlite is None:
            return await super().get(task_id, context)
        await self._ensure_initialized()
        model, sessions = self.task_model, self._sqlite.sessions
        statement = select(model).where(and_(model.id == task_id, model.owner == owner))

        def read() -> Any:
            with sessions() as session:
                return session.execute(statement).scalar_one_or_none()

        row = await self._sqlite.run(read)
        return self._from_orm(row) if row is not None else None

    def _remember_absent(self, key: tuple[str, str]) -> None:
        now = time.monotonic()
        if len(self._absent) >= ABSENT_MAX:
            self._absent = {k: expiry for k, expiry in self._absent.items() if expiry > now}
            while len(self._absent) >= ABSENT_MAX:
                self._absent.pop(next(iter(self._absent)))
        self._absent[key] = now + ABSENT_TTL_S

    def _stamped(self, task: Task) -> Task:
        """The version written while the task runs: named after this agent on a shared store."""
        if self.instance is None:
            return task
        stamped = _copy(task)
        stamped.metadata[INSTANCE_METADATA_KEY] = self.instance
        return stamped

    async def fail_unfinished(self, reason: str = INTERRUPTED_BY_RESTART) -> int:
        """Mark every task a previous process left open (running or waiting for input) FAILED (all callers).

        On a shared store only this agent's own (stamped with ``instance``): another agent's
        running tasks are not ours to end."""
        await self._ensure_initialized()
        failed = 0
        async with self.async_session_maker.begin() as session:
            rows = (await session.execute(select(self.task_model))).scalars().all()
            for row in rows:
                task = self._from_orm(row)
                if task.status.state not in OPEN_STATES:
                    continue
                owner = task.metadata.fields.get(INSTANCE_METADATA_KEY)
                if self.instance is not None and (owner is None or owner.string_value != self.instance):
                    continue
                status = TaskStatus(
                    state=TaskState.TASK_STATE_FAILED,
                    message=Message(
                        role=Role.ROLE_AGENT,
                        message_id=f"restart-{task.id}",
                        task_id=task.id,
                        context_id=task.context_id,
                        parts=[Part(text=reason)],
                    ),
                )
                status.timestamp.GetCurrentTime()
                task.status.CopyFrom(status)
                await session.merge(self._to_orm(task, row.owner))
                failed += 1
        if failed:
            logger.warning("marked %d task(s) interrupted by the previous shutdown as FAILED", failed)
        return failed


def task_store_url(state_dir: Path, url: str | None) -> str:
    """The SQLAlchemy URL: the given one, or an SQLite file in the state directory (created 0600)."""
    if url:
        return url
    path = Path(state_dir) / TASKS_DB_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return f"sqlite+aiosqlite:///{path}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL + synchronous=NORMAL: a commit per task event stays cheap and survives a process crash."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_task_store(url: str, *, instance: str | None = None) -> TaskStore:
    """A task store on any async SQLAlchemy URL (``sqlite+aiosqlite://…``, ``postgresql+asyncpg://…``).

    SQLite files run in WAL mode, with their single-task reads and writes on one thread (see the
    module docstring). SQLite has one writer at a time and a writer's transaction can span
    event-loop turns: on a busy loop (32 turns on 2 cores) others waited past the driver's 5 s
    busy timeout ("database is locked", which reached the A2A client with the SQL in it), hence
    the longer wait.

    A server database may be shared by several agents: each then names itself (``instance``,
    default ``$MOLECULE_CODEX_INSTANCE`` or the host name, stable across a container's restarts).
    """
    sqlite_path: str | None = None
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": STORE_BUSY_TIMEOUT_S})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        database = make_url(url).database
        if database and database != ":memory:":
            sqlite_path = database  # an in-memory database exists per connection: keep one engine
    else:
        engine = create_async_engine(url, pool_pre_ping=True)
        instance = instance or os.environ.get("MOLECULE_CODEX_INSTANCE") or socket.gethostname()
    return TaskStore(engine, create_table=True, instance=instance, sqlite_path=sqlite_path)
