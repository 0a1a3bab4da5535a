"""Chat commands end to end: each command as an A2A message through the served stack.

tests/a2a_rig.py serves the real executor (real a2a-sdk server and client, real codex binary,
scripted model). A command is an ordinary message; its answer completes the task.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from a2a.types import TaskState
from a2a_rig import Served, send, serve_codex, user_message

from molecule_codex.conversations import ConversationStore
from molecule_codex.demo.scripted_model import REVIEW_FINDING_TITLE, ScriptedModel

pytestmark = [pytest.mark.real_codex, pytest.mark.timeout(90)]

COMPLETED = TaskState.TASK_STATE_COMPLETED



class Chat:
    """One conversation (one contextId) over a blocking A2A client."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.context_id = str(uuid.uuid4())

    async def say(self, text: str, metadata: dict[str, Any] | None = None) -> tuple[int, str]:
        """The task's final state and answer text."""
        message = user_message(text, context_id=self.context_id)
        if metadata:
            message.metadata.update(metadata)
        [item] = await send(await self.served.client(streaming=False), message)
        task = item.task
        return task.status.state, "".join(part.text for part in task.artifacts[0].parts)

    async def answer(self, text: str, metadata: dict[str, Any] | None = None) -> str:
        state, reply = await self.say(text, metadata)
        assert state == COMPLETED, reply
        return reply


def sent(model: ScriptedModel) -> tuple[str, str | None]:
    """The model and reasoning effort of the last model request."""
    body = model.requests[-1].body
    return body["model"], (body.get("reasoning") or {}).get("effort")


async def test_help_unknown_status_and_the_card(model: ScriptedModel, tmp_path: Path) -> None:
    async with serve_codex(tmp_path, model) as served:
        chat = Chat(served)
        help_text = await chat.answer("/help")
        unknown = await chat.answer("/frobnicate now")
        before = await chat.answer("/status")
        assert await chat.answer("hello") == "echo: hello"
        after = await chat.answer("/status")
        card = (await served.http().get("/.well-known/agent-card.json")).json()

    assert help_text.startswith("Commands:\n/new - ")
    assert unknown.startswith("Unknown command /frobnicate. Commands:\n")
    assert before.startswith("thread: none yet\nmodel: scripted-model\n")
    thread_id = ConversationStore(served.state_dir).get(chat.context_id)
    assert after.startswith(f"thread: {thread_id}\n")
    assert "tokens: 0 in" not in after and "queued messages: 0" in after
    assert "approvals: never" in after
    assert [skill["id"] for skill in card["skills"]] == ["codex", "chat-commands", "code-review", "approvals"]


async def test_new_then_a_message_has_no_earlier_history(model: ScriptedModel, tmp_path: Path) -> None:
    async with serve_codex(tmp_path, model) as served:
        chat = Chat(served)
        await chat.answer("remember the word apple")
        store = ConversationStore(served.state_dir)
        old = store.get(chat.context_id)
        started_over = await chat.answer("/new")
        assert store.get(chat.context_id) is None  # the persisted binding is gone too
        await chat.answer("which word did I say?")
        new = store.get(chat.context_id)
        rollouts = list((served.codex_home / "sessions").rglob("*.jsonl"))

    assert started_over == (
        f"Started over: your next message goes to a fresh codex thread. The previous thread ({old}) stays on disk."
    )
    assert new not in (None, old)
    assert model.requests[-1].all_user_texts == ["which word did I say?"]
    assert any("remember the word apple" in path.read_text() for path in rollouts)  # the old one stays on disk


