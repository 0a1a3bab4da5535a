"""What the Molecule platform reads from a host we own: usage it can count, the card it sees.

The platform's proxy decodes ``result.usage`` as int64 (Go): ``16743.0`` is refused, so the raw
JSON text is checked, not only the parsed value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from a2a.client import ClientConfig, ClientFactory
from a2a.types import AgentCard, GetTaskRequest, TaskState
from a2a_rig import CLIENT_TIMEOUT_S, send, serve_codex, user_message
from google.protobuf.json_format import ParseDict

from molecule_codex.demo.scripted_model import Text
from molecule_codex.reply_usage import reply_usage, whole_numbers, with_usage
from molecule_codex.standalone import card_host

ROOT = Path(__file__).resolve().parent.parent
V1 = {"A2A-Version": "1.0"}
#: A usage count written as a JSON integer: digits, then the end of the number.
INT_COUNT = r'"{name}":\s*-?\d+(?=[,}}\s])'
FLOAT_COUNT = r'"{name}":\s*-?\d+\.\d'



def v03_send(text: str, message_id: str, method: str = "message/send") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "method": method,
            "params": {"message": {"messageId": message_id, "role": "user", "parts": [{"kind": "text", "text": text}]}}}


def v1_send(text: str, message_id: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "method": "SendMessage",
            "params": {"message": {"messageId": message_id, "role": "ROLE_USER", "parts": [{"text": text}]}}}


def assert_strict_usage(raw: str, usage: Any, expected: tuple[int, int]) -> None:
    """Go-style strict int64: a JSON integer (not ``N.0``), equal to the model's count."""
    assert isinstance(usage, dict), raw[:2000]
    for name, value in zip(("input_tokens", "output_tokens"), expected, strict=True):
        assert isinstance(usage[name], int) and not isinstance(usage[name], bool), raw[:2000]
        assert usage[name] == value, raw[:2000]
    for name in ("input_tokens", "output_tokens"):
        assert re.search(INT_COUNT.format(name=name), raw), raw[:2000]
        assert not re.search(FLOAT_COUNT.format(name=name), raw), raw[:2000]


# ---------------------------------------------------------------------------- served, real codex


@pytest.mark.real_codex
async def test_v03_message_send_carries_result_usage_as_integers(tmp_path, model):
    model.enqueue(Text("the answer"))
    async with serve_codex(tmp_path, model) as served:
        response = await served.http().post("/", json=v03_send("hello", "m1"))
        raw = response.text
        body = json.loads(raw)
        result = body["result"]
        assert result["kind"] == "task" and result["status"]["state"] == "completed", raw[:2000]
        counted = model.requests[-1].usage
        expected = (counted.input_tokens, counted.output_tokens)
        assert expected[0] > 0 and expected[1] > 0
        assert_strict_usage(raw, result["usage"], expected)
        # metadata.usage is kept, now with whole numbers as integers too.
        metadata_usage = result["metadata"]["usage"]
        assert metadata_usage["input_tokens"] == expected[0] and isinstance(metadata_usage["input_tokens"], int)
        assert isinstance(result["status"]["message"]["metadata"]["usage"]["output_tokens"], int)
        assert ".0," not in json.dumps(result["metadata"]["usage"])


@pytest.mark.real_codex
async def test_v1_send_message_carries_result_usage_as_integers(tmp_path, model):
    model.enqueue(Text("the answer"))
    async with serve_codex(tmp_path, model) as served:
        response = await served.http().post("/", json=v1_send("hello", "m1"), headers=V1)
        raw = response.text
        result = json.loads(raw)["result"]
        assert result["task"]["status"]["state"] == "TASK_STATE_COMPLETED", raw[:2000]
        counted = model.requests[-1].usage
        assert_strict_usage(raw, result["usage"], (counted.input_tokens, counted.output_tokens))


