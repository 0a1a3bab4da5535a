"""Shared helpers for tests that drive the real codex binary through :class:`app_server.AppServer`.

* :func:`started_app_server` - a CODEX_HOME pointed at a :class:`scripted_model.ScriptedModel`, the
  provider key in the child env, a workspace dir, and a started :class:`AppServer`.
* :func:`start_thread` / :func:`resume_thread` - ``thread/start`` / ``thread/resume`` with the
  recommended sandbox, approval policy and cwd (repeated on resume: codex does not restore them).
* :func:`start_turn` / :func:`collect_turn` / :func:`run_text_turn` - send a turn and gather its
  notifications up to ``turn/completed``.
* :func:`codex_pids`, :func:`process_tree`, :func:`alive` - live processes (from /proc), for orphan checks.

Import it as ``import codex_rig as rig`` (pytest puts tests/ on sys.path). Every wait is bounded
(``TURN_TIMEOUT_S``), so a broken build fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molecule_codex.app_server import AppServer, Notification, ThreadSubscription
from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, ScriptedModel, write_codex_config

#: Bound on one turn from turn/start to turn/completed against the instant scripted model.
TURN_TIMEOUT_S = 15.0
#: Bound on one JSON-RPC request in tests.
REQUEST_TIMEOUT_S = 15.0


async def started_app_server(
    tmp_path: Path,
    model: ScriptedModel,
    *,
    name: str = "codex",
    extra_toml: str = "",
    stream_idle_timeout_ms: int = 3000,
    **kwargs: Any,
) -> AppServer:
    """Start an AppServer on ``tmp_path/<name>-home`` talking to ``model``; workspace is ``tmp_path/workspace``.

    A second call with the same ``name`` reuses the CODEX_HOME (thread resume in a new process).
    ``kwargs`` go to :class:`AppServer` (``policy``, ``server_request_deadline``, ...). The caller
    closes the server.
    """
    home = tmp_path / f"{name}-home"
    write_codex_config(home, model.base_url, extra_toml=extra_toml, stream_idle_timeout_ms=stream_idle_timeout_ms)
    workspace(tmp_path)
    env = {**os.environ, SCRIPTED_API_KEY_ENV: "scripted-test-key"}
    app = AppServer(codex_home=home, env=env, **kwargs)
    await app.start()
    return app


def workspace(tmp_path: Path) -> Path:
    """The cwd threads run in (created if missing)."""
    path = tmp_path / "workspace"
    path.mkdir(exist_ok=True)
    return path


def thread_params(cwd: Path, *, sandbox: str = "workspace-write", approval: str = "never") -> dict[str, Any]:
    """Params for thread/start and thread/resume."""
    return {"cwd": str(cwd), "sandbox": sandbox, "approvalPolicy": approval}


async def start_thread(app: AppServer, cwd: Path, **kwargs: str) -> tuple[str, Mapping[str, Any]]:
    """``thread/start``; returns the thread id and the full result."""
    result = await app.request("thread/start", thread_params(cwd, **kwargs), timeout=REQUEST_TIMEOUT_S)
    return result["thread"]["id"], result


async def resume_thread(app: AppServer, thread_id: str, cwd: Path, **kwargs: str) -> Mapping[str, Any]:
    """``thread/resume`` with ``excludeTurns`` and the thread settings repeated."""
    params = {"threadId": thread_id, "excludeTurns": True, **thread_params(cwd, **kwargs)}
    return await app.request("thread/resume", params, timeout=REQUEST_TIMEOUT_S)


async def start_turn(app: AppServer, thread_id: str, text: str) -> str:
    """``turn/start`` with one text input; returns the turn id."""
    params = {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
    result = await app.request("turn/start", params, timeout=REQUEST_TIMEOUT_S)
    return result["turn"]["id"]


@dataclass
class TurnRecord:
    """What one turn produced, as seen on its thread's subscription."""

    events: list[Notification] = field(default_factory=list)
    deltas: dict[str, str] = field(default_factory=dict)  # agentMessage item id -> concatenated deltas
    completed: Mapping[str, Any] = field(default_factory=dict)  # turn/completed params["turn"]

    @property
    def status(self) -> str | None:
        return self.completed.get("status")

    @property
    def delta_text(self) -> str:
        """Every agentMessage delta of the turn, in arrival order."""
        return "".join(self.deltas.values())

    @property
    def final_text(self) -> str:
        """Text of the last completed agentMessage item (authoritative over the deltas)."""
        texts = [item["text"] for item in self.items("agentMessage")]
        return texts[-1] if texts else ""

    def items(self, item_type: str) -> list[Mapping[str, Any]]:
        """Completed items of ``item_type`` (``agentMessage``, ``commandExecution``, ...)."""
        return [
            event.params["item"]
            for event in self.events
            if event.method == "item/completed" and event.params["item"].get("type") == item_type
        ]

    def methods(self) -> list[str]:
        return [event.method for event in self.events]


async def collect_turn(
    sub: ThreadSubscription, turn_id: str | None = None, timeout: float = TURN_TIMEOUT_S
) -> TurnRecord:
    """Read ``sub`` until ``turn/completed`` (of ``turn_id`` when given), within ``timeout`` s overall."""
    record = TurnRecord()
    deadline = time.monotonic() + timeout
    while True:
        event = await sub.get(timeout=max(0.01, deadline - time.monotonic()))
        record.events.append(event)
        if event.method == "item/agentMessage/delta":
            item_id = event.params["itemId"]
            record.deltas[item_id] = record.deltas.get(item_id, "") + event.params["delta"]
        elif event.method == "turn/completed" and (turn_id is None or event.turn_id == turn_id):
            record.completed = event.params["turn"]
            return record


async def run_text_turn(
    app: AppServer, thread_id: str, text: str, timeout: float = TURN_TIMEOUT_S
) -> tuple[str, TurnRecord]:
    """Subscribe, start a turn with ``text``, wait for it to complete; returns (final text, record)."""
    sub = app.subscribe(thread_id)
    try:
        turn_id = await start_turn(app, thread_id, text)
        record = await collect_turn(sub, turn_id, timeout)
    finally:
        sub.close()
    return record.final_text, record


def _processes() -> dict[int, tuple[bytes, int]]:
    """Live (non-zombie) processes from /proc: pid -> (command name, parent pid)."""
    found: dict[int, tuple[bytes, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        # The name is parenthesised and may contain spaces; state and ppid follow it.
        name = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
        state, ppid = stat[stat.rfind(b")") + 2 :].split()[:2]
        if state not in (b"Z", b"X"):
            found[int(entry)] = (name, int(ppid))
    return found


def codex_pids() -> set[int]:
    """Pids of live processes whose executable is named ``codex`` (any owner: compare before/after)."""
    return {pid for pid, (name, _) in _processes().items() if name == b"codex"}


def process_tree(root: int) -> set[int]:
    """``root`` and all its live descendants (empty if ``root`` is gone)."""
    processes = _processes()
    if root not in processes:
        return set()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (_, ppid) in processes.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    return tree


def alive(pids: set[int]) -> set[int]:
    """The subset of ``pids`` still running (zombies count as gone)."""
    return pids & set(_processes())
