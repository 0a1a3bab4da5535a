"""``connect`` under faults: kill -9 at random moments, a platform outage, a refused token.

Exactly once is counted on the platform side: every reply the fake platform accepted, per row.
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest
from connect_rig import Connect
from fake_platform import FakePlatform

from molecule_codex.demo.scripted_model import ScriptedModel

pytestmark = pytest.mark.real_codex

MESSAGES = 20
KILLS = 5
#: A 30 s outage in the issue; CI uses a shorter one that still needs three backoff steps (1+2+4 s).
OUTAGE_S = float(os.environ.get("CONNECT_OUTAGE_S", "6"))
DONE_TIMEOUT_S = 90.0
#: A reply the platform accepted in the last moments before a kill -9 can be sent again: the state
#: file could not yet say it was accepted (notify has no idempotency key; see connect.state).
CRASH_WINDOW_S = 0.5


def _row_of(text: str) -> str | None:
    match = re.search(r"\bm(\d\d)\b", text)
    return match.group(1) if match else None


def test_kill_9_at_random_moments_every_message_answered_exactly_once(tmp_path):
    rng = random.Random(int(os.environ.get("CONNECT_KILL_SEED", str(time.time_ns()))))
    with ScriptedModel() as model, FakePlatform() as fake:
        connect = Connect(tmp_path, model, fake)
        kills: list[float] = []
        try:
            connect.start()
            fake.wait_for(lambda: fake.registrations, 30, "register")
            senders = [None, None, "ws-peer-1", None, "ws-peer-2", "ws-peer-3"]
            for n in range(MESSAGES):
                source = senders[n % len(senders)]
                context = None if source else ("ctx-a" if n % 2 else None)
                fake.message(f"m{n:02d} [sleep=0.{rng.randint(1, 4)}]", source_id=source, context_id=context)
                if n % 4 == 3 and len(kills) < KILLS:
                    time.sleep(rng.uniform(0.2, 1.5))
                    connect.kill9()
                    kills.append(time.monotonic())
                    connect.start()
            while len(kills) < KILLS:
                time.sleep(rng.uniform(0.5, 1.5))
                connect.kill9()
                kills.append(time.monotonic())
                connect.start()
            answered = lambda: {_row_of(sent.text) for sent in fake.replies()} >= {f"{n:02d}" for n in range(MESSAGES)}  # noqa: E731
            fake.wait_for(answered, DONE_TIMEOUT_S, "every message answered")
            time.sleep(1.0)  # more polls after the last reply: nothing answered twice later
        finally:
            connect.cleanup()
        per_row: dict[str, list] = {}
        for sent in fake.replies():
            per_row.setdefault(_row_of(sent.text), []).append(sent)
        assert set(per_row) == {f"{n:02d}" for n in range(MESSAGES)}
        for row, sends in per_row.items():
            if len(sends) == 1:
                continue
            # The only allowed duplicate: the first copy was accepted just before a kill -9.
            first = min(sent.at for sent in sends)
            assert len(sends) == 2 and any(0 <= kill - first <= CRASH_WINDOW_S for kill in kills), (
                f"row m{row} answered {len(sends)} times", connect.output()[-4000:])
        duplicates = sum(len(sends) - 1 for sends in per_row.values())
        print(f"kill -9 x{len(kills)} over {MESSAGES} messages: {duplicates} duplicate(s) in the crash window")
        assert all(sent.text.startswith("echo: m") for sent in fake.replies()), [s.text for s in fake.replies()]
        peer_sends = [sent for sent in fake.peer_sends]
        assert all(sent.headers["x-workspace-id"] == fake.workspace_id for sent in peer_sends)
        assert fake.token not in connect.output()


def test_platform_outage_backs_off_then_delivers_everything_and_heartbeats_resume(tmp_path):
    with ScriptedModel() as model, FakePlatform() as fake:
        connect = Connect(tmp_path, model, fake)
        try:
            connect.start()
            fake.wait_for(lambda: fake.registrations, 30, "register")
            fake.message("before-outage")
            fake.wait_for(lambda: any("before-outage" in s.text for s in fake.notifies), 30, "first reply")
            fake.message("[sleep=1] in-flight-at-outage", source_id="ws-peer-1")
            time.sleep(0.5)
            fake.down()
            down_at = time.monotonic()
            during = [fake.message(f"during-outage-{n}") for n in range(3)]
            time.sleep(OUTAGE_S)
            beats_before = len(fake.heartbeats)
            fake.up()
            up_at = time.monotonic()
            fake.wait_for(lambda: sum("during-outage" in s.text for s in fake.notifies) == 3
                          and any("in-flight-at-outage" in s.text for s in fake.peer_sends), 70, "all delivered")
            fake.wait_for(lambda: len(fake.heartbeats) > beats_before, 30, "heartbeats resume")
            time.sleep(1.0)
        finally:
            rc = connect.stop()
        assert rc == 0
        texts = [s.text for s in fake.replies()]
        for token in ("before-outage", "in-flight-at-outage", "during-outage-0", "during-outage-1", "during-outage-2"):
            assert sum(token in text for text in texts) == 1, (token, texts)
        log = connect.output()
        delays = [float(d) for d in re.findall(r"activity feed unavailable: .*; retrying in (\d+) s", log)]
        assert delays[:3] == [1, 2, 4], delays  # exponential
        assert all(d <= 60 for d in delays)
        assert fake.online()
        assert during and down_at < up_at
        assert fake.token not in log


def test_refused_token_at_register_exits_nonzero_naming_the_source_not_the_token(tmp_path):
    with ScriptedModel() as model, FakePlatform() as fake:
        wrong = "wrong-" + fake.token[:20]
        connect = Connect(tmp_path, model, fake, token=wrong)
        try:
            connect.start()
            assert connect.proc is not None
            rc = connect.proc.wait(60)
        finally:
            connect.cleanup()
        log = connect.output()
        assert rc == 1, log[-2000:]
        assert "refused the workspace token from MOLECULE_WORKSPACE_TOKEN (HTTP 401)" in log
        assert wrong not in log and fake.token not in log
        assert not fake.heartbeats


def test_missing_token_exits_2_with_where_to_put_it(tmp_path):
    with ScriptedModel() as model, FakePlatform() as fake:
        connect = Connect(tmp_path, model, fake, token="")
        try:
            connect.start()
            assert connect.proc is not None
            rc = connect.proc.wait(30)
        finally:
            connect.cleanup()
        assert rc == 2
        assert "no workspace token: set MOLECULE_WORKSPACE_TOKEN" in connect.output()
        assert not fake.registrations


def test_a_second_connect_on_the_same_state_dir_refuses_to_start(tmp_path):
    with ScriptedModel() as model, FakePlatform() as fake:
        first = Connect(tmp_path, model, fake)
        second = Connect(tmp_path, model, fake)
        try:
            first.start()
            fake.wait_for(lambda: fake.registrations, 30, "register")
            second.logs.append(tmp_path / "unused.log")  # so its log file is connect-1.log, not the first's
            second.start()
            assert second.proc is not None
            assert second.proc.wait(30) == 1
            assert "another molecule-codex connect is running" in second.output()
            assert len(fake.registrations) == 1
            first.kill9()  # the kernel drops the lock with the process
            first.start()
            fake.wait_for(lambda: len(fake.registrations) == 2, 30, "register after kill -9")
        finally:
            first.cleanup()
            second.cleanup()
