"""``molecule-codex demo``: the whole path, offline, in one command.

A scripted model on loopback plays the LLM; everything else is real: ``serve`` on a free port
with the adapter's preflight, the pinned codex binary running a real shell command in a
temporary workspace, and the a2a-sdk client streaming the answer. Exit 0 when the answer
arrived and carries the line count codex really measured.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
from a2a.client import ClientCallContext, ClientConfig, create_client
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState

from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, RecordedRequest, ScriptedModel, Text, ToolCall
from molecule_codex.standalone import DEFAULT_CONFIG, serving

DEMO_FILES = {
    "notes.txt": "buy milk\ncall the plumber\nwrite the report\n",
    "ideas.txt": "a2a everywhere\ncodex in a box\n",
    "README.md": "# demo workspace\n\nA few files for codex to look at.\nNothing more.\n",
}
DEMO_COMMAND = "ls -1 && wc -l *.txt *.md"
DEMO_QUESTION = "Which files are in your workspace, and how many lines do they have in total?"
CLIENT_TIMEOUT_S = 120.0
_TOTAL_RE = re.compile(r"(\d+)\s+total")


def demo_responder(request: RecordedRequest) -> Text | ToolCall:
    """First ask codex to run the command; then answer from the output codex sent back."""
    outputs = request.tool_outputs_since_last_user()
    if not outputs:
        return ToolCall(DEMO_COMMAND)
    output = outputs[-1]
    listing = output.split("Output:\n", 1)[-1].strip()
    total = _TOTAL_RE.search(listing)
    summary = f"In total the files have {total.group(1)} lines." if total else "I could not find a total."
    return Text(f"I ran `{DEMO_COMMAND}` in the workspace. It printed:\n\n{listing}\n\n{summary}", chunks=12)


def _expected_total() -> int:
    return sum(text.count("\n") for text in DEMO_FILES.values())


async def run_demo() -> int:
    """Run the demo, print what a person wants to see, and return the exit code."""
    with tempfile.TemporaryDirectory(prefix="molecule-codex-demo-") as tmp, ScriptedModel(demo_responder) as model:
        root = Path(tmp)
        workspace = root / "workspace"
        workspace.mkdir()
        for name, text in DEMO_FILES.items():
            (workspace / name).write_text(text)
        args = argparse.Namespace(
            config=DEFAULT_CONFIG, state_dir=root / "state", workdir=workspace, base_url=model.base_url,
            api_key_env=SCRIPTED_API_KEY_ENV, model="scripted-model", host="127.0.0.1", port=0,
            token=None, task_store=None, max_body_bytes=None,
        )
        env = {**os.environ, SCRIPTED_API_KEY_ENV: "demo-key"}
        print(f"molecule-codex demo: scripted model at {model.base_url}, workspace {workspace}")
        async with serving(args, env=env) as running:
            print(f"A2A server on {running.url} (real codex, real a2a-sdk client)\n")
            print(f"user> {DEMO_QUESTION}")
            return await _ask(running.url)


async def _ask(url: str) -> int:
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as http:
        client = await create_client(url, client_config=ClientConfig(streaming=True, httpx_client=http))
        message = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=DEMO_QUESTION)])
        answer, state, usage, streaming = "", None, {}, False
        async for item in client.send_message(SendMessageRequest(message=message),
                                              context=ClientCallContext(timeout=CLIENT_TIMEOUT_S)):
            kind = item.WhichOneof("payload")
            if kind == "artifact_update":
                update = item.artifact_update
                text = "".join(part.text for part in update.artifact.parts)
                if update.last_chunk and not update.append:
                    answer = text  # the final, complete answer replaces the streamed chunks
                    continue
                if not streaming:
                    print("agent> ", end="")
                    streaming = True
                print(text, end="", flush=True)
            elif kind == "status_update":
                status = item.status_update.status
                state = status.state
                line = status.message.parts[0].text if status.message.parts else ""
                if state == TaskState.TASK_STATE_WORKING and line:
                    print(f"  [working] {line}")
                if item.status_update.metadata and "usage" in item.status_update.metadata:
                    usage = dict(item.status_update.metadata["usage"])
        print()
        print(f"[{TaskState.Name(state or 0).removeprefix('TASK_STATE_').lower()}] tokens: "
              f"input={int(usage.get('input_tokens', 0))} output={int(usage.get('output_tokens', 0))} "
              f"cached={int(usage.get('cached_input_tokens', 0))}")
    expected = f"{_expected_total()} lines"
    if state == TaskState.TASK_STATE_COMPLETED and expected in answer:
        print(f"demo OK: codex really ran the command and counted {expected}.")
        return 0
    print(f"demo FAILED: expected a completed task whose answer mentions {expected!r}", file=sys.stderr)
    return 1
