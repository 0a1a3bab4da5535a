"""Tests for the loopback fake Responses API: wire framing over HTTP, scripting, recording, and real codex."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from molecule_codex import codex_binary
from molecule_codex.demo import scripted_model as sm

#: Generous bound for one loopback HTTP call; failures should show as errors, not hangs.
HTTP_TIMEOUT_S = 5.0
#: Bound for one ``codex exec`` run against the scripted model (normally well under a second).
CODEX_RUN_TIMEOUT_S = 30.0


@pytest.fixture
def model() -> Iterator[sm.ScriptedModel]:
    with sm.ScriptedModel() as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
        yield http


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def request_body(*items: dict[str, Any]) -> dict[str, Any]:
    """A body shaped like codex's: developer prompt, injected context, then the given items."""
    return {
        "model": "scripted-model",
        "stream": True,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "sys"}]},
            user_message("<environment_context>\n  <cwd>/w</cwd>\n</environment_context>"),
            *items,
        ],
    }


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(event, data)`` per SSE frame as the lines arrive."""
    kind, data = "", ""
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and kind:
            yield kind, json.loads(data)
            kind, data = "", ""


def post_events(client: httpx.Client, model: sm.ScriptedModel, body: dict[str, Any]) -> list[tuple[str, dict]]:
    with client.stream("POST", f"{model.base_url}/responses", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        return list(parse_sse(response.iter_lines()))


def deltas(events: list[tuple[str, dict]]) -> list[str]:
    return [data["delta"] for kind, data in events if kind == "response.output_text.delta"]


# --------------------------------------------------------------------------- wire format


def test_text_stream_frames_usage_and_timestamps(model: sm.ScriptedModel, client: httpx.Client) -> None:
    model.enqueue(sm.Text("hello big world"))
    events = post_events(client, model, request_body(user_message("hi")))

    kinds = [kind for kind, _ in events]
    assert kinds == [
        "response.created",
        "response.output_item.added",
        *["response.output_text.delta"] * 3,
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == kind for kind, data in events)
    assert deltas(events) == ["hello ", "big ", "world"]
    done_item = events[-2][1]["item"]
    assert done_item["role"] == "assistant"
    assert done_item["content"][0]["text"] == "hello big world"
    usage = events[-1][1]["response"]["usage"]
    expected = sm.Usage(output_tokens=3)
    assert usage == {
        "input_tokens": sm.DEFAULT_INPUT_TOKENS,
        "input_tokens_details": {"cached_tokens": sm.DEFAULT_CACHED_TOKENS},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": sm.DEFAULT_INPUT_TOKENS + 3,
    }
    (record,) = model.requests
    assert record.wait_finished(HTTP_TIMEOUT_S)
    assert record.usage == expected
    assert record.status == 200
    assert not record.client_disconnected
    assert record.first_delta_at is not None and record.finished_at is not None
    assert record.received_at <= record.first_delta_at <= record.finished_at


def test_text_chunks_and_custom_usage(model: sm.ScriptedModel, client: httpx.Client) -> None:
    custom = sm.Usage(input_tokens=7, cached_tokens=1, output_tokens=2, reasoning_tokens=5)
    model.enqueue(sm.Text("abcdefg", chunks=3, usage=custom), sm.Text(""))
    first = post_events(client, model, request_body(user_message("x")))
    second = post_events(client, model, request_body(user_message("y")))

    assert deltas(first) == ["abc", "de", "fg"]
    assert first[-1][1]["response"]["usage"]["total_tokens"] == 9
    assert first[-1][1]["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 5}
    assert deltas(second) == []
    assert second[-1][0] == "response.completed"


def test_deltas_are_flushed_as_they_are_produced(model: sm.ScriptedModel, client: httpx.Client) -> None:
    model.enqueue(sm.Text("a b c", chunk_delay=0.2))
    arrivals: list[tuple[str, float]] = []
    start = time.perf_counter()
    with client.stream("POST", f"{model.base_url}/responses", json=request_body(user_message("x"))) as response:
        for kind, _ in parse_sse(response.iter_lines()):
            arrivals.append((kind, time.perf_counter() - start))
    first_delta = next(at for kind, at in arrivals if kind == "response.output_text.delta")
    completed = arrivals[-1][1]
    assert first_delta < 0.15  # not held back until the end of the reply
    assert completed >= 0.4


def test_tool_call_item(model: sm.ScriptedModel, client: httpx.Client) -> None:
    model.enqueue(sm.ToolCall("echo hi", workdir="/w", call_id="call_x", sandbox_permissions="require_escalated"))
    events = post_events(client, model, request_body(user_message("run it")))

    assert [kind for kind, _ in events] == [
        "response.created",
        "response.output_item.added",
        "response.output_item.done",
        "response.completed",
    ]
    item = events[2][1]["item"]
    assert item["type"] == "function_call"
    assert item["name"] == "exec_command"
    assert item["call_id"] == "call_x"
    assert json.loads(item["arguments"]) == {
        "cmd": "echo hi",
        "login": False,
        "workdir": "/w",
        "sandbox_permissions": "require_escalated",
    }


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, None, {"error": {"message": "scripted HTTP 401", "type": "scripted_error", "code": None}}),
        (429, {"error": {"message": "slow down"}}, {"error": {"message": "slow down"}}),
        (500, "boom", "boom"),
    ],
)
def test_http_errors(model: sm.ScriptedModel, client: httpx.Client, status: int, body: Any, expected: Any) -> None:
    model.enqueue(sm.HttpError(status, body))
    response = client.post(f"{model.base_url}/responses", json=request_body(user_message("x")))

    assert response.status_code == status
    assert (response.text if isinstance(expected, str) else response.json()) == expected
    assert model.requests[0].status == status


def test_stream_cut_closes_without_completed(model: sm.ScriptedModel, client: httpx.Client) -> None:
    model.enqueue(sm.StreamCut("one two"))
    seen: list[tuple[str, dict]] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", f"{model.base_url}/responses", json=request_body(user_message("x"))) as response,
    ):
        seen.extend(parse_sse(response.iter_lines()))

    assert deltas(seen) == ["one ", "two"]
    assert "response.completed" not in [kind for kind, _ in seen]
    assert model.requests[0].wait_finished(HTTP_TIMEOUT_S)


def test_models_endpoint_and_unknown_path(model: sm.ScriptedModel, client: httpx.Client) -> None:
    assert client.get(f"{model.base_url}/models").json() == {"data": [], "models": []}
    assert client.get(f"{model.base_url}/models?client_version=0.163.0").status_code == 200
    assert client.post(f"{model.base_url}/chat/completions", json={}).status_code == 404
    assert model.requests == []


def _read_chunked_reply(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bytes]:
    """Read one HTTP/1.1 chunked response: (head, body, leftover bytes)."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += sock.recv(65536)
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += sock.recv(65536)
        body, rest = body + rest[:size], rest[size + 2 :]
        if size == 0:
            return head, body, rest