@pytest.mark.real_codex
async def test_sdk_clients_still_read_replies_that_carry_usage(tmp_path, model):
    """The real a2a-sdk v1 client (blocking and streaming) and its v0.3 compat client."""
    for answer in ("one", "two", "three"):
        model.enqueue(Text(answer))
    async with serve_codex(tmp_path, model) as served:
        v1 = await served.client(streaming=False)
        items = await send(v1, user_message("hi"))
        assert [item.WhichOneof("payload") for item in items] == ["task"]
        assert items[0].task.status.state == TaskState.TASK_STATE_COMPLETED
        assert items[0].task.status.message.parts[0].text == "one"
        assert items[0].task.metadata["usage"]["output_tokens"] == model.requests[-1].usage.output_tokens
        stored = await v1.get_task(GetTaskRequest(id=items[0].task.id))
        assert stored.status.message.parts[0].text == "one"

        streaming = await served.client(streaming=True)
        streamed = await send(streaming, user_message("hi"))
        assert streamed[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED

        # A 0.3-only card makes the SDK pick its compat transport (message/send, kind shapes).
        methods: list[str] = []

        async def record(request: httpx.Request) -> None:
            if request.method == "POST":
                methods.append(json.loads(request.content)["method"])

        http = httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, event_hooks={"request": [record]})
        served._clients.append(http)
        card_json = (await http.get(f"{served.url}.well-known/agent-card.json")).json()
        interfaces = card_json["supportedInterfaces"]
        card_json["supportedInterfaces"] = [i for i in interfaces if i["protocolVersion"] == "0.3"]
        card = ParseDict(card_json, AgentCard(), ignore_unknown_fields=True)
        compat = ClientFactory(ClientConfig(streaming=False, httpx_client=http)).create(card)
        compat_items = await send(compat, user_message("hi"))
        assert methods == ["message/send"]
        assert compat_items[-1].task.status.state == TaskState.TASK_STATE_COMPLETED
        assert compat_items[-1].task.status.message.parts[0].text == "three"


@pytest.mark.real_codex
async def test_get_task_writes_whole_numbers_but_adds_no_usage(tmp_path, model):
    model.enqueue(Text("the answer"))
    async with serve_codex(tmp_path, model) as served:
        http = served.http()
        sent = (await http.post("/", json=v03_send("hello", "m1"))).json()["result"]
        response = await http.post("/", json={"jsonrpc": "2.0", "id": 2, "method": "tasks/get",
                                               "params": {"id": sent["id"]}})
        raw = response.text
        result = json.loads(raw)["result"]
        assert "usage" not in result, raw[:2000]
        assert isinstance(result["metadata"]["usage"]["input_tokens"], int), raw[:2000]
        assert not re.search(FLOAT_COUNT.format(name="input_tokens"), raw), raw[:2000]


@pytest.mark.real_codex
async def test_errors_and_streams_pass_untouched(tmp_path, model):
    model.enqueue(Text("streamed"))
    async with serve_codex(tmp_path, model) as served:
        http = served.http()
        bad = await http.post("/", content=b"{not json")
        assert bad.json()["error"]["code"] == -32700
        unknown = await http.post("/", json={"jsonrpc": "2.0", "id": 3, "method": "tasks/get",
                                             "params": {"id": "no-such-task"}})
        assert unknown.json()["error"]["code"] == -32001
        async with http.stream("POST", "/", json=v03_send("hello", "m2", method="message/stream")) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            frames = [json.loads(line[5:]) for line in [line async for line in response.aiter_lines()]
                      if line.startswith("data:")]
        assert frames[-1]["result"]["status"]["state"] == "completed"
        assert all("usage" not in frame["result"] for frame in frames)


# ---------------------------------------------------------------------------- reply rewriting


