"""Chat commands and per-message overrides (:mod:`molecule_codex.commands`).

The ``real_codex`` tests run each command against the pinned binary and the scripted model through
:class:`Host`, a minimal :class:`commands.CommandHost` standing in for the executor's conversation
state (one bound thread, sticky model choice).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import codex_rig as rig
import pytest
from a2a.types import AgentCard

from molecule_codex import commands
from molecule_codex.app_server import AppServer
from molecule_codex.commands import Command, CommandError, ModelChoice, StatusInfo
from molecule_codex.demo.scripted_model import REVIEW_FINDING_TITLE, Hold, ScriptedModel, Text
from molecule_codex.turn import Usage

pytestmark = pytest.mark.timeout(40)

CATALOG_MODEL = "gpt-5.5"  # efforts low, medium (default), high, xhigh on the pinned catalog
COMMAND_TIMEOUT_S = 15.0


@dataclass
class Host:
    """The executor's conversation state, reduced to what commands need."""

    app: AppServer
    cwd: Path
    choice: ModelChoice = field(default_factory=ModelChoice)
    configured_model: str = CATALOG_MODEL
    configured_effort: str | None = None
    allow_any_model: bool = False
    bound: str | None = None
    queue_depth: int = 0

    def thread_id(self) -> str | None:
        return self.bound

    async def ensure_thread(self) -> str:
        if self.bound is None:
            self.bound, _ = await rig.start_thread(self.app, self.cwd)
        return self.bound

    async def reset_thread(self) -> str | None:
        old, self.bound = self.bound, None
        return old

    def status(self) -> StatusInfo:
        return StatusInfo(
            thread_id=self.bound,
            model=self.choice.model or self.configured_model,
            effort=self.choice.effort or self.configured_effort,
            sandbox="workspace-write",
            approval_policy="never",
            usage=Usage(input_tokens=300, output_tokens=12, cached_input_tokens=60),
            queue_depth=self.queue_depth,
        )

    async def run(self, text: str) -> str:
        command = commands.parse_command(text)
        assert command is not None, text
        return await commands.run_command(command, self, timeout=COMMAND_TIMEOUT_S)

    async def turn(self, text: str, metadata: dict[str, Any] | None = None) -> rig.TurnRecord:
        """A normal message: turn/start with this conversation's overrides (as the executor will)."""
        thread_id = await self.ensure_thread()
        catalog = await commands.model_catalog(self.app)
        params = {
            "threadId": thread_id,
            "input": [{"type": "text", "text": text}],
            **commands.turn_overrides(self, catalog, metadata),
        }
        sub = self.app.subscribe(thread_id)
        try:
            turn_id = (await self.app.request("turn/start", params, timeout=rig.REQUEST_TIMEOUT_S))["turn"]["id"]
            return await rig.collect_turn(sub, turn_id)
        finally:
            sub.close()



@pytest.fixture
async def host(tmp_path: Path, model: ScriptedModel) -> AsyncIterator[Host]:
    app = await rig.started_app_server(tmp_path, model)
    try:
        yield Host(app=app, cwd=rig.workspace(tmp_path))
    finally:
        await app.close()


# --------------------------------------------------------------------------- parsing and help


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/new", Command("new", "", "/new")),
        ("  /Review main ", Command("review", "main", "/Review main")),
        ("/model\ngpt-5.5", Command("model", "gpt-5.5", "/model\ngpt-5.5")),
        ("/frobnicate now", Command("", "now", "/frobnicate now")),
        ("/usr/bin/env is broken", None),
        ("please /compact", None),
        ("/", None),
        ("hello", None),
    ],
)
def test_parse_command(text: str, expected: Command | None) -> None:
    assert commands.parse_command(text) == expected


async def test_unknown_command_answers_with_the_list(host: Host) -> None:
    answer = await host.run("/frobnicate now")
    assert answer.startswith("Unknown command /frobnicate. Commands:\n/new - ")
    for name in commands.COMMANDS:
        assert f"\n/{name} - " in answer
    assert (await host.run("/help")).startswith("Commands:\n/new - ")


# --------------------------------------------------------------------------- /new (real binary)


@pytest.mark.real_codex
async def test_new_then_a_message_has_no_earlier_history(host: Host, model: ScriptedModel) -> None:
    first = await host.turn("remember the word apple")
    assert first.status == "completed"
    old = host.bound
    read = await host.app.request("thread/read", {"threadId": old}, timeout=rig.REQUEST_TIMEOUT_S)
    old_rollout = Path(read["thread"]["path"])

    answer = await host.run("/new")
    assert answer == (
        f"Started over: your next message goes to a fresh codex thread. The previous thread ({old}) stays on disk."
    )
    second = await host.turn("which word did I say?")

    assert second.status == "completed"
    assert host.bound not in (None, old)
    assert model.requests[-1].all_user_texts == ["which word did I say?"]
    kept = await asyncio.to_thread(old_rollout.read_text)  # the old thread stays on disk
    assert "remember the word apple" in kept
    assert await host.run("/new") != answer and host.bound is None
    assert (await host.run("/new")).startswith("This conversation has no codex thread yet")


