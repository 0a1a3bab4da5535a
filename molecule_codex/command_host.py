"""The executor's side of the chat commands: what :mod:`commands` needs to know about a conversation.

:mod:`commands` runs codex's side of /new /compact /review /model /effort /status /help against
a :class:`commands.CommandHost`. This module supplies one, built by the executor's worker for the
conversation it serves, plus the two pieces of state that outlive a loaded conversation:

* :class:`StickyState`: per conversation key, the /model and /effort choice and the token totals
  /status reports. A conversation's in-memory state goes away when its thread is unloaded idle;
  these must not, so they live here (bounded, least recently used dropped). They are not persisted:
  a restarted agent is back to the configured model and effort (the README says so).
* :class:`CatalogCache`: the pinned binary's model catalog, read once per app-server child, for
  validating /model, /effort and per-message ``model`` / ``reasoning_effort`` metadata.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from molecule_codex.app_server import AppServer
from molecule_codex.commands import ModelChoice, ModelInfo, StatusInfo, model_catalog
from molecule_codex.turn import Usage

#: Conversations whose sticky choice and totals are remembered (least recently used dropped).
STICKY_CONVERSATIONS = 4096


@dataclass(slots=True)
class Sticky:
    """What a conversation keeps between its turns, even while its thread is unloaded."""

    choice: ModelChoice = field(default_factory=ModelChoice)
    usage: Usage = field(default_factory=Usage)
    started_over: bool = False  # /new was used: history a sender brings no longer seeds a new thread

    def count(self, usage: Usage) -> None:
        """Add one turn's tokens to the conversation's totals."""
        self.usage.input_tokens += usage.input_tokens
        self.usage.output_tokens += usage.output_tokens
        self.usage.cached_input_tokens += usage.cached_input_tokens
        self.usage.reasoning_output_tokens += usage.reasoning_output_tokens


class StickyState:
    """Sticky state per conversation key, bounded."""

    def __init__(self, limit: int = STICKY_CONVERSATIONS) -> None:
        self._limit = limit
        self._items: collections.OrderedDict[str, Sticky] = collections.OrderedDict()

    def get(self, key: str) -> Sticky:
        sticky = self._items.get(key)
        if sticky is None:
            sticky = self._items[key] = Sticky()
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return sticky


class CatalogCache:
    """``model/list`` of the running app-server child, asked once per child."""

    def __init__(self, app: AppServer) -> None:
        self._app = app
        self._generation: int | None = None
        self._models: tuple[ModelInfo, ...] = ()

    async def get(self) -> tuple[ModelInfo, ...]:
        generation = self._app.generation
        if self._generation != generation:
            self._models = await model_catalog(self._app)
            self._generation = generation
        return self._models


@dataclass(slots=True)
class ConversationHost:
    """A :class:`commands.CommandHost` for one conversation, wired to its executor's callbacks."""

    app: AppServer
    cwd: Path
    choice: ModelChoice
    configured_model: str
    configured_effort: str | None
    allow_any_model: bool
    bound: Callable[[], str | None]
    load: Callable[[], Awaitable[str]]
    unbind: Callable[[], Awaitable[str | None]]
    facts: Callable[[], StatusInfo]

    def thread_id(self) -> str | None:
        return self.bound()

    async def ensure_thread(self) -> str:
        return await self.load()

    async def reset_thread(self) -> str | None:
        return await self.unbind()

    def status(self) -> StatusInfo:
        return self.facts()