def test_whole_numbers_become_integers_and_nothing_else_changes() -> None:
    value = {"a": 16743.0, "b": [1.5, 2.0, {"c": -3.0}], "d": "4.0", "e": True, "f": None, "g": 1e300,
             "h": float("inf")}
    out = whole_numbers(value)
    assert out["a"] == 16743 and isinstance(out["a"], int)
    assert out["b"] == [1.5, 2, {"c": -3}] and isinstance(out["b"][1], int)
    assert out["d"] == "4.0" and out["e"] is True and out["f"] is None
    assert isinstance(out["g"], int) and out["g"] == int(1e300)
    assert out["h"] == float("inf")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"kind": "task", "metadata": {"usage": {"input_tokens": 10, "output_tokens": 2}}}, (10, 2)),
        ({"kind": "message", "metadata": {"usage": {"input_tokens": 1, "output_tokens": 0}}}, (1, 0)),
        ({"task": {"metadata": {"usage": {"input_tokens": 7, "output_tokens": 3}}}}, (7, 3)),
        ({"message": {"metadata": {"usage": {"input_tokens": 7, "output_tokens": 3}}}}, (7, 3)),
        ({"kind": "task", "status": {"message": {"metadata": {"usage": {"input_tokens": 5, "output_tokens": 6}}}}},
         (5, 6)),
        ({"kind": "task", "metadata": {"usage": {"input_tokens": 5}}}, None),
        ({"kind": "task", "metadata": {"usage": {"input_tokens": -1, "output_tokens": 1}}}, None),
        ({"kind": "task", "metadata": {"usage": {"input_tokens": True, "output_tokens": 1}}}, None),
        ({"kind": "task", "metadata": {"usage": "lots"}}, None),
        ({"kind": "task"}, None),
    ],
)
def test_reply_usage_shapes(result: dict[str, Any], expected: tuple[int, int] | None) -> None:
    usage = reply_usage(result)
    assert usage == (None if expected is None else {"input_tokens": expected[0], "output_tokens": expected[1]})


def test_with_usage_only_for_sends_and_never_overwrites() -> None:
    body = {"jsonrpc": "2.0", "id": 1,
            "result": {"kind": "task", "metadata": {"usage": {"input_tokens": 9.0, "output_tokens": 4.0}}}}
    assert with_usage(body, "message/send")["result"]["usage"] == {"input_tokens": 9, "output_tokens": 4}
    assert "usage" not in with_usage(body, "tasks/get")["result"]
    assert body["result"]["metadata"]["usage"]["input_tokens"] == 9.0  # the input is not mutated
    own = {"result": {"kind": "task", "usage": {"input_tokens": 1, "output_tokens": 1},
                      "metadata": {"usage": {"input_tokens": 9, "output_tokens": 4}}}}
    assert with_usage(own, "message/send")["result"]["usage"] == {"input_tokens": 1, "output_tokens": 1}
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32001, "message": "x"}}
    assert with_usage(error, "message/send") == error


# ---------------------------------------------------------------------------- card and template


@pytest.mark.parametrize(
    ("bind", "advertised"),
    [("127.0.0.1", "localhost"), ("127.0.0.5", "localhost"), ("::1", "localhost"), ("localhost", "localhost"),
     ("0.0.0.0", "localhost"), ("::", "localhost"), ("10.1.2.3", "10.1.2.3"),
     ("agent.example.com", "agent.example.com"), ("fd00::7", "[fd00::7]")],
)
def test_card_host(bind: str, advertised: str) -> None:
    assert card_host(bind) == advertised


def test_template_turns_push_notifications_off() -> None:
    """The runtime's A2AConfig defaults push_notifications to True and the card advertises it,
    but the handler it builds answers tasks/pushNotificationConfig/set with -32003."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert data["a2a"]["push_notifications"] is False
    assert data["a2a"]["port"] == 8000


@pytest.mark.real_codex
async def test_served_card_has_no_push_capability(tmp_path, model):
    async with serve_codex(tmp_path, model) as served:
        card = (await served.http().get("/.well-known/agent-card.json")).json()
        assert card["capabilities"].get("pushNotifications", False) is False
        assert card["capabilities"]["streaming"] is True
