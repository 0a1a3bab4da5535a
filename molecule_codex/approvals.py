"""A person in the loop: codex's approval requests as questions, and a person's reply as codex's answer.

Job: turn the four server→client requests that want a human (a command, a file change, an MCP
tool call or other MCP elicitation, and Plan-mode ``request_user_input``) into a prompt a person can
read (plain text, because the platform chat shows only text) plus a structured data dict for A2A
clients; parse the person's reply; produce the exact JSON-RPC result codex 0.163 expects. It speaks
codex only (no a2a import), so the executor owns every A2A event.

Answer shapes, checked against ``codex app-server generate-json-schema`` of the pinned 0.163 binary
and exercised in tests/test_approvals.py:

=================================== ============================================================
request                             result
=================================== ============================================================
item/commandExecution/requestApproval ``{"decision": "accept" | "acceptForSession" | "decline" | "cancel"}``
item/fileChange/requestApproval     same four decisions (the diff is in the preceding ``fileChange``
                                    item, not in the request: :class:`FileChangeTracker` keeps it)
mcpServer/elicitation/request       ``{"action": "accept" | "decline" | "cancel", "content": …, "_meta": …}``;
                                    "for session" = accept with ``_meta: {"persist": "session"}``
item/tool/requestUserInput          ``{"answers": {"<question id>": {"answers": ["…"]}}}``
=================================== ============================================================

``decline`` lets the turn carry on without the action (the model is told it was rejected);
``cancel`` also interrupts the turn. The binary accepts ``acceptForSession`` for commands even when
``availableDecisions`` does not list it.

Contract for the executor (the integration is mechanical):

1. Feed every notification of a conversation's thread to that conversation's
   :meth:`FileChangeTracker.observe` (cheap; keeps the last ``TRACKED_FILE_CHANGES`` items).
2. In the AppServer policy, for a request with :func:`needs_person` true, build
   ``pending = await PendingApproval.from_request(request, tracker)`` and make it the conversation's
   pending approval. Then set the running task to ``input-required`` with a message of two parts:
   text ``pending.prompt_text`` and data ``pending.prompt_data``. Await
   ``pending.wait(effective_timeout(approval_timeout, turn_time_left))`` and return
   ``resolution.answer`` to AppServer (it sends exactly one answer per request). AppServer's own
   ``server_request_deadline`` must exceed that wait, or AppServer declines first.
3. The answer arrives as a new A2A message with the **same taskId**. Hand its text and data parts
   to ``pending.offer(text, data_parts)``. ``accepted`` → the waiting policy resumes; set the task
   back to ``working`` and stream on. Not accepted → keep the task ``input-required`` and send
   ``reply.reprompt`` as the status message (never decline silently).
4. No answer in time: ``resolution.how == "timeout"``; codex got a decline; append
   ``resolution.sentence`` to the turn's final text.
5. CancelTask while waiting: call ``pending.cancel()`` (codex gets ``cancel``, which interrupts the
   turn), then interrupt/settle the task CANCELED as for any cancel.
6. A message on the same contextId but a new task while an approval waits follows ``on_busy``;
   mention ``pending.waiting_line()`` in that task's status.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from molecule_codex.app_server import Notification
from molecule_codex.server_requests import (
    ASKING_POLICIES,
    COMMAND_APPROVAL,
    FILE_CHANGE_APPROVAL,
    MCP_ELICITATION,
    Answer,
    ServerRequest,
)

logger = logging.getLogger(__name__)

USER_INPUT = "item/tool/requestUserInput"
#: The server requests a person can answer.
PERSON_METHODS = frozenset({COMMAND_APPROVAL, FILE_CHANGE_APPROVAL, MCP_ELICITATION, USER_INPUT})
#: fileChange items remembered per conversation (an approval follows its item within milliseconds).
TRACKED_FILE_CHANGES = 64
#: How long a file-change prompt waits for its item to be observed. The item is already in the
#: thread's subscription buffer when the request arrives; this only covers the consumer's lag.
ITEM_WAIT_S = 2.0
#: Diff text quoted in a prompt; the data part carries the full diff.
PROMPT_DIFF_CHARS = 2000
#: Command / argument text quoted in a prompt.
PROMPT_VALUE_CHARS = 500
#: The marker clients can key on in the data part.
DATA_TYPE = "codex.approval"

Kind = Literal["command", "fileChange", "mcpTool", "elicitation", "userInput"]
Decision = Literal["approve", "approve_for_session", "deny"]

#: Reply words, compared after lower-casing, trimming and dropping trailing punctuation.
_APPROVE_WORDS = frozenset({"approve", "approved", "yes", "y", "accept", "allow", "ok"})
_SESSION_WORDS = frozenset(
    {"approve for session", "approve for this session", "yes for session", "accept for session", "allow for session"}
)
_DENY_WORDS = frozenset({"deny", "denied", "no", "n", "decline", "reject"})
#: Data-part ``decision`` values: ours, and codex's own spellings.
_DATA_DECISIONS: dict[str, Decision] = {
    "approve": "approve",
    "accept": "approve",
    "approve_for_session": "approve_for_session",
    "approve for session": "approve_for_session",
    "acceptforsession": "approve_for_session",
    "deny": "deny",
    "decline": "deny",
}
_ANSWER_LABELS: dict[Decision, str] = {
    "approve": "approve",
    "approve_for_session": "approve for session",
    "deny": "deny",
}
_TRAILING_PUNCTUATION = re.compile(r"[\s.!]+$")


def needs_person(request: ServerRequest, *, approval_policy: str, trusted_mcp_servers: frozenset[str]) -> bool:
    """Whether this request should wait for a person instead of the automatic policy.

    Only under an asking policy (``on-request``/``untrusted``); tool calls of trusted MCP servers
    (the platform's own) stay automatic, as :class:`server_requests.ServerRequestPolicy` accepts them.
    """
    if request.method not in PERSON_METHODS or approval_policy not in ASKING_POLICIES:
        return False
    if request.method == MCP_ELICITATION:
        return not (request.params.get("serverName") in trusted_mcp_servers and _is_tool_approval(request.params))
    return True


def effective_timeout(approval_timeout: float, turn_time_left: float) -> float:
    """How long to wait for a person: ``approval_timeout`` (0 = until the turn limit), never past the turn limit."""
    if approval_timeout <= 0:
        return max(0.0, turn_time_left)
    return max(0.0, min(approval_timeout, turn_time_left))


class FileChangeTracker:
    """The latest ``fileChange`` items of one conversation, by item id.

    codex puts the diff in the ``fileChange`` item (``item/started``) and sends only its ``itemId``
    in the approval request that follows, so the prompt needs this lookup.
    """

    def __init__(self, limit: int = TRACKED_FILE_CHANGES) -> None:
        self._limit = limit
        self._items: collections.OrderedDict[str, list[Mapping[str, Any]]] = collections.OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def observe(self, event: Notification) -> None:
        """Remember the changes of a ``fileChange`` item from ``item/started`` or ``item/completed``."""
        if event.method not in ("item/started", "item/completed"):
            return
        item = event.params.get("item")
        if not isinstance(item, Mapping) or item.get("type") != "fileChange":
            return
        item_id, changes = item.get("id"), item.get("changes")
        if not isinstance(item_id, str) or not isinstance(changes, list):
            return
        self._items[item_id] = [change for change in changes if isinstance(change, Mapping)]
        self._items.move_to_end(item_id)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)
        for waiter in self._waiters.pop(item_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def changes(self, item_id: str) -> list[Mapping[str, Any]]:
        """The file changes of ``item_id`` (empty when unknown)."""
        return list(self._items.get(item_id, ()))

    async def wait_changes(self, item_id: str, timeout: float = ITEM_WAIT_S) -> list[Mapping[str, Any]]:
        """The changes of ``item_id``, waiting up to ``timeout`` s for the item to be observed.

        The approval request is handled on its own task while the item that precedes it may still
        sit unread in the subscription; an unknown item after the wait gives an empty list.
        """
        if item_id not in self._items:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(item_id, []).append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                logger.warning("fileChange item %s not seen within %gs; prompting without its diff", item_id, timeout)
            finally:
                waiters = self._waiters.get(item_id)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[item_id]
        return self.changes(item_id)


@dataclass(frozen=True, slots=True)
class FileSummary:
    """One changed file, counted for a person."""

    path: str
    kind: str  # add | delete | update | move
    added: int
    removed: int
    diff: str

    def line(self) -> str:
        return f"{self.kind} {self.path} (+{self.added} -{self.removed})"

    def to_data(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "added": self.added, "removed": self.removed, "diff": self.diff}


def summarize_change(change: Mapping[str, Any]) -> FileSummary:
    """Count a ``FileUpdateChange``: an ``add`` diff is the new content, an ``update`` a unified diff."""
    kind_info = change.get("kind") if isinstance(change.get("kind"), Mapping) else {}
    kind = str(kind_info.get("type") or "update")
    path = str(change.get("path") or "?")
    if kind == "update" and kind_info.get("move_path"):
        kind, path = "move", f"{path} -> {kind_info['move_path']}"
    diff = str(change.get("diff") or "")
    lines = diff.splitlines()
    if kind == "add":
        added, removed = len(lines), 0
    elif kind == "delete":
        added, removed = 0, len(lines)
    else:
        added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
        removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    return FileSummary(path=path, kind=kind, added=added, removed=removed, diff=diff)


@dataclass(frozen=True, slots=True)
class ReplyResult:
    """What :meth:`PendingApproval.offer` made of a reply: an accepted answer, or a re-prompt."""

    accepted: bool
    summary: str  # what was decided ("approve", "deny", "answers") or why not
    reprompt: str = ""


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a pending approval ended and what codex was told."""

    answer: Answer
    how: Literal["answered", "timeout", "cancelled"]
    sentence: str = ""  # for the final text when a person did not decide


@dataclass(eq=False)
class PendingApproval:
    """One server request waiting for a person; resolved exactly once (answer, timeout or cancel)."""

    request: ServerRequest
    kind: Kind
    prompt_text: str
    prompt_data: dict[str, Any]
    allowed: tuple[Decision, ...]
    questions: tuple[Mapping[str, Any], ...] = ()
    created_at: float = field(default_factory=time.monotonic)
    _future: asyncio.Future[Answer] | None = field(default=None, repr=False)
    _how: Literal["answered", "timeout", "cancelled"] = field(default="answered", repr=False)

    # ------------------------------------------------------------------ building

    @classmethod
    async def from_request(cls, request: ServerRequest, tracker: FileChangeTracker | None = None) -> PendingApproval:
        """Describe ``request`` for a person; ``tracker`` supplies a file change's diff (bounded wait)."""
        params = request.params
        if request.method == COMMAND_APPROVAL:
            return cls._command(request, params)
        if request.method == FILE_CHANGE_APPROVAL:
            changes = await tracker.wait_changes(str(params.get("itemId"))) if tracker is not None else []
            return cls._file_change(request, params, [summarize_change(change) for change in changes])
        if request.method == MCP_ELICITATION:
            return cls._elicitation(request, params)
        if request.method == USER_INPUT:
            return cls._user_input(request, params)
        raise ValueError(f"not a request a person answers: {request.method}")

    @classmethod
    def _command(cls, request: ServerRequest, params: Mapping[str, Any]) -> PendingApproval:
        command = str(params.get("command") or "(command not given)")
        cwd = str(params.get("cwd") or "?")
        what = f"Codex wants to run a command:\n  {_clip(command, PROMPT_VALUE_CHARS)}\nin {cwd}"
        allowed: tuple[Decision, ...] = ("approve", "approve_for_session", "deny")
        data = {"command": command, "cwd": cwd}
        return cls._build(request, "command", what=what, why=_reason(params), details=data, allowed=allowed)

    @classmethod
    def _file_change(
        cls, request: ServerRequest, params: Mapping[str, Any], files: list[FileSummary]
    ) -> PendingApproval:
        if files:
            listing = "\n".join(f"  {summary.line()}" for summary in files)
            diff = _clip("\n".join(f"--- {summary.path}\n{summary.diff}" for summary in files), PROMPT_DIFF_CHARS)
            what = f"Codex wants to change {len(files)} file(s):\n{listing}\n\nDiff:\n{diff}"
        else:
            what = "Codex wants to change files (their diff was not seen)."
        if params.get("grantRoot"):
            what += f"\nIt also asks to write under {params['grantRoot']} for the rest of this session."
        data = {"files": [summary.to_data() for summary in files], "grantRoot": params.get("grantRoot")}
        allowed: tuple[Decision, ...] = ("approve", "approve_for_session", "deny")
        return cls._build(request, "fileChange", what=what, why=_reason(params), details=data, allowed=allowed)

    @classmethod
    def _elicitation(cls, request: ServerRequest, params: Mapping[str, Any]) -> PendingApproval:
        server = str(params.get("serverName") or "?")
        meta = params.get("_meta") if isinstance(params.get("_meta"), Mapping) else {}
        message = str(params.get("message") or "")
        if _is_tool_approval(params):
            tool = str(meta.get("tool_name") or _quoted_tool(message) or "?")
            arguments = meta.get("tool_params")
            what = f'Codex wants to call the MCP tool "{tool}" of server "{server}"'
            if arguments:
                what += f" with arguments:\n  {_clip(_compact_json(arguments), PROMPT_VALUE_CHARS)}"
            description = meta.get("tool_description")
            why = f"{message}\nTool description: {description}" if description else message
            persist = meta.get("persist") or ()
            allowed: tuple[Decision, ...] = (
                ("approve", "approve_for_session", "deny") if "session" in persist else ("approve", "deny")
            )
            data = {"server": server, "tool": tool, "arguments": arguments}
            return cls._build(request, "mcpTool", what=what, why=why, details=data, allowed=allowed)
        schema = params.get("requestedSchema")
        fields = sorted(schema.get("properties") or {}) if isinstance(schema, Mapping) else []
        what = f'The MCP server "{server}" asks: {message or "(no message)"}'
        if params.get("url"):
            what += f"\nLink: {params['url']}"
        if fields:
            what += (
                f"\nIt wants these fields: {', '.join(fields)}. Send them as a data part "
                '{"decision": "approve", "content": {...}}.'
            )
        data = {"server": server, "message": message, "fields": fields, "mode": params.get("mode")}
        return cls._build(request, "elicitation", what=what, why="", details=data, allowed=("approve", "deny"))

    @classmethod
    def _user_input(cls, request: ServerRequest, params: Mapping[str, Any]) -> PendingApproval:
        questions = tuple(q for q in params.get("questions") or () if isinstance(q, Mapping) and q.get("id"))
        lines = []
        for number, question in enumerate(questions, 1):
            options = [str(option.get("label")) for option in question.get("options") or () if option.get("label")]
            line = f"  {number}. {question.get('question') or question.get('header') or question['id']}"
            if options:
                line += f" (options: {', '.join(options)})"
            lines.append(line)
        what = "Codex asks:\n" + "\n".join(lines)
        how = (
            "Reply with your answer."
            if len(questions) == 1
            else 'Reply with one answer per line, in order, or a data part {"answers": {"<question id>": "<answer>"}}.'
        )
        data = {"questions": [dict(q) for q in questions]}
        return cls._build(
            request, "userInput", what=what, why="", details=data, allowed=(), how=how, questions=questions
        )

    @classmethod
    def _build(
        cls,
        request: ServerRequest,
        kind: Kind,
        *,
        what: str,
        why: str,
        details: dict[str, Any],
        allowed: tuple[Decision, ...],
        how: str = "",
        questions: tuple[Mapping[str, Any], ...] = (),
    ) -> PendingApproval:
        how = how or "Reply " + " / ".join(_ANSWER_LABELS[decision] for decision in allowed) + "."
        text = what + (f"\nWhy: {why}" if why else "") + f"\n{how}"
        data = {
            "type": DATA_TYPE,
            "kind": kind,
            "method": request.method,
            "requestId": str(request.id),
            "threadId": request.params.get("threadId"),
            "turnId": request.params.get("turnId"),
            "itemId": request.params.get("itemId"),
            "reason": why or None,
            **details,
            "allowedAnswers": [_ANSWER_LABELS[decision] for decision in allowed],
            "answerWith": (
                {"data": {"answers": {"<question id>": "<answer>"}}}
                if kind == "userInput"
                else {"text": [_ANSWER_LABELS[d] for d in allowed], "data": {"decision": list(allowed)}}
            ),
            "request": dict(request.params),
        }
        return cls(request=request, kind=kind, prompt_text=text, prompt_data=data, allowed=allowed, questions=questions)

    # ------------------------------------------------------------------ answering

    @property
    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def _resolve(self, answer: Answer, how: Literal["answered", "timeout", "cancelled"]) -> bool:
        future = self._ensure_future()
        if future.done():
            return False
        self._how = how
        future.set_result(answer)
        return True

    def _ensure_future(self) -> asyncio.Future[Answer]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def offer(self, text: str, data_parts: Sequence[Any] = ()) -> ReplyResult:
        """Try a person's reply (message text and data-part values); resolve on a valid answer."""
        if self.done:
            return ReplyResult(False, "already answered", "This request was already answered.")
        answer = self._answer_from_data(data_parts) or self._answer_from_text(text)
        if answer is None:
            return ReplyResult(False, "not an answer", self._reprompt(text))
        self._resolve(answer, "answered")
        logger.info(
            "approval %s id=%s thread=%s answered: %s",
            self.request.method,
            self.request.id,
            self.request.thread_id or "-",
            answer.summary,
        )
        return ReplyResult(True, answer.summary)

    async def wait(self, timeout: float) -> Resolution:
        """Wait for :meth:`offer` or :meth:`cancel`; after ``timeout`` s codex gets a decline."""
        future = self._ensure_future()
        try:
            answer = await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.CancelledError:
            # Our waiter is gone (AppServer's own deadline, shutdown): AppServer declines on its
            # behalf, so a late reply must not be reported as accepted.
            self._resolve(self.decline_answer("wait cancelled"), "timeout")
            raise
        except TimeoutError:
            if self._resolve(self.decline_answer(f"no answer within {timeout:g}s"), "timeout"):
                logger.info("approval %s id=%s timed out after %gs", self.request.method, self.request.id, timeout)
            answer = future.result()  # ours, or an answer that won the race at the last moment
        sentence = self.timeout_sentence(timeout) if self._how == "timeout" else ""
        return Resolution(answer, self._how, sentence)

    def cancel(self) -> bool:
        """Tell codex ``cancel`` (the turn is interrupted); False if already resolved."""
        return self._resolve(self.cancel_answer(), "cancelled")

    def waiting_line(self) -> str:
        """One sentence for another task's status while this one waits."""
        first = self.prompt_text.splitlines()[0].rstrip(":")
        return f"Waiting for an answer on an earlier request: {first}."

    def timeout_sentence(self, timeout: float) -> str:
        """What the final text says when nobody answered."""
        return f"No answer to codex's request within {timeout:g} seconds, so it was declined."

    # ------------------------------------------------------------------ codex results

    def answer_for(self, decision: Decision, content: Mapping[str, Any] | None = None) -> Answer:
        """The codex result for a person's ``decision`` on this request."""
        if self.kind in ("command", "fileChange"):
            wire = {"approve": "accept", "approve_for_session": "acceptForSession", "deny": "decline"}[decision]
            return Answer(result={"decision": wire}, summary=wire)
        if self.kind in ("mcpTool", "elicitation"):
            if decision == "deny":
                return Answer(result={"action": "decline", "content": None, "_meta": None}, summary="decline")
            meta = {"persist": "session"} if decision == "approve_for_session" else None
            summary = "accept for session" if meta else "accept"
            return Answer(result={"action": "accept", "content": dict(content or {}), "_meta": meta}, summary=summary)
        raise ValueError(f"{self.kind} takes answers, not a decision")

    def decline_answer(self, why: str) -> Answer:
        """Codex's refusal for this request (timeouts): the turn carries on without the action."""
        if self.kind == "userInput":
            return Answer(result={"answers": {}}, summary=f"no answers ({why})")
        answer = self.answer_for("deny")
        return Answer(result=answer.result, summary=f"{answer.summary} ({why})")

    def cancel_answer(self) -> Answer:
        """Codex's ``cancel`` for this request: refuse and interrupt the turn."""
        if self.kind in ("command", "fileChange"):
            return Answer(result={"decision": "cancel"}, summary="cancel")
        if self.kind in ("mcpTool", "elicitation"):
            return Answer(result={"action": "cancel", "content": None, "_meta": None}, summary="cancel")
        return Answer(result={"answers": {}}, summary="cancel (no answers)")

    # ------------------------------------------------------------------ parsing

    def _answer_from_data(self, data_parts: Sequence[Any]) -> Answer | None:
        for value in data_parts:
            if not isinstance(value, Mapping):
                continue
            if self.kind == "userInput" and isinstance(value.get("answers"), Mapping):
                answers = self._answers_from_mapping(value["answers"])
                if answers is not None:
                    return answers
            decision = _DATA_DECISIONS.get(str(value.get("decision", "")).strip().lower())
            if decision is not None and decision in self.allowed:
                content = value.get("content") if isinstance(value.get("content"), Mapping) else None
                return self.answer_for(decision, content)
        return None

    def _answer_from_text(self, text: str) -> Answer | None:
        if self.kind == "userInput":
            return self._answers_from_text(text)
        word = _TRAILING_PUNCTUATION.sub("", " ".join(text.lower().split()))
        decision: Decision | None = None
        if word in _SESSION_WORDS:
            decision = "approve_for_session"
        elif word in _APPROVE_WORDS:
            decision = "approve"
        elif word in _DENY_WORDS:
            decision = "deny"
        if decision is None or decision not in self.allowed:
            return None
        return self.answer_for(decision)

    def _answers_from_mapping(self, raw: Mapping[str, Any]) -> Answer | None:
        answers: dict[str, dict[str, list[str]]] = {}
        for question in self.questions:
            value = raw.get(question["id"])
            if isinstance(value, str) and value.strip():
                answers[question["id"]] = {"answers": [value.strip()]}
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                answers[question["id"]] = {"answers": list(value)}
            else:
                return None
        return Answer(result={"answers": answers}, summary="answers")

    def _answers_from_text(self, text: str) -> Answer | None:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if not self.questions or len(lines) != len(self.questions):
            return None
        raw = {
            question["id"]: _match_option(question, line) for question, line in zip(self.questions, lines, strict=True)
        }
        return self._answers_from_mapping(raw)

    def _reprompt(self, text: str) -> str:
        shown = _clip(" ".join(text.split()), 80) or "(an empty message)"
        return f'"{shown}" is not an answer, and codex is still waiting.\n{self.prompt_text}'


def _match_option(question: Mapping[str, Any], line: str) -> str:
    """An option label matched case-insensitively, else the line as typed (codex allows "other")."""
    for option in question.get("options") or ():
        label = str(option.get("label") or "")
        if label and label.lower() == line.lower():
            return label
    return line


def _is_tool_approval(params: Mapping[str, Any]) -> bool:
    meta = params.get("_meta")
    return isinstance(meta, Mapping) and meta.get("codex_approval_kind") == "mcp_tool_call"


def _quoted_tool(message: str) -> str | None:
    """codex's tool-approval message names the tool in double quotes."""
    found = re.search(r'tool "([^"]+)"', message)
    return found.group(1) if found else None


def _reason(params: Mapping[str, Any]) -> str:
    reason = params.get("reason")
    return str(reason) if reason else ""


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