async def test_model_and_effort_are_sticky_and_metadata_overrides_one_message(
    model: ScriptedModel, tmp_path: Path
) -> None:
    async with serve_codex(tmp_path, model) as served:
        chat = Chat(served)
        unknown = await chat.answer("/model gpt-imaginary")
        assert unknown.startswith('"gpt-imaginary" is not one of the models codex knows: ')
        assert "gpt-5.5" in unknown
        await chat.answer("one")
        assert sent(model) == ("scripted-model", None)  # the configured model, not in codex's catalog

        assert await chat.answer("/model gpt-5.5") == "Model for this conversation: gpt-5.5."
        await chat.answer("two")
        assert sent(model) == ("gpt-5.5", "medium")  # the catalog default effort
        assert await chat.answer("/effort high") == "Reasoning effort for this conversation: high."
        await chat.answer("three")
        assert sent(model) == ("gpt-5.5", "high")
        await chat.answer("four", {"reasoning_effort": "low"})
        assert sent(model) == ("gpt-5.5", "low")
        await chat.answer("five")
        assert sent(model) == ("gpt-5.5", "high")  # the override was for one message
        refused_effort = await chat.answer("/effort ultra")
        state, refused_model = await chat.say("six", {"model": "gpt-imaginary"})
        status = await chat.answer("/status")

    assert refused_effort.startswith('"ultra" is not a reasoning effort gpt-5.5 supports')
    assert state == TaskState.TASK_STATE_REJECTED
    assert refused_model.startswith('"gpt-imaginary" is not one of the models codex knows')
    assert "model: gpt-5.5\nreasoning effort: high\n" in status


async def test_model_and_effort_are_sent_when_they_change_and_stay_in_effect(
    model: ScriptedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """codex keeps a turn's model and effort for later turns; sending them again costs every turn."""
    async with serve_codex(tmp_path, model) as served:
        starts: list[dict[str, Any]] = []
        real_request = served.app.request

        async def recording(method: str, params: Any = None, **kwargs: Any) -> Any:
            if method == "turn/start":
                starts.append(dict(params))
            return await real_request(method, params, **kwargs)

        monkeypatch.setattr(served.app, "request", recording)
        chat = Chat(served)
        await chat.answer("/model gpt-5.5")
        for text in ("one", "two", "three"):
            await chat.answer(text)
            assert sent(model) == ("gpt-5.5", "medium")  # in effect on every turn
        await chat.answer("four", {"reasoning_effort": "low"})
        assert sent(model) == ("gpt-5.5", "low")
        await chat.answer("five")
        assert sent(model) == ("gpt-5.5", "medium")

    chosen = [(start.get("model"), start.get("effort")) for start in starts]
    assert chosen == [("gpt-5.5", "medium"), (None, None), (None, None), ("gpt-5.5", "low"), ("gpt-5.5", "medium")]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


async def test_compact_and_review(model: ScriptedModel, tmp_path: Path) -> None:
    async with serve_codex(tmp_path, model) as served:
        cwd = served.workspace
        git(cwd, "init", "-q", "-b", "main")
        git(cwd, "config", "user.email", "test@example.com")
        git(cwd, "config", "user.name", "test")
        (cwd / "app.py").write_text("print('v1')\n")
        git(cwd, "add", ".")
        git(cwd, "commit", "-qm", "first version")
        (cwd / "app.py").write_text("print('v2')\n")
        chat = Chat(served)
        nothing = await chat.answer("/compact")
        await chat.answer("remember the word apple")
        compacted = await chat.answer("/compact")
        compaction_prompt = model.requests[-1].last_user_text
        review = await chat.answer("/review")
        after = await chat.answer("and now?")
        not_a_ref = await chat.answer("/review nonsense")

    assert nothing == "Nothing to compact yet: this conversation has no history."
    assert compacted == "Compacted this conversation: codex replaced its history with a summary."
    assert compaction_prompt.startswith("You are performing a CONTEXT CHECKPOINT COMPACTION")
    assert REVIEW_FINDING_TITLE in review and "Review the current code changes" in review
    assert after == "echo: and now?"  # the router ignored the compaction and review turns
    assert not_a_ref.startswith('"nonsense" is neither a branch nor a commit')
