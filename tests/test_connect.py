"""``molecule-codex connect`` in poll mode: one real process, real codex, scripted model, fake platform.

The process is shared by this module's tests (start-up is the expensive part); each test uses its
own conversations, so they do not see each other's turns.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Iterator

import pytest
from connect_rig import Connect
from fake_platform import FakePlatform

from molecule_codex.connect.state import STATE_FILENAME
from molecule_codex.demo.scripted_model import ScriptedModel

pytestmark = pytest.mark.real_codex

REPLY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakePlatform, ScriptedModel, Connect]]:
    tmp_path = tmp_path_factory.mktemp("connect")
    with ScriptedModel() as model, FakePlatform() as fake:
        connect = Connect(tmp_path, model, fake)
        connect.start()
        try:
            fake.wait_for(lambda: fake.registrations, REPLY_TIMEOUT_S, "register")
            yield fake, model, connect
        finally:
            rc = connect.stop()
            assert rc == 0, connect.output()[-3000:]
            assert fake.token not in connect.output()


def _replies_to(fake: FakePlatform, token: str) -> list:
    return [sent for sent in fake.replies() if token in sent.text]


def _wait_reply(fake: FakePlatform, token: str, count: int = 1) -> list:
    fake.wait_for(lambda: len(_replies_to(fake, token)) >= count, REPLY_TIMEOUT_S, f"reply with {token!r}")
    return _replies_to(fake, token)


def test_register_is_poll_mode_with_a_card_and_the_workspace_stays_online(world):
    fake, _model, _connect = world
    registration = fake.registrations[0]
    assert registration["delivery_mode"] == "poll" and registration["url"] == ""
    assert registration["agent_card"]["name"] and registration["agent_card"]["skills"]
    fake.wait_for(lambda: len(fake.heartbeats) >= 3, REPLY_TIMEOUT_S, "three heartbeats")
    beat = fake.heartbeats[-1][1]
    assert fake.online()
    assert beat["runtime_metadata"]["capabilities"]["session"] is True
    assert beat["runtime_metadata"]["idle_timeout_seconds"] > 0
    assert {"active_tasks", "current_task", "uptime_seconds"} <= set(beat)
    assert "runtime_state" not in beat  # not wedged


def test_canvas_message_gets_exactly_one_notify_with_the_models_text(world):
    fake, _model, _connect = world
    row = fake.message("canvas-hello-1")
    [reply] = _wait_reply(fake, "canvas-hello-1")
    assert reply.peer is None and reply.text == "echo: canvas-hello-1"
    time.sleep(1.0)  # several more polls: still exactly one
    assert len(_replies_to(fake, "canvas-hello-1")) == 1
    echo_rows = [r for r in fake.rows if r["method"] == "notify"]
    assert echo_rows, "the feed holds our own notify echo, which must not be answered"
    assert row


def test_peer_message_gets_one_message_send_to_that_peer_as_us(world):
    fake, _model, _connect = world
    row = fake.message("peer-hello-1", source_id="ws-peer-1")
    [reply] = _wait_reply(fake, "peer-hello-1")
    assert reply.peer == "ws-peer-1"
    assert reply.headers["x-workspace-id"] == fake.workspace_id
    assert reply.headers["origin"] == fake.url
    assert reply.body["method"] == "message/send"
    message = reply.body["params"]["message"]
    assert message["role"] == "user" and message["messageId"] == f"reply-{row}"
    assert message["parts"] == [{"kind": "text", "text": "echo: peer-hello-1"}]
    time.sleep(0.6)
    assert len(_replies_to(fake, "peer-hello-1")) == 1


def test_history_is_kept_per_conversation_across_three_messages(world):
    fake, model, _connect = world
    for n in range(1, 4):
        fake.message(f"hist-canvas-{n}", context_id="sess-history")
        fake.message(f"hist-peer-{n}", source_id="ws-peer-hist")
        _wait_reply(fake, f"hist-canvas-{n}")
        _wait_reply(fake, f"hist-peer-{n}")
    canvas = [r for r in model.requests if r.last_user_text == "hist-canvas-3"][-1]
    peer = [r for r in model.requests if r.last_user_text == "hist-peer-3"][-1]
    assert canvas.all_user_texts == ["hist-canvas-1", "hist-canvas-2", "hist-canvas-3"]
    assert peer.all_user_texts == ["hist-peer-1", "hist-peer-2", "hist-peer-3"]


def test_two_peers_run_in_parallel(world):
    fake, model, _connect = world
    fake.message("[sleep=1.5] par-a", source_id="ws-peer-a")
    fake.message("[sleep=1.5] par-b", source_id="ws-peer-b")
    _wait_reply(fake, "par-a")
    _wait_reply(fake, "par-b")
    requests = [r for r in model.requests if "par-" in r.last_user_text]
    first_reply = min(sent.at for sent in fake.replies() if "par-" in sent.text)
    started = sorted(r.received_at for r in requests)
    assert len(started) == 2
    # Both turns were at the model before either reply went out: they overlapped.
    assert started[1] - started[0] < 1.0, started
    assert {sent.peer for sent in fake.replies() if "par-" in sent.text} == {"ws-peer-a", "ws-peer-b"}
    assert first_reply  # both answered


def test_heartbeat_reports_the_running_turn(world):
    fake, _model, _connect = world
    fake.message("[sleep=2] busy-turn", source_id="ws-peer-busy")
    fake.wait_for(lambda: any(beat["active_tasks"] >= 1 and "busy-turn" in beat["current_task"]
                              for _at, beat in fake.heartbeats), REPLY_TIMEOUT_S, "a busy heartbeat")
    _wait_reply(fake, "busy-turn")


def test_bad_rows_are_skipped_or_answered_readably_and_the_cursor_moves_past_them(world):
    fake, _model, connect = world
    ws = fake.workspace_id
    before = len(fake.notifies)
    envelope = {"jsonrpc": "2.0", "id": "x", "method": "message/send"}
    fake.add_row(source_id=ws, request_body={**envelope, "params": {"message": {
        "role": "user", "messageId": "self", "parts": [{"kind": "text", "text": "from myself"}]}}})
    fake.add_row(method="notify", request_body={"message": "an echo of a reply"})
    fake.add_row(method="tasks/frobnicate", request_body={"jsonrpc": "2.0", "id": 1, "method": "tasks/frobnicate"})
    fake.add_row(method="chat_upload_receive", request_body={"file_id": "f1"})
    fake.add_row(request_body={**envelope, "params": {"message": {"role": "user", "messageId": "np"}}})  # no parts
    fake.add_row(request_body={**envelope, "params": {"message": {"role": "user", "messageId": "ep", "parts": []}}})
    fake.add_row(request_body="{this is not json")
    fake.add_row(request_body=None)
    fake.message("x" * (5 * 1024 * 1024))
    last = fake.message("after-the-poison")
    _wait_reply(fake, "after-the-poison")
    fake.wait_for(lambda: len(fake.notifies) - before >= 6, REPLY_TIMEOUT_S, "six replies")
    time.sleep(0.6)
    errors = [sent.text for sent in fake.notifies[before:] if "after-the-poison" not in sent.text]
    assert len(errors) == 5, errors  # missing parts, empty parts, bad JSON, no body, 5 MB text
    assert all(text.startswith(("The agent could not", "Cannot run this message")) or "too long" in text
               or "limit" in text for text in errors), errors
    assert not any("from myself" in text or "an echo" in text for text in errors)
    assert all(len(text) < 2000 for text in errors)
    assert connect.proc is not None and connect.proc.poll() is None
    state_path = connect.state_dir / STATE_FILENAME
    state = json.loads(state_path.read_text())
    assert last in state["handled"]
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
    fake.wait_for(lambda: fake.acks and fake.acks[-1] >= max(r["seq"] for r in fake.rows if r["id"] == last),
                  REPLY_TIMEOUT_S, "retention ack past the poison rows")
    assert re.search(r"row \S+ skipped: sent by this workspace", connect.output())
