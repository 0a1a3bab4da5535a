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
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext, SimpleRequestContextBuilder
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import DefaultServerCallContextBuilder, create_agent_card_routes, create_jsonrpc_routes
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Task,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from molecule_codex.commands import command_skills
from molecule_codex.identity import CLIENT_CONTEXT_ID_STATE
from molecule_codex.reply_usage import CALL_CONTEXT_ATTR, counted
from molecule_codex.task_store import TaskStore

logger = logging.getLogger(__name__)

#: uvicorn binds in milliseconds; this bound only catches a port that never opens.
SERVER_START_TIMEOUT_S = 30.0
#: How long a stopping uvicorn may take once it was told to exit.
SERVER_STOP_TIMEOUT_S = 10.0
#: Request bodies above this get HTTP 413: big enough for images, small enough to protect memory.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
HEALTH_PATH = "/health"
UNAUTHENTICATED_PATHS = frozenset({AGENT_CARD_WELL_KNOWN_PATH, "/.well-known/agent.json", HEALTH_PATH})


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
            ),
            *command_skills(),
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
    the message; :func:`identity.identify` reads it to tell "no contextId" from a chosen one. A task
    id the SDK invents is announced to the task store, which then skips looking it up."""

    def __init__(self, task_store: TaskStore | None = None) -> None:
        super().__init__()
        self._task_store = task_store

    async def build(
        self,
        context: ServerCallContext,
        params: Any = None,
        task_id: str | None = None,
        context_id: str | None = None,
        task: Task | None = None,
    ) -> RequestContext:
        context.state[CLIENT_CONTEXT_ID_STATE] = context_id or ""
        built = await super().build(context, params, task_id, context_id, task)
        if not task_id and built.task_id and self._task_store is not None:
            self._task_store.note_new_task(built.task_id, context)
        return built


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
        request_context_builder=ClientContextRecorder(task_store),
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
