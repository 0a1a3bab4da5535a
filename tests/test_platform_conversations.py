"""End to end: the April/May platform's senders (no contextId) keep their conversations.

Exact request bodies of the canvas, a channel and a delegation (see ``test_identity``) through the
served stack with ``WORKSPACE_ID`` set, the real codex and the scripted model: each sender's
history is kept across three messages, senders never see each other's turns, and the canvas's
``metadata.history`` seeds a brand-new thread once.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from a2a_rig import serve_codex
from test_identity import canvas_body, canvas_turn, channel_body, delegation_body

pytestmark = pytest.mark.real_codex

WS = "6f1c2a3b-0d4e-4f5a-9b8c-7d6e5f4a3b2c"



async def post(http: Any, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/", json=body)
    reply = response.json()
    assert reply.get("result", {}).get("status", {}).get("state") == "completed", json.dumps(reply)[:2000]
    return reply["result"]


async def test_each_sender_keeps_its_history_and_senders_are_isolated(tmp_path, model):
    async with serve_codex(tmp_path, model, workspace_id=WS) as served:
        http = served.http()
        said: dict[str, list[str]] = {"canvas": [], "channel": [], "peer": []}
        canvas_history: list[dict[str, Any]] = []
        for round_ in range(3):
            for sender in ("canvas", "channel", "peer"):
                text = f"{sender} message {round_} {uuid.uuid4().hex[:6]}"
                if sender == "canvas":
                    body = canvas_body(text, canvas_history)
                elif sender == "channel":
                    body = channel_body(text, message_id=str(round_))
                else:
                    body = delegation_body(text)
                await post(http, body)
                said[sender].append(text)
                # The model saw exactly this sender's turns, in order: nothing from the others.
                assert model.requests[-1].all_user_texts == said[sender], (sender, model.requests[-1].all_user_texts)
                if sender == "canvas":
                    canvas_history += [canvas_turn("user", text), canvas_turn("agent", f"echo: {text}")]


async def test_canvas_history_seeds_a_new_thread_once(tmp_path, model):
    """First message after an upgrade: the canvas brings turns codex never saw."""
    prior = [canvas_turn("user", "my name is Ada Quill"), canvas_turn("agent", "Hello Ada Quill")]
    async with serve_codex(tmp_path, model, workspace_id=WS) as served:
        http = served.http()
        await post(http, canvas_body("what is my name?", prior))
        # Counted in what codex sent as the user's words (the scripted echo repeats the prompt).
        first = "\n".join(model.requests[-1].all_user_texts)
        assert first.count("my name is Ada Quill") == 1, first[:3000]
        history = [*prior, canvas_turn("user", "what is my name?"), canvas_turn("agent", "echo")]
        await post(http, canvas_body("and again?", history))
        await post(http, canvas_body("once more?", [*history, canvas_turn("user", "and again?")]))
        last = "\n".join(model.requests[-1].all_user_texts)
        assert last.count("my name is Ada Quill") == 1, last[:3000]  # seeded once, never repeated
        assert model.requests[-1].all_user_texts[-2:] == ["and again?", "once more?"]
