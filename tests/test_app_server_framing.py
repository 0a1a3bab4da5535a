"""Framing and routing tests for :mod:`app_server` against a tiny stub app-server.

The real codex binary never sends garbage, partial lines, unknown ids or overload errors, so these
cases use a stub: a Python script written to ``tmp_path`` and spawned exactly like codex (it
ignores the ``app-server --listen stdio:// --disable ...`` arguments). The stub answers
``initialize``, echoes unknown methods back as ``{"method", "params"}`` and otherwise plays a
per-method script from a JSON file next to it (see :data:`STUB_SOURCE`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from molecule_codex import app_server
from molecule_codex.app_server import (
    AppServer,
    AppServerError,
    AppServerExited,
    AppServerTimeout,
    Notification,
    RestartBackoff,
)
from molecule_codex.codex_binary import CodexBinary, CodexBinaryError
from molecule_codex.server_requests import (
    COMMAND_APPROVAL,
    METHOD_NOT_HANDLED,
    Answer,
    ServerRequest,
    ServerRequestPolicy,
)

pytestmark = pytest.mark.timeout(20)

#: The stub. Per request it looks up ``method`` in the scenario file: a list of steps per call
#: (the last list repeats). A step is a line to write (``@ID@`` -> the request id, ``@LAST@`` ->
#: the last line we answered a stub request with), or a command: ``!raw TEXT`` (no newline),
#: ``!stderr N`` (N bytes of stderr lines), ``!stderr_blob N`` (N bytes, no newline),
#: ``!read`` (read one line from stdin into @LAST@), ``!exit CODE``, ``!close_stdin SECONDS`` (close
#: its input, stay alive with stdout open).
STUB_SOURCE = r"""
import json, os, sys, time
from pathlib import Path

scenario = json.loads(Path(__file__).with_suffix(".json").read_text())
calls = {}
last = "null"
out, err = sys.stdout.buffer, sys.stderr.buffer

def write(stream, data):
    stream.write(data)
    stream.flush()