def test_chunked_keep_alive_on_one_socket(model: sm.ScriptedModel) -> None:
    payload = json.dumps(request_body(user_message("again"))).encode()
    request = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    with socket.create_connection(("127.0.0.1", model.port), timeout=HTTP_TIMEOUT_S) as sock:
        leftover = b""
        for _ in range(2):  # the second request reuses the connection
            sock.sendall(request)
            head, body, leftover = _read_chunked_reply(sock, leftover)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"Transfer-Encoding: chunked" in head
            frames = body.decode().split("\n\n")
            assert frames[0].startswith("event: response.created\ndata: {")
            assert frames[-2].startswith("event: response.completed\n")
            assert frames[-1] == ""
    assert len(model.requests) == 2


# --------------------------------------------------------------------------- stalls, holds, stop


def _stream_in_thread(model: sm.ScriptedModel, sink: list[str], errors: list[BaseException]) -> threading.Thread:
    """Read one streamed reply on a background thread, keeping event kinds and any error."""

    def run() -> None:
        try:
            with (
                httpx.Client(timeout=HTTP_TIMEOUT_S) as http,
                http.stream("POST", f"{model.base_url}/responses", json=request_body(user_message("x"))) as rsp,
            ):
                sink.extend(kind for kind, _ in parse_sse(rsp.iter_lines()))
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_stall_ends_promptly_on_stop() -> None:
    model = sm.ScriptedModel().start()
    model.enqueue(sm.Stall(60))
    kinds: list[str] = []
    errors: list[BaseException] = []
    reader = _stream_in_thread(model, kinds, errors)
    (record,) = model.wait_for_requests(1, timeout=HTTP_TIMEOUT_S)
    deadline = time.perf_counter() + HTTP_TIMEOUT_S
    while not kinds and time.perf_counter() < deadline:  # the stall begins after response.created
        time.sleep(0.01)

    started = time.perf_counter()
    model.stop()
    assert time.perf_counter() - started < 2.0
    reader.join(HTTP_TIMEOUT_S)
    assert not reader.is_alive()
    assert record.wait_finished(0)
    assert kinds == ["response.created"]
    assert errors  # the body ended without its final chunk
    assert not record.client_disconnected  # the server, not the client, ended it


