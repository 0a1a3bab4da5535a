"""Token usage where the Molecule platform counts it, in numbers its Go proxy can decode.

The platform's A2A proxy reads ``result.usage`` (then a top-level ``usage``) of a JSON-RPC reply
as int64 ``{"input_tokens": N, "output_tokens": N}``; it never reads ``result.metadata.usage``.
a2a-sdk has no ``usage`` field (Tasks and Messages carry only ``metadata``), and ``metadata`` is a
protobuf ``Struct`` whose numbers are doubles, so the SDK writes ``16743.0``, which Go cannot
decode into an int64 either. Nothing the executor puts into metadata can change that: the only
place to fix it is the JSON text, after the SDK made it. A host that owns the HTTP layer passes
its JSON-RPC endpoint through :func:`counted` and every task/message reply gets

* whole numbers written as integers (``16743``, not ``16743.0``) everywhere in ``result``, and
* for ``message/send`` (v0.3) and ``SendMessage`` (v1): ``result.usage`` with the turn's
  ``input_tokens`` / ``output_tokens``, copied from the reply's ``metadata.usage``.

SDK clients ignore the extra member (v1: ``parse_lenient``; v0.3: pydantic ignores unknown keys).
Streams (SSE) are left as the SDK writes them: the platform's proxy relays non-streaming replies.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

#: ``request.state`` attribute under which the host's call-context builder leaves the SDK's
#: call context, whose ``state["method"]`` names the JSON-RPC method (v0.3 or v1 spelling).
CALL_CONTEXT_ATTR = "a2a_call_context"
#: Methods whose reply is a turn's outcome: these get ``result.usage``.
SEND_METHODS = frozenset({"message/send", "SendMessage"})
#: Methods whose replies are rewritten at all (tasks and messages; the rest carry no metadata).
TASK_METHODS = SEND_METHODS | {"tasks/get", "GetTask", "tasks/cancel", "CancelTask", "ListTasks"}
USAGE_FIELDS = ("input_tokens", "output_tokens")

Endpoint = Callable[[Request], Awaitable[Response]]


def whole_numbers(value: Any) -> Any:
    """``value`` with every finite whole float written as an int (JSON numbers mean the same;
    strict integer readers such as Go's int64 accept only the int spelling)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    return value


def reply_usage(result: Mapping[str, Any]) -> dict[str, int] | None:
    """``{input_tokens, output_tokens}`` from a send reply's metadata (v0.3: the Task or Message
    itself; v1: under ``task`` / ``message``; either: its status message as a fallback)."""
    for holder in _metadata_holders(result):
        metadata = holder.get("metadata")
        usage = metadata.get("usage") if isinstance(metadata, Mapping) else None
        if not isinstance(usage, Mapping):
            continue
        counts = {name: usage.get(name) for name in USAGE_FIELDS}
        if all(_is_count(count) for count in counts.values()):
            return {name: int(count) for name, count in counts.items()}
    return None


def _metadata_holders(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    holders: list[Mapping[str, Any]] = []
    for candidate in (result, result.get("task"), result.get("message")):
        if isinstance(candidate, Mapping):
            holders.append(candidate)
            status = candidate.get("status")
            message = status.get("message") if isinstance(status, Mapping) else None
            if isinstance(message, Mapping):
                holders.append(message)
    return holders


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def with_usage(body: Mapping[str, Any], method: str | None) -> dict[str, Any]:
    """A JSON-RPC reply body rewritten for strict readers (see the module docstring)."""
    rewritten = dict(body)
    result = body.get("result")
    if not isinstance(result, dict):
        return rewritten
    result = whole_numbers(result)
    if method in SEND_METHODS and "usage" not in result:
        usage = reply_usage(result)
        if usage is not None:
            result["usage"] = usage
    rewritten["result"] = result
    return rewritten


def counted(endpoint: Endpoint) -> Endpoint:
    """Wrap the SDK's JSON-RPC endpoint so task and message replies carry countable usage."""

    async def handle(request: Request) -> Response:
        response = await endpoint(request)
        if not isinstance(response, JSONResponse):
            return response  # SSE streams and non-JSON answers pass untouched
        call = getattr(request.state, CALL_CONTEXT_ATTR, None)
        method = call.state.get("method") if call is not None else None
        if method not in TASK_METHODS:
            return response
        body = json.loads(response.body)
        if not isinstance(body, dict) or "result" not in body:
            return response
        return JSONResponse(
            with_usage(body, method), status_code=response.status_code, background=response.background
        )

    return handle
