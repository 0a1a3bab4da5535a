"""Bad input against the live server: a clear JSON-RPC error or a FAILED task, never a crash.

One server (real codex, scripted model, bearer tokens for two callers, ``on_busy="steer"``)
serves the whole module. Each case checks the answer (code and a readable message, no
traceback or SQL in it), that refused input never reached the model, that nothing was written
outside the workspace, and that a normal message still completes afterwards. The hypothesis
fuzz at the end sends generated message shapes in the 1.0 and the 0.3 JSON-RPC dialects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from a2a.types import Message, Part, Role, TaskState
from a2a_rig import Served, send, serve_codex, status_texts, terminal_state, user_message
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from molecule_codex.demo.scripted_model import ScriptedModel, Text
from molecule_codex.inputs import InputBuilder, InputError

pytestmark = [pytest.mark.real_codex, pytest.mark.asyncio(loop_scope="module")]

T1, T2 = "token-one", "token-two"
V1 = {"A2A-Version": "1.0"}
V03: dict[str, str] = {}  # no version header: the 0.3 dialect
#: Nothing may hang: every call answers within this.
ANSWER_TIMEOUT_S = 30.0
#: Text that must never reach a caller (a Python traceback, SQL from the task store).
LEAKS = ("Traceback (most recent call last)", 'File "/', "sqlalchemy", "sqlite3.", "SELECT ", "INSERT INTO")
TERMINAL_V1 = {"TASK_STATE_COMPLETED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED", "TASK_STATE_REJECTED"}
TERMINAL_V03 = {"completed", "failed", "canceled", "rejected"}
_ids = itertools.count(1)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rpc(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params}


def v1_send(*parts: Any, method: str = "SendMessage", **fields: Any) -> dict[str, Any]:
    message = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": list(parts), **fields}
    return rpc(method, {"message": message})


def v03_send(*parts: Any, method: str = "message/send", **fields: Any) -> dict[str, Any]:
    message = {"kind": "message", "messageId": str(uuid.uuid4()), "role": "user", "parts": list(parts), **fields}
    return rpc(method, {"message": message})


def assert_clean(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, text[:2000]


def status_text(task: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in task["status"].get("message", {}).get("parts", []))


@dataclass
class Rig:
    """The module's server plus helpers for raw JSON-RPC against it."""

    served: Served
    model: ScriptedModel
    root: Path
    outside: Path
    t1: httpx.AsyncClient
    t2: httpx.AsyncClient

    @property
    def workspace(self) -> Path:
        return self.served.workspace

    async def post(
        self,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        """POST ``raw`` bytes or ``body`` as JSON (NaN and lone surrogates allowed) to ``/``."""
        content = raw if raw is not None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(V1 if headers is None else headers)}
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            response = await (client or self.t1).post("/", content=content, headers=all_headers)
        assert_clean(response.text)
        return response

    async def error(self, body: Any = None, *, code: int | set[int], fragment: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON-RPC error the request gets (HTTP 200); its message or data names ``fragment``."""
        response = await self.post(body, **kwargs)
        assert response.status_code == 200, response.text
        frames = sse_frames(response) if is_sse(response) else [response.json()]
        assert len(frames) == 1, frames
        assert "result" not in frames[0], frames[0]
        error = frames[0]["error"]
        assert error["code"] in (code if isinstance(code, set) else {code}), error
        assert isinstance(error["message"], str) and error["message"].strip(), error
        assert fragment in error["message"] + json.dumps(error.get("data")), error
        return error

    async def task(self, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        """The task a blocking send answers with (1.0 wraps it in ``task``, 0.3 marks it ``kind``)."""
        response = await self.post(body, **kwargs)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        return result.get("task", result)

    async def failed(self, body: Any = None, *, fragment: str, **kwargs: Any) -> dict[str, Any]:
        task = await self.task(body, **kwargs)
        assert task["status"]["state"] in ("TASK_STATE_FAILED", "failed"), task["status"]
        text = status_text(task)
        assert text.startswith("Cannot run this message: "), text
        assert fragment in text, text
        return task

    async def completed(self, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        task = await self.task(body, **kwargs)
        assert task["status"]["state"] in ("TASK_STATE_COMPLETED", "completed"), status_text(task)
        return task

    @contextlib.contextmanager
    def nothing_reaches_codex(self) -> Iterator[None]:
        before = len(self.model.requests)
        yield
        assert len(self.model.requests) == before, "refused input reached the model"

    def assert_nothing_outside(self) -> None:
        assert sorted(os.listdir(self.outside)) == ["secret.txt"]
        assert (self.outside / "secret.txt").read_text() == "secret"
        assert sorted(os.listdir(self.root)) == ["outside", "state", "workspace"]

    async def assert_still_serving(self) -> None:
        """Health answers, a normal message completes, and nothing landed outside the workspace."""
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            assert (await self.t1.get("/health")).status_code == 200
        text = f"still serving {uuid.uuid4().hex[:6]}"
        task = await self.completed(v1_send({"text": text}))
        assert task["artifacts"][0]["parts"][0]["text"] == f"echo: {text}"
        self.assert_nothing_outside()


def is_sse(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def sse_frames(response: httpx.Response) -> list[dict[str, Any]]:
    # SSE lines end only at CR/LF; str.splitlines() would also split at U+0085 or U+2028 inside the data.
    lines = re.split(r"\r\n|\r|\n", response.text)
    return [json.loads(line[5:]) for line in lines if line.startswith("data:")]


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedModel]:
    with ScriptedModel() as scripted:
        yield scripted


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory, model: ScriptedModel):
    root = tmp_path_factory.mktemp("bad-input")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    # A generous model-stream idle limit: a loaded machine must not turn a slow turn into a failure here.
    async with serve_codex(root, model, tokens=(T1, T2), on_busy="steer", stream_idle_timeout_ms=30_000) as served:
        (served.workspace / "inside.txt").write_text("inside")
        (served.workspace / "link-out.txt").symlink_to(outside / "secret.txt")
        (served.workspace / "link-dir").symlink_to(outside, target_is_directory=True)
        yield Rig(served, model, root, outside, served.http(headers=auth(T1)), served.http(headers=auth(T2)))


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Bad input is the caller's mistake: the executor must never report it as its own internal error."""
    caplog.set_level(logging.ERROR, logger="molecule_codex.executor")
    yield
    internal = [r.getMessage() for r in caplog.records
                if r.name == "molecule_codex.executor" and r.levelno >= logging.ERROR]
    assert not internal, internal


# ---------------------------------------------------------------------------- protocol level


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": ', -32700, "Expecting value"),
        (b"", -32700, "Expecting value"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}} tail', -32700, "Extra data"),
        (b"null", -32600, "should be an object"),
        (b'"just a string"', -32600, "should be an object"),
        (b"[]", -32600, "not accepted"),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}]', -32600, "Batch"),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}', -32600, "'2.0'"),
        (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "GetTask", "params": {"id": "x"}}', -32600, "id should be"),
        (b'{"jsonrpc": "2.0", "id": 1, "params": {}}', -32600, "method"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 7, "params": {}}', -32600, "Method should be string"),
    ],
    ids=["truncated", "empty", "trailing-garbage", "null", "string", "empty-batch", "batch", "jsonrpc-1.0",
         "object-id", "no-method", "method-not-string"],
)
async def test_malformed_json_rpc_is_refused(rig, raw, code, fragment):
    with rig.nothing_reaches_codex():
        await rig.error(raw=raw, code=code, fragment=fragment)
    await rig.assert_still_serving()


