"""A real a2a-sdk server around the real executor, codex and the scripted model, on 127.0.0.1.

``serve_codex(...)`` yields a :class:`Served` with the URL, the executor, the app-server and a
client factory; everything is torn down (server, executor, codex child) when the block exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from a2a.client import ClientCallContext, ClientConfig, create_client
from a2a.client.client import Client
from a2a.types import Message, Part, Role, SendMessageRequest, StreamResponse

from molecule_codex.app_server import AppServer, RestartBackoff
from molecule_codex.conversations import ConversationStore
from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, ScriptedModel, write_codex_config
from molecule_codex.executor import CodexExecutor, ExecutorOptions, TurnHooks
from molecule_codex.host import build_agent_card, build_app
from molecule_codex.person import PersonPolicy, server_request_deadline
from molecule_codex.task_store import create_task_store, task_store_url

#: Generous per-call client timeout: the SDK default (5 s) is shorter than some test turns.
CLIENT_TIMEOUT_S = 60.0
SERVER_START_TIMEOUT_S = 15.0


@dataclass
class Served:
    """One running server and what it is made of."""

    url: str
    executor: CodexExecutor
    app: AppServer
    model: ScriptedModel
    workspace: Path
    state_dir: Path
    codex_home: Path
    _clients: list[Any] = field(default_factory=list)

    async def client(self, *, streaming: bool = True, headers: dict[str, str] | None = None) -> Client:
        """A real a2a-sdk client for this server (closed with the server)."""
        http = httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, headers=headers or {})
        self._clients.append(http)
        return await create_client(self.url, client_config=ClientConfig(streaming=streaming, httpx_client=http))

    def http(self, **kwargs: Any) -> httpx.AsyncClient:
        """A raw HTTP client for hand-written JSON-RPC (v0.3 calls, bad input)."""
        client = httpx.AsyncClient(base_url=self.url, timeout=CLIENT_TIMEOUT_S, **kwargs)
        self._clients.append(client)
        return client


def user_message(text: str, *, context_id: str | None = None, task_id: str | None = None,
                 parts: list[Part] | None = None) -> Message:
    """A user message with a fresh id."""
    message = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=parts or [Part(text=text)])
    if context_id:
        message.context_id = context_id
    if task_id:
        message.task_id = task_id
    return message


async def send(client: Client, message: Message, *, timeout: float = CLIENT_TIMEOUT_S) -> list[StreamResponse]:
    """Send and collect every response item (one for non-streaming clients)."""
    items = []
    async for item in client.send_message(SendMessageRequest(message=message),
                                          context=ClientCallContext(timeout=timeout)):
        items.append(item)
    return items


def streamed_text(items: list[StreamResponse]) -> str:
    """The answer as a streaming client reassembles it from artifact chunks (before the final replace)."""
    text = ""
    for item in items:
        if item.WhichOneof("payload") == "artifact_update":
            update = item.artifact_update
            if update.last_chunk:
                continue  # the final replace: checked separately with final_answer()
            chunk = "".join(part.text for part in update.artifact.parts)
            text = text + chunk if update.append else chunk
    return text


def final_answer(items: list[StreamResponse]) -> str | None:
    """The answer artifact's text at the end: the Task's first artifact, or the last replace event."""
    for item in reversed(items):
        kind = item.WhichOneof("payload")
        if kind == "task" and item.task.artifacts:
            return "".join(part.text for part in item.task.artifacts[0].parts)
        if kind == "artifact_update" and item.artifact_update.last_chunk:
            return "".join(part.text for part in item.artifact_update.artifact.parts)
    return None


def status_texts(items: list[StreamResponse]) -> list[str]:
    """Text of every status message seen, in order (progress lines and the terminal message)."""
    texts = []
    for item in items:
        kind = item.WhichOneof("payload")
        status = item.status_update.status if kind == "status_update" else item.task.status if kind == "task" else None
        if status is not None and status.message.parts:
            texts.append("".join(part.text for part in status.message.parts))
    return texts


def final_message(items: list[StreamResponse]) -> str:
    """Text of the last status message (the terminal one once the task ended)."""
    texts = status_texts(items)
    return texts[-1] if texts else ""


def final_task(items: list[StreamResponse]):
    """The last Task snapshot or the terminal status among the items."""
    for item in reversed(items):
        if item.WhichOneof("payload") == "task":
            return item.task
    return None


def terminal_state(items: list[StreamResponse]) -> int | None:
    """The state of the last status we saw (task snapshot or status update)."""
    for item in reversed(items):
        kind = item.WhichOneof("payload")
        if kind == "status_update":
            return item.status_update.status.state
        if kind == "task":
            return item.task.status.state
    return None


class Call:
    """A streaming send running in the background: ``items`` fill in as they arrive."""

    def __init__(self, client: Client, message: Message, *, timeout: float = CLIENT_TIMEOUT_S) -> None:
        self.message = message
        self.items: list[StreamResponse] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._consume(client, timeout))

    async def _consume(self, client: Client, timeout: float) -> None:
        try:
            async for item in client.send_message(
                SendMessageRequest(message=self.message), context=ClientCallContext(timeout=timeout)
            ):
                async with self._changed:
                    self.items.append(item)
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._changed.notify_all()

    @property
    def task_id(self) -> str:
        return self.items[0].task.id

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> StreamResponse:
        """The first item matching ``predicate``; fails if the call ends or times out without one."""

        def found() -> StreamResponse | None:
            return next((item for item in self.items if predicate(item)), None)

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: found() is not None or self._task.done())
        match = found()
        if match is None:
            await self._task  # surfaces the client's error, if any
            raise AssertionError(f"the call ended without a matching item: {self.items}")
        return match

    async def wait_status(self, fragment: str, timeout: float = 20.0) -> StreamResponse:
        """The first status message containing ``fragment``."""
        return await self.wait_for(lambda item: any(fragment in text for text in status_texts([item])), timeout)

    async def result(self, timeout: float = 30.0) -> list[StreamResponse]:
        """Every item, once the call has ended."""
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.items


@contextlib.asynccontextmanager
async def serve_codex(
    tmp_path: Path,
    model: ScriptedModel,
    *,
    state_dir: Path | None = None,
    codex_home: Path | None = None,
    tokens: tuple[str, ...] = (),
    max_body_bytes: int | None = None,
    stream_idle_timeout_ms: int = 3000,
    hooks: TurnHooks | None = None,
    backoff: RestartBackoff | None = None,
    extra_toml: str = "",
    **option_overrides: Any,
) -> AsyncIterator[Served]:
    """Run the whole stack; keyword overrides go to ExecutorOptions (``hooks``/``backoff``: executor, app-server;
    ``extra_toml``: appended to codex's config.toml)."""
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    state_dir = state_dir or tmp_path / "state"
    codex_home = codex_home or state_dir / "codex-home"
    write_codex_config(codex_home, model.base_url, stream_idle_timeout_ms=stream_idle_timeout_ms, extra_toml=extra_toml)
    options = replace(ExecutorOptions(workspace=workspace, model="scripted-model"), **option_overrides)
    person = PersonPolicy(options.approval_policy)
    app = AppServer(codex_home=codex_home, cwd=workspace, env={**os.environ, SCRIPTED_API_KEY_ENV: "scripted-key"},
                    backoff=backoff, policy=person,
                    server_request_deadline=server_request_deadline(options.approval_timeout, options.turn_timeout))
    executor = CodexExecutor(app, ConversationStore(state_dir), options, hooks=hooks, person=person)
    store = create_task_store(task_store_url(state_dir, None))
    await store.fail_unfinished()
    card = build_agent_card("http://127.0.0.1:0/", name="codex-test", description="test", version="0")
    kwargs = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
    starlette_app, handler = build_app(executor, card=card, task_store=store, tokens=tokens, **kwargs)
    config = uvicorn.Config(starlette_app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(SERVER_START_TIMEOUT_S):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/"
        card.supported_interfaces[0].url = url
        card.supported_interfaces[1].url = url
        await app.start()
        served = Served(url, executor, app, model, workspace, state_dir, codex_home)
        try:
            yield served
        finally:
            for client in served._clients:
                await client.aclose()
    finally:
        await executor.shutdown()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
        await handler.aclose()
        await store.close()
