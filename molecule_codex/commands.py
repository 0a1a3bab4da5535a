"""Chat commands (/new /compact /review /model /effort /status /help) and per-message model overrides.

Job: recognise a command message, run codex's side of it over an :class:`AppServer`, and return the
answer text. The conversation's own state (which thread it is bound to, sticky model and effort,
queue depth) stays in the executor and reaches this module through the small :class:`CommandHost`
protocol, so every command can be tested against the real binary without the A2A stack.

Facts checked on the pinned 0.163 binary (tests/test_commands.py):

* compaction is ``thread/compact/start {"threadId"}`` → ``{}``; it then runs a turn (its id comes
  with ``turn/started``) holding one ``contextCompaction`` item and ends with ``turn/completed``.
* review is ``review/start {"threadId", "target"}`` with target ``{"type": "uncommittedChanges"}``,
  ``{"type": "baseBranch", "branch"}`` or ``{"type": "commit", "sha", "title"}``; inline delivery
  (the default) runs on the same thread. The result's ``turn.id`` is the id every item and
  ``turn/completed`` carry; the ``turn/started`` of the review sub-turn has another id and names the
  first as ``rootTurnId``. The findings are the ``exitedReviewMode`` item's ``review`` text (codex
  also repeats them as an agentMessage). Codex does not check that a commit exists, so
  :func:`resolve_review_target` asks git first.
* ``model/list`` pages the bundled catalog: ``id``, ``supportedReasoningEfforts[].reasoningEffort``,
  ``defaultReasoningEffort``, ``hidden``, ``isDefault``. ``turn/start`` ``model``/``effort`` are
  not validated by codex and are **sticky** on the thread, which is why :func:`turn_overrides`
  sends the intended model and effort on every turn: a one-message override must not leak into
  the next message.

Contract for the executor:

1. Before treating a message as a prompt, call :func:`parse_command` on its text. ``None`` → a
   normal turn. Otherwise run ``await run_command(command, host)`` **inside the conversation's
   worker** (commands are ordered with the conversation's other messages; /compact and /review
   run codex turns) and complete the A2A task with the returned text. :class:`CommandError` is
   a refusal: complete the task with its text too (it is an answer, not a failure). Bound the
   call with the turn timeout; :func:`run_command` interrupts codex itself when its own bound
   passes.
2. ``/new``: :meth:`CommandHost.reset_thread` (async: it writes the map) must forget the
   conversation's contextId → threadId binding (persisted map included) and return the old
   thread id; the next message starts a
   fresh thread. The old rollout stays in CODEX_HOME (nothing is deleted, nothing is sent to codex).
3. ``/model`` and ``/effort`` store their choice in the conversation's :class:`ModelChoice`; every
   later ``turn/start`` takes ``turn_overrides(...)`` merged into its params. Message metadata
   ``model`` / ``reasoning_effort`` go through :func:`turn_overrides` too (one message only); its
   :class:`CommandError` refuses that message.
4. The executor's event router must ignore turns it did not start (the compaction and review turns
   arrive on the thread's subscription too), or route them to :func:`run_command` via its own
   subscription (AppServer fans every notification out to each subscriber of the thread).
5. The agent card lists :func:`command_skills` next to the main skill (host.build_agent_card).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from a2a.types import AgentSkill

from molecule_codex.app_server import AppServer, AppServerError, Notification
from molecule_codex.settings import REASONING_EFFORTS
from molecule_codex.turn import Usage

logger = logging.getLogger(__name__)

#: What each command does, in the order /help lists them.
COMMANDS: dict[str, str] = {
    "new": "start a fresh codex thread for this conversation (the old one stays on disk)",
    "compact": "summarize this conversation's history to free context",
    "review": "code review of uncommitted changes, or against a base branch, or of one commit: /review [branch|commit]",
    "model": "show or set this conversation's model: /model <id>",
    "effort": "show or set this conversation's reasoning effort: /effort <level>",
    "status": "thread, model, effort, sandbox, token totals, queue",
    "help": "this list",
}
#: A command is one word after the slash; "/usr/bin/env is broken" is a normal message.
_COMMAND_RE = re.compile(r"^/([A-Za-z][\w-]*)(?:\s+(.*))?$", re.DOTALL)
#: Effort words that mean "the model's default".
DEFAULT_EFFORT_WORDS = frozenset({"default", "none", "auto"})
#: Review argument meaning the working tree.
UNCOMMITTED_WORDS = frozenset({"", "uncommitted", "working-tree", "changes"})
#: Bound on each git call that resolves a review target.
GIT_TIMEOUT_S = 10.0
#: model/list pages we read at most (the bundled catalog is one page).
MAX_CATALOG_PAGES = 20
#: Bound on one catalog request.
CATALOG_TIMEOUT_S = 30.0
#: Bound on the request that starts a compaction or review (the turn itself has the caller's bound).
START_TIMEOUT_S = 30.0


class CommandError(Exception):
    """A command or override was refused; the message is the answer for the person."""


@dataclass(frozen=True, slots=True)
class Command:
    """One parsed command; ``name`` is empty for an unknown command."""

    name: str
    argument: str
    text: str


def parse_command(text: str) -> Command | None:
    """The command in ``text``, or None when the message is a normal prompt."""
    stripped = text.strip()
    found = _COMMAND_RE.match(stripped)
    if found is None:
        return None
    name = found.group(1).lower()
    argument = (found.group(2) or "").strip()
    return Command(name if name in COMMANDS else "", argument, stripped)


def help_text(unknown: str | None = None) -> str:
    """The command list; with ``unknown``, say first that it is not one of them."""
    lines = [f"/{name} - {what}" for name, what in COMMANDS.items()]
    head = f"Unknown command {unknown}. " if unknown else ""
    return f"{head}Commands:\n" + "\n".join(lines)


# --------------------------------------------------------------------------- the executor's side


@dataclass(slots=True)
class ModelChoice:
    """A conversation's sticky /model and /effort (None = the configured default)."""

    model: str | None = None
    effort: str | None = None


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """What /status reports; the executor fills it from its conversation state."""

    thread_id: str | None
    model: str
    effort: str | None
    sandbox: str
    approval_policy: str
    usage: Usage
    queue_depth: int
    waiting_approval: str | None = None