@pytest.mark.parametrize(
    ("method", "headers", "code", "fragment"),
    [
        ("Frobnicate", V1, -32601, "Method not found"),
        ("tasks/frobnicate", V03, -32601, "Method not found"),
        ("", V1, -32600, "Method is required"),
    ],
    ids=["v1", "v03-style", "empty"],
)
async def test_unknown_method_is_refused(rig, method, headers, code, fragment):
    with rig.nothing_reaches_codex():
        await rig.error(rpc(method, {"id": "x"}), headers=headers, code=code, fragment=fragment)
    await rig.assert_still_serving()


@pytest.mark.parametrize(
    ("dialect", "headers", "code", "fragment"),
    [
        ("v1", {}, -32009, "A2A version '0.3' is not supported"),
        ("v1", {"A2A-Version": "2.0"}, -32009, "A2A version '2.0' is not supported"),
        ("v1", {"A2A-Version": "banana"}, -32009, "A2A version 'banana' is not supported"),
        ("v03", V1, -32603, "A2A version '1.0' is not supported"),
    ],
    ids=["v1-without-header", "v1-header-2.0", "v1-header-garbage", "v03-with-1.0-header"],
)
async def test_wrong_version_header_is_refused_before_codex(rig, dialect, headers, code, fragment):
    body = v1_send({"text": "wrong version"}) if dialect == "v1" else v03_send({"kind": "text", "text": "wrong"})
    with rig.nothing_reaches_codex():
        await rig.error(body, headers=headers, code=code, fragment=fragment)
    await rig.assert_still_serving()


