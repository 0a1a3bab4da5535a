"""``connect --public-url``: push mode behind the platform's inbound secret, real codex, fake platform."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from connect_rig import Connect
from fake_platform import FakePlatform

from molecule_codex.demo.scripted_model import ScriptedModel

pytestmark = pytest.mark.real_codex


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _v03_send(text: str) -> dict:
    """What the platform relays to a push workspace: a v0.3 message/send, no A2A-Version header."""
    return {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": "message/send",
            "params": {"message": {"role": "user", "messageId": str(uuid.uuid4()),
                                   "parts": [{"kind": "text", "text": text}]}}}


def _reply_text(answer: dict) -> str:
    result = answer["result"]
    message = result.get("status", {}).get("message") or result
    return "".join(part.get("text", "") for part in message.get("parts", []))


def test_push_mode_accepts_only_the_inbound_secret_and_answers_v03_message_send(tmp_path):
    port = _free_port()
    public = f"http://127.0.0.1:{port}/"
    with ScriptedModel() as model, FakePlatform() as fake:
        connect = Connect(tmp_path, model, fake, "--public-url", public, "--port", str(port))
        try:
            connect.start()
            fake.wait_for(lambda: fake.registrations, 30, "register")
            registration = fake.registrations[0]
            assert registration["delivery_mode"] == "push" and registration["url"] == public
            deadline = time.monotonic() + 30
            while True:  # the listener opens right after register
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, connect.output()[-2000:]
                    time.sleep(0.05)

            for authorization in (None, "Bearer wrong-secret", f"Basic {fake.secret}", f"Bearer {fake.token}"):
                refused = fake.deliver_push(_v03_send("must not run"), authorization=authorization)
                assert refused.status_code == 401, (authorization, refused.text)
            assert not [r for r in model.requests if "must not run" in r.last_user_text]

            answer = fake.deliver_push(_v03_send("pushed-hello"))
            assert answer.status_code == 200
            body = answer.json()
            assert body["result"]["status"]["state"] == "completed"
            assert _reply_text(body) == "echo: pushed-hello"

            # The secret rotates: the next heartbeat brings the new one, the old one stops working.
            old = fake.secret
            fake.secret = "rotated-" + old[:10]
            beats = len(fake.heartbeats)
            fake.wait_for(lambda: len(fake.heartbeats) >= beats + 2, 30, "heartbeats after rotation")
            assert fake.deliver_push(_v03_send("old secret"), authorization=f"Bearer {old}").status_code == 401
            assert _reply_text(fake.deliver_push(_v03_send("new-secret-hello")).json()) == "echo: new-secret-hello"

            # Heartbeats continue during a long turn.
            beats = len(fake.heartbeats)
            long_turn = fake.deliver_push(_v03_send("[sleep=2] long-push")).json()
            assert _reply_text(long_turn) == "echo: [sleep=2] long-push"
            assert len(fake.heartbeats) >= beats + 2
        finally:
            rc = connect.stop()
        assert rc == 0
        log = connect.output()
        assert "push call refused" in log
        assert fake.secret not in log and fake.token not in log