for raw in sys.stdin.buffer:
    message = json.loads(raw)
    if "method" not in message or "id" not in message:
        continue
    method, request_id = message["method"], message["id"]
    if method == "initialize":
        agent = scenario.get("userAgent", "molecule-codex/0.163.0 (stub)")
        write(out, json.dumps({"id": request_id, "result": {"userAgent": agent}}).encode() + b"\n")
        continue
    if method not in scenario:
        echo = {"id": request_id, "result": {"method": method, "params": message.get("params")}}
        write(out, json.dumps(echo).encode() + b"\n")
        continue
    plays = scenario[method]
    steps = plays[min(calls.get(method, 0), len(plays) - 1)]
    calls[method] = calls.get(method, 0) + 1
    for step in steps:
        command, _, arg = step.partition(" ")
        if command == "!raw":
            write(out, arg.encode())
        elif command == "!stderr":
            line = b"e" * 999 + b"\n"
            write(err, line * (int(arg) // len(line)))
        elif command == "!stderr_blob":
            write(err, b"b" * int(arg))
        elif command == "!read":
            last = sys.stdin.buffer.readline().decode().strip()
        elif command == "!exit":
            os._exit(int(arg))
        elif command == "!close_stdin":
            os.close(0)
            time.sleep(float(arg))
        else:
            write(out, step.replace("@ID@", json.dumps(request_id)).replace("@LAST@", last).encode() + b"\n")
"""


def result_line(result: Any) -> str:
    return json.dumps({"id": "@ID@", "result": result}).replace('"@ID@"', "@ID@")


def error_line(code: int, message: str) -> str:
    return json.dumps({"id": "@ID@", "error": {"code": code, "message": message}}).replace('"@ID@"', "@ID@")


def notification_line(method: str, params: dict[str, Any]) -> str:
    return json.dumps({"method": method, "params": params})


def stub_app(tmp_path: Path, scenario: dict[str, Any], **kwargs: Any) -> AppServer:
    """An AppServer (not started) whose child is the stub playing ``scenario``."""
    script = tmp_path / "stub_codex.py"
    script.write_text(f"#!{sys.executable}\n{STUB_SOURCE}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    script.with_suffix(".json").write_text(json.dumps(scenario))
    return AppServer(codex_home=tmp_path / "home", binary=CodexBinary(path=script, source="test"), **kwargs)


@asynccontextmanager
async def stub_server(tmp_path: Path, scenario: dict[str, Any], **kwargs: Any) -> AsyncIterator[AppServer]:
    """A started AppServer whose child is the stub playing ``scenario``; closed on exit."""
    app = stub_app(tmp_path, scenario, **kwargs)
    await app.start()
    try:
        yield app
    finally:
        await app.close()


async def test_stub_handshake(tmp_path: Path) -> None:
    async with stub_server(tmp_path, {}) as app:
        assert app.init_result == {"userAgent": "molecule-codex/0.163.0 (stub)"}
        assert app.codex_version == (0, 163, 0)
        assert await app.request("ping", {"x": 1}) == {"method": "ping", "params": {"x": 1}}
        assert app.command()[1:4] == ["app-server", "--listen", "stdio://"]


async def test_unsupported_version_in_handshake_fails_start_and_leaves_no_child(tmp_path: Path) -> None:
    app = stub_app(tmp_path, {"userAgent": "molecule-codex/0.99.0 (stub)"})
    with pytest.raises(CodexBinaryError) as caught:
        await app.start()
    assert "0.99.0" in str(caught.value) and "0.163.0" in str(caught.value)
    assert not app.running
    await app.close()


async def test_garbage_line_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scenario = {"garbage": [["this is not json {{{", result_line({"routed": True})]]}
    async with stub_server(tmp_path, scenario) as app:
        with caplog.at_level(logging.WARNING, logger="molecule_codex.app_server"):
            assert await app.request("garbage") == {"routed": True}
        assert "malformed line" in caplog.text
        assert await app.request("after") == {"method": "after", "params": None}
        assert app.running


@pytest.mark.parametrize("line", ["[1, 2, 3]", "42", '"a string"', "null", "true"])
async def test_non_object_json_line_is_skipped(tmp_path: Path, line: str) -> None:
    async with stub_server(tmp_path, {"odd": [[line, result_line("fine")]]}) as app:
        assert await app.request("odd") == "fine"
        assert app.running


async def test_response_to_unknown_id_is_ignored(tmp_path: Path) -> None:
    scenario = {
        "stray": [
            [
                json.dumps({"id": 9999, "result": {"stray": True}}),
                json.dumps({"id": "not-ours", "result": {"stray": True}}),
                json.dumps({"error": {"code": -32600, "message": "no id at all"}}),
                result_line({"stray": False}),
            ]
        ]
    }
    async with stub_server(tmp_path, scenario) as app:
        assert await app.request("stray") == {"stray": False}
        assert await app.request("again") == {"method": "again", "params": None}


async def test_error_response_raises_app_server_error(tmp_path: Path) -> None:
    error = {"code": -32600, "message": "thread not found: t", "data": {"codexErrorInfo": "x"}}
    scenario = {"bad": [[json.dumps({"id": "@ID@", "error": error}).replace('"@ID@"', "@ID@")]]}
    async with stub_server(tmp_path, scenario) as app:
        with pytest.raises(AppServerError) as caught:
            await app.request("bad")
        assert caught.value.code == -32600
        assert caught.value.method == "bad"
        assert "thread not found" in str(caught.value)
        assert caught.value.codex_error_info == "x"


async def test_partial_line_at_eof_fails_waiters_with_exit_code(tmp_path: Path) -> None:
    scenario = {
        "die": [
            [
                notification_line("turn/started", {"threadId": "t1", "turn": {"id": "u1"}}),
                '!raw {"id": 1234, "result": {"cut',
                "!exit 3",
            ]
        ]
    }
    async with stub_server(tmp_path, scenario) as app:
        sub = app.subscribe("t1")
        started = time.monotonic()
        with pytest.raises(AppServerExited) as caught:
            await app.request("die", timeout=10)
        assert caught.value.returncode == 3
        # What was received before the death is handed out first, then the same failure.
        event = await sub.get(timeout=1)
        assert (event.method, event.turn_id) == ("turn/started", "u1")
        with pytest.raises(AppServerExited) as from_sub:
            await sub.get(timeout=1)
        assert from_sub.value.returncode == 3
        assert time.monotonic() - started < 5
        assert not app.running
        with pytest.raises(AppServerExited):
            await app.request("after")


async def test_notifications_route_by_thread_and_buffer_before_subscribe(tmp_path: Path) -> None:
    emitted = [
        notification_line("thread/started", {"thread": {"id": "A"}}),
        notification_line("turn/started", {"threadId": "A", "turn": {"id": "a1"}}),
        notification_line("turn/started", {"threadId": "B", "turn": {"id": "b1"}}),
        notification_line("configWarning", {"summary": "global"}),
        notification_line("item/agentMessage/delta", {"threadId": "A", "turnId": "a1", "delta": "hi"}),
        notification_line("turn/completed", {"threadId": "B", "turn": {"id": "b1", "status": "completed"}}),
    ]
    scenario = {
        "emit": [[*emitted, result_line("emitted")]],
        "emit_live": [
            [notification_line("turn/completed", {"threadId": "A", "turn": {"id": "a1"}}), result_line("ok")]
        ],
    }
    seen_globally: list[Notification] = []
    async with stub_server(tmp_path, scenario) as app:
        app.add_listener(seen_globally.append)
        assert await app.request("emit") == "emitted"  # all six lines were read before the answer

        sub_b = app.subscribe("B")
        sub_a = app.subscribe("A")
        assert [(e.method, e.turn_id) for e in [await sub_a.get(1) for _ in range(3)]] == [
            ("thread/started", None),
            ("turn/started", "a1"),
            ("item/agentMessage/delta", "a1"),
        ]
        assert [e.method for e in [await sub_b.get(1) for _ in range(2)]] == ["turn/started", "turn/completed"]
        assert sub_a.pending() == 0 and sub_b.pending() == 0
        assert [e.method for e in seen_globally] == ["configWarning"]

        assert await app.request("emit_live") == "ok"
        live = await sub_a.get(1)
        assert (live.method, live.thread_id, live.turn_id) == ("turn/completed", "A", "a1")
        assert sub_b.pending() == 0

        sub_b.close()
        with pytest.raises(AppServerExited):
            await sub_b.get(1)
        assert [event async for event in _closed_iter(sub_b)] == []


async def _closed_iter(sub: app_server.ThreadSubscription) -> AsyncIterator[Notification]:
    async for event in sub:
        yield event


async def test_stderr_flood_does_not_block_the_child(tmp_path: Path) -> None:
    eight_mb = 8 * 1024 * 1024
    steps = [f"!stderr {eight_mb}", f"!stderr_blob {3 * 1024 * 1024}", "!stderr 2000", result_line("done")]
    scenario = {"flood": [steps]}
    async with stub_server(tmp_path, scenario) as app:
        assert await app.request("flood", timeout=15) == "done"
        tail = app.stderr_tail().splitlines()
        assert 0 < len(tail) <= app_server.STDERR_TAIL_LINES
        assert all(len(line) <= app_server.STDERR_LINE_CHARS for line in tail)
        assert await app.request("still-there") == {"method": "still-there", "params": None}


async def test_unanswered_request_times_out(tmp_path: Path) -> None:
    async with stub_server(tmp_path, {"silence": [[]]}) as app:
        started = time.monotonic()
        with pytest.raises(AppServerTimeout) as caught:
            await app.request("silence", timeout=0.5)
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.method == "silence" and caught.value.timeout == 0.5
        assert time.monotonic() - started >= 0.5
        assert app._pending == {}
        assert await app.request("next") == {"method": "next", "params": None}


async def test_line_over_max_line_bytes_is_dropped(tmp_path: Path) -> None:
    limit = 1024
    small_big = notification_line("item/agentMessage/delta", {"threadId": "T", "delta": "x" * (2 * limit)})
    huge = notification_line("item/agentMessage/delta", {"threadId": "T", "delta": "y" * (3 * 1024 * 1024)})
    normal = notification_line("turn/completed", {"threadId": "T", "turn": {"id": "u"}})
    scenario = {"big": [[small_big, normal, huge, normal, result_line("survived")]]}
    async with stub_server(tmp_path, scenario, max_line_bytes=limit) as app:
        sub = app.subscribe("T")
        assert await app.request("big", timeout=10) == "survived"
        assert [e.method for e in [sub.get_nowait(), sub.get_nowait()]] == ["turn/completed", "turn/completed"]
        assert sub.pending() == 0
        assert await app.request("next") == {"method": "next", "params": None}
        assert app.running


async def test_overload_is_retried_until_success(tmp_path: Path) -> None:
    overloaded = error_line(app_server.OVERLOADED_CODE, "Server overloaded; retry later.")
    scenario = {"busy": [[overloaded], [overloaded], [result_line("third time lucky")]]}
    async with stub_server(tmp_path, scenario) as app:
        assert await app.request("busy") == "third time lucky"


async def test_overload_gives_up_after_retries_and_other_errors_are_not_retried(tmp_path: Path) -> None:
    overloaded = error_line(app_server.OVERLOADED_CODE, "Server overloaded; retry later.")
    invalid = error_line(-32600, "bad params")
    scenario = {"busy": [[overloaded]], "invalid": [[invalid], [result_line("retried!")]]}
    async with stub_server(tmp_path, scenario) as app:
        with pytest.raises(AppServerError) as caught:
            await app.request("busy")
        assert caught.value.code == app_server.OVERLOADED_CODE
        with pytest.raises(AppServerError) as caught:
            await app.request("invalid")
        assert caught.value.code == -32600
        assert await app.request("invalid") == "retried!"  # second call: the first was not retried


@pytest.mark.parametrize(
    ("method", "policy_kind", "expected"),
    [
        (COMMAND_APPROVAL, "default", {"result": {"decision": "decline"}}),
        (COMMAND_APPROVAL, "broken", {"result": {"decision": "decline"}}),
        (COMMAND_APPROVAL, "accepting", {"result": {"decision": "accept"}}),
        ("some/unknown/request", "default", {"error": {"code": METHOD_NOT_HANDLED}}),
    ],
)
async def test_server_request_gets_exactly_one_answer(
    tmp_path: Path, method: str, policy_kind: str, expected: dict[str, Any]
) -> None:
    server_request = json.dumps({"id": 0, "method": method, "params": {"threadId": "T", "command": "ls"}})
    answered = json.dumps({"id": "@ID@", "result": "@LAST@"}).replace('"@ID@"', "@ID@").replace('"@LAST@"', "@LAST@")
    scenario = {"ask": [[server_request, "!read", answered]]}
    seen: list[ServerRequest] = []

    async def policy(request: ServerRequest) -> Answer:
        seen.append(request)
        if policy_kind == "broken":
            raise RuntimeError("policy bug")
        if policy_kind == "accepting":
            return Answer(result={"decision": "accept"})
        return await ServerRequestPolicy()(request)

    async with stub_server(tmp_path, scenario, policy=policy) as app:
        reply = await app.request("ask", timeout=10)
    assert [(r.id, r.method, r.thread_id) for r in seen] == [(0, method, "T")]
    assert reply["id"] == 0
    for key, value in expected.items():
        assert key in reply
        assert {k: reply[key][k] for k in value} == value


async def test_a_child_that_closed_its_input_is_gone_at_once_and_the_next_call_restarts_it(tmp_path: Path) -> None:
    """A write that hits a closed pipe means the child is unusable: nothing may wait for its exit
    code (kill -9 is seen this way first when a message races the death) before restarting it."""
    scenario = {"hangup": [["!close_stdin 30"]]}
    async with stub_server(tmp_path, scenario, backoff=RestartBackoff(0.01, 0.01)) as app:
        first_pid = app.pid
        waiting = asyncio.create_task(app.request("hangup", timeout=20))
        await asyncio.sleep(0.5)  # the stub has closed its input and sleeps with stdout open
        with pytest.raises(AppServerExited):
            await app.request("ping", timeout=5)
        assert not app.running  # at once: the stub is still alive, its stdout still open
        with pytest.raises(AppServerExited):
            await asyncio.wait_for(waiting, 5)  # the request already in flight fails too
        await app.ensure_running()
        assert app.pid != first_pid
        assert await app.request("ping", {"again": True}, timeout=5) == {"method": "ping", "params": {"again": True}}