def _without(field: str) -> dict[str, Any]:
    body = v1_send({"text": "incomplete"})
    del body["params"]["message"][field]
    return body


@pytest.mark.parametrize(
    ("body", "headers", "code", "fragment"),
    [
        (v1_send(), V1, -32602, "message.parts"),
        (_without("parts"), V1, -32602, "message.parts"),
        (_without("messageId"), V1, -32602, "message_id"),
        (_without("role"), V1, -32602, "message.role"),
        (rpc("SendMessage", {}), V1, -32602, "message"),
        (rpc("SendMessage", {"message": {"messageId": "m", "role": "ROLE_USER", "parts": "text"}}), V1, -32602,
         "repeated field parts"),
        (rpc("SendMessage", None), V1, -32602, "Invalid params"),
        (v1_send({"text": "two contents", "data": {"a": 1}}), V1, -32602, "multiple"),
        (v1_send({"text": 5}), V1, -32602, "text field"),
        (v1_send(method="SendStreamingMessage"), V1, -32602, "message.parts"),
        (v03_send(), V03, -32602, "message.parts"),
        (v03_send({"kind": "video", "text": "x"}), V03, -32600, "validation error"),
        (v03_send({"kind": "text", "text": "x"}, role="robot"), V03, -32600, "role"),
        (v03_send(method="message/stream"), V03, -32602, "message.parts"),
    ],
    ids=["no-parts", "parts-missing", "message-id-missing", "role-missing", "message-missing", "parts-not-list",
         "params-null", "two-contents", "text-not-string", "stream-no-parts", "v03-no-parts", "v03-bad-kind",
         "v03-bad-role", "v03-stream-no-parts"],
)
async def test_missing_or_malformed_fields_are_refused(rig, body, headers, code, fragment):
    with rig.nothing_reaches_codex():
        await rig.error(body, headers=headers, code=code, fragment=fragment)
    await rig.assert_still_serving()


async def test_parts_without_content_fail_as_empty(rig):
    with rig.nothing_reaches_codex():
        await rig.failed(v1_send({}, {"mediaType": "text/plain"}, {"text": ""}), fragment="the message is empty")
        await rig.failed(v1_send(*[{"text": ""}] * 10_000), fragment="the message is empty")
    await rig.assert_still_serving()


# ---------------------------------------------------------------------------- size


async def test_ten_thousand_parts_arrive_as_one_prompt(rig):
    rig.model.enqueue(Text("got them all"))
    before = len(rig.model.requests)
    task = await rig.completed(v1_send(*[{"text": f"p{i}"} for i in range(10_000)]))
    assert task["artifacts"][0]["parts"][0]["text"] == "got them all"
    assert len(rig.model.requests) == before + 1
    assert rig.model.requests[-1].last_user_text.splitlines() == [f"p{i}" for i in range(10_000)]
    await rig.assert_still_serving()


async def test_forty_megabyte_body_gets_413(rig):
    body = json.dumps(v1_send({"text": "x" * 40_000_000})).encode()
    with rig.nothing_reaches_codex():
        response = await rig.post(raw=body)
    assert response.status_code == 413, response.text[:300]
    await rig.assert_still_serving()


