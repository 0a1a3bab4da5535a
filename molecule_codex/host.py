"""The standalone A2A host: agent card, JSON-RPC (protocol 1.0 and 0.3) on ``/``, auth, body cap.

Used by ``molecule-codex serve`` and by the tests; under the platform the runtime builds its own
server around the same executor. Route order matters: card first, then JSON-RPC at ``/``,
then our own routes (a REST catch-all would shadow everything after it, so we serve none).

Auth: with tokens configured, every request but the card and the health check needs
``Authorization: Bearer <token>``; each token is its own caller. The task store scopes tasks
per caller and the executor scopes conversations per caller, so one caller can neither read nor
cancel another's tasks, nor join another's codex thread by reusing its context id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext, SimpleRequestContextBuilder
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import DefaultServerCallContextBuilder, create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import DatabaseTaskStore
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from sqlalchemy import event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from molecule_codex.identity import CLIENT_CONTEXT_ID_STATE
from molecule_codex.reply_usage import CALL_CONTEXT_ATTR, counted

logger = logging.getLogger(__name__)

#: uvicorn binds in milliseconds; this bound only catches a port that never opens.
SERVER_START_TIMEOUT_S = 30.0
#: How long a stopping uvicorn may take once it was told to exit.
SERVER_STOP_TIMEOUT_S = 10.0
#: Request bodies above this get HTTP 413: big enough for images, small enough to protect memory.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
TASKS_DB_FILENAME = "tasks.sqlite3"
#: How long an SQLite write waits for another connection's transaction (the driver default is 5 s).
STORE_BUSY_TIMEOUT_S = 60.0
HEALTH_PATH = "/health"
UNAUTHENTICATED_PATHS = frozenset({AGENT_CARD_WELL_KNOWN_PATH, "/.well-known/agent.json", HEALTH_PATH})
#: States that mean "still running": after a restart nothing is running any more.
UNFINISHED_STATES = frozenset(
    {TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_UNSPECIFIED}
)
#: Task metadata naming the agent that runs a task on a shared store (see TaskStore.instance).
INSTANCE_METADATA_KEY = "molecule_codex_instance"
INTERRUPTED_BY_RESTART = "The agent restarted while this task was running; send the message again to continue."


def build_agent_card(
    url: str, *, name: str, description: str, version: str, streaming: bool = True
) -> AgentCard:
    """A card advertising JSON-RPC at ``url`` for protocol 1.0 and 0.3 (the platform speaks 0.3)."""
    return AgentCard(
        name=name,
        description=description,
        version=version,
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="0.3"),
        ],
        capabilities=AgentCapabilities(streaming=streaming, push_notifications=False),
        default_input_modes=["text/plain", "application/json", "image/png", "image/jpeg", "application/octet-stream"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id="codex",
                name="Coding agent",
                description="Reads, writes and runs code in its workspace with the OpenAI Codex CLI.",
                tags=["coding", "shell", "codex"],
            )
        ],
    )


def caller_name(token: str) -> str:
    """A stable, non-secret name for the caller holding ``token`` (the task store's owner key)."""
    return "caller-" + hashlib.sha256(token.encode()).hexdigest()[:12]


class BearerTokenBackend(AuthenticationBackend):
    """Maps each configured bearer token to its own caller; anything else is refused."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [token.encode() for token in tokens if token]

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path in UNAUTHENTICATED_PATHS:
            return None
        header = conn.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AuthenticationError("missing bearer token")
        candidate = presented.strip().encode()
        for token in self._tokens:
            if hmac.compare_digest(candidate, token):
                return AuthCredentials(["authenticated"]), SimpleUser(caller_name(token.decode()))
        raise AuthenticationError("invalid bearer token")


def _unauthorized(_conn: HTTPConnection, exc: Exception) -> Response:
    return JSONResponse(
        {"error": f"unauthorized: {exc}"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


def _copy(task: Task) -> Task:
    """A deep copy: stored versions must not change when a caller mutates its object."""
    copy = Task()
    copy.CopyFrom(task)
    return copy


class TaskStoreError(RuntimeError):
    """A task could not be written; the text is what the A2A caller sees."""


class TaskStore(DatabaseTaskStore):
    """The SDK's SQLAlchemy task store, written when a task appears and when it settles.

    The SDK saves a task on every event (a dozen or more per turn); each save is a database
    commit, which was half of our per-turn overhead. A task is therefore written when first
    seen (so a crash leaves it on disk as unfinished, and ``fail_unfinished`` reports it
    FAILED after the restart) and whenever it leaves submitted/working; in between, its latest
    version lives in memory, scoped by owner like the table, and is what ``get`` returns.
    """

    def __init__(self, engine: Any, *, instance: str | None = None, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._live: dict[tuple[str, str], Task] = {}  # (owner, task id) -> latest in-flight version
        #: On a store shared by several agents: this agent's name, stamped on the tasks it runs, so
        #: ``fail_unfinished`` at boot settles only its own (None: the store is this agent's alone).
        self.instance = instance

    async def save(self, task: Task, context: ServerCallContext) -> None:
        key = (self.owner_resolver(context), task.id)
        in_flight = task.status.state in UNFINISHED_STATES
        if key not in self._live or not in_flight:
            try:
                await super().save(self._stamped(task) if in_flight else task, context)
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
        if in_flight:
            self._live[key] = _copy(task)  # the SDK keeps mutating the object it passed us
        else:
            self._live.pop(key, None)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        live = self._live.get((self.owner_resolver(context), task_id))
        if live is None:
            return await super().get(task_id, context)
        return _copy(live)

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

    def _stamped(self, task: Task) -> Task:
        """The version written while the task runs: named after this agent on a shared store."""
        if self.instance is None:
            return task
        stamped = _copy(task)
        stamped.metadata[INSTANCE_METADATA_KEY] = self.instance
        return stamped

    async def fail_unfinished(self, reason: str = INTERRUPTED_BY_RESTART) -> int:
        """Mark every task left submitted/working by a previous process as FAILED (all callers).

        On a shared store only this agent's own (stamped with ``instance``): another agent's
        running tasks are not ours to end."""
        await self._ensure_initialized()
        failed = 0
        async with self.async_session_maker.begin() as session:
            rows = (await session.execute(select(self.task_model))).scalars().all()
            for row in rows:
                task = self._from_orm(row)
                if task.status.state not in UNFINISHED_STATES:
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

    The SDK commits once per task event; on SQLite that cost is most of our per-turn overhead
    with the default rollback journal, so file databases run in WAL mode. SQLite has one writer
    at a time, and a writer's transaction spans event-loop turns: on a busy loop (32 turns on
    2 cores) the others waited past the driver's 5 s busy timeout ("database is locked", which
    reached the A2A client with the SQL in it), hence the longer wait.

    A server database may be shared by several agents: each then names itself (``instance``,
    default ``$MOLECULE_CODEX_INSTANCE`` or the host name, stable across a container's restarts).
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": STORE_BUSY_TIMEOUT_S})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        engine = create_async_engine(url, pool_pre_ping=True)
        instance = instance or os.environ.get("MOLECULE_CODEX_INSTANCE") or socket.gethostname()
    return TaskStore(engine, create_table=True, instance=instance)


#: Request headers kept out of the call context: a2a-sdk logs the context at DEBUG.
PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class _CallContextBuilder(DefaultServerCallContextBuilder):
    """The SDK's call context without credentials (the user is already resolved from them), left
    on the request too so :func:`reply_usage.counted` knows which method a reply answers."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        headers = context.state.get("headers")
        if isinstance(headers, dict):
            context.state["headers"] = {k: v for k, v in headers.items() if k.lower() not in PRIVATE_HEADERS}
        setattr(request.state, CALL_CONTEXT_ATTR, context)
        return context


def _jsonrpc_routes(handler: DefaultRequestHandler) -> list[Route]:
    """JSON-RPC (1.0 and 0.3) at ``/``, its replies carrying usage the platform can count."""
    routes = create_jsonrpc_routes(handler, rpc_url="/", context_builder=_CallContextBuilder(), enable_v0_3_compat=True)
    return [Route(route.path, counted(route.endpoint), methods=list(route.methods or ())) for route in routes]


class ClientContextRecorder(SimpleRequestContextBuilder):
    """Records the contextId the client really sent before the SDK invents one and writes it into
    the message; :func:`identity.identify` reads it to tell "no contextId" from a chosen one."""

    async def build(
        self,
        context: ServerCallContext,
        params: Any = None,
        task_id: str | None = None,
        context_id: str | None = None,
        task: Task | None = None,
    ) -> RequestContext:
        context.state[CLIENT_CONTEXT_ID_STATE] = context_id or ""
        return await super().build(context, params, task_id, context_id, task)


async def _health(_request: Request) -> Response:
    return PlainTextResponse("ok")


def build_app(
    executor: AgentExecutor,
    *,
    card: AgentCard,
    task_store: TaskStore,
    tokens: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    extra_routes: Sequence[Route] = (),
    lifespan: Any = None,
) -> tuple[Starlette, DefaultRequestHandler]:
    """The Starlette app serving ``executor`` over A2A, and its request handler (close it on exit)."""
    handler = DefaultRequestHandler(
        agent_executor=executor,
        task_store=task_store,
        agent_card=card,
        request_context_builder=ClientContextRecorder(),
    )
    routes = [
        *create_agent_card_routes(card),
        *_jsonrpc_routes(handler),
        Route(HEALTH_PATH, _health, methods=["GET"]),
        *extra_routes,
    ]
    middleware = []
    if tokens:
        middleware.append(
            Middleware(AuthenticationMiddleware, backend=BearerTokenBackend(tokens), on_error=_unauthorized)
        )
    app = Starlette(routes=routes, middleware=middleware, max_body_size=max_body_bytes, lifespan=lifespan)
    return app, handler


@contextlib.asynccontextmanager
async def running_server(
    server: uvicorn.Server, card: AgentCard, public_host: str
) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """Serve until the block ends; yields the URL (the card points at it) and uvicorn's task.

    The server may bind port 0: the real port is read once uvicorn is listening. Leaving the
    block stops the server; await the task inside the block to serve until a signal instead.
    """
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(SERVER_START_TIMEOUT_S):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the HTTP server stopped during start-up")
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://{public_host}:{port}/"
        for interface in card.supported_interfaces:
            interface.url = url
        yield url, task
    finally:
        if not task.done():
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, SERVER_STOP_TIMEOUT_S)
