"""Answers to codex's server→client requests (approvals, elicitations, anything else).

Invariant: every request codex sends us gets exactly one answer. An unanswered approval blocks
its turn forever, so ``AppServer`` wraps this policy in a deadline and falls back to
:func:`decline_answer` on timeout or on any error inside the policy.

The default is to decline: headless runs have nobody to ask, and auto-accepting lets a
``require_escalated`` command run outside the sandbox. The only thing accepted is a tool call
of a trusted MCP server (the platform's own ``molecule`` server), which codex routes through an
elicitation even under ``approvalPolicy: never``.

Answer shapes (checked against the 0.163 JSON schema):

* ``item/commandExecution/requestApproval`` and ``item/fileChange/requestApproval``:
  ``{"decision": "accept" | "decline" | "cancel"}``
* legacy ``execCommandApproval`` / ``applyPatchApproval``: ``{"decision": "approved" | "denied"}``
* ``mcpServer/elicitation/request``: ``{"action": "accept" | "decline", "content": …, "_meta": None}``
* anything else: a JSON-RPC error, which codex treats as a denial (never silence).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

COMMAND_APPROVAL = "item/commandExecution/requestApproval"
FILE_CHANGE_APPROVAL = "item/fileChange/requestApproval"
LEGACY_APPROVALS = frozenset({"execCommandApproval", "applyPatchApproval"})
MCP_ELICITATION = "mcpServer/elicitation/request"

#: JSON-RPC "method not found": what an unsupported server request gets.
METHOD_NOT_HANDLED = -32601

#: Approval policies for which codex asks us before running commands.
ASKING_POLICIES = frozenset({"on-request", "untrusted"})


@dataclass(frozen=True, slots=True)
class ServerRequest:
    """One request codex sent us; ``id`` is in codex's own id space (counts from 0)."""

    id: int | str
    method: str
    params: Mapping[str, Any]

    @property
    def thread_id(self) -> str | None:
        """The codex thread this request belongs to, if it says."""
        value = self.params.get("threadId") or self.params.get("conversationId")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Answer:
    """Either a ``result`` or an ``error`` object for a server request."""

    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None
    summary: str = ""  # one operator-readable word or phrase for the log line

    def to_wire(self, request_id: int | str) -> dict[str, Any]:
        """The JSON-RPC message that answers ``request_id``."""
        if self.error is not None:
            return {"id": request_id, "error": dict(self.error)}
        return {"id": request_id, "result": dict(self.result or {})}


def decline_answer(method: str, reason: str = "declined") -> Answer:
    """The safe refusal for ``method``: what codex receives when nobody may say yes."""
    if method in (COMMAND_APPROVAL, FILE_CHANGE_APPROVAL):
        return Answer(result={"decision": "decline"}, summary=f"decline ({reason})")
    if method in LEGACY_APPROVALS:
        return Answer(result={"decision": "denied"}, summary=f"denied ({reason})")
    if method == MCP_ELICITATION:
        return Answer(
            result={"action": "decline", "content": None, "_meta": None}, summary=f"decline ({reason})"
        )
    return Answer(
        error={"code": METHOD_NOT_HANDLED, "message": f"molecule-codex does not handle {method}: {reason}"},
        summary=f"error ({reason})",
    )


#: What a policy is to AppServer: anything that turns a request into an answer.
PolicyCallable = Callable[[ServerRequest], Awaitable[Answer]]


@dataclass(slots=True)
class ServerRequestPolicy:
    """Decides every server→client request for one app-server.

    ``approval_policy`` is the one the threads run with. Under ``never`` codex should not ask
    at all; if it does anyway we decline with a reason. Under the asking policies a person
    answers through :class:`person.PersonPolicy`, which falls back to this policy when no task
    waits for the request (a chat command's review turn, a task already gone): then commands and
    patches are declined; the turn carries on and the model sees the refusal.
    """

    approval_policy: str = "never"
    trusted_mcp_servers: frozenset[str] = field(default_factory=lambda: frozenset({"molecule"}))

    async def __call__(self, request: ServerRequest) -> Answer:
        """Answer one request; never raises for a well-formed request."""
        method = request.method
        if method in (COMMAND_APPROVAL, FILE_CHANGE_APPROVAL) or method in LEGACY_APPROVALS:
            why = (
                "no approver in a headless turn"
                if self.approval_policy in ASKING_POLICIES
                else f"approval policy is {self.approval_policy}"
            )
            return decline_answer(method, why)
        if method == MCP_ELICITATION:
            return self._elicitation(request)
        return decline_answer(method, "unsupported server request")

    def _elicitation(self, request: ServerRequest) -> Answer:
        """Accept tool-call approvals of trusted MCP servers; decline every other elicitation."""
        server = request.params.get("serverName")
        meta = request.params.get("_meta") or {}
        is_tool_approval = isinstance(meta, Mapping) and meta.get("codex_approval_kind") == "mcp_tool_call"
        if server in self.trusted_mcp_servers and is_tool_approval:
            return Answer(
                result={"action": "accept", "content": {}, "_meta": None},
                summary=f"accept (trusted MCP server {server})",
            )
        return decline_answer(MCP_ELICITATION, f"untrusted elicitation from {server or 'unknown server'}")