def test_stall_notices_client_disconnect(model: sm.ScriptedModel) -> None:
    model.enqueue(sm.Stall(60))
    with (
        httpx.Client(timeout=HTTP_TIMEOUT_S) as http,
        http.stream("POST", f"{model.base_url}/responses", json=request_body(user_message("x"))) as rsp,
    ):
        first = next(parse_sse(rsp.iter_lines()))
    # Leaving the block closes the connection mid-stream, as codex does on interrupt.
    (record,) = model.requests
    assert first[0] == "response.created"
    assert record.wait_finished(2.0)
    assert record.client_disconnected


def test_stall_runs_out_by_itself(model: sm.ScriptedModel, client: httpx.Client) -> None:
    model.enqueue(sm.Stall(0.2))
    started = time.perf_counter()
    with pytest.raises(httpx.RemoteProtocolError):
        post_events(client, model, request_body(user_message("x")))
    assert 0.2 <= time.perf_counter() - started < 2.0


def test_hold_pauses_mid_text_until_released(model: sm.ScriptedModel) -> None:
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(sm.Hold(gate, sm.Text("a b c"), after_deltas=1, reached=reached))
    kinds: list[str] = []
    errors: list[BaseException] = []
    reader = _stream_in_thread(model, kinds, errors)

    assert reached.wait(HTTP_TIMEOUT_S)
    time.sleep(0.1)
    assert "response.completed" not in kinds
    assert model.requests[0].first_delta_at is not None
    gate.set()
    reader.join(HTTP_TIMEOUT_S)
    assert not errors
    assert kinds.count("response.output_text.delta") == 3
    assert kinds[-1] == "response.completed"


def test_hold_before_http_error_sends_nothing(model: sm.ScriptedModel) -> None:
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(sm.Hold(gate, sm.HttpError(503), reached=reached))
    result: list[int] = []

    def call() -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            result.append(http.post(f"{model.base_url}/responses", json=request_body()).status_code)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert reached.wait(HTTP_TIMEOUT_S)
    time.sleep(0.1)
    assert result == []
    gate.set()
    caller.join(HTTP_TIMEOUT_S)
    assert result == [503]


def test_start_stop_idempotent_and_idle_connections_closed() -> None:
    model = sm.ScriptedModel()
    with pytest.raises(RuntimeError):
        _ = model.port
    assert model.start() is model.start()
    assert model.base_url == f"http://127.0.0.1:{model.port}/v1"
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
        http.get(f"{model.base_url}/models")  # leaves a keep-alive connection open on the server
        started = time.perf_counter()
        url = f"{model.base_url}/models"
        model.stop()
        model.stop()
        assert time.perf_counter() - started < 1.0
        with pytest.raises(httpx.TransportError):
            http.get(url)


