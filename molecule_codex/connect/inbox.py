"""Poll mode: read the workspace's activity feed, run each message as a turn, reply exactly once.

How a turn runs: the row's v0.3 ``params`` are validated with the SDK's own v0.3 models, converted
with the SDK's own v0.3 → v1 conversion (the one the served ``/`` route uses) and handed to the
served stack's ``DefaultRequestHandler.on_message_send``, blocking, in process. So every message
runs through the same request handler, task store and ``CodexExecutor`` as ``serve`` and push mode,
with no HTTP hop. We drive the handler rather than POSTing to our own app (``httpx.ASGITransport``)
because the caller's identity matters: peer rows run as an authenticated caller ``peer-<id>``, so
the executor's per-caller rule keeps each peer's conversations (and tasks) apart from everyone
else's even when two peers send the same contextId; over HTTP that identity would have to be forged
through the auth middleware. Errors come back as exceptions and terminal tasks, not JSON-RPC
envelopes to unpack.

Conversation per chat thread: the message's ``contextId`` when present; else canvas rows (no
``source_id``) continue ``canvas-<workspace_id>`` (what the newest platform uses) and peer rows
continue ``peer-<source_id>``. Rows of one conversation run one at a time, in feed order (on_busy
= queue: each row needs its own reply, and the platform cannot answer the original request, so a
steered turn would answer two rows with one text); different conversations run in parallel.

Replies: canvas user → ``notify``; peer → a new ``message/send`` to that peer. A failed turn or an
unreadable row is answered with its readable failure sentence, never silence. Our own notify
echoes, our own rows (except ``delegate_result``) and methods that carry no message for us are
skipped. Exactly-once bookkeeping is in :mod:`.state`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from a2a.auth.user import UnauthenticatedUser, User
from a2a.compat.v0_3 import conversions
from a2a.compat.v0_3 import types as types_v03
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import RequestHandler
from a2a.types import Message, Task, TaskState
from a2a.utils.errors import A2AError
from pydantic import ValidationError

from molecule_codex.connect.platform import (
    FEED_PAGE_LIMIT,
    AuthRejected,
    Backoff,
    CursorGone,
    PlatformClient,
    PlatformError,
    Rejected,
)
from molecule_codex.connect.state import InboxState, Pending

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 5.0
#: A bound on one turn seen from the inbox; the executor's own turn limit (25 min) fires first.
TURN_WAIT_S = 3 * 3600.0
#: How long shutdown waits for replies already on their way to the platform.
DELIVERY_DRAIN_S = 10.0
MESSAGE_METHODS = frozenset({"message/send", "message/stream"})
ERROR_DETAIL_CHARS = 300
EMPTY_REPLY = "(The agent finished without a text reply.)"


class PeerUser(User):
    """The caller behind a peer row: conversations and tasks are scoped to it."""

    def __init__(self, peer_id: str) -> None:
        self._name = f"peer-{peer_id}"

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._name


@dataclass(frozen=True, slots=True)
class Row:
    """One ``a2a_receive`` activity row, as far as we need it."""

    id: str
    source_id: str | None
    method: str
    body: dict[str, Any] | None
    body_error: str | None
    seq: int | None


def parse_row(raw: dict[str, Any]) -> Row | None:
    """The row, or None when it has no id (it cannot be tracked, so it cannot be answered once)."""
    row_id = raw.get("id")
    if not isinstance(row_id, str | int) or isinstance(row_id, bool) or row_id == "":
        return None
    source = raw.get("source_id")
    body: Any = raw.get("request_body")
    error = None
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except ValueError as exc:
            body, error = None, f"its request body is not valid JSON ({exc})"
    if error is None and not isinstance(body, dict):
        body, error = None, "it has no request body"
    seq = raw.get("seq")
    return Row(
        id=str(row_id),
        source_id=str(source) if source not in (None, "") else None,
        method=str(raw.get("method") or ""),
        body=body,
        body_error=error,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


def _message_of(row: Row) -> dict[str, Any]:
    """A copy of ``params.message`` of the row's envelope, ``{}`` when there is none."""
    params = row.body.get("params") if isinstance(row.body, dict) else None
    message = params.get("message") if isinstance(params, dict) else None
    return dict(message) if isinstance(message, dict) else {}


def _task_text(task: Task) -> str:
    """What a reader of the platform shows: the terminal status message, else the answer artifact."""
    text = "".join(part.text for part in task.status.message.parts if part.HasField("text"))
    if not text:
        text = "".join(part.text for artifact in task.artifacts for part in artifact.parts if part.HasField("text"))
    if not text and task.status.state != TaskState.TASK_STATE_COMPLETED:
        text = f"The agent could not answer (task ended {TaskState.Name(task.status.state)})."
    return text or EMPTY_REPLY


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= ERROR_DETAIL_CHARS else text[:ERROR_DETAIL_CHARS] + "…"


