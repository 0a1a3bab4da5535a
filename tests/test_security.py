"""Security properties of the whole stack (``standalone.serving``, real codex, scripted model on loopback).

* Secrets (provider key, platform token, auth.json content, bearer token) appear in no log record
  at any level (codex stderr included), no task (GetTask JSON, streamed events), no error text,
  no state file other than auth.json, and not in the agent's shell environment (``env`` output).
* State files are private from creation: auth.json, config.toml and both SQLite databases (and
  their WAL/SHM files) 0600, the state directory and CODEX_HOME 0700, even under umask 000.
* The sandbox holds under the defaults (workspace-write, network_access: false): a command
  writing outside the workspace fails and writes nothing; a command opening a TCP connection
  fails, and succeeds once ``network_access: true`` is configured.

The standalone host's own guards (loopback default, token required off loopback, per-caller task
isolation, body cap) are tested against the real process in ``test_serve.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from a2a.client import ClientConfig, create_client
from a2a.types import GetTaskRequest, TaskState
from a2a_rig import final_answer, final_message, send, terminal_state, user_message
from google.protobuf import json_format

from molecule_codex.demo.scripted_model import (
    SCRIPTED_API_KEY_ENV,
    HttpError,
    RecordedRequest,
    ScriptedModel,
    Text,
    ToolCall,
    default_responder,
)
from molecule_codex.standalone import DEFAULT_CONFIG, serving

pytestmark = pytest.mark.real_codex

PROVIDER_KEY = "prov-key-SECRET-7f3a91e2"
OPENAI_KEY = "sk-openai-SECRET-c0ffee42"
SEED_KEY = "sk-seed-SECRET-5eed5eed"
PLATFORM_TOKEN = "platform-token-SECRET-9d8e7f"
BEARER_TOKEN = "bearer-token-SECRET-a1b2c3"
OTHER_KEY = "sk-ant-SECRET-0th3r"
CHATGPT_ACCESS = "chatgpt-access-SECRET-acce55"
CHATGPT_REFRESH = "chatgpt-refresh-SECRET-4e4e4e"
CLIENT_TIMEOUT_S = 60.0


def _chatgpt_seed() -> str:
    return json.dumps({
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {"id_token": "x.y.z", "access_token": CHATGPT_ACCESS, "refresh_token": CHATGPT_REFRESH,
                   "account_id": "acct"},
        "last_refresh": "2026-01-01T00:00:00Z",
    })


def _api_key_seed() -> str:
    return json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": SEED_KEY})


def _base_env(**secrets: str) -> dict[str, str]:
    """Our environment minus anything that would pick a provider or a setting, plus ``secrets``."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("MOLECULE_", "CODEX_", "OPENAI_")) and name not in ("MODEL", SCRIPTED_API_KEY_ENV)
    }
    env.update(secrets)
    return env


#: Two credential set-ups: a custom endpoint whose key codex reads from the env, and the built-in
#: openai provider whose key we install into auth.json from a CODEX_AUTH_JSON seed.
SCENARIOS = {
    "endpoint": {
        "env": {
            SCRIPTED_API_KEY_ENV: PROVIDER_KEY,
            "OPENAI_API_KEY": OPENAI_KEY,
            "CODEX_AUTH_JSON": _chatgpt_seed(),
            "MOLECULE_WORKSPACE_TOKEN": PLATFORM_TOKEN,
            "MOLECULE_CODEX_TOKEN": BEARER_TOKEN,
            "ANTHROPIC_API_KEY": OTHER_KEY,
        },
        "secrets": (PROVIDER_KEY, OPENAI_KEY, CHATGPT_ACCESS, CHATGPT_REFRESH, PLATFORM_TOKEN, BEARER_TOKEN,
                    OTHER_KEY),
    },
    "auth_json": {
        "env": {
            "CODEX_AUTH_JSON": _api_key_seed(),
            "MOLECULE_WORKSPACE_TOKEN": PLATFORM_TOKEN,
            "MOLECULE_CODEX_TOKEN": BEARER_TOKEN,
            "ANTHROPIC_API_KEY": OTHER_KEY,
        },
        "secrets": (SEED_KEY, PLATFORM_TOKEN, BEARER_TOKEN, OTHER_KEY),
    },
}


def _args(tmp_path: Path, model: ScriptedModel | None, *, token: str | None, endpoint: bool,
          config: Path = DEFAULT_CONFIG) -> argparse.Namespace:
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    return argparse.Namespace(
        config=config, state_dir=tmp_path / "state", workdir=workspace,
        base_url=model.base_url if endpoint and model else None,
        api_key_env=SCRIPTED_API_KEY_ENV if endpoint else None,
        model="scripted-model" if endpoint else None,
        host="127.0.0.1", port=0, token=token, task_store=None, max_body_bytes=None,
    )


