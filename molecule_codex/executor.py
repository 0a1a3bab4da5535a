"""The A2A ``AgentExecutor`` that turns A2A messages into codex turns.

Message path: A2A request → :class:`CodexExecutor` → one :class:`Conversation` per context id →
its codex thread (persisted, resumed on demand) → ``turn/start`` on the shared app-server →
codex notifications → :class:`turn.TurnState` → A2A events.

| codex                                   | A2A                                                        |
|-----------------------------------------|------------------------------------------------------------|
| turn started                            | Task (submitted), then status ``working``                  |
| ``item/agentMessage/delta``             | chunk of the ``answer`` artifact (``append``)              |
| command / file change / MCP tool / plan | status ``working`` with one readable line                  |
| ``error`` willRetry                     | status ``working`` "retrying: …"                           |
| ``turn/completed`` completed            | ``answer`` replaced by the full text; ``completed`` + meta |
| ``turn/completed`` failed               | ``failed`` with a user-readable reason                     |
| interrupted by our cancel / watchdog    | ``canceled`` (published by cancel()) / ``failed``          |

Invariants:

* every task reaches a terminal state; ``execute()`` never raises except ``CancelledError``;
* turns of one conversation never overlap (a2a-sdk serializes per task, not per context):
  ``on_busy = queue`` runs the next message as its own turn, ``steer`` joins the running turn
  and answers with that turn's reply;
* the codex turn belongs to the conversation, not to the request: when the framework cancels
  ``execute()``, the turn is interrupted and drained before the next turn may start, because a
  ``turn/start`` on a busy thread silently merges into the stale turn;
* history is never silently lost: a thread that cannot be resumed is replaced *and* the caller
  is told in a status message.
"""

from __future__ import annotations

import asyncio
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

from molecule_codex.app_server import (
    AppServer,
    AppServerError,
    AppServerExited,
    AppServerTimeout,
    Notification,
    ThreadSubscription,
)
from molecule_codex.conversations import ConversationStore, ConversationStoreError
from molecule_codex.inputs import CodexInput, InputBuilder, InputError
from molecule_codex.turn import MessageStarted, Progress, TextDelta, TurnState

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
_EXPECTED_TURN_RE = re.compile(r"expected active turn id (\S+) but found (\S+)")


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


@dataclass(slots=True)
class TurnResult:
    """How a turn ended, in the terms the A2A side publishes."""

    state: TaskState
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


class Publisher:
    """Publishes one task's events; stops quietly once terminal or detached.

    ``detach()`` is called when the request that owns this task is cancelled: the A2A side
    has (or will have) the CANCELED event from ``cancel()``, so nothing more may follow.
    """

    def __init__(self, queue: EventQueue, task_id: str, context_id: str) -> None:
        self.task_id = task_id
        self.context_id = context_id
        self._queue = queue
        self._updater = TaskUpdater(queue, task_id, context_id)
        self._chunks = 0
        self.terminal = False
        self.detached = False

    @property
    def active(self) -> bool:
        return not (self.terminal or self.detached)

    @property
    def has_chunks(self) -> bool:
        """Whether part of the answer was streamed already."""
        return self._chunks > 0

    def detach(self) -> None:
        self.detached = True

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

    async def working(self, line: str | None = None) -> None:
        if not self.active:
            return
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
        """Terminal event, after the answer artifact is replaced by the final text.

        On COMPLETED that text is the full answer. A turn that fails after streaming part of an
        answer gets its reason there instead, so nobody reading the first artifact takes the
        fragment for an answer.
        """
        if not self.active:
            return
        self.terminal = True
        if result.state == TaskState.TASK_STATE_COMPLETED or self.has_chunks:
            await self._updater.add_artifact(
                [Part(text=result.text)],
                artifact_id=ANSWER_ARTIFACT_ID,
                name=ANSWER_ARTIFACT_NAME,
                append=False,
                last_chunk=True,
            )
        message = self._updater.new_agent_message([Part(text=result.text)], metadata=result.metadata or None)
        await self._updater.update_status(result.state, message=message, metadata=result.metadata or None)


