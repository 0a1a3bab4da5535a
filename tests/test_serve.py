"""``molecule-codex`` as a real process: serve (HTTP, auth, body cap, restart, signals), demo, doctor.

Each serve runs as a subprocess in its own session, pointed at a loopback scripted model; the
test waits (bounded) for ``GET /health`` and kills whatever is left of the session at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import GetTaskRequest, TaskState
from a2a_rig import Call, final_answer, final_message, send, terminal_state, user_message

from molecule_codex.app_server import _our_version
from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, Hold, ScriptedModel, Text

pytestmark = pytest.mark.real_codex

CLI = str(Path(sys.executable).parent / "molecule-codex")
HEALTH_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 60.0
V1 = {"A2A-Version": "1.0"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLECULE_CODEX_")}
    env[SCRIPTED_API_KEY_ENV] = "x"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def terminate(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code (bounded)."""
        self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, EXIT_TIMEOUT_S)


class Launcher:
    """Starts ``molecule-codex serve`` processes for one test and cleans them all up."""

    def __init__(self, tmp_path: Path, model: ScriptedModel) -> None:
        self.tmp_path = tmp_path
        self.model = model
        self.workspace = tmp_path / "ws"
        self.workspace.mkdir()
        self.state_dir = tmp_path / "state"
        self.procs: list[subprocess.Popen[bytes]] = []

    def args(self) -> list[str]:
        return [
            "--base-url",
            self.model.base_url,
            "--api-key-env",
            SCRIPTED_API_KEY_ENV,
            "--model",
            "scripted-model",
            "--state-dir",
            str(self.state_dir),
            "--workdir",
            str(self.workspace),
        ]

    def popen(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=self.tmp_path, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def start(self, *extra: str, host: str | None = None) -> ServeProcess:
        port = _free_port()
        log = self.tmp_path / f"serve-{len(self.procs)}.log"
        argv = [CLI, "serve", *self.args(), "--port", str(port), *extra]
        if host:
            argv += ["--host", host]
        proc = self.popen(argv, log)
        served = ServeProcess(proc, port, log)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode} before /health:\n{served.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{served.url}health", timeout=1).status_code == 200:
                    return served
            if time.monotonic() > deadline:
                pytest.fail(f"serve not healthy within {HEALTH_TIMEOUT_S}s:\n{served.output()}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)



@pytest.fixture
def launcher(tmp_path: Path, model: ScriptedModel) -> Iterator[Launcher]:
    launch = Launcher(tmp_path, model)
    try:
        yield launch
    finally:
        launch.cleanup()


@contextlib.asynccontextmanager
async def a2a_client(url: str, *, streaming: bool = True, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, headers=headers) as http:
        yield await create_client(url, client_config=ClientConfig(streaming=streaming, httpx_client=http))


def _v03_send(text: str, message_id: str = "m-03") -> dict:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "message/send",
        "params": {
            "message": {
                "kind": "message",
                "messageId": message_id,
                "role": "user",
                "parts": [{"kind": "text", "text": text}],
            }
        },
    }


def _get_task(task_id: str) -> dict:
    return {"jsonrpc": "2.0", "id": 2, "method": "GetTask", "params": {"id": task_id}}


# --------------------------------------------------------------------------- CLI basics


def test_version_prints_ours_and_codex():
    result = subprocess.run([CLI, "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert f"molecule-codex {_our_version()}" in result.stdout
    assert "codex 0.163.0" in result.stdout


def test_demo_runs_offline_and_says_ok(tmp_path):
    result = subprocess.run(
        [CLI, "demo"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=tmp_path,
        env=_env(),
        start_new_session=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    assert "[working] $ " in result.stdout


def test_doctor_passes_on_scripted_endpoint_and_fails_without_provider(launcher):
    ok = subprocess.run(
        [CLI, "doctor", *launcher.args()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=launcher.tmp_path,
        env=_env(),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert any(line.startswith("[PASS] ") for line in ok.stdout.splitlines()), ok.stdout
    assert "[FAIL]" not in ok.stdout

    env = {k: v for k, v in _env().items() if "API_KEY" not in k and "ANTHROPIC" not in k and "OPENAI" not in k}
    bad = subprocess.run(
        [
            CLI,
            "doctor",
            "--model",
            "anthropic:claude-opus-4-7",
            "--state-dir",
            str(launcher.state_dir),
            "--workdir",
            str(launcher.workspace),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=launcher.tmp_path,
        env=env,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert any(line.startswith("[FAIL] ") for line in bad.stdout.splitlines()), bad.stdout
    assert "anthropic:claude-opus-4-7" in bad.stdout


# --------------------------------------------------------------------------- serving


def test_serve_with_a_bad_model_exits_1_with_the_preflight_message_and_no_traceback(launcher):
    env = {k: v for k, v in _env().items() if "API_KEY" not in k and "OPENAI" not in k}
    bad = subprocess.run(
        [CLI, "serve", "--model", "anthropic:claude-opus-4-7", "--port", str(_free_port()),
         "--state-dir", str(launcher.state_dir), "--workdir", str(launcher.workspace)],
        capture_output=True, text=True, timeout=60, check=False, cwd=launcher.tmp_path, env=env,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "preflight failed" in bad.stderr and "anthropic:claude-opus-4-7" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr


async def test_serve_end_to_end_v1_streaming_non_streaming_and_v03(launcher):
    served = launcher.start()
    async with httpx.AsyncClient(base_url=served.url, timeout=CLIENT_TIMEOUT_S) as http:
        card = (await http.get("/.well-known/agent-card.json")).json()
        interfaces = {(i["protocolBinding"], i["protocolVersion"]) for i in card["supportedInterfaces"]}
        assert {("JSONRPC", "1.0"), ("JSONRPC", "0.3")} <= interfaces
        # Bound to 127.0.0.1: the card names it localhost, as clients and conformance suites expect.
        assert all(i["url"] == f"http://localhost:{served.port}/" for i in card["supportedInterfaces"])
        assert card["url"] == f"http://localhost:{served.port}/"
        assert card["capabilities"]["pushNotifications"] is False
        assert card["capabilities"]["streaming"] is True

        async with a2a_client(served.url, streaming=True) as client:
            items = await send(client, user_message("streamed hello"))
        assert items[0].WhichOneof("payload") == "task"
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        assert final_answer(items) == "echo: streamed hello"

        async with a2a_client(served.url, streaming=False) as client:
            items = await send(client, user_message("plain hello"))
        assert len(items) == 1
        assert items[0].task.status.state == TaskState.TASK_STATE_COMPLETED
        assert items[0].task.artifacts[0].parts[0].text == "echo: plain hello"

        reply = (await http.post("/", json=_v03_send("old protocol hello"))).json()
        result = reply["result"]
        assert result["kind"] == "task"
        assert result["status"]["state"] == "completed"
        assert result["artifacts"][0]["parts"][0]["text"] == "echo: old protocol hello"
    assert await served.terminate() == 0


async def test_serve_tokens_gate_requests_and_isolate_callers(launcher):
    served = launcher.start("--token", "t1,t2")
    async with httpx.AsyncClient(base_url=served.url, timeout=CLIENT_TIMEOUT_S) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/.well-known/agent-card.json")).status_code == 200
        assert (await http.post("/", json=_v03_send("no token"))).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await http.post("/", json=_v03_send("bad token"), headers=wrong)).status_code == 401
        assert launcher.model.requests == []  # nothing reached the model

        async with a2a_client(served.url, streaming=False, token="t1") as client:
            items = await send(client, user_message("caller one"))
            task = items[-1].task
            assert task.status.state == TaskState.TASK_STATE_COMPLETED
            assert (await client.get_task(GetTaskRequest(id=task.id))).id == task.id

        mine = (await http.post("/", json=_get_task(task.id), headers={**V1, "Authorization": "Bearer t1"})).json()
        assert mine["result"]["id"] == task.id
        theirs = (await http.post("/", json=_get_task(task.id), headers={**V1, "Authorization": "Bearer t2"})).json()
        assert "result" not in theirs
        assert theirs["error"]["code"] == -32001
        legacy = {"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {"id": task.id}}
        theirs03 = (await http.post("/", json=legacy, headers={"Authorization": "Bearer t2"})).json()
        assert theirs03["error"]["code"] == -32001
    assert await served.terminate() == 0


def test_non_loopback_bind_needs_token_or_insecure(launcher):
    port = str(_free_port())
    result = subprocess.run(
        [CLI, "serve", *launcher.args(), "--host", "0.0.0.0", "--port", port],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=_env(),
        cwd=launcher.tmp_path,
    )
    assert result.returncode != 0
    assert "refusing to bind 0.0.0.0 without a token" in result.stderr
    assert "--insecure" in result.stderr

    served = launcher.start("--insecure", host="0.0.0.0")
    assert httpx.get(f"{served.url}health", timeout=5).status_code == 200


async def test_body_cap_rejects_big_body_and_keeps_serving(launcher):
    served = launcher.start("--max-body-bytes", "100000")
    async with httpx.AsyncClient(base_url=served.url, timeout=CLIENT_TIMEOUT_S) as http:
        big = await http.post("/", json=_v03_send("x" * 200_000))
        if big.status_code == 200:
            assert big.json()["error"]["code"] == -32600
            assert "Payload too large" in big.json()["error"]["message"]
        else:
            assert big.status_code == 413
        assert launcher.model.requests == []
        assert (await http.get("/health")).status_code == 200
        small = (await http.post("/", json=_v03_send("small after big"))).json()
        assert small["result"]["status"]["state"] == "completed"


async def test_tasks_and_conversations_survive_restart(launcher):
    first = launcher.start()
    async with a2a_client(first.url, streaming=False) as client:
        items = await send(client, user_message("remember pineapple", context_id="ctx-restart"))
    task = items[-1].task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert await first.terminate() == 0

    second = launcher.start()
    async with a2a_client(second.url, streaming=False) as client:
        again = await client.get_task(GetTaskRequest(id=task.id))
        assert again.status.state == TaskState.TASK_STATE_COMPLETED
        assert again.artifacts[0].parts[0].text == "echo: remember pineapple"
        items = await send(client, user_message("which fruit?", context_id="ctx-restart"))
    assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
    assert launcher.model.requests[-1].all_user_texts == ["remember pineapple", "which fruit?"]
    assert await second.terminate() == 0


async def test_sigterm_mid_turn_fails_the_task_and_exits_cleanly(launcher):
    gate, reached = threading.Event(), threading.Event()
    launcher.model.enqueue(Hold(gate, Text("never finished"), reached=reached))
    served = launcher.start()
    try:
        async with a2a_client(served.url, streaming=True) as client:
            call = Call(client, user_message("a long job"), timeout=CLIENT_TIMEOUT_S)
            assert await asyncio.to_thread(reached.wait, 20), "the model stream never opened"
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            items = await call.result(timeout=EXIT_TIMEOUT_S)
            code = await asyncio.to_thread(served.proc.wait, EXIT_TIMEOUT_S)
            elapsed = time.monotonic() - started
    finally:
        gate.set()
    assert terminal_state(items) in (TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED), items
    assert "shutting down" in final_message(items)
    assert code == 0, served.output()
    assert elapsed < EXIT_TIMEOUT_S


async def test_task_left_working_by_sigkill_is_failed_after_restart(launcher):
    gate, reached = threading.Event(), threading.Event()
    launcher.model.enqueue(Hold(gate, Text("never finished"), reached=reached))
    first = launcher.start()
    try:
        async with a2a_client(first.url, streaming=True) as client:
            call = Call(client, user_message("doomed"), timeout=CLIENT_TIMEOUT_S)
            assert await asyncio.to_thread(reached.wait, 20), "the model stream never opened"
            await call.wait_for(lambda item: item.WhichOneof("payload") == "task")
            task_id = call.task_id
            assert await first.terminate(signal.SIGKILL) == -signal.SIGKILL
            with contextlib.suppress(Exception):
                await call.result(timeout=EXIT_TIMEOUT_S)
    finally:
        gate.set()
    launcher.cleanup()  # the orphaned codex child of the killed process

    second = launcher.start()
    async with a2a_client(second.url, streaming=False) as client:
        task = await client.get_task(GetTaskRequest(id=task_id))
    assert task.status.state == TaskState.TASK_STATE_FAILED
    assert "restarted" in task.status.message.parts[0].text