# --------------------------------------------------------------------------- /compact (real binary)


@pytest.mark.real_codex
async def test_compact_summarizes_the_thread(host: Host, model: ScriptedModel) -> None:
    assert (await host.run("/compact")) == "Nothing to compact yet: this conversation has no history."
    await host.turn("remember the word apple")

    answer = await host.run("/compact")

    assert answer == "Compacted this conversation: codex replaced its history with a summary."
    assert model.requests[-1].last_user_text.startswith("You are performing a CONTEXT CHECKPOINT COMPACTION")
    after = await host.turn("and now?")
    assert after.status == "completed"
    history = "\n".join(model.requests[-1].all_user_texts)
    assert "echo: You are performing a CONTEXT CHECKPOINT COMPACTION" in history  # the summary replaced it
    assert model.requests[-1].last_user_text == "and now?"


@pytest.mark.real_codex
async def test_compact_past_its_bound_is_interrupted_and_the_thread_stays_usable(
    host: Host, model: ScriptedModel
) -> None:
    await host.turn("something to compact")
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(Hold(gate, Text("summary"), reached=reached))
    try:
        with pytest.raises(CommandError, match=r"did not finish thread/compact/start within 1 seconds"):
            await commands.run_compact(host.app, host.bound, timeout=1.0)
        assert reached.is_set()
    finally:
        gate.set()
    after = await host.turn("still here?")
    assert after.status == "completed" and after.final_text == "echo: still here?"


# --------------------------------------------------------------------------- /review (real binary)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(host: Host) -> Path:
    """The workspace as a git repo: one commit on main, a topic branch commit, an uncommitted edit."""
    cwd = host.cwd
    git(cwd, "init", "-q", "-b", "main")
    git(cwd, "config", "user.email", "test@example.com")
    git(cwd, "config", "user.name", "test")
    (cwd / "app.py").write_text("print('v1')\n")
    git(cwd, "add", ".")
    git(cwd, "commit", "-qm", "first version")
    git(cwd, "checkout", "-qb", "topic")
    (cwd / "app.py").write_text("print('v2')\n")
    git(cwd, "commit", "-qam", "second version")
    (cwd / "app.py").write_text("print('v3')\n")
    return cwd


@pytest.mark.real_codex
async def test_review_targets_and_findings(host: Host, model: ScriptedModel, repo: Path) -> None:
    uncommitted = await host.run("/review")
    assert uncommitted.startswith("One scripted finding.")
    assert REVIEW_FINDING_TITLE in uncommitted
    assert "Scripted review of: Review the current code changes" in uncommitted

    against_main = await host.run("/review main")
    assert "Review the code changes against the base branch 'main'" in against_main

    sha = git(repo, "rev-parse", "HEAD")
    one_commit = await host.run(f"/review {sha[:8]}")
    assert f"Review the code changes introduced by commit {sha}" in one_commit
    assert model.requests[-1].last_user_text.startswith(f"Review the code changes introduced by commit {sha}")

    with pytest.raises(CommandError, match=r'"nonsense" is neither a branch nor a commit'):
        await host.run("/review nonsense")
    with pytest.raises(CommandError, match="is not a branch or commit"):
        await host.run("/review --help")
    after = await host.turn("thanks")  # review ran inline; the conversation goes on
    assert after.status == "completed"