class CommandHost(Protocol):
    """The conversation state a command needs from the executor."""

    app: AppServer
    cwd: Path
    choice: ModelChoice
    configured_model: str
    configured_effort: str | None
    allow_any_model: bool  # a custom endpoint accepts any model id

    def thread_id(self) -> str | None:
        """The conversation's bound codex thread, or None before its first turn."""
        ...

    async def ensure_thread(self) -> str:
        """The bound thread, started (or resumed) if needed."""
        ...

    async def reset_thread(self) -> str | None:
        """Forget the binding, persisted too (the next message starts a fresh thread); returns the old id."""
        ...

    def status(self) -> StatusInfo:
        """Current numbers for /status."""
        ...


async def run_command(command: Command, host: CommandHost, *, timeout: float) -> str:
    """Run ``command`` for the conversation behind ``host``; returns the answer text.

    Raises :class:`CommandError` for a refusal (its text is the answer) and lets
    :class:`AppServerError` through for codex failures the executor reports as failed.
    """
    logger.info("chat command /%s thread=%s", command.name or "?", host.thread_id() or "-")
    if command.name == "":
        return help_text(command.text.split()[0])
    if command.name == "help":
        return help_text()
    if command.name == "new":
        return new_conversation_text(await host.reset_thread())
    if command.name == "status":
        return status_text(host.status())
    if command.name == "model":
        return await _set_model(command.argument, host)
    if command.name == "effort":
        return await _set_effort(command.argument, host)
    if command.name == "compact":
        if host.thread_id() is None:
            return "Nothing to compact yet: this conversation has no history."
        await run_compact(host.app, await host.ensure_thread(), timeout=timeout)
        return "Compacted this conversation: codex replaced its history with a summary."
    if command.name == "review":
        target = await resolve_review_target(command.argument, host.cwd)
        return await run_review(host.app, await host.ensure_thread(), target, timeout=timeout)
    raise AssertionError(f"unhandled command {command.name}")