async def test_huge_data_part_fails_with_the_limit(rig):
    data = {f"key{i}": "v" * 100 for i in range(20_000)}  # ~2.2 MB of JSON text, limit 1,000,000 chars
    with rig.nothing_reaches_codex():
        await rig.failed(v1_send({"data": data}), fragment="the limit is 1,000,000")
    await rig.assert_still_serving()


@pytest.mark.parametrize(
    ("depth", "code", "fragment"),
    [(150, -32602, "too deep"), (5000, -32603, "maximum recursion depth")],
    ids=["protobuf-limit", "json-decoder-limit"],
)
async def test_deeply_nested_data_is_refused(rig, depth, code, fragment):
    head = '{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {"messageId": "deep", '
    raw = (head + '"role": "ROLE_USER", "parts": [{"data": ' + "[" * depth + "]" * depth + "}]}}}").encode()
    with rig.nothing_reaches_codex():
        await rig.error(raw=raw, code=code, fragment=fragment)
    await rig.assert_still_serving()


@pytest.mark.parametrize("where", ["data", "metadata", "v03-data"])
async def test_nan_in_json_is_refused(rig, where):
    # Python's JSON decoder accepts NaN; protobuf's Value cannot carry it back out.
    if where == "data":
        body = v1_send({"text": "with nan"}, {"data": {"x": float("nan")}})
    elif where == "metadata":
        body = v1_send({"text": "with nan"}, metadata={"x": float("inf")})
    else:
        body = v03_send({"kind": "data", "data": {"x": float("nan")}})
    with rig.nothing_reaches_codex():
        response = await rig.post(body, headers=V03 if where.startswith("v03") else V1)
    reply = response.json()
    if "error" in reply:
        assert reply["error"]["code"] == -32603
        assert "NaN" in reply["error"]["message"] or "Infinity" in reply["error"]["message"], reply
    else:
        task = reply["result"].get("task", reply["result"])
        assert "NaN or Infinity" in status_text(task), task
    await rig.assert_still_serving()


async def test_nan_data_is_an_input_error_where_the_store_keeps_it(tmp_path):
    # A task store that does not serialize (the platform's in-memory one) lets NaN reach the executor.
    value = struct_pb2.Value()
    value.struct_value.update({"x": float("nan")})
    message = user_message("", parts=[Part(text="with nan"), Part(data=value)])
    with pytest.raises(InputError, match="NaN or Infinity"):
        InputBuilder(tmp_path, 1000).build(message)


async def test_data_part_numbers_reach_codex_as_the_caller_wrote_them(tmp_path):
    # protobuf's Value widens every number to a double; the agent must read 2, not 2.0.
    value = struct_pb2.Value()
    value.struct_value.update({"count": 2, "ratio": 1.5, "nested": [{"n": -3}]})
    built = InputBuilder(tmp_path, 1000).build(user_message("", parts=[Part(data=value)]))
    assert built.text == '{"count": 2, "nested": [{"n": -3}], "ratio": 1.5}'


# ---------------------------------------------------------------------------- encodings


async def test_binary_garbage_in_text_reaches_codex_verbatim(rig):
    garbage = "start" + bytes(range(1, 32)).decode() + "\x00\x7f" + bytes(range(128, 256)).decode("latin-1")
    garbage += "\u200b\ufeff\U0001f600\u202e" + "end"
    before = len(rig.model.requests)
    task = await rig.completed(v1_send({"text": garbage}))
    assert len(rig.model.requests) == before + 1
    assert rig.model.requests[-1].last_user_text == garbage
    assert task["artifacts"][0]["parts"][0]["text"] == f"echo: {garbage}"
    await rig.assert_still_serving()


async def test_invalid_utf8_body_is_refused(rig):
    raw = json.dumps(v1_send({"text": "PLACEHOLDER"})).encode().replace(b"PLACEHOLDER", b"\xff\xfe\xc3(")
    with rig.nothing_reaches_codex():
        # The SDK reports a body it cannot decode as -32603 rather than -32700; either is a clear refusal.
        await rig.error(raw=raw, code={-32700, -32603}, fragment="can't decode byte 0xff")
    await rig.assert_still_serving()


