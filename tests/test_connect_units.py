"""connect's pieces on their own: token lookup, backoff, platform client errors, state file, inbound
secret gate, cursor bookkeeping with out-of-order turns, doctor's platform section (fake platform)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from pathlib import Path

import httpx
import pytest
from a2a.types import Message, Part, Role
from fake_platform import FakePlatform

from molecule_codex.adapter import CodexAdapter, child_env
from molecule_codex.connect.doctor import platform_report
from molecule_codex.connect.inbox import Inbox
from molecule_codex.connect.platform import (
    AuthRejected,
    Backoff,
    CursorGone,
    PlatformClient,
    Rejected,
    Token,
    TokenError,
    resolve_token,
)
from molecule_codex.connect.push import InboundSecret, InboundSecretGate, check_public_url
from molecule_codex.connect.state import HANDLED_MEMORY, STATE_FILENAME, InboxState


@pytest.fixture
def fake():
    with FakePlatform() as platform:
        yield platform


def test_token_lookup_order_and_the_value_never_in_repr(tmp_path):
    file = tmp_path / "token"
    file.write_text("from-file\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / ".auth_token").write_text("from-configs")
    env = {"MOLECULE_WORKSPACE_TOKEN": "from-env", "MOLECULE_WORKSPACE_TOKEN_FILE": str(file),
           "CONFIGS_DIR": str(tmp_path / "configs")}
    assert resolve_token(env) == Token("from-env", "MOLECULE_WORKSPACE_TOKEN")
    del env["MOLECULE_WORKSPACE_TOKEN"]
    assert resolve_token(env).value == "from-file"
    del env["MOLECULE_WORKSPACE_TOKEN_FILE"]
    token = resolve_token(env)
    assert token.value == "from-configs" and token.source.endswith(".auth_token")
    assert "from-configs" not in repr(token) and "from-configs" not in f"{token!r}"
    with pytest.raises(TokenError, match="cannot be read"):
        resolve_token({"MOLECULE_WORKSPACE_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(TokenError, match="no workspace token"):
        resolve_token({"CONFIGS_DIR": str(tmp_path / "empty")})


def test_the_workspace_token_never_reaches_the_agents_shell():
    env = {"MOLECULE_WORKSPACE_TOKEN": "t", "MOLECULE_WORKSPACE_TOKEN_FILE": "/f", "PATH": "/bin",
           "PLATFORM_URL": "https://p", "WORKSPACE_ID": "ws"}
    assert child_env(env, set()) == {"PATH": "/bin", "PLATFORM_URL": "https://p", "WORKSPACE_ID": "ws"}


def test_backoff_doubles_from_1_to_60_and_resets():
    backoff = Backoff()
    assert [backoff.delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    backoff.reset()
    assert backoff.delay() == 1


async def test_client_sends_origin_and_bearer_and_sorts_errors(fake):
    client = PlatformClient(fake.url + "/", fake.workspace_id, Token(fake.token, "test"))
    try:
        assert await client.activity(since_id=None) == []
        first, second = fake.add_row(request_body={}), fake.add_row(request_body={})
        # A cold-start page comes newest first; the client hands it over oldest first.
        assert [row["id"] for row in await client.activity(since_id=None)] == [first, second]
        assert [row["id"] for row in await client.activity(since_id=first)] == [second]
        fake.pruned.add(first)
        with pytest.raises(CursorGone):
            await client.activity(since_id=first)
        fake.talk_to_user_disabled = True
        with pytest.raises(Rejected, match="talk_to_user_disabled"):
            await client.notify("hi")
    finally:
        await client.aclose()
    bad = PlatformClient(fake.url, fake.workspace_id, Token("nope", "test"))
    try:
        with pytest.raises(AuthRejected) as refused:
            await bad.heartbeat({})
        assert refused.value.status == 401
    finally:
        await bad.aclose()
    # The hosted edge answers 404 on /workspaces/* without Origin: the fake does too.
    async with httpx.AsyncClient() as raw:
        response = await raw.get(f"{fake.url}/workspaces/{fake.workspace_id}/activity",
                                 headers={"Authorization": f"Bearer {fake.token}"}, params={"type": "a2a_receive"})
    assert response.status_code == 404


def test_state_file_is_0600_atomic_bounded_and_a_corrupt_one_is_moved_aside(tmp_path):
    old = os.umask(0)
    try:
        state = InboxState.load(tmp_path)
        for n in range(HANDLED_MEMORY + 10):
            state.mark_handled(f"r{n}")
        state.cursor = "r9"
        state.save()
    finally:
        os.umask(old)
    path = tmp_path / STATE_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.glob(".*.tmp")) == []
    again = InboxState.load(tmp_path)
    assert again.cursor == "r9" and len(again.handled) == HANDLED_MEMORY and again.is_handled(f"r{HANDLED_MEMORY + 9}")
    path.write_text("{half a file")
    fresh = InboxState.load(tmp_path)
    assert fresh.cursor is None and (tmp_path / (STATE_FILENAME + ".corrupt")).exists()


class _GateRig:
    """An InboundSecretGate in front of an app that records what reached it; reading the request
    (its body, or a websocket's messages) fails the test."""

    def __init__(self, secret: InboundSecret, key: str) -> None:
        self.reached: list[str] = []
        self.sent: list[dict] = []

        async def app(scope, receive, send):
            self.reached.append(scope[key])

        self.gate = InboundSecretGate(app, secret)

    async def __call__(self, scope: dict) -> None:
        async def receive():
            raise AssertionError("the request was read")

        async def send(message):
            self.sent.append(message)

        await self.gate(scope, receive, send)


async def test_inbound_gate_refuses_before_reading_the_body():
    secret = InboundSecret()
    rig = _GateRig(secret, "path")
    reached, sent = rig.reached, rig.sent
    post = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await rig(post)  # secret unknown: nothing passes
    secret.set("s3cret")
    for header in (b"Bearer wrong", b"bearer s3cre", b"Basic s3cret", b""):
        await rig({**post, "headers": [(b"authorization", header)]})
    assert reached == [] and [m["status"] for m in sent if m["type"] == "http.response.start"] == [401] * 5
    await rig({**post, "headers": [(b"authorization", b"Bearer s3cret")]})
    await rig({"type": "http", "method": "GET", "path": "/.well-known/agent-card.json", "headers": []})
    assert reached == ["/", "/.well-known/agent-card.json"]


async def test_inbound_gate_also_guards_websocket_scopes():
    """Only lifespan passes unchecked: a websocket upgrade without the secret never reaches the app."""
    secret = InboundSecret()
    secret.set("s3cret")
    rig = _GateRig(secret, "type")
    upgrade = {"type": "websocket", "path": "/", "headers": [(b"authorization", b"Bearer wrong")]}
    await rig(upgrade)
    assert rig.reached == [] and [m["type"] for m in rig.sent] == ["websocket.close"]
    await rig({**upgrade, "headers": [(b"authorization", b"Bearer s3cret")]})
    await rig({"type": "lifespan"})
    assert rig.reached == ["websocket", "lifespan"]


def test_public_url_must_be_https_except_loopback():
    assert check_public_url("https://agent.example.com/") is None
    assert check_public_url("http://127.0.0.1:8000/") is None
    assert "https://" in check_public_url("http://agent.example.com/")


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the state lives in a file and another thread
            await asyncio.sleep(0.02)


class _HeldHandler:
    """A request handler whose turns end when the test says so (bookkeeping only; turns are tested
    against the real codex in test_connect.py)."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []

    async def on_message_send(self, request, context):
        text = request.message.parts[0].text
        self.started.append(text)
        await self.release.setdefault(text, asyncio.Event()).wait()
        return Message(role=Role.ROLE_AGENT, message_id="r", parts=[Part(text=f"done {text}")])


async def test_cursor_moves_only_over_the_handled_prefix_when_turns_finish_out_of_order(fake, tmp_path: Path):
    handler = _HeldHandler()
    client = PlatformClient(fake.url, fake.workspace_id, Token(fake.token, "test"))
    inbox = Inbox(client, handler, InboxState.load(tmp_path), poll_interval=0.05)
    slow = fake.message("slow", source_id="ws-a")
    fast = fake.message("fast", source_id="ws-b")
    run = asyncio.create_task(inbox.run())
    state_file = tmp_path / STATE_FILENAME

    def saved() -> dict:
        return json.loads(state_file.read_text()) if state_file.exists() else {"handled": [], "cursor": None}

    try:
        await _until(lambda: len(handler.started) == 2)
        handler.release["fast"].set()
        await _until(lambda: fast in saved()["handled"])
        assert saved()["cursor"] is None  # "slow" still runs: the cursor must not skip it
        handler.release["slow"].set()
        await _until(lambda: saved()["cursor"] == fast)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await inbox.stop()
        await client.aclose()
    # A restart sees both rows as handled and answers neither again.
    restarted = Inbox(PlatformClient(fake.url, fake.workspace_id, Token(fake.token, "t")), _HeldHandler(),
                      InboxState.load(tmp_path), poll_interval=0.05)
    assert restarted._state.cursor == fast and restarted._state.is_handled(slow)
    assert sorted(sent.peer for sent in fake.peer_sends) == ["ws-a", "ws-b"]


async def test_a_410_re_read_of_a_finished_row_does_not_stall_the_cursor(fake, tmp_path: Path):
    """After a 410 the feed's last ten minutes come again, including a row that finished while an
    older one still runs; counting it twice must not pin the cursor (and the ack) behind it forever."""
    handler = _HeldHandler()
    client = PlatformClient(fake.url, fake.workspace_id, Token(fake.token, "test"))
    inbox = Inbox(client, handler, InboxState.load(tmp_path), poll_interval=0.05)
    slow = fake.message("slow", source_id="ws-a")
    fast = fake.message("fast", source_id="ws-b")
    skipped = fake.add_row(method="tasks/get", source_id="ws-c", request_body={})
    run = asyncio.create_task(inbox.run())
    state_file = tmp_path / STATE_FILENAME

    def saved() -> dict:
        return json.loads(state_file.read_text()) if state_file.exists() else {"handled": [], "cursor": None}

    try:
        await _until(lambda: len(handler.started) == 2)
        handler.release["fast"].set()
        await _until(lambda: fast in saved()["handled"] and skipped in saved()["handled"])
        fake.pruned.add(skipped)  # the cursor row is gone: the next poll gets a 410 and re-reads
        await _until(lambda: any(status == 410 for _m, _p, status in fake.log))
        gone = next(i for i, (_m, _p, status) in enumerate(fake.log) if status == 410)
        await _until(lambda: any(path.endswith("/activity") for _m, path, _s in fake.log[gone + 1:]))
        await asyncio.sleep(0.1)  # the re-read page is accepted before "slow" finishes
        handler.release["slow"].set()
        later = fake.message("later", source_id="ws-d")
        await _until(lambda: "later" in handler.started)
        handler.release["later"].set()
        await _until(lambda: saved()["cursor"] == later)
        assert slow in saved()["handled"]
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await inbox.stop()
        await client.aclose()
    assert sorted(sent.peer for sent in fake.peer_sends) == ["ws-a", "ws-b", "ws-d"]


async def test_a_state_file_that_cannot_be_written_costs_no_reply(fake, tmp_path: Path, monkeypatch, caplog):
    """Disk full or read-only: every row is still answered, in order, and the next write catches up."""
    handler = _HeldHandler()
    client = PlatformClient(fake.url, fake.workspace_id, Token(fake.token, "test"))
    state = InboxState.load(tmp_path)
    inbox = Inbox(client, handler, state, poll_interval=0.05)
    real_save, broken = InboxState.save, {"on": True}

    def save(self) -> None:
        if broken["on"]:
            raise OSError(28, "No space left on device")
        real_save(self)

    monkeypatch.setattr(InboxState, "save", save)
    first = fake.message("first", source_id="ws-a")
    second = fake.message("second", source_id="ws-a")  # same peer: behind "first" in one conversation
    run = asyncio.create_task(inbox.run())
    try:
        await _until(lambda: "first" in handler.started)
        handler.release["first"].set()
        await _until(lambda: "second" in handler.started)  # the failed write did not stop the conversation
        handler.release["second"].set()
        await _until(lambda: len(fake.peer_sends) == 2)
        assert "inbox state not written" in caplog.text
        broken["on"] = False  # space again: the next write records everything handled so far
        third = fake.message("third", source_id="ws-b")
        await _until(lambda: "third" in handler.started)
        handler.release["third"].set()
        state_file = tmp_path / STATE_FILENAME
        await _until(lambda: state_file.exists() and json.loads(state_file.read_text())["cursor"] == third)
        assert {first, second} <= set(json.loads(state_file.read_text())["handled"])
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await inbox.stop()
        await client.aclose()
    assert [sent.peer for sent in fake.peer_sends] == ["ws-a", "ws-a", "ws-b"]


async def test_doctor_platform_section(fake, caplog):
    caplog.set_level(logging.DEBUG)
    env = {"PLATFORM_URL": fake.url, "WORKSPACE_ID": fake.workspace_id, "MOLECULE_WORKSPACE_TOKEN": fake.token}
    lines, ok = await platform_report(CodexAdapter(), env)
    assert ok, lines
    assert any(line.startswith("[PASS] platform token: accepted") for line in lines)
    assert any("delivery mode" in line and "poll" in line for line in lines)
    assert fake.heartbeats and fake.heartbeats[-1][1]["runtime_metadata"]["capabilities"]["session"] is True
    lines, ok = await platform_report(CodexAdapter(), {**env, "MOLECULE_WORKSPACE_TOKEN": "wrong-token"})
    assert not ok and any("refused (HTTP 401)" in line for line in lines)
    assert fake.token not in caplog.text and "wrong-token" not in "\n".join(lines) + caplog.text


def test_readme_recipe_matches_the_cli_and_the_token_sources():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## External Connect: the agent on your own machine", 1)[1].split("\n## ", 1)[0]
    for name in ("PLATFORM_URL", "WORKSPACE_ID", "MOLECULE_WORKSPACE_TOKEN", "MOLECULE_WORKSPACE_TOKEN_FILE",
                 "$CONFIGS_DIR/.auth_token", "--public-url", "connect-inbox.json", "systemctl --user"):
        assert name in section, name
    assert STATE_FILENAME in section
    from molecule_codex.cli import build_parser

    exec_start = re.search(r"ExecStart=\S+/molecule-codex (.+)", section).group(1).replace("%h", "/home/u").split()
    args = build_parser().parse_args(exec_start)
    assert args.command == "connect" and str(args.workdir) == "/home/u/project"
    push = build_parser().parse_args(["connect", "--public-url", "https://agent.example.com/"])
    assert push.public_url == "https://agent.example.com/" and push.port == 8000