def new_conversation_text(old_thread_id: str | None) -> str:
    """The answer to /new."""
    if old_thread_id is None:
        return "This conversation has no codex thread yet; your next message starts one."
    return (
        "Started over: your next message goes to a fresh codex thread. "
        f"The previous thread ({old_thread_id}) stays on disk."
    )


def status_text(info: StatusInfo) -> str:
    """The answer to /status, one fact per line."""
    usage = info.usage
    lines = [
        f"thread: {info.thread_id or 'none yet'}",
        f"model: {info.model}",
        f"reasoning effort: {info.effort or 'model default'}",
        f"sandbox: {info.sandbox}, approvals: {info.approval_policy}",
        f"tokens: {usage.input_tokens} in ({usage.cached_input_tokens} cached), {usage.output_tokens} out "
        f"({usage.reasoning_output_tokens} reasoning)",
        f"queued messages: {info.queue_depth}",
    ]
    if info.waiting_approval:
        lines.append(info.waiting_approval)
    return "\n".join(lines)


# --------------------------------------------------------------------------- model and effort


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of codex's model catalog."""

    id: str
    display_name: str
    efforts: tuple[str, ...]
    default_effort: str | None
    is_default: bool


async def model_catalog(app: AppServer) -> tuple[ModelInfo, ...]:
    """The pinned binary's visible models (``model/list``, every page)."""
    models: list[ModelInfo] = []
    cursor: str | None = None
    for _ in range(MAX_CATALOG_PAGES):
        params: dict[str, Any] = {"cursor": cursor} if cursor else {}
        page = await app.request("model/list", params, timeout=CATALOG_TIMEOUT_S)
        for entry in page.get("data") or ():
            efforts = tuple(
                str(option["reasoningEffort"])
                for option in entry.get("supportedReasoningEfforts") or ()
                if option.get("reasoningEffort")
            )
            models.append(
                ModelInfo(
                    id=str(entry["id"]),
                    display_name=str(entry.get("displayName") or entry["id"]),
                    efforts=efforts,
                    default_effort=entry.get("defaultReasoningEffort"),
                    is_default=bool(entry.get("isDefault")),
                )
            )
        cursor = page.get("nextCursor")
        if not cursor:
            break
    return tuple(models)


def _find(catalog: Sequence[ModelInfo], model_id: str) -> ModelInfo | None:
    return next((model for model in catalog if model.id == model_id), None)


def check_model(model_id: str, catalog: Sequence[ModelInfo], *, allow_any: bool = False) -> str:
    """``model_id`` if the catalog has it (any id when ``allow_any``); else CommandError with the list."""
    model_id = model_id.strip()
    if model_id and (allow_any or _find(catalog, model_id) is not None):
        return model_id
    shown = f'"{model_id}" is not' if model_id else "No model given; it must be"
    raise CommandError(f"{shown} one of the models codex knows: {', '.join(model.id for model in catalog)}.")


def check_effort(effort: str, model_id: str, catalog: Sequence[ModelInfo]) -> str | None:
    """A supported effort for ``model_id`` (None = the model's default); else CommandError with the list."""
    effort = effort.strip().lower()
    if effort in DEFAULT_EFFORT_WORDS:
        return None
    model = _find(catalog, model_id)
    allowed = model.efforts if model is not None else REASONING_EFFORTS
    if effort in allowed:
        return effort
    raise CommandError(f'"{effort}" is not a reasoning effort {model_id} supports: {", ".join(allowed)} (or default).')


async def _set_model(argument: str, host: CommandHost) -> str:
    catalog = await model_catalog(host.app)
    current = host.choice.model or host.configured_model
    if not argument:
        return f"Model: {current}. Choose with /model <id>: {', '.join(model.id for model in catalog)}."
    model_id = check_model(argument, catalog, allow_any=host.allow_any_model)
    effort = host.choice.effort
    note = ""
    if effort is not None and (model := _find(catalog, model_id)) is not None and effort not in model.efforts:
        note = f" Its efforts are {', '.join(model.efforts)}, so the effort is back to the model default."
        effort = None
    host.choice.model, host.choice.effort = model_id, effort
    return f"Model for this conversation: {model_id}.{note}"