@dataclass(slots=True)
class ActiveTurn:
    """One request's turn: queued, running, or joined to another (steer)."""

    task_id: str
    publisher: Publisher
    text_preview: str
    state: TurnState | None = None
    turn_id: str | None = None
    started: bool = False
    cancel_requested: bool = False
    stop_reason: str | None = None  # why we interrupted it, when not a cancel
    interrupt_sent: bool = False
    worker: asyncio.Task[None] | None = None
    result: asyncio.Future[TurnResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(slots=True)
class Conversation:
    """One A2A context and its codex thread."""

    context_id: str
    thread_id: str | None = None
    loaded_generation: int = 0
    subscription: ThreadSubscription | None = None
    active: ActiveTurn | None = None
    waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class CodexExecutor(AgentExecutor):
    """A2A executor backed by one codex app-server hosting one thread per conversation."""

    def __init__(
        self,
        app: AppServer,
        store: ConversationStore,
        options: ExecutorOptions,
        hooks: TurnHooks | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.options = options
        self.hooks = hooks
        self._inputs = InputBuilder(options.workspace, options.max_input_chars)
        self._conversations: dict[str, Conversation] = {}
        self._turns: dict[str, ActiveTurn] = {}
        self._slots = asyncio.Semaphore(max(1, options.max_concurrent_turns))
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ A2A entry points

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Run one A2A message as a codex turn; always ends the task in a terminal state."""
        task_id = context.task_id or str(uuid.uuid4())
        context_id = _context_id(context, task_id)
        publisher = Publisher(event_queue, task_id, context_id)
        try:
            if context.current_task is None:
                await publisher.task(context.message)
            if self._closing:
                await publisher.finish(_failed("The agent is shutting down; send the message again shortly."))
                return
            codex_input = self._inputs.build(context.message)
            message_id = context.message.message_id if context.message else ""
            await self._run(_conversation_key(context, context_id), task_id, codex_input, message_id, publisher)
        except asyncio.CancelledError:
            publisher.detach()
            raise
        except InputError as exc:
            await publisher.finish(_failed(f"Cannot run this message: {exc}"))
        except Exception:
            reference = uuid.uuid4().hex[:8]
            logger.exception("executor error ref=%s task=%s context=%s", reference, task_id, context_id)
            with contextlib.suppress(Exception):
                await publisher.finish(
                    _failed(f"molecule-codex hit an internal error (reference {reference}); see the agent's log.")
                )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Interrupt the codex turn (or drop the queued message) and publish CANCELED ourselves."""
        task_id = context.task_id or ""
        context_id = _context_id(context, task_id)
        turn = self._turns.get(task_id)
        if turn is None or turn.publisher.terminal:
            # Already answered (or not started here): CANCELED now would overwrite the stored result.
            # The SDK cancels the request and marks a task that is still open CANCELED itself.
            logger.info("turn cancel task=%s context=%s: no running turn", task_id, context_id)
            return
        turn.cancel_requested = True
        turn.publisher.detach()
        if turn.started:
            await self._interrupt_for(turn, "canceled by request")
        elif turn.worker is not None and not turn.worker.done():
            turn.worker.cancel()  # still queued: it never starts
        logger.info("turn cancel task=%s context=%s started=%s", task_id, context_id, turn.started)
        publisher = Publisher(event_queue, task_id, context_id)
        await publisher.finish(_canceled())

    # ------------------------------------------------------------------ ordering per conversation

    def _conversation(self, context_id: str) -> Conversation:
        conversation = self._conversations.get(context_id)
        if conversation is None:
            conversation = Conversation(context_id, thread_id=self.store.get(context_id))
            self._conversations[context_id] = conversation
        self._ensure_sweeper()
        return conversation

    async def _run(
        self, context_id: str, task_id: str, codex_input: CodexInput, message_id: str, publisher: Publisher
    ) -> None:
        conversation = self._conversation(context_id)
        if self.options.on_busy == "steer" and await self._try_steer(conversation, task_id, codex_input, publisher):
            return
        turn = ActiveTurn(task_id, publisher, codex_input.text[:200])
        self._turns[task_id] = turn
        turn.worker = asyncio.get_running_loop().create_task(
            self._turn_worker(conversation, turn, codex_input, message_id), name=f"turn-{task_id}"
        )
        self._background.add(turn.worker)
        turn.worker.add_done_callback(self._background.discard)
        try:
            # The worker owns the codex turn; cancelling this request must not abandon it mid-flight.
            await asyncio.shield(turn.worker)
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            # cancel() dropped the queued worker and published CANCELED itself.
        finally:
            if turn.worker.done():
                self._turns.pop(task_id, None)
            else:
                turn.worker.add_done_callback(lambda _t: self._turns.pop(task_id, None))

    async def _turn_worker(
        self, conversation: Conversation, turn: ActiveTurn, codex_input: CodexInput, message_id: str
    ) -> None:
        conversation.waiting += 1
        queued = True
        try:
            if conversation.lock.locked():
                await turn.publisher.working("Waiting for the previous message of this conversation to finish.")
            async with conversation.lock, self._slots:
                conversation.waiting -= 1
                queued = False
                if turn.cancel_requested:
                    return
                conversation.active = turn
                turn.started = True
                try:
                    result = await self._run_turn(conversation, turn, codex_input, message_id)
                except Exception:
                    # A bug of ours, not a codex failure (execute() reports it): requests that joined
                    # this turn must still end, and the codex turn must not run on unattended.
                    self._settle(turn, _failed("The turn this message joined hit an internal error; see the "
                                               "agent's log."))
                    with contextlib.suppress(Exception):
                        await self._interrupt_for(turn, "internal error")
                    raise
                finally:
                    conversation.active = None
                    conversation.last_used = time.monotonic()
                self._settle(turn, result)
        except asyncio.CancelledError:
            if not turn.result.done():
                turn.result.cancel()
            if turn.started and turn.publisher.active:
                # Cancelled from inside (shutdown gave up waiting): the task must still end.
                with contextlib.suppress(Exception):
                    await turn.publisher.finish(_failed(f"The turn was stopped: {turn.stop_reason or 'aborted'}."))
            raise
        finally:
            if queued:
                conversation.waiting -= 1

    def _settle(self, turn: ActiveTurn, result: TurnResult) -> None:
        if not turn.result.done():
            turn.result.set_result(result)

    async def _try_steer(
        self, conversation: Conversation, task_id: str, codex_input: CodexInput, publisher: Publisher
    ) -> bool:
        """Join the running turn; True when this request was answered with that turn's reply."""
        active = conversation.active
        if active is None or active.turn_id is None or active.cancel_requested or conversation.thread_id is None:
            return False
        try:
            await self.app.request(
                "turn/steer",
                {"threadId": conversation.thread_id, "expectedTurnId": active.turn_id, "input": codex_input.items},
                timeout=self._request_timeout(TURN_START_TIMEOUT_S),
            )
        except (AppServerError, AppServerExited) as exc:
            logger.info("steer not possible context=%s (%s); queueing instead", conversation.context_id, exc)
            return False
        logger.info("turn steer task=%s joined turn=%s context=%s", task_id, active.turn_id, conversation.context_id)
        await publisher.working("Added to the running turn of this conversation.")
        joined = ActiveTurn(task_id, publisher, codex_input.text[:200], started=True)
        self._turns[task_id] = joined
        try:
            result = await asyncio.shield(active.result)
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            result = _failed("The turn this message joined ended before producing a reply.")
        finally:
            self._turns.pop(task_id, None)
        if not joined.cancel_requested:
            await publisher.finish(result)
        return True

    # ------------------------------------------------------------------ one codex turn

    async def _run_turn(
        self, conversation: Conversation, turn: ActiveTurn, codex_input: CodexInput, message_id: str
    ) -> TurnResult:
        started = time.monotonic()
        publisher = turn.publisher
        await publisher.working()
        if self.hooks:
            self.hooks.turn_started(conversation.context_id, turn.text_preview)
        result: TurnResult | None = None
        try:
            try:
                result = await self._drive(conversation, turn, codex_input, message_id)
            except AppServerExited as exc:
                if turn.turn_id is not None or turn.cancel_requested:
                    raise
                # codex died before this turn began (e.g. killed just before the message arrived): nothing
                # of the turn ran, so it gets one fresh child instead of a "send it again".
                logger.warning("codex exited before the turn started context=%s (%s); trying once more",
                               conversation.context_id, exc)
                self._detach_thread(conversation)
                result = await self._drive(conversation, turn, codex_input, message_id)
        except AppServerExited as exc:
            result = _failed(
                "The codex process stopped unexpectedly"
                + (f" (exit code {exc.returncode})" if exc.returncode is not None else "")
                + ". Send the message again to continue: the conversation resumes from its saved history."
            )
            self._detach_thread(conversation)
        except ConversationStoreError as exc:
            result = _failed(f"The conversation could not be saved: {exc}")
        except AppServerTimeout as exc:
            # A child that answers nothing is hung (not just slow): replace it, or every later message waits too.
            logger.error("codex did not answer %s context=%s; restarting it", exc.method, conversation.context_id)
            self._detach_thread(conversation)
            self._spawn_background(self._restart_app(f"no answer to {exc.method}", self.app.generation))
            result = _failed(
                f"codex stopped answering (no answer to {exc.method} within {exc.timeout:g}s) and is being restarted. "
                "Send the message again to continue: the conversation resumes from its saved history."
            )
        except AppServerError as exc:
            logger.warning("codex refused a request context=%s: %s", conversation.context_id, exc)
            result = _failed(f"codex refused the request: {exc.message}")
        finally:
            ok = result is not None and result.state == TaskState.TASK_STATE_COMPLETED
            if self.hooks:
                self.hooks.turn_finished(conversation.context_id, ok)
        state = turn.state
        logger.info(
            "turn end context=%s thread=%s task=%s turn=%s state=%s duration=%.2fs tokens_in=%d tokens_out=%d",
            conversation.context_id,
            conversation.thread_id,
            turn.task_id,
            turn.turn_id,
            TaskState.Name(result.state),
            time.monotonic() - started,
            state.usage.input_tokens if state else 0,
            state.usage.output_tokens if state else 0,
        )
        await publisher.finish(result)
        return result

    async def _drive(
        self, conversation: Conversation, turn: ActiveTurn, codex_input: CodexInput, message_id: str
    ) -> TurnResult:
        try:
            await self.app.ensure_running()
        except (AppServerExited, AppServerError, OSError) as exc:
            if self.hooks:
                self.hooks.app_server_unavailable(str(exc))
            return _failed(f"codex is not available right now ({exc}); the agent will retry on the next message.")
        await self._load_thread(conversation, turn.publisher)
        assert conversation.thread_id is not None and conversation.subscription is not None
        subscription = conversation.subscription
        while subscription.get_nowait() is not None:
            pass  # late events of earlier turns (e.g. a command that outlived its turn)
        if turn.cancel_requested:
            # Canceled while codex restarted or the thread loaded: the message never reaches codex.
            return _canceled()
        params: dict[str, Any] = {"threadId": conversation.thread_id, "input": codex_input.items}
        if message_id:
            params["clientUserMessageId"] = message_id
        try:
            started = await self.app.request("turn/start", params, timeout=self._request_timeout(TURN_START_TIMEOUT_S))
        except AppServerError as exc:
            if "thread not found" not in exc.message:
                raise
            # codex unloaded the thread behind our back: resume it and try once more.
            self._detach_thread(conversation)
            await self._load_thread(conversation, turn.publisher)
            params["threadId"] = conversation.thread_id
            subscription = conversation.subscription
            assert subscription is not None
            started = await self.app.request("turn/start", params, timeout=self._request_timeout(TURN_START_TIMEOUT_S))
        turn.turn_id = str(started["turn"]["id"])
        turn.state = TurnState(thread_id=conversation.thread_id, turn_id=turn.turn_id)
        logger.info(
            "turn start context=%s thread=%s task=%s turn=%s",
            conversation.context_id, conversation.thread_id, turn.task_id, turn.turn_id,
        )
        if turn.cancel_requested:
            await self._interrupt_for(turn, "canceled before it started")
        return await self._consume(conversation, turn, subscription)

    async def _consume(
        self, conversation: Conversation, turn: ActiveTurn, subscription: ThreadSubscription
    ) -> TurnResult:
        """Read the turn's events until ``turn/completed``, with the inactivity and total bounds."""
        state = turn.state
        assert state is not None
        publisher = turn.publisher
        deadline = time.monotonic() + self.options.turn_timeout
        generation = self.app.generation
        timeout_reason: str | None = None
        while not state.done:
            remaining = deadline - time.monotonic()
            wait = min(self.options.inactivity_timeout, remaining)
            if timeout_reason is not None:
                wait = INTERRUPT_SETTLE_S
            try:
                event = await subscription.get(timeout=max(wait, 0.0))
            except TimeoutError:
                if timeout_reason is not None:
                    # Interrupted but no turn/completed: the child is stuck; replace it.
                    logger.error("codex did not finish turn %s after interrupt; restarting app-server", turn.turn_id)
                    self._detach_thread(conversation)
                    self._spawn_background(self._restart_app("turn did not stop after interrupt", generation))
                    break
                timeout_reason = (
                    f"the turn exceeded its time limit of {self.options.turn_timeout:g}s"
                    if remaining <= self.options.inactivity_timeout
                    else f"codex made no progress for {self.options.inactivity_timeout:g}s"
                )
                logger.warning("turn watchdog context=%s turn=%s: %s", conversation.context_id, turn.turn_id,
                               timeout_reason)
                if not await self._interrupt_for(turn, timeout_reason):
                    self._detach_thread(conversation)
                    self._spawn_background(self._restart_app("codex stopped answering", generation))
                    break
                continue
            await self._publish_batch(state, publisher, event, subscription)
        self.store.touch(conversation.context_id)
        return self._result(conversation, turn, timeout_reason)

    async def _publish_batch(
        self, state: TurnState, publisher: Publisher, event: Notification, subscription: ThreadSubscription
    ) -> None:
        """Publish ``event`` and every event already waiting behind it, text deltas merged.

        Each A2A event costs a task-store write and a client frame; deltas that arrived together
        go out as one chunk. The first delta is never held back: nothing waits for more input.
        """
        text: list[str] = []
        next_event: Notification | None = event
        while next_event is not None:
            if state.belongs(next_event):
                for out in state.feed(next_event):
                    if isinstance(out, TextDelta):
                        text.append(out.delta)
                    elif isinstance(out, MessageStarted):
                        if publisher.has_chunks or text:
                            text.append(MESSAGE_SEPARATOR)
                    elif isinstance(out, Progress):
                        if text:  # keep the order: text so far, then the tool line
                            await publisher.chunk("".join(text))
                            text.clear()
                        await publisher.working(out.text)
            if state.done:
                break
            next_event = subscription.get_nowait()
        if text:
            await publisher.chunk("".join(text))

    def _result(self, conversation: Conversation, turn: ActiveTurn, timeout_reason: str | None) -> TurnResult:
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
        if timeout_reason is not None:
            return TurnResult(TaskState.TASK_STATE_FAILED, f"The turn was stopped: {timeout_reason}.", metadata)
        if state.status == "completed":
            return TurnResult(TaskState.TASK_STATE_COMPLETED, state.answer(), metadata)
        if state.status == "interrupted":
            if turn.cancel_requested:
                return _canceled(metadata)
            reason = turn.stop_reason or "codex interrupted the turn"
            return TurnResult(TaskState.TASK_STATE_FAILED, f"The turn was stopped: {reason}.", metadata)
        failure = state.failure
        text = failure.message if failure else "codex could not complete the turn."
        if failure:
            metadata["error_category"] = failure.category
        return TurnResult(TaskState.TASK_STATE_FAILED, text, metadata)

    async def _interrupt_for(self, turn: ActiveTurn, reason: str) -> bool:
        """Send ``turn/interrupt`` once for this turn; False when codex did not answer at all."""
        if turn.interrupt_sent or turn.turn_id is None or turn.state is None:
            return True
        turn.interrupt_sent = True
        thread_id = turn.state.thread_id
        target = turn.turn_id
        for _attempt in range(2):
            try:
                await self.app.request(
                    "turn/interrupt", {"threadId": thread_id, "turnId": target}, timeout=INTERRUPT_TIMEOUT_S
                )
                logger.info("turn interrupt thread=%s turn=%s (%s)", thread_id, target, reason)
                return True
            except AppServerTimeout:
                return False
            except AppServerExited:
                return True  # the subscription reports the death
            except AppServerError as exc:
                match = _EXPECTED_TURN_RE.search(exc.message)
                if match and match.group(2) != target:
                    target = match.group(2)
                    continue
                logger.info("turn interrupt thread=%s turn=%s: %s", thread_id, target, exc.message)
                return True
        return True

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
        if conversation.thread_id and conversation.loaded_generation == generation and conversation.subscription:
            return
        self._detach_thread(conversation)
        params = self._thread_params()
        if conversation.thread_id:
            try:
                await self.app.request(
                    "thread/resume",
                    {"threadId": conversation.thread_id, "excludeTurns": True, **params},
                    timeout=self._request_timeout(THREAD_REQUEST_TIMEOUT_S),
                )
                conversation.subscription = self.app.subscribe(conversation.thread_id)
                conversation.loaded_generation = generation
                logger.info("thread resumed context=%s thread=%s", conversation.context_id, conversation.thread_id)
                return
            except AppServerError as exc:
                if isinstance(exc, AppServerTimeout):
                    raise
                lost = conversation.thread_id
                logger.warning("thread resume failed context=%s thread=%s: %s", conversation.context_id, lost, exc)
                await publisher.working(
                    "The earlier history of this conversation could not be restored (codex no longer has "
                    f"thread {lost}); continuing in a new codex thread without it."
                )
        result = await self.app.request("thread/start", params, timeout=self._request_timeout(THREAD_REQUEST_TIMEOUT_S))
        thread_id = str(result["thread"]["id"])
        # Saved first: a thread the map cannot hold must not be used, or its history is lost at the next restart.
        self.store.bind(conversation.context_id, thread_id)
        conversation.subscription = self.app.subscribe(thread_id)
        conversation.thread_id = thread_id
        conversation.loaded_generation = generation
        logger.info("thread started context=%s thread=%s", conversation.context_id, thread_id)

    def _detach_thread(self, conversation: Conversation) -> None:
        """Forget our live handle on the thread (it is resumed from its rollout next time)."""
        if conversation.subscription is not None:
            conversation.subscription.close()
            conversation.subscription = None
        conversation.loaded_generation = 0

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
        """Unload every idle conversation's thread now; returns how many were unloaded."""
        now = time.monotonic() if now is None else now
        unloaded = 0
        for context_id, conversation in list(self._conversations.items()):
            idle = now - conversation.last_used >= self.options.idle_unload_after
            if not idle or conversation.lock.locked() or conversation.waiting:
                continue
            thread_id = conversation.thread_id
            if thread_id and conversation.loaded_generation == self.app.generation and self.app.running:
                with contextlib.suppress(AppServerError, AppServerExited):
                    await self.app.request("thread/unsubscribe", {"threadId": thread_id}, timeout=INTERRUPT_TIMEOUT_S)
            self._detach_thread(conversation)
            if thread_id:
                self.app.forget_thread(thread_id)
            del self._conversations[context_id]
            unloaded += 1
            logger.info("thread unloaded context=%s thread=%s (idle)", context_id, thread_id)
        return unloaded

    # ------------------------------------------------------------------ lifecycle

    async def shutdown(self, reason: str = "the agent is shutting down") -> None:
        """Interrupt running turns (their tasks end FAILED with ``reason``), then close codex."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for turn in list(self._turns.values()):
            if turn.started and not turn.result.done():
                turn.stop_reason = reason
                await self._interrupt_for(turn, reason)
        pending = [t for t in self._background if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=INTERRUPT_SETTLE_S)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await self.app.close()


def _conversation_key(context: RequestContext, context_id: str) -> str:
    """The conversation a message continues: per caller, so a context id another authenticated
    caller also uses neither shares nor reveals that caller's codex thread."""
    user = getattr(context.call_context, "user", None)
    if user is None or not user.is_authenticated or not user.user_name:
        return context_id
    return f"{user.user_name}/{context_id}"


def _being_cancelled() -> bool:
    """Whether the running asyncio task itself has a cancel request (not just something it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _context_id(context: RequestContext, task_id: str) -> str:
    """The task's conversation: a follow-up without contextId gets a fresh random one from the SDK,
    so the stored task knows better."""
    return context.current_task.context_id if context.current_task else (context.context_id or task_id)


def _canceled(metadata: dict[str, Any] | None = None) -> TurnResult:
    return TurnResult(TaskState.TASK_STATE_CANCELED, "Canceled by request.", metadata or {})


def _failed(text: str) -> TurnResult:
    return TurnResult(TaskState.TASK_STATE_FAILED, text)