@pytest.mark.parametrize(
    ("body", "headers", "code", "fragment"),
    [
        (v1_send({"text": "a\ud800b"}), V1, -32602, "Unpaired surrogate"),
        (v03_send({"kind": "text", "text": "a\udc00b"}), V03, -32603, "surrogates not allowed"),
    ],
    ids=["v1", "v03"],
)
async def test_lone_surrogates_are_refused(rig, body, headers, code, fragment):
    with rig.nothing_reaches_codex():
        await rig.error(body, headers=headers, code=code, fragment=fragment)
    await rig.assert_still_serving()


# ---------------------------------------------------------------------------- files and media


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("link-out.txt", "points outside the workspace"),
        ("link-dir/secret.txt", "points outside the workspace"),
        ("workspace:../outside/secret.txt", "points outside the workspace"),
        ("file:///{workspace}/link-out.txt", "points outside the workspace"),
        ("file:///{workspace}/%2e%2e/outside/secret.txt", "points outside the workspace"),
        ("{workspace}/../outside/secret.txt", "points outside the workspace"),
        ("/etc/hostname", "points outside the workspace"),
        ("inside\x00.txt", "not a usable path"),
        ("x" * 5000, "not a usable path"),
        (".molecule", "no such file in the workspace"),
    ],
    ids=["symlink-file", "symlink-dir", "workspace-dotdot", "file-url-symlink", "file-url-encoded-dotdot",
         "absolute-dotdot", "absolute", "nul-byte", "name-too-long", "directory"],
)
async def test_file_reference_escaping_the_workspace_is_refused(rig, url, fragment):
    url = url.replace("{workspace}", str(rig.workspace).lstrip("/") if url.startswith("file:") else str(rig.workspace))
    with rig.nothing_reaches_codex():
        await rig.failed(v1_send({"text": "read it"}, {"url": url, "mediaType": "text/plain"}), fragment=fragment)
    await rig.assert_still_serving()


async def test_file_reference_inside_the_workspace_is_attached(rig):
    task = await rig.completed(v1_send({"text": "read it"}, {"url": "inside.txt", "mediaType": "text/plain"}))
    assert f"[attached file in the workspace: {rig.workspace / 'inside.txt'}]" in status_text(task)
    await rig.assert_still_serving()


async def test_attachment_is_never_written_through_a_symlinked_inputs_directory(rig):
    molecule = rig.workspace / ".molecule"
    molecule.mkdir(exist_ok=True)
    saved = molecule / "inputs"
    kept = molecule / "inputs.kept"
    if saved.exists():
        saved.rename(kept)
    saved.symlink_to(rig.outside, target_is_directory=True)
    try:
        payload = base64.b64encode(b"attacker bytes").decode()
        with rig.nothing_reaches_codex():
            await rig.failed(v1_send({"raw": payload, "filename": "note.txt", "mediaType": "text/plain"}),
                             fragment="points outside it")
        rig.assert_nothing_outside()
    finally:
        saved.unlink()
        if kept.exists():
            kept.rename(saved)
    await rig.assert_still_serving()


async def test_attachment_filename_cannot_climb_out(rig):
    payload = base64.b64encode(b"harmless").decode()
    task = await rig.completed(v1_send({"raw": payload, "filename": "../../../outside/evil.txt"}))
    saved = [p for p in (rig.workspace / ".molecule" / "inputs").iterdir() if p.name.endswith("evil.txt")]
    assert len(saved) == 1 and saved[0].read_bytes() == b"harmless"
    assert str(saved[0]) in status_text(task)
    await rig.assert_still_serving()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/file.bin", "remote URLs are not fetched"),
        ("s3://bucket/key", "remote URLs are not fetched"),
        ("https://example.com/cat.png", "remote URLs are not fetched"),
        ("data:text/plain,hello", "only base64 data: URLs"),
        ("data:image/png;base64,@@not-base64@@", "not valid base64"),
        ("javascript:alert(1)", "no such file in the workspace"),
        ("mailto:someone@example.com", "no such file in the workspace"),
    ],
    ids=["ftp", "s3", "https", "data-not-base64", "data-bad-base64", "javascript", "mailto"],
)
async def test_unsupported_url_is_refused(rig, url, fragment):
    with rig.nothing_reaches_codex():
        await rig.failed(v1_send({"text": "look"}, {"url": url, "mediaType": "image/png"}), fragment=fragment)
    await rig.assert_still_serving()


