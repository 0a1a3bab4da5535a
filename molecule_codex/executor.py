"""The A2A ``AgentExecutor`` that turns A2A messages into codex turns.

Message path: A2A request → :class:`CodexExecutor` → the :class:`Conversation` of its key → a
:class:`Request` in that conversation's queue → the conversation's one worker → ``turn/start``
on the shared app-server → codex notifications → :class:`turn.TurnState` → A2A events.

| codex                                   | A2A                                                        |
|-----------------------------------------|------------------------------------------------------------|
| turn started                            | Task (submitted), then status ``working``                  |
| ``item/agentMessage/delta``             | chunk of the ``answer`` artifact (``append``)              |
| command / file change / MCP tool / plan | status ``working`` with one readable line                  |
| ``error`` willRetry                     | status ``working`` "retrying: …"                           |
| ``turn/completed`` completed            | ``answer`` replaced by the full text; ``completed`` + meta |
| ``turn/completed`` failed               | ``answer`` replaced by the reason; ``failed``              |
| interrupted by our cancel / watchdog    | ``canceled`` (published by cancel()) / ``failed``          |
| approval request (``approval_policy``   | ``input-required``: readable question + data part; the     |
| on-request/untrusted, see person.py)    | answer is a message on the same taskId                     |

A message whose whole text is a chat command (/new /compact /review /model /effort /status
/help, :mod:`commands`) is a :class:`Request` too: the worker runs it in order with the
conversation's turns and its answer (or refusal) completes the task.

The shape: ``execute()`` only validates, enqueues a :class:`Request` (its publisher plus a future)
on its conversation and waits for that future. Each conversation has at most one worker task;
the worker alone loads and unloads the thread and starts, steers and interrupts turns, taking
requests from the queue in order. ``cancel()`` and ``shutdown()`` only mark and wake: the worker
acts at its next step. There is no other state machine.

Invariants:

* every task reaches a terminal state, and its ``answer`` artifact holds the text of that state
  (the full answer, or the failed/canceled sentence): readers that take the first artifact's text
  never see a fragment; ``execute()`` never raises except ``CancelledError``;
* turns of one conversation never overlap: only its worker sends ``turn/start``; ``on_busy =
  queue`` runs the next request as its own turn, ``steer`` joins it to the running turn and that
  turn's reply answers every request riding it (its token usage is counted on one task only);
* a task id runs at most one turn: a message naming a task that is running or answered is
  refused without touching that task;
* codex events reach a turn only when they carry its (threadId, turnId); everything else is
  dropped, so late events of an older turn never leak into a newer one;
* a turn we abandon (cancel, watchdog, shutdown) is interrupted, its background commands are
  cleaned up, and it is drained before the next turn starts (a ``turn/start`` on a busy thread
  silently merges into the stale turn); a turn is interrupted on cancel only when every request
  riding it was canceled;
* after ``shutdown()`` began no turn starts and no request is steered: queued requests fail in
  order with a shutdown sentence;
* an idle thread is unloaded only by its own worker, so unloading never races a message;
  unloading archives the thread (codex then stops its MCP server processes), and resuming
  unarchives it;
* history is never silently lost: a thread is replaced only when codex says it no longer has it
  (and the caller is told); any other resume failure fails the request and keeps the binding;
  the history a sender brings (``identity.Identity.history``) seeds only a brand-new thread, in
  its first turn, once;
* ``input-required`` is a pause, never an end: the asking ``execute()`` returns (a2a-sdk runs
  the answer as the task's next ``execute()``), the turn keeps running in the worker, and the
  task still ends terminal like every other; while a question is open no progress line flips
  the task back to ``working``; the wait is bounded by ``approval_timeout`` (and the turn
  limit): then codex is told no and the final text says so; a reply that is no answer is asked
  again, never taken as a decision; cancel while waiting answers codex ``cancel`` and ends the
  task CANCELED with the thread's history kept; a question never outlives its turn (a stopped
  turn answers it ``cancel``); waiting for a person does not count as no progress;
* the router drops turns it did not start (compaction and review turns of chat commands);
  every turn sends the conversation's model and effort (/model, /effort, message metadata),
  because codex keeps a turn's overrides for later turns;
* nothing blocking runs on the event loop (the conversation map and attachment decoding run in
  a worker thread), and callers never see store errors, paths or other internals.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Message, Part, Task, TaskState, TaskStatus
from google.protobuf import json_format

from molecule_codex.app_server import (
    AppServer,
    AppServerError,
    AppServerExited,
    AppServerTimeout,
    ThreadSubscription,
)
from molecule_codex.approvals import FileChangeTracker, PendingApproval, effective_timeout
from molecule_codex.command_host import CatalogCache, ConversationHost, StickyState
from molecule_codex.commands import Command, CommandError, StatusInfo, parse_command, run_command, turn_overrides
from molecule_codex.conversations import ConversationStore, ConversationStoreError
from molecule_codex.identity import identify
from molecule_codex.inputs import CodexInput, InputBuilder, InputError
from molecule_codex.person import PersonPolicy, prompt_parts, reply_of
from molecule_codex.server_requests import Answer, ServerRequest
from molecule_codex.turn import MessageStarted, Progress, TextDelta, TurnState, Usage

logger = logging.getLogger(__name__)

ANSWER_ARTIFACT_ID = "answer"
ANSWER_ARTIFACT_NAME = "answer"
#: Between two agent messages of one turn, in the streamed answer and in the final text alike.
MESSAGE_SEPARATOR = "\n\n"
#: Bounds on codex requests the executor makes (each answered in milliseconds normally).
THREAD_REQUEST_TIMEOUT_S = 60.0
TURN_START_TIMEOUT_S = 60.0
#: Interrupt is acknowledged in ~20 ms; if codex does not answer in this time it is hung.
INTERRUPT_TIMEOUT_S = 3.0
#: After an interrupt, how long we wait for ``turn/completed`` before replacing the child.
INTERRUPT_SETTLE_S = 5.0
#: How often idle conversations are looked at for unloading.
SWEEP_INTERVAL_S = 60.0
#: Task ids answered lately: a follow-up naming one is refused even before the SDK stored the answer.
RECENT_TASKS = 4096
WAITING_LINE = "Waiting for the previous message of this conversation to finish."
JOINED_LINE = "Added to the running turn of this conversation."
SHUTTING_DOWN = "The agent is shutting down; send the message again shortly."
HISTORY_HEADER = (
    "Earlier conversation history (context only, already answered; the new message follows it):"
)
HISTORY_FOOTER = "End of earlier conversation history."
_EXPECTED_TURN_RE = re.compile(r"expected active turn id (\S+) but found (\S+)")
#: codex's words for "this thread no longer exists here" (resume cannot bring it back).
#: Observed on 0.163: a deleted rollout gives "no rollout found", a damaged one "failed to read session metadata".
_THREAD_GONE = ("no rollout found", "thread not found", "failed to read session metadata", "failed to load rollout")
_ARCHIVED = "is archived"
_PATH_RE = re.compile(r"(?:~|\.{1,2})?(?:/[^\s/:'\"`]+){2,}/?")


class TurnHooks(Protocol):
    """Platform signals around turns (the adapter maps them to heartbeat and wedge calls)."""

    def turn_started(self, context_id: str, preview: str) -> None: ...

    def turn_finished(self, context_id: str, ok: bool) -> None: ...

    def app_server_unavailable(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ExecutorOptions:
    """What the executor needs to know; the adapter builds it from Settings."""

    workspace: Path
    model: str
    #: Resolved: read-only | workspace-write | danger-full-access, or None to run under the
    #: permission profile config.toml selects (codex ignores the profile when a sandbox is sent).
    sandbox: str | None = "workspace-write"
    approval_policy: str = "never"
    on_busy: str = "queue"
    turn_timeout: float = 1500.0
    inactivity_timeout: float = 300.0
    reasoning_effort: str | None = None
    developer_instructions: str | None = None
    max_input_chars: int = 1_000_000
    max_concurrent_turns: int = 32
    idle_unload_after: float = 1800.0
    thread_config: Mapping[str, Any] | None = None
    workspace_id: str | None = None  # the platform's WORKSPACE_ID: scopes conversations without contextId
    approval_timeout: float = 600.0  # how long a question waits for a person (0 = until the turn limit)
    allow_any_model: bool = False  # a custom endpoint: /model and metadata accept ids outside codex's catalog


@dataclass(slots=True)
class TurnResult:
    """How a turn ended, in the terms the A2A side publishes."""

    state: TaskState
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


class Publisher:
    """Publishes one task's events; stops quietly once terminal or detached.

    ``detach()`` is called when the request is canceled: ``cancel()`` publishes CANCELED through
    its own queue, so nothing more may follow from here.
    """

    def __init__(self, queue: EventQueue, task_id: str, context_id: str) -> None:
        self.task_id = task_id
        self.context_id = context_id
        self._queue = queue
        self._updater = TaskUpdater(queue, task_id, context_id)
        self._chunks = 0
        self.terminal = False
        self.detached = False
        self.asking = False  # input-required: progress lines wait, or they would flip the task back to working

    @property
    def active(self) -> bool:
        return not (self.terminal or self.detached)

    @property
    def has_chunks(self) -> bool:
        """Whether part of the answer was streamed already."""
        return self._chunks > 0

    def detach(self) -> None:
        self.detached = True

    def rebind(self, queue: EventQueue) -> None:
        """Publish through the queue of the latest ``execute()`` for this task (an answer's)."""
        self._queue = queue
        self._updater = TaskUpdater(queue, self.task_id, self.context_id)

    async def input_required(self, parts: list[Part]) -> None:
        """A question for the caller: a pause, not an end (the task goes on once it is answered)."""
        if not self.active:
            return
        self.asking = True
        message = self._updater.new_agent_message(parts)
        await self._updater.update_status(TaskState.TASK_STATE_INPUT_REQUIRED, message=message)

    async def task(self, message: Message) -> None:
        """The Task event that must precede every status update."""
        await self._queue.enqueue_event(
            Task(
                id=self.task_id,
                context_id=self.context_id,
                status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                history=[message],
            )
        )

    async def working(self, line: str | None = None, *, resume: bool = False) -> None:
        """Status ``working`` with an optional line; while a question is open only ``resume`` (its answer) publishes."""
        if not self.active or (self.asking and not resume):
            return
        self.asking = False
        message = self._updater.new_agent_message([Part(text=line)]) if line else None
        await self._updater.update_status(TaskState.TASK_STATE_WORKING, message=message)

    async def chunk(self, text: str) -> None:
        """One streamed piece of the answer artifact."""
        if not self.active or not text:
            return
        await self._updater.add_artifact(
            [Part(text=text)],
            artifact_id=ANSWER_ARTIFACT_ID,
            name=ANSWER_ARTIFACT_NAME,
            append=self._chunks > 0,
            last_chunk=False,
        )
        self._chunks += 1

    async def finish(self, result: TurnResult) -> None:
        """The answer artifact replaced by the final text, then the terminal status.

        Always both, whatever the state: readers that take the first artifact's text then see
        the answer, or the reason there is none, and never a streamed fragment.
        """
        if not self.active:
            return
        self.terminal = True
        await self._updater.add_artifact(
            [Part(text=result.text)],
            artifact_id=ANSWER_ARTIFACT_ID,
            name=ANSWER_ARTIFACT_NAME,
            append=False,
            last_chunk=True,
        )
        message = self._updater.new_agent_message([Part(text=result.text)], metadata=result.metadata or None)
        await self._updater.update_status(result.state, message=message, metadata=result.metadata or None)


@dataclass(eq=False, slots=True)
class Request:
    """One A2A message: waiting in its conversation's queue, or riding a turn."""

    task_id: str
    publisher: Publisher
    codex_input: CodexInput
    message_id: str
    history: str | None = None  # earlier turns, for a brand-new thread only
    command: Command | None = None  # a chat command instead of a prompt
    metadata: Mapping[str, Any] = field(default_factory=dict)  # per-message model / reasoning_effort
    wakeup: asyncio.Event | None = None  # its conversation's worker, woken on cancel
    canceled: bool = False
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    pending: PendingApproval | None = None  # the question this task's caller is asked now
    asked: asyncio.Event = field(default_factory=asyncio.Event)  # set when the task went input-required

    @property
    def waiting_for_answer(self) -> bool:
        return self.publisher.active

    async def finish(self, result: TurnResult) -> None:
        try:
            await self.publisher.finish(result)
        finally:
            if not self.done.done():
                self.done.set_result(None)


@dataclass(eq=False, slots=True)
class Turn:
    """The codex turn a worker runs, and the requests riding it (the first started it)."""

    riders: list[Request]
    state: TurnState | None = None
    stop_reason: str | None = None  # why we interrupted it (cancel, watchdog, shutdown)
    watchdog: bool = False  # the stop was our time limit: the turn failed, whatever codex says
    interrupt_sent: bool = False
    deadline: float = float("inf")  # the turn limit (monotonic), set when the turn starts
    approval: PendingApproval | None = None  # a codex request waiting for a person
    asking: asyncio.Lock = field(default_factory=asyncio.Lock)  # one question at a time per turn
    notes: list[str] = field(default_factory=list)  # sentences for the final text (unanswered questions)

    @property
    def turn_id(self) -> str | None:
        return self.state.turn_id if self.state else None

    @property
    def wanted(self) -> bool:
        """Whether any request still waits for this turn's answer."""
        return any(not rider.canceled for rider in self.riders)


@dataclass(eq=False, slots=True)
class Conversation:
    """One conversation key, its codex thread, its queue and its worker."""

    key: str
    thread_id: str | None = None
    looked_up: bool = False  # thread_id was read from the store
    loaded_generation: int = 0
    subscription: ThreadSubscription | None = None
    fresh_thread: bool = False  # started (not resumed) and no turn sent yet: history may seed it
    queue: collections.deque[Request] = field(default_factory=collections.deque)
    turn: Turn | None = None
    worker: asyncio.Task[None] | None = None
    unload: bool = False
    last_used: float = field(default_factory=time.monotonic)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    tracker: FileChangeTracker = field(default_factory=FileChangeTracker)  # diffs for file-change questions
    #: model/effort last sent on this loaded thread (codex keeps them for later turns); None after a load
    overrides_sent: dict[str, str] | None = None


class CodexExecutor(AgentExecutor):
    """A2A executor backed by one codex app-server hosting one thread per conversation."""

    def __init__(
        self,
        app: AppServer,
        store: ConversationStore,
        options: ExecutorOptions,
        hooks: TurnHooks | None = None,
        person: PersonPolicy | None = None,
    ) -> None:
        """``person``: the policy ``app`` was built with, when a person may answer codex's requests."""
        self.app = app
        self.store = store
        self.options = options
        self.hooks = hooks
        if person is not None:
            person.ask = self._ask_person
        self._sticky = StickyState()
        self._catalog = CatalogCache(app)
        self._inputs = InputBuilder(options.workspace, options.max_input_chars)
        self._conversations: dict[str, Conversation] = {}
        self._requests: dict[str, Request] = {}  # task id -> request not yet answered
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._slots = asyncio.Semaphore(max(1, options.max_concurrent_turns))
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: str | None = None  # the shutdown reason, once shutdown began

    # ------------------------------------------------------------------ A2A entry points

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Queue one A2A message on its conversation and wait until its task is terminal."""
        task_id = context.task_id or str(uuid.uuid4())
        context_id = _context_id(context, task_id)
        publisher = Publisher(event_queue, task_id, context_id)
        request: Request | None = None
        try:
            if context.current_task is not None:
                request = self._asking(context.current_task)
                if request is None:
                    await self._refuse_rerun(context.current_task, publisher)
                elif await self._take_answer(request, context.message, event_queue):
                    await self._settled(request)
                return
            await publisher.task(context.message)
            if self._closing:
                await publisher.finish(_failed(SHUTTING_DOWN))
                return
            command = parse_command(context.get_user_input())
            if command is not None:
                codex_input = CodexInput(text=command.text)
            elif self._inputs.touches_disk(context.message):  # attachments: decode and save off the loop
                codex_input = await asyncio.to_thread(self._inputs.build, context.message)
            else:
                codex_input = self._inputs.build(context.message)  # a thread hop would cost more than this
            message_id = context.message.message_id if context.message else ""
            identity = identify(context, workspace_id=self.options.workspace_id)
            request = Request(task_id, publisher, codex_input, message_id, identity.history, command=command,
                              metadata=_message_metadata(context.message))
            await self._submit(identity.key, request)
            await self._settled(request)
        except asyncio.CancelledError:
            if request is not None:
                self._abandon(request)
            raise
        except InputError as exc:
            await publisher.finish(_failed(f"Cannot run this message: {exc}"))
        except Exception:
            reference = _internal_error(f"task={task_id} context={context_id}")
            with contextlib.suppress(Exception):
                await publisher.finish(_failed(_internal_text(reference)))
        finally:
            if request is not None and request.publisher.terminal:
                self._forget(request)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Mark the request canceled (its worker interrupts or skips it) and publish CANCELED ourselves."""
        task_id = context.task_id or ""
        context_id = _context_id(context, task_id)
        request = self._requests.get(task_id)
        if request is None or request.publisher.terminal:
            # Already answered (or not running here): CANCELED now would overwrite the stored result.
            # The SDK cancels the request and marks a task that is still open CANCELED itself.
            logger.info("turn cancel task=%s context=%s: no running turn", task_id, context_id)
            return
        if request.pending is not None:
            request.pending.cancel()  # codex gets ``cancel`` (its turn stops); the worker interrupts it too
        self._abandon(request)  # also when execute() was cancelled first (a2a-python#1170): CANCELED still goes out
        self._forget(request)
        logger.info("turn cancel task=%s context=%s", task_id, context_id)
        await Publisher(event_queue, task_id, context_id).finish(_canceled())

    async def _refuse_rerun(self, task: Task, publisher: Publisher) -> None:
        """A message naming an existing task: that task already has (or will have) its one turn.

        Running it again would answer twice and overwrite a stored answer, so it is refused.
        For a task running or answered here nothing is published (the SDK hands the caller that
        task's outcome); any other open task ends FAILED, so no caller waits forever.
        """
        ours = publisher.task_id in self._requests or publisher.task_id in self._recent
        logger.warning("refused a second message for task=%s (state %s, running here: %s)",
                       publisher.task_id, TaskState.Name(task.status.state), ours)
        if not ours and task.status.state not in _TERMINAL:
            await publisher.finish(_failed(
                "This task is no longer running here; send the message again without a task id."
            ))

    # ------------------------------------------------------------------ questions for a person

    async def _settled(self, request: Request) -> None:
        """Until the task is terminal, or asks its caller a question (the answer is a new ``execute()``)."""
        asked = asyncio.ensure_future(request.asked.wait())
        try:
            await asyncio.wait((request.done, asked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()

    def _asking(self, task: Task) -> Request | None:
        """The running request of a task that asked its caller a question (a message on it answers)."""
        request = self._requests.get(task.id)
        if request is None or not request.publisher.active or task.status.state != _INPUT_REQUIRED:
            return None
        return request

    async def _take_answer(self, request: Request, message: Message | None, queue: EventQueue) -> bool:
        """Offer a reply to the task's question; False when it was no answer (the caller is asked again)."""
        request.publisher.rebind(queue)
        pending = request.pending
        text, data = reply_of(message)
        reply = pending.offer(text, data) if pending is not None else None
        if reply is not None and not reply.accepted and not pending.done:
            await request.publisher.input_required(prompt_parts(reply.reprompt, pending))
            return False
        request.asked.clear()  # before any await: the next question may follow at once
        line = (f"Answer received ({reply.summary}); codex continues." if reply is not None and reply.accepted
                else "codex is no longer waiting for an answer (it was declined after the wait); it continues.")
        await request.publisher.working(line, resume=True)
        return True

    async def _ask_person(self, server_request: ServerRequest) -> Answer | None:
        """PersonPolicy's callback: the running turn's first waiting task asks its caller; None if none waits."""
        found = self._turn_of(server_request)
        if found is None:
            return None
        conversation, turn = found
        async with turn.asking:
            pending = await PendingApproval.from_request(server_request, conversation.tracker)
            asking = next((rider for rider in turn.riders if rider.waiting_for_answer), None)
            if asking is None or turn.interrupt_sent:
                return None
            timeout = effective_timeout(self.options.approval_timeout, turn.deadline - time.monotonic())
            turn.approval = asking.pending = pending
            try:
                await asking.publisher.input_required(prompt_parts(pending.prompt_text, pending))
                asking.asked.set()
                for rider in turn.riders:
                    if rider is not asking:
                        await rider.publisher.working(pending.waiting_line())
                logger.info("approval asked task=%s context=%s kind=%s wait=%gs",
                            asking.task_id, conversation.key, pending.kind, timeout)
                resolution = await pending.wait(timeout)
            finally:
                turn.approval = asking.pending = None
                conversation.wakeup.set()  # the worker's no-progress clock restarts now
        if resolution.sentence:
            turn.notes.append(resolution.sentence)
            await asking.publisher.working(resolution.sentence, resume=True)
        return resolution.answer

    def _turn_of(self, server_request: ServerRequest) -> tuple[Conversation, Turn] | None:
        """The conversation and running turn a codex request belongs to."""
        turn_id = server_request.params.get("turnId")
        for conversation in self._conversations.values():
            turn = conversation.turn
            if (conversation.thread_id == server_request.thread_id and turn is not None and turn.state is not None
                    and turn_id in (None, turn.turn_id)):
                return conversation, turn
        return None

    @staticmethod
    def _busy_line(conversation: Conversation, line: str) -> str:
        """A status line for a message that waits behind (or joins) the running turn."""
        turn = conversation.turn
        return f"{line} {turn.approval.waiting_line()}" if turn and turn.approval else line

    # ------------------------------------------------------------------ requests and workers

    async def _submit(self, key: str, request: Request) -> None:
        """Put ``request`` in its conversation's queue and make sure a worker takes it."""
        self._requests[request.task_id] = request
        # A task that asked a question ends with no execute() running; it is forgotten when it ends.
        request.done.add_done_callback(lambda _done: self._forget(request) if request.publisher.terminal else None)
        conversation = self._conversations.get(key)
        if conversation is None:
            conversation = self._conversations[key] = Conversation(key)
        busy = conversation.turn is not None or bool(conversation.queue)
        request.wakeup = conversation.wakeup
        conversation.queue.append(request)
        self._start_worker(conversation)
        self._ensure_sweeper()
        if busy and not (self.options.on_busy == "steer" and conversation.turn is not None):
            await request.publisher.working(self._busy_line(conversation, WAITING_LINE))

    def _start_worker(self, conversation: Conversation) -> None:
        conversation.wakeup.set()
        if conversation.worker is None:
            conversation.worker = asyncio.get_running_loop().create_task(
                self._work(conversation), name=f"conversation-{conversation.key}"
            )

    def _abandon(self, request: Request) -> None:
        """The caller no longer wants an answer: stop publishing, let the worker skip or interrupt."""
        request.canceled = True
        request.publisher.detach()
        if not request.done.done():
            request.done.set_result(None)
        if request.wakeup is not None:
            request.wakeup.set()

    def _forget(self, request: Request) -> None:
        if self._requests.get(request.task_id) is request:
            del self._requests[request.task_id]
        self._recent[request.task_id] = None
        while len(self._recent) > RECENT_TASKS:
            self._recent.popitem(last=False)

    async def _work(self, conversation: Conversation) -> None:
        """The conversation's one worker: unload if asked, then each queued request in order."""
        try:
            if conversation.unload:
                await self._unload(conversation)
            while conversation.queue:
                request = conversation.queue.popleft()
                async with self._slots:
                    if not request.waiting_for_answer:
                        continue  # canceled while it waited
                    if self._closing:
                        await request.finish(_failed(SHUTTING_DOWN))
                        continue
                    if request.command is not None:
                        await self._run_command(conversation, request)
                    else:
                        await self._run_turn(conversation, request)
        except Exception:
            reference = _internal_error(f"conversation={conversation.key}")
            await self._fail_waiting(conversation, _failed(_internal_text(reference)))
        finally:
            # No await between the last look at the queue and this: a request queued now starts a new worker.
            conversation.worker = None
            if conversation.queue:
                self._start_worker(conversation)
            elif conversation.subscription is None and self._conversations.get(conversation.key) is conversation:
                del self._conversations[conversation.key]  # nothing loaded: the store remembers the thread

    async def _fail_waiting(self, conversation: Conversation, result: TurnResult) -> None:
        """End every request of the conversation still waiting (the worker cannot go on)."""
        riders = conversation.turn.riders if conversation.turn else []
        conversation.turn = None
        while conversation.queue:
            riders.append(conversation.queue.popleft())
        for request in riders:
            with contextlib.suppress(Exception):
                await request.finish(result)

    # ------------------------------------------------------------------ chat commands

    async def _run_command(self, conversation: Conversation, request: Request) -> None:
        """A chat command, in order with the conversation's turns; its answer (or refusal) completes the task."""
        command = request.command
        assert command is not None
        await request.publisher.working()
        try:
            async with asyncio.timeout(self.options.turn_timeout + THREAD_REQUEST_TIMEOUT_S):
                await self.app.ensure_running()
                if not conversation.looked_up:
                    conversation.thread_id = await asyncio.to_thread(self.store.get, conversation.key)
                    conversation.looked_up = True
                host = self._command_host(conversation, request)
                text = await run_command(command, host, timeout=self.options.turn_timeout)
            result = TurnResult(_COMPLETED, text)
        except CommandError as exc:
            result = TurnResult(_COMPLETED, str(exc))  # a refusal is an answer, not a failure
        except (AppServerError, AppServerExited, ConversationStoreError, TimeoutError, OSError) as exc:
            logger.warning("chat command /%s failed context=%s: %s", command.name, conversation.key, exc)
            result = _failed(f"The command {command.text.split()[0]} did not finish: "
                             f"{_for_caller(getattr(exc, 'message', '') or str(exc) or type(exc).__name__)}")
        finally:
            conversation.last_used = time.monotonic()
        await request.finish(result)

    def _command_host(self, conversation: Conversation, request: Request) -> ConversationHost:
        """What :mod:`commands` may see and change of this conversation."""
        sticky = self._sticky.get(conversation.key)
        options = self.options

        async def load() -> str:
            await self._load_thread(conversation, request.publisher)
            assert conversation.thread_id is not None
            return conversation.thread_id

        def facts() -> StatusInfo:
            return StatusInfo(
                thread_id=conversation.thread_id,
                model=sticky.choice.model or options.model,
                effort=sticky.choice.effort or options.reasoning_effort,
                sandbox=options.sandbox or "the permission profile of config.toml",
                approval_policy=options.approval_policy,
                usage=sticky.usage,
                queue_depth=len(conversation.queue),
            )

        return ConversationHost(
            app=self.app, cwd=options.workspace, choice=sticky.choice, configured_model=options.model,
            configured_effort=options.reasoning_effort, allow_any_model=options.allow_any_model,
            bound=lambda: conversation.thread_id, load=load, unbind=lambda: self._unbind(conversation), facts=facts,
        )

    async def _unbind(self, conversation: Conversation) -> str | None:
        """/new: forget the conversation's thread (map included); codex keeps its rollout on disk."""
        old = conversation.thread_id
        self._sticky.get(conversation.key).started_over = True  # the sender's history must not seed the new thread
        if old is None:
            return None
        await asyncio.to_thread(self.store.unbind, conversation.key)
        loaded = conversation.subscription is not None and conversation.loaded_generation == self.app.generation
        self._detach_thread(conversation)
        conversation.thread_id = None
        conversation.fresh_thread = False
        if loaded:  # codex unloads an unsubscribed thread by itself once it is idle
            with contextlib.suppress(AppServerError, AppServerExited):
                await self.app.request("thread/unsubscribe", {"threadId": old}, timeout=INTERRUPT_TIMEOUT_S)
        self.app.forget_thread(old)
        logger.info("thread unbound context=%s thread=%s (/new)", conversation.key, old)
        return old

    # ------------------------------------------------------------------ one codex turn

    async def _run_turn(self, conversation: Conversation, request: Request) -> None:
        started = time.monotonic()
        turn = Turn([request])
        conversation.turn = turn
        await request.publisher.working()
        preview = request.codex_input.text[:200]
        if self.hooks:
            self.hooks.turn_started(conversation.key, preview)
        result: TurnResult | None = None
        try:
            result = await self._turn_result(conversation, turn)
        except Exception:
            # A bug of ours, not a codex failure: every rider still ends, and the codex turn is stopped.
            reference = _internal_error(f"context={conversation.key} task={request.task_id}")
            result = _failed(_internal_text(reference))
            with contextlib.suppress(Exception):
                await self._interrupt(turn, "internal error")
        finally:
            if turn.approval is not None:
                turn.approval.cancel()  # a question never outlives its turn: codex gets its answer
            conversation.turn = None
            conversation.last_used = time.monotonic()
            if self.hooks:
                self.hooks.turn_finished(conversation.key, result is not None and result.state == _COMPLETED)
        state = turn.state
        if state is not None:
            self._sticky.get(conversation.key).count(state.usage)
        logger.info(
            "turn end context=%s thread=%s task=%s turn=%s state=%s riders=%d duration=%.2fs "
            "tokens_in=%d tokens_out=%d",
            conversation.key, conversation.thread_id, request.task_id, turn.turn_id, TaskState.Name(result.state),
            len(turn.riders), time.monotonic() - started,
            state.usage.input_tokens if state else 0, state.usage.output_tokens if state else 0,
        )
        await self._answer(turn, result)

    async def _answer(self, turn: Turn, result: TurnResult) -> None:
        """Publish the turn's outcome to each rider still waiting; usage is counted on the first one."""
        counted_on: str | None = None
        for rider in turn.riders:
            if not rider.waiting_for_answer:
                continue
            metadata = dict(result.metadata)
            if counted_on is None:
                counted_on = rider.task_id
            elif "usage" in metadata:
                metadata["usage"] = Usage().as_dict()
                metadata["usage_counted_on_task"] = counted_on
            await rider.finish(TurnResult(result.state, result.text, metadata))

    async def _turn_result(self, conversation: Conversation, turn: Turn) -> TurnResult:
        """Run the turn; every codex failure becomes a readable FAILED result."""
        try:
            try:
                return await self._drive(conversation, turn)
            except AppServerExited as exc:
                if turn.turn_id is not None or not turn.wanted:
                    raise
                # codex died before this turn began (e.g. killed just before the message arrived): nothing
                # of the turn ran, so it gets one fresh child instead of a "send it again".
                logger.warning("codex exited before the turn started context=%s (%s); trying once more",
                               conversation.key, exc)
                self._detach_thread(conversation)
                return await self._drive(conversation, turn)
        except AppServerExited as exc:
            self._detach_thread(conversation)
            return _failed(
                "The codex process stopped unexpectedly"
                + (f" (exit code {exc.returncode})" if exc.returncode is not None else "")
                + ". Send the message again to continue: the conversation resumes from its saved history."
            )
        except ConversationStoreError as exc:
            logger.error("conversation map write failed context=%s: %s", conversation.key, exc)
            return _failed("The agent could not save this conversation (its state directory is full or not "
                           "writable); see the agent's log.")
        except AppServerTimeout as exc:
            # A child that answers nothing is hung (not just slow): replace it, or every later message waits too.
            logger.error("codex did not answer %s context=%s; restarting it", exc.method, conversation.key)
            self._detach_thread(conversation)
            self._spawn_background(self._restart_app(f"no answer to {exc.method}", self.app.generation))
            return _failed(
                f"codex stopped answering (no answer to {exc.method} within {exc.timeout:g}s) and is being restarted. "
                "Send the message again to continue: the conversation resumes from its saved history."
            )
        except AppServerError as exc:
            logger.warning("codex refused a request context=%s: %s", conversation.key, exc)
            return _failed(f"codex refused the request: {_for_caller(exc.message)}")

    async def _drive(self, conversation: Conversation, turn: Turn) -> TurnResult:
        request = turn.riders[0]
        try:
            await self.app.ensure_running()
        except (AppServerExited, AppServerError, OSError) as exc:
            logger.error("codex app-server unavailable: %s", exc)
            if self.hooks:
                self.hooks.app_server_unavailable(str(exc))
            return _failed("codex is not available right now; the agent will retry on the next message "
                           "(the agent's log says why).")
        await self._load_thread(conversation, request.publisher)
        if not turn.wanted:
            return _canceled()  # canceled while codex restarted or the thread loaded: codex never sees it
        if self._closing:
            return _failed(SHUTTING_DOWN)
        sticky = self._sticky.get(conversation.key)
        items = list(request.codex_input.items)
        if conversation.fresh_thread and request.history and not sticky.started_over:
            items.insert(0, {"type": "text", "text": f"{HISTORY_HEADER}\n\n{request.history}\n\n{HISTORY_FOOTER}"})
        params: dict[str, Any] = {"threadId": conversation.thread_id, "input": items}
        if request.message_id:
            params["clientUserMessageId"] = request.message_id
        try:
            overrides = turn_overrides(self._command_host(conversation, request), await self._catalog.get(),
                                       request.metadata)
        except CommandError as exc:
            return TurnResult(TaskState.TASK_STATE_REJECTED, str(exc))
        if overrides != conversation.overrides_sent:  # codex keeps them: re-sending costs ~1.5 ms a turn
            params.update(overrides)
        timeout = self._request_timeout(TURN_START_TIMEOUT_S)
        try:
            started = await self.app.request("turn/start", params, timeout=timeout)
        except AppServerError as exc:
            if "thread not found" not in exc.message or isinstance(exc, AppServerTimeout):
                raise
            # codex unloaded the thread behind our back: resume it and try once more.
            self._detach_thread(conversation)
            await self._load_thread(conversation, request.publisher)
            params.update(overrides, threadId=conversation.thread_id)
            started = await self.app.request("turn/start", params, timeout=timeout)
        conversation.fresh_thread = False
        conversation.overrides_sent = overrides
        assert conversation.thread_id is not None
        turn.state = TurnState(thread_id=conversation.thread_id, turn_id=str(started["turn"]["id"]))
        logger.info("turn start context=%s thread=%s task=%s turn=%s",
                    conversation.key, conversation.thread_id, request.task_id, turn.turn_id)
        return await self._follow(conversation, turn)

    async def _follow(self, conversation: Conversation, turn: Turn) -> TurnResult:
        """Publish the turn's events until ``turn/completed``; steer, cancel and time limits on the way.

        One loop wakes on codex events, on new requests and cancels (``conversation.wakeup``) and
        on its own deadlines, so the worker alone decides everything about the running turn.
        """
        state, subscription = turn.state, conversation.subscription
        assert state is not None and subscription is not None
        options = self.options
        deadline = turn.deadline = time.monotonic() + options.turn_timeout
        last_progress = time.monotonic()
        settle_until: float | None = None
        generation = self.app.generation
        while True:
            conversation.wakeup.clear()
            if await self._publish_events(conversation, turn, subscription) or turn.approval is not None:
                last_progress = time.monotonic()  # waiting for a person is not a stall (approval_timeout bounds it)
            if state.done:
                break
            await self._steer_waiting(conversation, turn)
            now = time.monotonic()
            if turn.interrupt_sent:
                if settle_until is not None and now >= settle_until:
                    # Interrupted but no turn/completed: the child is stuck; replace it.
                    logger.error("codex did not finish turn %s after interrupt; restarting app-server", turn.turn_id)
                    self._detach_thread(conversation)
                    self._spawn_background(self._restart_app("turn did not stop after interrupt", generation))
                    break
            else:
                reason = self._stop_reason(turn, now, deadline, last_progress)
                if reason is not None:
                    if turn.approval is not None:
                        turn.approval.cancel()
                    if not await self._interrupt(turn, reason):
                        self._detach_thread(conversation)
                        self._spawn_background(self._restart_app("codex stopped answering", generation))
                        break
                    settle_until = time.monotonic() + INTERRUPT_SETTLE_S
                    continue
            wake_at = settle_until if turn.interrupt_sent and settle_until else min(
                deadline, last_progress + options.inactivity_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conversation.wakeup.wait(), max(0.0, wake_at - time.monotonic()))
        self._spawn_background(asyncio.to_thread(self.store.touch, conversation.key))
        return self._result(conversation, turn)

    def _stop_reason(self, turn: Turn, now: float, deadline: float, last_progress: float) -> str | None:
        """Why the running turn must be interrupted now, if it must."""
        if not turn.wanted:
            return "canceled by request"
        if self._closing:
            return self._closing
        if now >= deadline:
            turn.watchdog = True
            return f"the turn exceeded its time limit of {self.options.turn_timeout:g}s"
        if now - last_progress >= self.options.inactivity_timeout:
            turn.watchdog = True
            logger.warning("turn watchdog turn=%s: no progress for %gs", turn.turn_id, self.options.inactivity_timeout)
            return f"codex made no progress for {self.options.inactivity_timeout:g}s"
        return None

    async def _publish_events(self, conversation: Conversation, turn: Turn, subscription: ThreadSubscription) -> bool:
        """Publish every event waiting for this turn, text deltas merged; True if any was the turn's.

        Each A2A event costs a task-store write and a client frame; deltas that arrived together
        go out as one chunk. Raises AppServerExited once the child is gone and nothing is left.
        """
        state = turn.state
        assert state is not None
        text: list[str] = []
        progressed = False
        while not state.done and (event := subscription.get_nowait()) is not None:
            conversation.tracker.observe(event)
            if event.turn_id != state.turn_id:
                logger.debug("dropped %s of thread=%s turn=%s (not the running turn)",
                             event.method, event.thread_id, event.turn_id)
                continue
            progressed = True
            for out in state.feed(event):
                if isinstance(out, TextDelta):
                    text.append(out.delta)
                elif isinstance(out, MessageStarted):
                    if turn.riders[0].publisher.has_chunks or text:
                        text.append(MESSAGE_SEPARATOR)
                elif isinstance(out, Progress):
                    if text:  # keep the order: text so far, then the tool line
                        await self._to_riders(turn, "".join(text), chunk=True)
                        text.clear()
                    await self._to_riders(turn, out.text, chunk=False)
        if text:
            await self._to_riders(turn, "".join(text), chunk=True)
        return progressed

    async def _to_riders(self, turn: Turn, text: str, *, chunk: bool) -> None:
        """Stream a chunk (to the request that started the turn) or a status line (to every rider)."""
        if chunk:
            await turn.riders[0].publisher.chunk(text)
            return
        for rider in turn.riders:
            await rider.publisher.working(text)

    async def _steer_waiting(self, conversation: Conversation, turn: Turn) -> None:
        """``on_busy = steer``: join queued requests to the running turn (else they wait their turn)."""
        if self.options.on_busy != "steer" or self._closing or turn.interrupt_sent or not turn.wanted:
            return
        while conversation.queue:
            request = conversation.queue[0]
            if not request.waiting_for_answer:
                conversation.queue.popleft()
                continue
            if request.command is not None:
                return  # a command runs on its own, after this turn
            try:
                await self.app.request(
                    "turn/steer",
                    {"threadId": conversation.thread_id, "expectedTurnId": turn.turn_id,
                     "input": request.codex_input.items},
                    timeout=self._request_timeout(TURN_START_TIMEOUT_S),
                )
            except (AppServerError, AppServerExited) as exc:
                logger.info("steer not possible context=%s (%s); queueing instead", conversation.key, exc)
                await request.publisher.working(WAITING_LINE)
                return
            conversation.queue.popleft()
            turn.riders.append(request)
            logger.info("turn steer task=%s joined turn=%s context=%s", request.task_id, turn.turn_id,
                        conversation.key)
            await request.publisher.working(self._busy_line(conversation, JOINED_LINE))

    def _result(self, conversation: Conversation, turn: Turn) -> TurnResult:
        state = turn.state
        assert state is not None
        metadata: dict[str, Any] = {
            "usage": state.usage.as_dict(),
            "tool_trace": state.trace_dicts(),
            "thread_id": conversation.thread_id,
            "turn_id": turn.turn_id,
        }
        if state.trace_dropped:
            metadata["tool_trace_dropped"] = state.trace_dropped
        if turn.watchdog or (turn.stop_reason and not state.done):
            return TurnResult(_FAILED, f"The turn was stopped: {turn.stop_reason}.", metadata)
        if state.status == "completed":
            return TurnResult(_COMPLETED, MESSAGE_SEPARATOR.join(
                text for text in (state.answer(), *turn.notes) if text), metadata)
        if state.status == "interrupted":
            if not turn.wanted:
                return _canceled(metadata)
            reason = turn.stop_reason or "codex interrupted the turn"
            return TurnResult(_FAILED, f"The turn was stopped: {reason}.", metadata)
        failure = state.failure
        if failure:
            metadata["error_category"] = failure.category
        return TurnResult(_FAILED, failure.message if failure else "codex could not complete the turn.", metadata)

    async def _interrupt(self, turn: Turn, reason: str) -> bool:
        """Interrupt the turn once and stop its background commands; False when codex did not answer."""
        if turn.interrupt_sent or turn.state is None:
            return True
        turn.interrupt_sent = True
        turn.stop_reason = reason
        thread_id, target = turn.state.thread_id, turn.state.turn_id
        answered = True
        for _attempt in range(2):
            try:
                await self.app.request(
                    "turn/interrupt", {"threadId": thread_id, "turnId": target}, timeout=INTERRUPT_TIMEOUT_S
                )
                logger.info("turn interrupt thread=%s turn=%s (%s)", thread_id, target, reason)
                break
            except AppServerTimeout:
                answered = False
                break
            except AppServerExited:
                break  # the subscription reports the death
            except AppServerError as exc:
                match = _EXPECTED_TURN_RE.search(exc.message)
                if match and match.group(2) != target:
                    target = match.group(2)
                    continue
                logger.info("turn interrupt thread=%s turn=%s: %s", thread_id, target, exc.message)
                break
        if answered:
            await self._clean_background(thread_id)
        return answered

    async def _clean_background(self, thread_id: str) -> None:
        """Stop the commands the agent left running: ``turn/interrupt`` does not."""
        try:
            await self.app.request("thread/backgroundTerminals/clean", {"threadId": thread_id},
                                   timeout=INTERRUPT_TIMEOUT_S)
            logger.info("background terminals cleaned thread=%s", thread_id)
        except (AppServerError, AppServerExited) as exc:
            logger.warning("background terminals not cleaned thread=%s: %s", thread_id, exc)

    # ------------------------------------------------------------------ threads

    def _request_timeout(self, limit: float) -> float:
        """A codex request waits no longer than a turn may go without progress (a hung child is replaced)."""
        return min(limit, self.options.inactivity_timeout)

    def _thread_params(self) -> dict[str, Any]:
        """Parameters repeated on every start *and* resume: resume resets the sandbox otherwise."""
        options = self.options
        params: dict[str, Any] = {
            "cwd": str(options.workspace),
            "approvalPolicy": options.approval_policy,
            "model": options.model,
        }
        if options.sandbox is not None:
            params["sandbox"] = options.sandbox
        if options.developer_instructions:
            params["developerInstructions"] = options.developer_instructions
        config = dict(options.thread_config or {})
        if options.reasoning_effort:
            config["model_reasoning_effort"] = options.reasoning_effort
        if config:
            params["config"] = config
        return params

    async def _load_thread(self, conversation: Conversation, publisher: Publisher) -> None:
        """Make sure the conversation's thread is loaded in the current app-server generation."""
        generation = self.app.generation
        if conversation.subscription is not None and conversation.loaded_generation == generation:
            return
        self._detach_thread(conversation)
        if not conversation.looked_up:
            conversation.thread_id = await asyncio.to_thread(self.store.get, conversation.key)
            conversation.looked_up = True
        params = self._thread_params()
        if conversation.thread_id:
            if await self._resume(conversation, params):
                conversation.subscription = self.app.subscribe(conversation.thread_id, wakeup=conversation.wakeup)
                conversation.loaded_generation = generation
                return
            await publisher.working(
                "The earlier history of this conversation could not be restored (codex no longer has "
                f"thread {conversation.thread_id}); continuing in a new codex thread without it."
            )
        result = await self.app.request("thread/start", params, timeout=self._request_timeout(THREAD_REQUEST_TIMEOUT_S))
        thread_id = str(result["thread"]["id"])
        # Saved first: a thread the map cannot hold must not be used, or its history is lost at the next restart.
        await asyncio.to_thread(self.store.bind, conversation.key, thread_id)
        conversation.subscription = self.app.subscribe(thread_id, wakeup=conversation.wakeup)
        conversation.thread_id = thread_id
        conversation.loaded_generation = generation
        conversation.fresh_thread = True
        logger.info("thread started context=%s thread=%s", conversation.key, thread_id)

    async def _resume(self, conversation: Conversation, params: dict[str, Any]) -> bool:
        """Resume the conversation's thread; False only when codex no longer has it (anything else raises)."""
        thread_id = conversation.thread_id
        timeout = self._request_timeout(THREAD_REQUEST_TIMEOUT_S)
        resume = {"threadId": thread_id, "excludeTurns": True, **params}
        try:
            try:
                await self.app.request("thread/resume", resume, timeout=timeout)
            except AppServerError as exc:
                if _ARCHIVED not in exc.message or isinstance(exc, AppServerTimeout):
                    raise
                # We archived it when it went idle (that is what frees its MCP servers).
                await self.app.request("thread/unarchive", {"threadId": thread_id}, timeout=timeout)
                await self.app.request("thread/resume", resume, timeout=timeout)
        except AppServerError as exc:
            if isinstance(exc, AppServerTimeout) or not any(words in exc.message for words in _THREAD_GONE):
                raise
            logger.warning("thread resume failed context=%s thread=%s: %s", conversation.key, thread_id, exc)
            return False
        logger.info("thread resumed context=%s thread=%s", conversation.key, thread_id)
        return True

    def _detach_thread(self, conversation: Conversation) -> None:
        """Forget our live handle on the thread (it is resumed from its rollout next time)."""
        if conversation.subscription is not None:
            conversation.subscription.close()
            conversation.subscription = None
        conversation.loaded_generation = 0
        conversation.overrides_sent = None

    async def _restart_app(self, reason: str, generation: int) -> None:
        logger.error("replacing codex app-server: %s", reason)
        try:
            await self.app.restart(if_generation=generation)
        except (AppServerExited, AppServerError, OSError) as exc:
            logger.error("codex app-server restart failed: %s", exc)
            if self.hooks:
                self.hooks.app_server_unavailable(f"codex app-server restart failed: {exc}")

    def _spawn_background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ idle unload

    def _ensure_sweeper(self) -> None:
        if self.options.idle_unload_after <= 0:
            return  # 0 means "never unload"
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle(), name="idle-sweeper")

    async def _sweep_idle(self) -> None:
        """Unload threads idle longer than ``idle_unload_after`` so memory stays bounded."""
        while not self._closing:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self.options.idle_unload_after))
            await self.unload_idle()

    async def unload_idle(self, now: float | None = None) -> int:
        """Unload every idle conversation's thread now (each by its own worker); returns how many."""
        now = time.monotonic() if now is None else now
        workers = []
        for conversation in list(self._conversations.values()):
            if conversation.worker is not None or conversation.queue or self._closing:
                continue  # busy, or a message is about to run: never unloaded under it
            if now - conversation.last_used < self.options.idle_unload_after:
                continue
            conversation.unload = True
            self._start_worker(conversation)
            workers.append(conversation.worker)
        if workers:
            await asyncio.wait(workers, timeout=2 * INTERRUPT_TIMEOUT_S + 1)
        return len(workers)

    async def _unload(self, conversation: Conversation) -> None:
        """Archive the thread in codex (that stops its MCP servers) and drop our handle on it."""
        conversation.unload = False
        thread_id = conversation.thread_id
        loaded = conversation.subscription is not None and conversation.loaded_generation == self.app.generation
        if thread_id and loaded:
            try:
                await self.app.request("thread/archive", {"threadId": thread_id}, timeout=INTERRUPT_TIMEOUT_S)
            except (AppServerError, AppServerExited) as exc:
                logger.warning("thread unload context=%s thread=%s: %s", conversation.key, thread_id, exc)
        self._detach_thread(conversation)
        if thread_id:
            self.app.forget_thread(thread_id)
        logger.info("thread unloaded context=%s thread=%s (idle)", conversation.key, thread_id)

    # ------------------------------------------------------------------ lifecycle

    async def shutdown(self, reason: str = "the agent is shutting down") -> None:
        """Stop: running turns are interrupted (FAILED with ``reason``), queued requests fail, codex closes."""
        self._closing = reason or "the agent is shutting down"
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conversation in self._conversations.values():
            conversation.wakeup.set()
        workers = [c.worker for c in self._conversations.values() if c.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=INTERRUPT_TIMEOUT_S + INTERRUPT_SETTLE_S + 1)
        await self.app.close()  # fails what still waits on codex, so the workers finish
        workers = [c.worker for c in self._conversations.values() if c.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=INTERRUPT_SETTLE_S)
        for request in list(self._requests.values()):
            if request.waiting_for_answer:  # a worker that did not finish in time: the task still ends
                with contextlib.suppress(Exception):
                    await request.finish(_failed(f"The turn was stopped: {reason}."))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