def _write_operator_config(codex_home: Path, model: ScriptedModel) -> None:
    """What an operator would write to aim the built-in openai provider at another endpoint.

    codex first tries a websocket there (~6 s of retries, once per thread), then falls back to HTTP.
    """
    codex_home.mkdir(parents=True, mode=0o700, exist_ok=True)
    (codex_home / "config.toml").write_text(f'openai_base_url = "{model.base_url}"\n')


@contextlib.asynccontextmanager
async def _client(url: str, token: str | None) -> AsyncIterator[Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, headers=headers) as http:
        yield await create_client(url, client_config=ClientConfig(streaming=True, httpx_client=http))


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _all_loggers_at_debug() -> None:
    """Lower every configured logger (uvicorn sets its own) so nothing is filtered before capture."""
    for logger in [logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)]:
        if logger.level > logging.DEBUG:
            logger.setLevel(logging.DEBUG)


def _leaks(text: str, secrets: tuple[str, ...]) -> list[str]:
    return [secret for secret in secrets if secret in text]


def _failing_responder(request: RecordedRequest) -> Any:
    """Echo, except "this one fails", answered with an error every time (codex retries some)."""
    if "this one fails" in request.last_user_text:
        return HttpError(400, {"error": {"message": "The request was rejected", "type": "invalid_request_error",
                                         "code": "rejected"}})
    return default_responder(request)


def _tool_output(model: ScriptedModel) -> str:
    records: list[RecordedRequest] = model.requests
    outputs = [out for record in records for out in record.tool_outputs_since_last_user()]
    assert outputs, "no tool output reached the model"
    return outputs[-1]


# ---------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_no_secret_in_logs_tasks_errors_files_or_shell_env(tmp_path, caplog, scenario):
    caplog.set_level(logging.DEBUG)
    setup = SCENARIOS[scenario]
    secrets: tuple[str, ...] = setup["secrets"]
    endpoint = scenario == "endpoint"
    with ScriptedModel() as model:
        if not endpoint:
            _write_operator_config(tmp_path / "state" / "codex-home", model)
        env = _base_env(**setup["env"], RUST_LOG="debug")
        args = _args(tmp_path, model, token=BEARER_TOKEN, endpoint=endpoint)
        model.responder = _failing_responder
        seen: list[str] = []
        async with serving(args, env=env) as running:
            _all_loggers_at_debug()
            async with _client(running.url, BEARER_TOKEN) as client:
                ok = await send(client, user_message("hello there", context_id="c-sec"))
                assert terminal_state(ok) == TaskState.TASK_STATE_COMPLETED, final_message(ok)
                assert final_answer(ok) == "echo: hello there"

                failed = await send(client, user_message("this one fails", context_id="c-sec"))
                assert terminal_state(failed) == TaskState.TASK_STATE_FAILED
                error_text = final_message(failed)
                assert error_text

                model.enqueue(ToolCall("env"), Text("listed the environment"))
                tool = await send(client, user_message("show me your environment", context_id="c-sec"))
                assert terminal_state(tool) == TaskState.TASK_STATE_COMPLETED, final_message(tool)
                shell_env = _tool_output(model)
                assert "PATH=" in shell_env and "HOME=" in shell_env  # env really ran

                tasks = []
                for items in (ok, failed, tool):
                    seen.extend(json_format.MessageToJson(item) for item in items)
                    task = await client.get_task(GetTaskRequest(id=items[0].task.id))
                    tasks.append(json_format.MessageToJson(task))
                assert all(json.loads(text)["status"]["state"].startswith("TASK_STATE_") for text in tasks)

            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as http:
                refused = await http.post(running.url, json={"jsonrpc": "2.0", "id": 1, "method": "GetTask",
                                                             "params": {"id": "x"}},
                                          headers={"Authorization": f"Bearer {PLATFORM_TOKEN}"})
                assert refused.status_code == 401
                refusal = refused.text

    assert shell_env and not _leaks(shell_env, secrets), "a secret reached the agent's shell environment"
    for name in ("OPENAI_API_KEY", "CODEX_AUTH_JSON", "MOLECULE_WORKSPACE_TOKEN", "MOLECULE_CODEX_TOKEN",
                 SCRIPTED_API_KEY_ENV, "ANTHROPIC_API_KEY"):
        assert f"{name}=" not in shell_env, name
    assert not _leaks(error_text, secrets), error_text
    assert not _leaks(refusal, secrets), refusal
    assert not _leaks("\n".join(tasks), secrets), "a secret is in GetTask JSON"
    assert not _leaks("\n".join(seen), secrets), "a secret is in a streamed event"

    records = caplog.records
    stderr_logged = any(record.name == "molecule_codex.app_server" and "codex stderr" in record.getMessage()
                        for record in records)
    assert stderr_logged, "codex stderr was not captured; the scan would miss it"
    assert any(record.levelno == logging.DEBUG for record in records)
    log_text = "\n".join(
        [caplog.text, *(record.getMessage() for record in records),
         *(str(getattr(record, "exc_text", "") or "") for record in records)]
    )
    leaked = _leaks(log_text, secrets)
    assert not leaked, f"secret(s) in the logs: {[line for line in log_text.splitlines() if _leaks(line, secrets)][:5]}"

    auth = tmp_path / "state" / "codex-home" / "auth.json"
    for path in (tmp_path / "state").rglob("*"):
        if not path.is_file() or path == auth:
            continue
        data = path.read_bytes()
        found = [secret for secret in secrets if secret.encode() in data]
        assert not found, f"{path} holds {found}"
    if not endpoint:
        assert SEED_KEY in auth.read_text()  # the one place the credential belongs
        assert model.requests[0].headers.get("authorization") == f"Bearer {SEED_KEY}"
    else:
        assert not auth.exists()
        assert model.requests[0].headers.get("authorization") == f"Bearer {PROVIDER_KEY}"