@pytest.mark.parametrize(
    ("media_type", "data", "expect"),
    [
        ("application/x-msdownload", b"MZ\x90\x00binary", "[attached file saved at "),
        ("video/mp4", b"\x00\x00\x00\x18ftypmp42", "[attached file saved at "),
        ("not a media type", b"plain", "[attached file saved at "),
        ("image/png", b"definitely not a png", "could not be processed"),
        ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "could not be processed"),
    ],
    ids=["exe", "video", "garbage-type", "fake-png", "svg"],
)
async def test_unsupported_media_type_is_saved_or_declined_by_codex(rig, media_type, data, expect):
    part = {"raw": base64.b64encode(data).decode(), "mediaType": media_type}
    task = await rig.completed(v1_send({"text": "what is this?"}, part))
    assert expect in task["artifacts"][0]["parts"][0]["text"], task["artifacts"]
    await rig.assert_still_serving()


# ---------------------------------------------------------------------------- tasks and callers


async def test_other_callers_task_ids_are_not_found(rig):
    mine = await rig.completed(v1_send({"text": "caller one's task"}))
    task_id = mine["id"]
    with rig.nothing_reaches_codex():
        for body, headers in [
            (rpc("CancelTask", {"id": task_id}), V1),
            (rpc("tasks/cancel", {"id": task_id}), V03),
            (rpc("SubscribeToTask", {"id": task_id}), V1),
            (rpc("GetTask", {"id": task_id, "historyLength": 10}), V1),
            (v1_send({"text": "continue their task"}, taskId=task_id), V1),
            (v03_send({"kind": "text", "text": "continue their task"}, taskId=task_id), V03),
        ]:
            await rig.error(body, headers=headers, client=rig.t2, code=-32001, fragment="not found")
        listed = (await rig.post(rpc("ListTasks", {}), client=rig.t2)).json()["result"]
        assert task_id not in {task["id"] for task in listed.get("tasks", [])}
    again = (await rig.post(rpc("GetTask", {"id": task_id}))).json()["result"]
    assert again["status"]["state"] == "TASK_STATE_COMPLETED"
    await rig.assert_still_serving()


async def test_other_callers_context_id_does_not_share_the_conversation(rig):
    context_id = f"shared-{uuid.uuid4().hex[:6]}"
    await rig.completed(v1_send({"text": "caller one's secret plan"}, contextId=context_id))
    theirs = await rig.completed(v1_send({"text": "what did we discuss?"}, contextId=context_id), client=rig.t2)
    assert theirs["contextId"] == context_id
    assert rig.model.requests[-1].all_user_texts == ["what did we discuss?"]
    await rig.completed(v1_send({"text": "and next?"}, contextId=context_id))
    assert rig.model.requests[-1].all_user_texts == ["caller one's secret plan", "and next?"]
    await rig.assert_still_serving()


async def test_cancel_of_unknown_or_finished_task_is_refused(rig):
    finished = (await rig.completed(v1_send({"text": "done already"})))["id"]
    with rig.nothing_reaches_codex():
        await rig.error(rpc("CancelTask", {"id": "no-such-task"}), code=-32001, fragment="not found")
        await rig.error(rpc("tasks/cancel", {"id": "no-such-task"}), headers=V03, code=-32001, fragment="not found")
        await rig.error(rpc("CancelTask", {"id": finished}), code=-32002, fragment="cannot be canceled")
        await rig.error(rpc("tasks/cancel", {"id": finished}), headers=V03, code=-32002, fragment="cannot be canceled")
        await rig.error(rpc("CancelTask", {}), code=-32602, fragment="id")
        await rig.error(rpc("SubscribeToTask", {"id": finished}), code=-32004, fragment="terminal state")
        await rig.error(v1_send({"text": "more"}, taskId=finished), code=-32004, fragment="terminal state")
    again = (await rig.post(rpc("GetTask", {"id": finished}))).json()["result"]
    assert again["status"]["state"] == "TASK_STATE_COMPLETED"
    await rig.assert_still_serving()


