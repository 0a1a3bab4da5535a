"""The executor's side of a person in the loop: codex's approval requests as A2A ``input-required``.

:mod:`approvals` speaks codex (prompt text, reply parsing, answer shapes); this module is the glue
the executor needs around it, so the executor itself only routes:

* :class:`PersonPolicy` is AppServer's server-request policy. A request that needs a person
  (:func:`approvals.needs_person`) goes to the executor's ``ask`` callback; everything else, and
  a request the executor has no waiting task for (``ask`` returns None), gets the automatic
  :class:`server_requests.ServerRequestPolicy` answer. Every request still gets exactly one answer.
* :func:`prompt_parts` / :func:`reply_of`: the A2A parts of a question (plain text first, because
  the platform chat shows only text, then a data part for A2A clients) and the text and data
  values of the message that answers it.
* :func:`server_request_deadline`: AppServer declines a request whose policy takes longer than its
  deadline, so that deadline must be longer than any wait for a person.

Why the asking ``execute()`` returns while codex waits: a2a-sdk 1.3 runs the messages of one task
one after another (its per-task request lock is released only when ``execute()`` returns), so
the answer, a message on the same taskId, reaches the executor only after the asking call
returned. The codex turn keeps running in its conversation's worker meanwhile and publishes
through the task's event queue, which the SDK keeps per task while it is ``input-required``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from a2a.types import Message, Part
from google.protobuf import json_format, struct_pb2

from molecule_codex.approvals import PendingApproval, needs_person
from molecule_codex.server_requests import Answer, ServerRequest, ServerRequestPolicy

logger = logging.getLogger(__name__)

#: Slack between the longest wait for a person (approval or turn limit) and AppServer's deadline.
DEADLINE_MARGIN_S = 60.0

#: The executor's callback: the answer a person gave, or None when no task waits for this request.
Ask = Callable[[ServerRequest], Awaitable[Answer | None]]


class PersonPolicy:
    """AppServer's policy when a person may answer: the executor asks, the rest is automatic."""

    def __init__(self, approval_policy: str, automatic: ServerRequestPolicy | None = None) -> None:
        self.approval_policy = approval_policy
        self.automatic = automatic or ServerRequestPolicy(approval_policy=approval_policy)
        #: Set by the executor that owns the tasks (CodexExecutor.__init__).
        self.ask: Ask | None = None

    async def __call__(self, request: ServerRequest) -> Answer:
        if self.ask is not None and needs_person(
            request, approval_policy=self.approval_policy, trusted_mcp_servers=self.automatic.trusted_mcp_servers
        ):
            answer = await self.ask(request)
            if answer is not None:
                return answer
            logger.info("approval %s id=%s thread=%s: no task waits for it; automatic answer",
                        request.method, request.id, request.thread_id or "-")
        return await self.automatic(request)


def server_request_deadline(approval_timeout: float, turn_timeout: float) -> float:
    """AppServer's bound on one server request: past every wait for a person (0 = until the turn limit)."""
    return max(approval_timeout, turn_timeout) + DEADLINE_MARGIN_S


def prompt_parts(text: str, pending: PendingApproval) -> list[Part]:
    """The ``input-required`` message: readable text, then the structured request and allowed answers."""
    data = json_format.ParseDict(_jsonable(pending.prompt_data), struct_pb2.Value())
    return [Part(text=text), Part(data=data)]


def reply_of(message: Message | None) -> tuple[str, list[Any]]:
    """The text (text parts joined) and the data-part values of a person's reply."""
    if message is None:
        return "", []
    texts = [part.text for part in message.parts if part.WhichOneof("content") == "text"]
    data = [json_format.MessageToDict(part.data) for part in message.parts if part.WhichOneof("content") == "data"]
    return "\n".join(texts), data


def _jsonable(value: Any) -> Any:
    """codex's params as protobuf ``Value`` accepts them (ids and other scalars kept, the rest as text)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
