"""MCP server processes stay bounded on the April/May platform's canvas traffic (no contextId).

Before conversation identity, each canvas message started a new codex thread and each thread
started its own MCP server: 100 messages, 100 processes. Now the canvas is one conversation, so
its one thread keeps one MCP server however many messages arrive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from a2a_rig import serve_codex
from test_approvals import mcp_toml
from test_identity import canvas_body, canvas_turn

from molecule_codex.app_server import descendants

pytestmark = pytest.mark.real_codex

WS = "6f1c2a3b-0d4e-4f5a-9b8c-7d6e5f4a3b2c"
MESSAGES = 100
MCP_STUB = str(Path(__file__).resolve().parent / "mcp_stub_server.py")


def mcp_processes(root: int) -> list[int]:
    """Descendants of the app-server running the stub MCP server."""
    found = []
    for pid in descendants(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if MCP_STUB.encode() in cmdline:
            found.append(pid)
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")



async def test_hundred_canvas_messages_keep_one_mcp_server(tmp_path, model):
    async with serve_codex(tmp_path, model, workspace_id=WS, extra_toml=mcp_toml(tmp_path / "notes.txt")) as served:
        http = served.http()
        history: list[dict[str, str | list[dict[str, str]]]] = []
        counts, rss = [], []
        for n in range(MESSAGES):
            text = f"canvas message {n}"
            reply = (await http.post("/", json=canvas_body(text, history[-20:]))).json()
            assert reply["result"]["status"]["state"] == "completed", reply
            history += [canvas_turn("user", text), canvas_turn("agent", f"echo: {text}")]
            if n % 10 == 9:
                pid = served.app.pid
                assert pid is not None
                counts.append(len(mcp_processes(pid)))
                rss.append(rss_kib(pid))
        print(f"mcp servers every 10 messages: {counts}; app-server RSS KiB: {rss}", file=sys.stderr)
        assert max(counts) == 1, counts
        assert len(model.requests[-1].all_user_texts) == MESSAGES  # one conversation throughout
        # RSS flat: the last sample within 25% of the first (one thread growing its history only).
        assert rss[-1] <= rss[0] * 1.25, rss