async def test_steer_while_nothing_runs_is_a_normal_turn(rig):
    client = await rig.served.client(streaming=True, headers=auth(T1))
    context_id = f"steer-{uuid.uuid4().hex[:6]}"
    first = await send(client, user_message("first, alone", context_id=context_id))
    assert terminal_state(first) == TaskState.TASK_STATE_COMPLETED
    second = await send(client, user_message("second, nothing running", context_id=context_id))
    assert terminal_state(second) == TaskState.TASK_STATE_COMPLETED
    assert not any("Added to the running turn" in text for text in status_texts(second))
    assert status_texts(second)[-1] == "echo: second, nothing running"
    assert rig.model.requests[-1].all_user_texts == ["first, alone", "second, nothing running"]
    await rig.assert_still_serving()


# ---------------------------------------------------------------------------- fuzz

_any_text = st.text(st.characters(exclude_categories=()), max_size=60)  # surrogates, NULs, controls included
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_any_text, inner, max_size=4),
    max_leaves=12,
)
_media = st.sampled_from(
    ["text/plain", "image/png", "image/svg+xml", "application/octet-stream", "application/x-msdownload", "", "image/"]
) | _any_text
_urls = st.builds(
    str.__add__,
    st.sampled_from(["", "file://", "file:", "workspace:", "http://", "ftp://", "data:", "data:image/png;base64,",
                     "javascript:", "s3://", "../", "/"]),
    st.sampled_from(["inside.txt", "link-out.txt", "link-dir/secret.txt", "../outside/secret.txt", "/etc/passwd",
                     "%2e%2e/%2e%2e/etc/passwd", ".molecule/inputs", "", "iVBORw0KGgo=", "a\x00b", "x" * 300])
    | _any_text,
)
_object = st.dictionaries(_any_text, _json, max_size=3)
_base64 = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()) | _any_text
_v1_part = st.one_of(
    st.fixed_dictionaries({"text": _any_text}),
    st.fixed_dictionaries({"data": _json}),
    st.fixed_dictionaries({"url": _urls}, optional={"mediaType": _media, "filename": _any_text}),
    st.fixed_dictionaries({"raw": _base64}, optional={"mediaType": _media, "filename": _any_text}),
    st.dictionaries(st.sampled_from(["text", "data", "url", "raw", "mediaType", "filename", "metadata", "x"]), _json,
                    max_size=3),
)
_v1_message = st.one_of(
    st.fixed_dictionaries(
        {"messageId": st.uuids().map(str), "role": st.just("ROLE_USER"), "parts": st.lists(_v1_part, min_size=1,
                                                                                             max_size=4)},
        optional={"contextId": st.uuids().map(str) | _any_text, "metadata": _object},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "messageId": _any_text | _json,
            "role": st.sampled_from(["ROLE_USER", "ROLE_AGENT", "ROLE_UNSPECIFIED", "user", ""]) | _json,
            "parts": st.lists(_v1_part, max_size=4) | _json,
            "contextId": _any_text | _json,
            "taskId": st.uuids().map(str) | _any_text,
            "extensions": _json,
        },
    ),
)
_v03_part = st.one_of(
    st.fixed_dictionaries({"kind": st.just("text"), "text": _any_text}),
    st.fixed_dictionaries({"kind": st.just("data"), "data": _object}),
    st.fixed_dictionaries({"kind": st.just("file"), "file": st.one_of(
        st.fixed_dictionaries({"bytes": _base64}, optional={"mimeType": _media, "name": _any_text}),
        st.fixed_dictionaries({"uri": _urls}, optional={"mimeType": _media, "name": _any_text}),
    )}),
    st.dictionaries(st.sampled_from(["kind", "text", "data", "file", "metadata"]), _json, max_size=3),
)
_v03_message = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("message"), "messageId": st.uuids().map(str), "role": st.just("user"),
         "parts": st.lists(_v03_part, min_size=1, max_size=4)},
        optional={"contextId": st.uuids().map(str) | _any_text, "metadata": _object},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "kind": st.sampled_from(["message", "task"]) | _any_text,
            "messageId": _any_text | _json,
            "role": st.sampled_from(["user", "agent", "ROLE_USER"]) | _json,
            "parts": st.lists(_v03_part, max_size=4) | _json,
            "contextId": _any_text,
            "taskId": st.uuids().map(str) | _any_text,
        },
    ),
)
_request_id = st.integers(0, 2**31) | st.uuids().map(str) | st.integers(-(2**31), -1) | st.none()