_COMPLETED = TaskState.TASK_STATE_COMPLETED
_INPUT_REQUIRED = TaskState.TASK_STATE_INPUT_REQUIRED
_FAILED = TaskState.TASK_STATE_FAILED
_TERMINAL = frozenset({_COMPLETED, _FAILED, TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_REJECTED})


def _context_id(context: RequestContext, task_id: str) -> str:
    """The task's conversation: a follow-up without contextId gets a fresh random one from the SDK,
    so the stored task knows better."""
    return context.current_task.context_id if context.current_task else (context.context_id or task_id)


def _message_metadata(message: Message | None) -> dict[str, Any]:
    """The message's own metadata (per-message ``model`` / ``reasoning_effort``); request-level
    metadata is the platform's (history, chat ids) and never chooses a model."""
    if message is None or not message.HasField("metadata"):
        return {}
    return json_format.MessageToDict(message.metadata)


def _internal_error(where: str) -> str:
    reference = uuid.uuid4().hex[:8]
    logger.exception("executor error ref=%s %s", reference, where)
    return reference


def _internal_text(reference: str) -> str:
    return f"molecule-codex hit an internal error (reference {reference}); see the agent's log."


def _for_caller(text: str) -> str:
    """codex's error text as a caller may see it: first line, bounded, file paths left out."""
    line = (text.strip().splitlines() or [""])[0][:300]
    return _PATH_RE.sub("<path>", line)


def _canceled(metadata: dict[str, Any] | None = None) -> TurnResult:
    return TurnResult(TaskState.TASK_STATE_CANCELED, "Canceled by request.", metadata or {})


def _failed(text: str) -> TurnResult:
    return TurnResult(_FAILED, text)