def test_concurrent_requests_run_in_parallel(model: sm.ScriptedModel) -> None:
    count, seconds = 6, 0.5
    results: dict[int, list[str]] = {}

    def call(index: int) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            body = request_body(user_message(f"n{index} [sleep={seconds}]"))
            results[index] = deltas(post_events(http, model, body))

    started = time.perf_counter()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HTTP_TIMEOUT_S)
    elapsed = time.perf_counter() - started

    assert elapsed < seconds * 3  # sequential would take count * seconds
    for index in range(count):
        assert "".join(results[index]) == f"echo: n{index} [sleep={seconds}]"


# --------------------------------------------------------------------------- scripting and recording


def test_request_recording(model: sm.ScriptedModel, client: httpx.Client) -> None:
    body = request_body(
        user_message("first question"),
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "answer"}]},
        user_message("<turn_aborted>\n</turn_aborted>"),
        user_message("second question"),
        {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Process exited with code 0\nOutput:\nok"},
    )
    client.post(
        f"{model.base_url}/responses", json=body, headers={"Authorization": "Bearer k", "originator": "t"}
    ).read()

    (record,) = model.wait_for_requests(1, timeout=HTTP_TIMEOUT_S)
    assert record.path == "/v1/responses"
    assert record.body == body
    assert record.input == body["input"]
    assert record.headers["authorization"] == "Bearer k"
    assert record.headers["originator"] == "t"
    assert record.all_user_texts == ["first question", "second question"]
    assert record.last_user_text == "second question"
    assert [item["call_id"] for item in record.function_call_outputs] == ["c1"]
    assert record.tool_outputs_since_last_user() == ["Process exited with code 0\nOutput:\nok"]
    assert isinstance(record.reply, sm.Text)


def test_injected_context_detection() -> None:
    assert sm.is_injected_context("<environment_context>\n  <cwd>/w</cwd>\n</environment_context>")
    assert sm.is_injected_context("# AGENTS.md instructions for /w\n\n<INSTRUCTIONS>x</INSTRUCTIONS>")
    assert not sm.is_injected_context("<b>bold</b> words")
    assert not sm.is_injected_context("say hi")


def test_wait_for_requests_times_out(model: sm.ScriptedModel) -> None:
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        model.wait_for_requests(1, timeout=0.1)
    assert time.perf_counter() - started < 1.0


def test_queue_first_then_responder(model: sm.ScriptedModel, client: httpx.Client) -> None:
    model.responder = lambda record: sm.Text(f"responder saw {record.last_user_text}")
    model.enqueue(sm.Text("queued"))
    assert model.pending == 1
    first = post_events(client, model, request_body(user_message("a")))
    second = post_events(client, model, request_body(user_message("b")))

    assert "".join(deltas(first)) == "queued"
    assert "".join(deltas(second)) == "responder saw b"
    assert model.pending == 0


def test_responder_failure_becomes_http_500(model: sm.ScriptedModel, client: httpx.Client) -> None:
    def broken(record: sm.RecordedRequest) -> sm.Reply:
        raise ValueError("no script")

    model.responder = broken
    response = client.post(f"{model.base_url}/responses", json=request_body(user_message("a")))
    assert response.status_code == 500
    assert "no script" in response.json()["error"]["message"]

    model.responder = lambda record: "not a reply"  # type: ignore[assignment,return-value]
    response = client.post(f"{model.base_url}/responses", json=request_body(user_message("a")))
    assert response.status_code == 500
    assert "not a scripted reply" in response.json()["error"]["message"]


def test_nested_hold_is_rejected() -> None:
    gate = threading.Event()
    with pytest.raises(TypeError):
        sm.Hold(gate, sm.Hold(gate, sm.Text("x")))


def _record(items: list[dict[str, Any]]) -> sm.RecordedRequest:
    return sm.RecordedRequest(index=0, path="/v1/responses", headers={}, body=request_body(*items), received_at=0.0)