def _envelope(methods: list[str], message: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    params = st.fixed_dictionaries(
        {"message": message},
        optional={"configuration": st.fixed_dictionaries({}, optional={"historyLength": st.integers(-3, 3)}),
                  "metadata": _object | _json},
    )
    return st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "id": _request_id, "method": st.sampled_from(methods), "params": params}
    )


FUZZ_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def fixed_reply(model: ScriptedModel) -> Iterator[None]:
    """Fuzzed prompts must not steer the scripted model (its ``[tool=…]`` directives run commands)."""
    original = model.responder
    model.responder = lambda _request: Text("fuzzed")
    try:
        yield
    finally:
        model.responder = original


async def _check_answer(rig: Rig, body: dict[str, Any], headers: dict[str, str]) -> None:
    """The property: HTTP 200/400/413, a JSON-RPC error or a terminal task, and the server still healthy."""
    before = len(rig.model.requests)
    response = await rig.post(body, headers=headers)
    assert response.status_code in (200, 400, 413), (response.status_code, response.text[:500])
    if response.status_code == 200:
        frames = sse_frames(response) if is_sse(response) else [response.json()]
        assert frames, response.text[:500]
        last = frames[-1]
        if "error" in last:
            error = last["error"]
            assert isinstance(error["code"], int) and error["code"] < 0, error
            assert isinstance(error["message"], str) and error["message"].strip(), error
            event(f"error {error['code']}")
            if len(frames) == 1:
                assert len(rig.model.requests) == before, f"refused request reached the model: {error}"
        else:
            result = last["result"]
            if "statusUpdate" in result:
                status = result["statusUpdate"]["status"]
            elif "kind" in result:  # 0.3: a bare task or a status-update event
                status = result["status"]
            else:
                status = result["task"]["status"]
            assert status["state"] in TERMINAL_V1 | TERMINAL_V03, status
            event(f"task {status['state']}")
            text = "".join(part.get("text", "") for part in status.get("message", {}).get("parts", []))
            assert_clean(text)
            assert "internal error" not in text, text
            if text.startswith("Cannot run this message"):
                assert len(rig.model.requests) == before, f"refused message reached the model: {text}"
    else:
        assert len(rig.model.requests) == before
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        assert (await rig.t1.get("/health")).status_code == 200


@FUZZ_SETTINGS
@given(body=_envelope(["SendMessage", "SendStreamingMessage"], _v1_message))
async def test_fuzz_v1_message_shapes(rig, fixed_reply, body):
    await _check_answer(rig, body, V1)


@FUZZ_SETTINGS
@given(body=_envelope(["message/send", "message/stream"], _v03_message))
async def test_fuzz_v03_message_shapes(rig, fixed_reply, body):
    await _check_answer(rig, body, V03)


async def test_still_serving_after_the_fuzz(rig):
    rig.assert_nothing_outside()
    await rig.assert_still_serving()


async def test_only_messages_with_files_are_built_off_the_event_loop():
    """Attachments are decoded and saved in a thread; text and data parts are too cheap for a hop."""
    text, data = Part(text="hi"), Part(data=struct_pb2.Value(string_value="x"))
    raw = Part(raw=b"\x89PNG", filename="a.png", media_type="image/png")
    url = Part(url="data:text/plain;base64,aGk=", filename="a.txt")
    assert not InputBuilder.touches_disk(user_message_with(text, data))
    assert InputBuilder.touches_disk(user_message_with(text, raw))
    assert InputBuilder.touches_disk(user_message_with(url))


def user_message_with(*parts: Part) -> Message:
    return Message(role=Role.ROLE_USER, message_id="m", parts=list(parts))