class Inbox:
    """The poll loop, one worker per busy conversation, and exactly-once bookkeeping."""

    def __init__(
        self,
        platform: PlatformClient,
        handler: RequestHandler,
        state: InboxState,
        *,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> None:
        self._platform = platform
        self._handler = handler
        self._state = state
        self._poll_interval = poll_interval
        self._fetch_after: str | None = state.cursor
        self._order: collections.deque[str] = collections.deque()  # fetched rows not yet folded into the cursor
        self._finished: set[str] = set()  # rows in _order that are done, not yet folded
        self._seqs: dict[str, int] = {}
        self._prefix_seq = state.acked_seq
        self._inflight: set[str] = set()
        self._queues: dict[tuple[str, str], collections.deque[tuple[Row, str, User]]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()

    @property
    def workspace_id(self) -> str:
        return self._platform.workspace_id

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Deliver replies left from the last run, then poll until cancelled."""
        await self._flush_outbox()
        backoff = Backoff()
        while True:
            try:
                rows = await self._platform.activity(since_id=self._fetch_after)
            except CursorGone:
                logger.warning("feed cursor %s is unknown to the platform (410): re-reading the last ten "
                               "minutes; rows older than that which were never answered are lost", self._fetch_after)
                self._fetch_after = None
                continue
            except PlatformError as exc:
                delay = backoff.delay()
                if isinstance(exc, AuthRejected):
                    logger.error("activity feed refused: the platform rejects the workspace token from %s "
                                 "(HTTP %s); retrying in %.0f s", self._platform.token_source, exc.status, delay)
                else:
                    logger.warning("activity feed unavailable: %s; retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            for raw in rows:
                self._accept(raw)
            await self._ack()
            if len(rows) < FEED_PAGE_LIMIT:
                await asyncio.sleep(self._poll_interval)

    async def stop(self) -> None:
        """Stop turns (their rows stay unanswered: the next start runs them again), finish deliveries."""
        for worker in list(self._workers):
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._deliveries:
            _done, pending = await asyncio.wait(self._deliveries, timeout=DELIVERY_DRAIN_S)
            for delivery in pending:
                delivery.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _flush_outbox(self) -> None:
        """Replies whose turn ran before a crash: send them, without running the turn again."""
        for row_id, pending in list(self._state.outbox.items()):
            logger.info("re-sending the reply for row %s produced before the last stop", row_id)
            await self._deliver(row_id, pending)

    # ------------------------------------------------------------------ rows

    def _accept(self, raw: dict[str, Any]) -> None:
        row = parse_row(raw)
        if row is None:
            logger.warning("activity row without an id skipped (it cannot be tracked)")
            return
        self._fetch_after = row.id
        if row.id in self._inflight or row.id in self._finished:
            return  # already in _order (a 410 re-read): a second entry would never fold into the cursor
        self._order.append(row.id)
        if row.seq is not None:
            self._seqs[row.id] = row.seq
        if self._state.is_handled(row.id):
            self._finished.add(row.id)
            self._advance()
            return
        skip = self._skip_reason(row)
        if skip:
            logger.info("row %s skipped: %s", row.id, skip)
            self._finish(row.id)
            return
        self._inflight.add(row.id)
        context_id, user = self._conversation(row)
        key = (user.user_name, context_id)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            worker = asyncio.create_task(self._drain(key, queue), name=f"inbox {context_id}")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        queue.append((row, context_id, user))

    def _skip_reason(self, row: Row) -> str | None:
        if row.method == "notify" and row.source_id is None:
            return "our own notify echo"
        if row.source_id == self.workspace_id and row.method != "delegate_result":
            return "sent by this workspace"
        if row.method not in MESSAGE_METHODS:
            return f"method {row.method or '(none)'} carries no message for connect"
        return None

    def _conversation(self, row: Row) -> tuple[str, User]:
        context_id = _message_of(row).get("contextId")
        user: User = UnauthenticatedUser() if row.source_id is None else PeerUser(row.source_id)
        if isinstance(context_id, str) and context_id:
            return context_id, user
        if row.source_id is None:
            return f"canvas-{self.workspace_id}", user
        return f"peer-{row.source_id}", user

    async def _drain(self, key: tuple[str, str], queue: collections.deque[tuple[Row, str, User]]) -> None:
        try:
            while queue:
                row, context_id, user = queue[0]
                await self._process(row, context_id, user)
                queue.popleft()
        finally:
            if self._queues.get(key) is queue:
                del self._queues[key]

    async def _process(self, row: Row, context_id: str, user: User) -> None:
        text = await self._turn(row, context_id, user)
        pending = Pending(text, row.source_id)
        self._state.outbox[row.id] = pending
        self._persist(row.id)
        delivery = asyncio.create_task(self._deliver(row.id, pending), name=f"reply {row.id}")
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)
        await asyncio.shield(delivery)  # a stop while sending lets the reply finish (stop() waits)

    # ------------------------------------------------------------------ turns

    async def _turn(self, row: Row, context_id: str, user: User) -> str:
        """The reply text for one message row: the turn's answer or a readable failure sentence."""
        if row.body_error:
            return f"The agent could not read this message: {row.body_error}."
        try:
            params = (row.body or {}).get("params")
            message = _message_of(row)
            if not isinstance(params, dict) or not message:
                raise ValueError("it has no params.message")
            message.setdefault("messageId", f"row-{row.id}")
            message.setdefault("role", "user")
            parts = message.get("parts")
            if isinstance(parts, list):  # the platform's own tools send text parts without "kind"
                message["parts"] = [{"kind": "text", **part} if isinstance(part, dict) and "kind" not in part
                                    and "text" in part else part for part in parts]
            compat = types_v03.SendMessageRequest(
                id=row.id, params=types_v03.MessageSendParams.model_validate({**params, "message": message})
            )
            request = conversions.to_core_send_message_request(compat)
        except (ValidationError, ValueError, TypeError) as exc:
            logger.warning("row %s is not a valid message/send: %s", row.id, _short(exc))
            return f"The agent could not read this message: {_short(exc)}"
        if not request.message.context_id:
            request.message.context_id = context_id
        request.configuration.return_immediately = False
        call = ServerCallContext(user=user)
        logger.info("row %s: turn in conversation %s (from %s)", row.id, request.message.context_id,
                    row.source_id or "canvas")
        try:
            async with asyncio.timeout(TURN_WAIT_S):
                result = await self._handler.on_message_send(request, call)
        except A2AError as exc:
            return f"The agent could not process this message: {_short(exc)}"
        except TimeoutError:
            return f"The agent did not finish this message within {TURN_WAIT_S / 3600:.0f} hours."
        except Exception:
            reference = uuid.uuid4().hex[:8]
            logger.exception("turn for row %s failed ref=%s", row.id, reference)
            return f"molecule-codex hit an internal error (reference {reference}); see the agent's log."
        if isinstance(result, Message):
            return "".join(part.text for part in result.parts if part.HasField("text")) or EMPTY_REPLY
        return _task_text(result)

    # ------------------------------------------------------------------ replies

    async def _deliver(self, row_id: str, pending: Pending) -> None:
        """Send until the platform accepts (or refuses for good), then record the row as handled."""
        backoff = Backoff()
        target = f"peer {pending.peer}" if pending.peer else "the canvas user"
        while True:
            try:
                if pending.peer:
                    await self._platform.send_to_peer(pending.peer, pending.text, message_id=f"reply-{row_id}")
                else:
                    await self._platform.notify(pending.text)
                logger.info("row %s answered (%d chars to %s)", row_id, len(pending.text), target)
                break
            except Rejected as exc:
                logger.error("reply for row %s cannot be delivered to %s and is dropped: %s", row_id, target, exc)
                break
            except PlatformError as exc:
                delay = backoff.delay()
                if isinstance(exc, AuthRejected):
                    logger.error("reply for row %s refused: the platform rejects the workspace token from %s "
                                 "(HTTP %s); retrying in %.0f s", row_id, self._platform.token_source,
                                 exc.status, delay)
                else:
                    logger.warning("reply for row %s not delivered: %s; retrying in %.0f s", row_id, exc, delay)
                await asyncio.sleep(delay)
        self._finish(row_id)

    def _finish(self, row_id: str) -> None:
        """Record ``row_id`` as handled and move the cursor over the handled prefix; persist."""
        self._inflight.discard(row_id)
        if row_id in self._order:  # not a reply re-sent at start: that row was never fetched
            self._finished.add(row_id)
        self._state.mark_handled(row_id)
        self._advance()

    def _advance(self) -> None:
        while self._order and self._order[0] in self._finished:
            row_id = self._order.popleft()
            self._finished.discard(row_id)
            self._state.cursor = row_id
            seq = self._seqs.pop(row_id, None)
            if seq is not None:
                self._prefix_seq = max(self._prefix_seq, seq)
        self._persist(self._state.cursor)

    async def _ack(self) -> None:
        """Retention ack for the handled prefix (newest platforms); a failure waits for the next poll."""
        if self._prefix_seq <= self._state.acked_seq:
            return
        try:
            await self._platform.ack(self._prefix_seq)
        except PlatformError as exc:
            logger.debug("activity ack of seq %d failed: %s", self._prefix_seq, exc)
            return
        self._state.acked_seq = self._prefix_seq
        self._persist(self._state.cursor)

    def _persist(self, row_id: str | None) -> None:
        """Write the state file; a full or read-only disk costs the restart guarantee, never a reply.

        In memory everything goes on (the next write retries); a restart before a write succeeds
        re-runs or re-sends from the last state on disk, as after a kill -9, and never skips a row.
        """
        try:
            self._state.save()
        except OSError as exc:
            logger.error("inbox state not written (row %s): %s; replies go on, a restart now may re-run "
                         "or re-send rows handled since the last write", row_id, exc)
