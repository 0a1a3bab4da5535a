"""A minimal stdio MCP server (stdlib only) that codex can start as ``[mcp_servers.<name>]`` in tests.

Why: approval tests need a real MCP tool call, which codex turns into an
``mcpServer/elicitation/request`` under ``approvalPolicy: on-request``. The ``mcp`` package is not a
dependency, and the protocol subset codex uses is small: ``initialize``, ``tools/list``,
``tools/call`` and ``ping`` over newline-delimited JSON-RPC. The one tool, ``save_note``, appends
its ``text`` argument to the file named by the ``NOTES_FILE`` env var, so a test can see whether the
call really ran.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TOOL_NAME = "save_note"
TOOL = {
    "name": TOOL_NAME,
    "description": "Save a short note.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}


def _result(params: dict[str, Any], method: str) -> dict[str, Any] | None:
    """The result for one request, or None for an unknown method."""
    if method == "initialize":
        return {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "mcp-stub", "version": "1.0"},
        }
    if method == "tools/list":
        return {"tools": [TOOL]}
    if method == "tools/call":
        text = str((params.get("arguments") or {}).get("text", ""))
        with open(os.environ["NOTES_FILE"], "a", encoding="utf-8") as notes:
            notes.write(text + "\n")
        return {"content": [{"type": "text", "text": f"saved: {text}"}], "isError": False}
    if method == "ping":
        return {}
    return None


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if "id" not in message or "method" not in message:
            continue  # notifications and responses need no answer
        result = _result(message.get("params") or {}, message["method"])
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
        if result is None:
            reply["error"] = {"code": -32601, "message": f"unknown method {message['method']}"}
        else:
            reply["result"] = result
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