# ---------------------------------------------------------------------------------------------- file modes


async def test_state_files_are_private_from_creation(tmp_path):
    """Under umask 000 every file and directory that is not explicitly made private would be 0666/0777."""
    state = tmp_path / "state"
    env = _base_env(CODEX_AUTH_JSON=_api_key_seed())
    with _umask(0):
        async with serving(_args(tmp_path, None, token=None, endpoint=False), env=env) as running:
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as http:
                assert (await http.get(running.url + "health")).status_code == 200
            modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
                     for path in [state, *state.rglob("*")]}
    expected = {
        "state": 0o700,
        "state/codex-home": 0o700,
        "state/codex-home/auth.json": 0o600,
        "state/codex-home/config.toml": 0o600,
        "state/conversations.sqlite3": 0o600,
        "state/tasks.sqlite3": 0o600,
    }
    for name, mode in expected.items():
        assert modes.get(name) == mode, f"{name}: {oct(modes.get(name, 0))}, want {oct(mode)}\n{modes}"
    ours = [name for name in modes if name.startswith(("state/conversations.sqlite3", "state/tasks.sqlite3"))]
    assert len(ours) >= 4, ours  # the WAL/SHM files exist and inherit the database's mode
    for name in ours:
        assert modes[name] == 0o600, f"{name}: {oct(modes[name])}"
    # codex's own files (0644 under umask 000) sit inside CODEX_HOME, which only we can enter.


# ---------------------------------------------------------------------------------------------- sandbox


def _write_config_yaml(tmp_path: Path, **runtime_config: Any) -> Path:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["runtime_config"].update(runtime_config)
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


async def _run_command(client: Any, model: ScriptedModel, command: str) -> str:
    model.enqueue(ToolCall(command), Text("ran it"))
    items = await send(client, user_message(f"please run {command}"))
    assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, final_message(items)
    return _tool_output(model)


def _connect_command(port: int) -> str:
    script = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"


async def test_sandbox_blocks_writes_outside_the_workspace_and_network_by_default(tmp_path):
    outside_dir = Path.home() / ".cache" / "molecule-codex"
    outside_dir.mkdir(parents=True, exist_ok=True)
    assert os.access(outside_dir, os.W_OK)  # we could write there: only the sandbox can stop codex
    outside = outside_dir / f"sandbox-escape-{uuid.uuid4().hex[:8]}"
    inside = tmp_path / "workspace" / "inside.txt"
    with ScriptedModel() as model:
        env = _base_env(**{SCRIPTED_API_KEY_ENV: "k"})
        args = _args(tmp_path, model, token=None, endpoint=True)
        async with serving(args, env=env) as running, _client(running.url, None) as client:
            wrote_inside = await _run_command(client, model, f"echo ok > {inside} && echo WROTE-INSIDE")
            escaped = await _run_command(client, model, f"echo bad > {outside} && echo WROTE-OUTSIDE")
            network = await _run_command(client, model, _connect_command(model.port))
    try:
        assert "WROTE-INSIDE" in wrote_inside and inside.read_text() == "ok\n", wrote_inside
        assert "WROTE-OUTSIDE" not in escaped and "exited with code 0" not in escaped, escaped
        assert not outside.exists(), "a command wrote outside the workspace"
        assert "CONNECTED" not in network and "exited with code 0" not in network, network
    finally:
        outside.unlink(missing_ok=True)


async def test_network_from_commands_works_once_configured(tmp_path):
    config = _write_config_yaml(tmp_path, network_access=True)
    with ScriptedModel() as model:
        env = _base_env(**{SCRIPTED_API_KEY_ENV: "k"})
        args = _args(tmp_path, model, token=None, endpoint=True, config=config)
        async with serving(args, env=env) as running, _client(running.url, None) as client:
            network = await _run_command(client, model, _connect_command(model.port))
    assert "CONNECTED" in network, network