async def _set_effort(argument: str, host: CommandHost) -> str:
    model_id = host.choice.model or host.configured_model
    catalog = await model_catalog(host.app)
    if not argument:
        model = _find(catalog, model_id)
        allowed = model.efforts if model is not None else REASONING_EFFORTS
        current = host.choice.effort or host.configured_effort or "model default"
        return f"Reasoning effort: {current}. Choose with /effort <level>: {', '.join(allowed)} (or default)."
    host.choice.effort = check_effort(argument, model_id, catalog)
    return f"Reasoning effort for this conversation: {host.choice.effort or 'model default'}."


def turn_overrides(
    host: CommandHost, catalog: Sequence[ModelInfo], metadata: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``turn/start`` params ``model`` and ``effort`` for the next turn of this conversation.

    Precedence: message metadata (``model``, ``reasoning_effort``; this turn only), then the
    conversation's /model and /effort, then the configured defaults. Both are sent on every turn
    because codex keeps per-turn overrides for later turns. When no effort is chosen anywhere, the
    catalog default of the model is sent (omitted for a model the catalog does not know); so is a
    sticky or configured effort the model does not support (a metadata effort is refused instead).
    """
    metadata = metadata or {}
    model_id = host.choice.model or host.configured_model
    requested_model = metadata.get("model")
    if isinstance(requested_model, str) and requested_model.strip():
        model_id = check_model(requested_model, catalog, allow_any=host.allow_any_model)
    requested_effort = metadata.get("reasoning_effort")
    if isinstance(requested_effort, str) and requested_effort.strip():
        effort = check_effort(requested_effort, model_id, catalog)
    else:
        effort = host.choice.effort or host.configured_effort
        model = _find(catalog, model_id)
        if effort is not None and model is not None and effort not in model.efforts:
            logger.info("effort %s not supported by %s; using its default %s", effort, model_id, model.default_effort)
            effort = None
    if effort is None and (model := _find(catalog, model_id)) is not None:
        effort = model.default_effort
    overrides = {"model": model_id}
    if effort:
        overrides["effort"] = effort
    return overrides


# --------------------------------------------------------------------------- compact and review


async def _run_codex_turn(
    app: AppServer, thread_id: str, method: str, params: Mapping[str, Any], *, timeout: float
) -> tuple[Mapping[str, Any], list[Notification]]:
    """Start a codex-driven turn with ``method`` and wait for its ``turn/completed``.

    Returns the completed turn and every event of it. The turn id is the result's ``turn.id`` when
    there is one (review), else the first ``turn/started`` (compaction). Past ``timeout`` the turn
    is interrupted and a CommandError says so.
    """
    sub = app.subscribe(thread_id)
    events: list[Notification] = []
    turn_id: str | None = None
    try:
        result = await app.request(method, params, timeout=START_TIMEOUT_S)
        turn = result.get("turn") if isinstance(result, Mapping) else None
        if isinstance(turn, Mapping):
            turn_id = turn.get("id")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            event = await sub.get(timeout=remaining)
            if turn_id is None and event.method == "turn/started":
                turn_id = event.turn_id
            if event.turn_id is not None and event.turn_id != turn_id:
                continue  # a sub-turn's own turn/started, or a late event of an earlier turn
            events.append(event)
            if event.method == "turn/completed":
                return event.params.get("turn") or {}, events
    except TimeoutError:
        if turn_id is not None:
            with contextlib.suppress(AppServerError):
                await app.request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id}, timeout=START_TIMEOUT_S)
        raise CommandError(f"codex did not finish {method} within {timeout:g} seconds; it was stopped.") from None
    finally:
        sub.close()


def _failure(turn: Mapping[str, Any], what: str) -> CommandError | None:
    if turn.get("status") == "completed":
        return None
    error = turn.get("error") if isinstance(turn.get("error"), Mapping) else {}
    detail = error.get("message") or turn.get("status") or "unknown reason"
    return CommandError(f"The {what} did not finish: {detail}")


async def run_compact(app: AppServer, thread_id: str, *, timeout: float) -> None:
    """Compact the thread's history (``thread/compact/start``) and wait until codex is done."""
    turn, events = await _run_codex_turn(
        app, thread_id, "thread/compact/start", {"threadId": thread_id}, timeout=timeout
    )
    if (failure := _failure(turn, "compaction")) is not None:
        raise failure
    if not _items(events, "contextCompaction"):
        raise CommandError("codex ended the compaction turn without compacting.")


async def resolve_review_target(argument: str, cwd: Path) -> dict[str, str]:
    """A ``review/start`` target: the working tree, a branch of ``cwd``'s repo, or a commit there."""
    word = argument.strip()
    if word.lower() in UNCOMMITTED_WORDS:
        return {"type": "uncommittedChanges"}
    if word.startswith("-"):
        raise CommandError(f'"{word}" is not a branch or commit.')
    ref = await _git(cwd, "rev-parse", "--verify", "--quiet", "--symbolic-full-name", word)
    if ref.startswith(("refs/heads/", "refs/remotes/")):
        return {"type": "baseBranch", "branch": word}
    sha = await _git(cwd, "rev-parse", "--verify", "--quiet", f"{word}^{{commit}}")
    if not sha:
        raise CommandError(
            f'"{word}" is neither a branch nor a commit in {cwd}. Use /review, /review <branch> or /review <commit>.'
        )
    title = await _git(cwd, "log", "-1", "--format=%s", sha)
    return {"type": "commit", "sha": sha, "title": title}


async def _git(cwd: Path, *args: str) -> str:
    """stdout of one bounded git call ('' when git fails, is missing, or times out)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", "-C", str(cwd), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as exc:
        logger.warning("git is not usable for /review: %s", exc)
        return ""
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        logger.warning("git %s timed out after %gs", args[0], GIT_TIMEOUT_S)
        return ""
    return stdout.decode(errors="replace").strip() if proc.returncode == 0 else ""


async def run_review(app: AppServer, thread_id: str, target: Mapping[str, str], *, timeout: float) -> str:
    """Run codex's review mode on the thread (inline) and return its findings as text."""
    params = {"threadId": thread_id, "target": dict(target)}
    turn, events = await _run_codex_turn(app, thread_id, "review/start", params, timeout=timeout)
    if (failure := _failure(turn, "review")) is not None:
        raise failure
    reviews = [str(item.get("review") or "") for item in _items(events, "exitedReviewMode")]
    messages = [str(item.get("text") or "") for item in _items(events, "agentMessage")]
    findings = next((text for text in reversed(reviews + messages) if text.strip()), "")
    return findings or "The review found nothing to report."


def _items(events: Sequence[Notification], item_type: str) -> list[Mapping[str, Any]]:
    items = []
    for event in events:
        item = event.params.get("item")
        if event.method == "item/completed" and isinstance(item, Mapping) and item.get("type") == item_type:
            items.append(item)
    return items


# --------------------------------------------------------------------------- agent card


def command_skills() -> list[AgentSkill]:
    """Agent-card skills for the chat commands and the approval round trip, with examples."""
    return [
        AgentSkill(
            id="chat-commands",
            name="Conversation commands",
            description="Control this conversation's codex thread with a message that is only a command. "
            + " ".join(f"/{name}: {what}." for name, what in COMMANDS.items()),
            tags=["commands", "codex"],
            examples=["/new", "/compact", "/model gpt-5.5", "/effort high", "/status", "/help"],
        ),
        AgentSkill(
            id="code-review",
            name="Code review",
            description="Codex's review mode: findings on the working tree, against a base branch, or for one commit.",
            tags=["review", "git", "codex"],
            examples=["/review", "/review main", "/review 1a2b3c4"],
        ),
        AgentSkill(
            id="approvals",
            name="Approvals",
            description="With approval_policy on-request or untrusted, codex asks before risky commands, file "
            "changes and MCP tool calls: the task turns input-required; answer on the same task with "
            'approve, approve for session or deny (or a data part {"decision": ...}).',
            tags=["approvals", "input-required"],
            examples=["approve", "approve for session", "deny", '{"decision": "approve"}'],
        ),
    ]