async def test_resolve_review_target_shapes(repo: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    assert await commands.resolve_review_target("", repo) == {"type": "uncommittedChanges"}
    assert await commands.resolve_review_target("uncommitted", repo) == {"type": "uncommittedChanges"}
    assert await commands.resolve_review_target("main", repo) == {"type": "baseBranch", "branch": "main"}
    assert await commands.resolve_review_target("HEAD~1", repo) == {
        "type": "commit",
        "sha": git(repo, "rev-parse", "HEAD~1"),
        "title": "first version",
    }
    assert (await commands.resolve_review_target(sha, repo))["title"] == "second version"


# --------------------------------------------------------------------------- /model and /effort (real binary)


@pytest.mark.real_codex
async def test_model_is_validated_against_the_pinned_catalog(host: Host) -> None:
    catalog = await commands.model_catalog(host.app)
    ids = [entry.id for entry in catalog]
    assert CATALOG_MODEL in ids and "gpt-6.1-sol" in ids
    assert [entry.id for entry in catalog if entry.is_default] == ["gpt-6.1-sol"]

    listing = await host.run("/model")
    assert listing.startswith(f"Model: {CATALOG_MODEL}. Choose with /model <id>: ")
    with pytest.raises(CommandError) as refused:
        await host.run("/model gpt-imaginary")
    assert str(refused.value) == f'"gpt-imaginary" is not one of the models codex knows: {", ".join(ids)}.'
    assert host.choice.model is None

    host.choice.model = "gpt-6.1-sol"
    assert await host.run("/effort ultra") == "Reasoning effort for this conversation: ultra."
    answer = await host.run(f"/model {CATALOG_MODEL}")
    assert answer.startswith(f"Model for this conversation: {CATALOG_MODEL}. Its efforts are low, medium, high")
    assert host.choice == ModelChoice(model=CATALOG_MODEL, effort=None)

    host.allow_any_model = True  # a custom endpoint takes any id
    assert await host.run("/model my-finetune") == "Model for this conversation: my-finetune."


@pytest.mark.real_codex
async def test_effort_is_validated_against_the_model(host: Host) -> None:
    with pytest.raises(CommandError) as refused:
        await host.run("/effort ultra")
    assert str(refused.value) == (
        f'"ultra" is not a reasoning effort {CATALOG_MODEL} supports: low, medium, high, xhigh (or default).'
    )
    assert await host.run("/effort HIGH") == "Reasoning effort for this conversation: high."
    assert host.choice.effort == "high"
    assert (await host.run("/effort")).startswith("Reasoning effort: high. Choose with /effort <level>: low, ")
    assert await host.run("/effort default") == "Reasoning effort for this conversation: model default."
    assert host.choice.effort is None


@pytest.mark.real_codex
async def test_overrides_reach_the_model_and_do_not_leak_into_the_next_message(
    host: Host, model: ScriptedModel
) -> None:
    def sent() -> tuple[str, str | None]:
        body = model.requests[-1].body
        return body["model"], (body.get("reasoning") or {}).get("effort")

    await host.turn("one", {"reasoning_effort": "high"})
    assert sent() == (CATALOG_MODEL, "high")
    await host.turn("two")
    assert sent() == (CATALOG_MODEL, "medium")  # the catalog default again, not the sticky "high"
    await host.turn("three", {"model": "gpt-5.6-sol"})
    assert sent() == ("gpt-5.6-sol", "low")  # that model's default effort
    await host.run("/effort xhigh")
    await host.turn("four")
    assert sent() == (CATALOG_MODEL, "xhigh")

    # Why every turn carries both: codex keeps a turn's overrides for the turns after it.
    params = {"threadId": host.bound, "input": [{"type": "text", "text": "five"}]}
    sub = host.app.subscribe(host.bound)
    try:
        turn_id = (await host.app.request("turn/start", params, timeout=rig.REQUEST_TIMEOUT_S))["turn"]["id"]
        await rig.collect_turn(sub, turn_id)
    finally:
        sub.close()
    assert sent() == (CATALOG_MODEL, "xhigh")

    host.configured_effort, host.choice = "ultra", ModelChoice()  # configured, but gpt-5.5 lacks it
    await host.turn("five and a half")
    assert sent() == (CATALOG_MODEL, "medium")

    with pytest.raises(CommandError, match="is not one of the models codex knows"):
        await host.turn("six", {"model": "gpt-imaginary"})
    with pytest.raises(CommandError, match="is not a reasoning effort"):
        await host.turn("six", {"reasoning_effort": "ultra"})


# --------------------------------------------------------------------------- /status and the card


async def test_status_lists_the_conversation_facts(host: Host) -> None:
    host.bound, host.queue_depth, host.choice.effort = "thread-1", 2, "high"
    assert await host.run("/status") == (
        "thread: thread-1\n"
        f"model: {CATALOG_MODEL}\n"
        "reasoning effort: high\n"
        "sandbox: workspace-write, approvals: never\n"
        "tokens: 300 in (60 cached), 12 out (0 reasoning)\n"
        "queued messages: 2"
    )
    waiting = StatusInfo(None, "m", None, "read-only", "on-request", Usage(), 0, "Waiting for an answer: x.")
    assert commands.status_text(waiting).splitlines()[0] == "thread: none yet"
    assert commands.status_text(waiting).endswith("\nWaiting for an answer: x.")


def test_command_skills_fit_an_agent_card() -> None:
    skills = commands.command_skills()
    card = AgentCard(name="codex", description="d", version="1", skills=skills)
    assert [skill.id for skill in card.skills] == ["chat-commands", "code-review", "approvals"]
    assert all(skill.examples and skill.description and skill.tags for skill in card.skills)
    assert "/review main" in card.skills[1].examples


async def test_run_command_is_bounded_by_its_caller(host: Host) -> None:
    """A command that cannot reach codex fails fast instead of hanging (app closed)."""
    await host.app.close()
    with pytest.raises(Exception, match="codex app-server"):
        await asyncio.wait_for(host.run("/model"), 5)