def test_default_responder_echo_and_sleep() -> None:
    assert sm.default_responder(_record([user_message("hello")])) == sm.Text("echo: hello")
    slow = sm.default_responder(_record([user_message("x [sleep=1.5]")]))
    assert isinstance(slow, sm.Text)
    pieces = 3  # "echo: ", "x ", "[sleep=1.5]"
    assert slow.first_delay + (pieces - 1) * slow.chunk_delay == pytest.approx(1.5)
    assert sm.default_responder(_record([])) == sm.Text("echo: ")


def test_default_responder_tool_directives_run_in_order() -> None:
    prompt = "go [tool=printf a] [tool=false]"
    call = {"type": "function_call", "call_id": "c", "name": "exec_command", "arguments": "{}"}

    def output(code: int, text: str) -> dict[str, Any]:
        wrapped = f"Chunk ID: 1\nWall time: 0.0 seconds\nProcess exited with code {code}\nOutput:\n{text}"
        return {"type": "function_call_output", "call_id": "c", "output": wrapped}

    assert sm.default_responder(_record([user_message(prompt)])) == sm.ToolCall("printf a")
    after_one = [user_message(prompt), call, output(0, "a")]
    assert sm.default_responder(_record(after_one)) == sm.ToolCall("false")
    after_two = [*after_one, call, output(1, "")]
    assert sm.default_responder(_record(after_two)) == sm.Text(f"echo: {prompt}\n[tool exit=0] a\n[tool exit=1] ")
    # Tool outputs from an earlier turn do not count for the new prompt.
    next_turn = [*after_two, user_message("plain")]
    assert sm.default_responder(_record(next_turn)) == sm.Text("echo: plain")


def test_write_codex_config(tmp_path: Path) -> None:
    home = tmp_path / "nested" / "codex-home"
    sm.write_codex_config(
        home, "http://127.0.0.1:1/v1", stream_idle_timeout_ms=500, extra_toml="[tui]\nanimations = false\n"
    )
    config = tomllib.loads((home / "config.toml").read_text())

    assert config["model"] == "scripted-model"
    assert config["model_provider"] == "scripted"
    provider = config["model_providers"]["scripted"]
    assert provider["base_url"] == "http://127.0.0.1:1/v1"
    assert provider["env_key"] == sm.SCRIPTED_API_KEY_ENV == "SCRIPTED_MODEL_API_KEY"
    assert provider["wire_api"] == "responses"
    assert (provider["request_max_retries"], provider["stream_max_retries"]) == (0, 0)
    assert provider["stream_idle_timeout_ms"] == 500
    assert config["features"] == {"unbounded_connection_retries": False, "shell_snapshot": False, "plugins": False}
    assert config["tui"] == {"animations": False}
    with pytest.raises(tomllib.TOMLDecodeError):
        sm.write_codex_config(home, "http://x/v1", extra_toml="not = [toml")


# --------------------------------------------------------------------------- real codex


@pytest.fixture
def codex() -> codex_binary.CodexBinary:
    try:
        return codex_binary.resolve_codex_binary()
    except codex_binary.CodexBinaryError as exc:
        pytest.skip(f"codex binary unavailable: {exc}")


class CodexRun:
    """``codex exec --json`` wired to a scripted model, with its own CODEX_HOME and workdir."""

    def __init__(self, binary: codex_binary.CodexBinary, model: sm.ScriptedModel, root: Path, **config: Any):
        self.binary = binary
        self.home = root / "codex-home"
        self.workdir = root / "work"
        self.workdir.mkdir()
        sm.write_codex_config(self.home, model.base_url, **config)
        base = {**os.environ, "CODEX_HOME": str(self.home), sm.SCRIPTED_API_KEY_ENV: "dummy"}
        self.env = binary.child_env(base)

    def argv(self, prompt: str) -> list[str]:
        return [
            str(self.binary.path),
            "exec",
            "--json",
            "--skip-git-repo-check",
            "--sandbox",
            "workspace-write",
            "-C",
            str(self.workdir),
            prompt,
        ]

    def run(self, prompt: str) -> tuple[int, list[dict[str, Any]], str]:
        done = subprocess.run(
            self.argv(prompt),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CODEX_RUN_TIMEOUT_S,
            check=False,
        )
        events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return done.returncode, events, done.stderr


