"""What callers receive on the wire: stored tasks, and the v0.3 JSON the Molecule platform reads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from a2a.types import GetTaskRequest, TaskState
from a2a_rig import send, serve_codex, user_message

from molecule_codex.demo.scripted_model import HttpError, Text

pytestmark = pytest.mark.real_codex

ANSWER = "The whole answer, streamed in several pieces."



def v03_send(text: str, message_id: str, *, method: str = "message/send", context_id: str | None = None) -> dict:
    message: dict[str, Any] = {"messageId": message_id, "role": "user", "parts": [{"kind": "text", "text": text}]}
    if context_id:
        message["contextId"] = context_id
    return {"jsonrpc": "2.0", "id": message_id, "method": method, "params": {"message": message}}


def sse_results(lines: list[str]) -> list[dict]:
    """The JSON-RPC ``result`` of every SSE data frame (fails on an error frame)."""
    results = []
    for line in lines:
        if line.startswith("data:"):
            frame = json.loads(line[5:])
            assert "error" not in frame, frame
            results.append(frame["result"])
    return results


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_get_task_after_blocking_send_matches_what_caller_got(tmp_path, model, outcome):
    model.enqueue(Text(ANSWER, chunks=5) if outcome == "completed" else HttpError(500))
    async with serve_codex(tmp_path, model) as served:
        client = await served.client(streaming=False)
        items = await send(client, user_message("go"))
        assert len(items) == 1
        received = items[0].task
        stored = await client.get_task(GetTaskRequest(id=received.id))
        expected_state = TaskState.TASK_STATE_COMPLETED if outcome == "completed" else TaskState.TASK_STATE_FAILED
        assert received.status.state == stored.status.state == expected_state
        assert stored.context_id == received.context_id
        received_text = received.status.message.parts[0].text
        assert stored.status.message.parts[0].text == received_text
        if outcome == "completed":
            assert received_text == ANSWER
            assert [[p.text for p in a.parts] for a in stored.artifacts] == [[ANSWER]]
            assert [[p.text for p in a.parts] for a in received.artifacts] == [[ANSWER]]
        else:
            assert "provider is unavailable" in received_text
            assert all(part.text != ANSWER for a in stored.artifacts for part in a.parts)
        assert stored.metadata["usage"]["input_tokens"] == received.metadata["usage"]["input_tokens"]


async def test_v03_message_send_without_version_header_gives_platform_shape(tmp_path, model):
    model.enqueue(Text(ANSWER, chunks=5))
    async with serve_codex(tmp_path, model) as served:
        http = served.http()
        response = await http.post("/", json=v03_send("hello", "m1"))
        assert response.status_code == 200
        body = response.json()
        shape = json.dumps(body, indent=1)[:3000]
        assert "error" not in body, shape
        result = body["result"]
        assert result["kind"] == "task", shape
        assert result["status"]["state"] == "completed", shape
        assert result["artifacts"][0]["parts"][0] == {"kind": "text", "text": ANSWER}, shape
        assert len(result["artifacts"]) == 1 and len(result["artifacts"][0]["parts"]) == 1, shape
        message = result["status"]["message"]
        assert message["role"] == "agent" and message["parts"][0]["text"] == ANSWER, shape
        usage = result["metadata"]["usage"]
        # protobuf Struct carries numbers as doubles: the platform gets 100.0, equal to 100.
        assert usage["input_tokens"] == model.requests[-1].usage.input_tokens, shape
        assert usage["output_tokens"] == model.requests[-1].usage.output_tokens, shape
        # A follow-up in the same context continues the conversation.
        again = await http.post("/", json=v03_send("and again", "m2", context_id=result["contextId"]))
        assert again.json()["result"]["status"]["state"] == "completed"
        assert again.json()["result"]["artifacts"][0]["parts"][0]["text"] == "echo: and again"
        assert model.requests[-1].all_user_texts == ["hello", "and again"]


async def test_v03_message_stream_without_version_header(tmp_path, model):
    # Spaced deltas: the executor merges deltas that arrive together, so only spacing makes pieces.
    model.enqueue(Text(ANSWER, chunks=5, chunk_delay=0.2))
    async with serve_codex(tmp_path, model) as served:
        http = served.http()
        async with http.stream("POST", "/", json=v03_send("hello", "m1", method="message/stream")) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines()]
        results = sse_results(lines)
        shape = json.dumps(results, indent=1)[:4000]
        assert results[0]["kind"] == "task" and results[0]["status"]["state"] == "submitted", shape
        text = ""
        chunks = 0
        for result in results:
            if result["kind"] == "artifact-update" and not result.get("lastChunk"):
                piece = "".join(part["text"] for part in result["artifact"]["parts"])
                text = text + piece if result.get("append") else piece
                chunks += 1
        assert chunks >= 2 and text == ANSWER, shape
        replaces = [r for r in results if r["kind"] == "artifact-update" and r.get("lastChunk")]
        assert [part["text"] for part in replaces[-1]["artifact"]["parts"]] == [ANSWER], shape
        final = results[-1]
        assert final["kind"] == "status-update" and final["final"] is True, shape
        assert final["status"]["state"] == "completed", shape
        assert final["status"]["message"]["parts"][0]["text"] == ANSWER, shape
        assert final["metadata"]["usage"]["output_tokens"] == 5, shape
        assert [r["kind"] for r in results].count("status-update") >= 2, shape  # working, then completed