def agent_texts(events: list[dict[str, Any]]) -> list[str]:
    return [
        event["item"]["text"]
        for event in events
        if event.get("type") == "item.completed" and event["item"].get("type") == "agent_message"
    ]


@pytest.mark.real_codex
def test_real_codex_text_and_tool_call(
    codex: codex_binary.CodexBinary, model: sm.ScriptedModel, tmp_path: Path
) -> None:
    run = CodexRun(codex, model, tmp_path)
    model.enqueue(sm.Text("hi there, friend"))
    rc, events, stderr = run.run("say hi")
    assert rc == 0, stderr
    assert agent_texts(events) == ["hi there, friend"]
    (first,) = model.requests
    assert first.last_user_text == "say hi"
    assert first.headers["authorization"] == "Bearer dummy"
    assert first.body["stream"] is True
    completed = next(event for event in events if event["type"] == "turn.completed")
    assert completed["usage"]["input_tokens"] == first.usage.input_tokens
    assert completed["usage"]["output_tokens"] == first.usage.output_tokens

    model.enqueue(sm.ToolCall("printf hello > made.txt"), sm.Text("made it"))
    rc, events, stderr = run.run("make a file")
    assert rc == 0, stderr
    assert (run.workdir / "made.txt").read_text() == "hello"
    assert agent_texts(events) == ["made it"]
    follow_up = model.requests[-1]
    assert follow_up.last_user_text == "make a file"
    (output,) = follow_up.function_call_outputs
    assert "exited with code 0" in output["output"]


@pytest.mark.real_codex
def test_real_codex_directives(codex: codex_binary.CodexBinary, model: sm.ScriptedModel, tmp_path: Path) -> None:
    run = CodexRun(codex, model, tmp_path)
    rc, events, stderr = run.run("list [tool=printf abc]")
    assert rc == 0, stderr
    assert agent_texts(events) == ["echo: list [tool=printf abc]\n[tool exit=0] abc"]
    assert len(model.requests) == 2


@pytest.mark.real_codex
def test_real_codex_http_error_fails_turn_without_retry(
    codex: codex_binary.CodexBinary, model: sm.ScriptedModel, tmp_path: Path
) -> None:
    run = CodexRun(codex, model, tmp_path)
    model.enqueue(sm.HttpError(500))
    model.responder = lambda record: sm.Text("should not be asked")
    rc, events, _ = run.run("fail please")
    assert rc != 0
    assert any(event.get("type") == "turn.failed" for event in events)
    assert len(model.requests) == 1  # retries are off in the written config


@pytest.mark.real_codex
def test_real_codex_idle_timeout_abandons_stalled_stream(
    codex: codex_binary.CodexBinary, model: sm.ScriptedModel, tmp_path: Path
) -> None:
    run = CodexRun(codex, model, tmp_path, stream_idle_timeout_ms=300)
    model.enqueue(sm.Stall(60))
    started = time.perf_counter()
    rc, _events, _ = run.run("stall")
    assert rc != 0
    assert time.perf_counter() - started < 10
    (record,) = model.requests
    assert record.wait_finished(2.0)
    assert record.client_disconnected


@pytest.mark.real_codex
def test_real_codex_killed_mid_stream_disconnects(
    codex: codex_binary.CodexBinary, model: sm.ScriptedModel, tmp_path: Path
) -> None:
    run = CodexRun(codex, model, tmp_path)
    gate, reached = threading.Event(), threading.Event()
    model.enqueue(sm.Hold(gate, sm.Text("never finished"), after_deltas=1, reached=reached))
    process = subprocess.Popen(
        run.argv("hold on"),
        env=run.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert reached.wait(CODEX_RUN_TIMEOUT_S)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(CODEX_RUN_TIMEOUT_S)
        (record,) = model.requests
        assert record.wait_finished(2.0)
        assert record.client_disconnected
        assert record.usage is None  # response.completed was never sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(CODEX_RUN_TIMEOUT_S)
