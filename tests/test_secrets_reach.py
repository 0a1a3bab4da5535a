"""Secrets and other conversations are out of the agent's reach (real stack, real codex, scripted model).

The scripted model makes the agent run real shell commands (``[tool=...]`` directives: the default
responder runs them and quotes their output in the reply), exactly as a caller asking "cat
~/.codex/auth.json" would. What must hold:

* every secret location is unreadable by ``cat``/``grep``/``find``: CODEX_HOME (auth.json, the
  rollout of another caller's conversation), the state directory (conversation map, task
  database, a file written there after start, like External Connect's inbound secret), the
  platform's token file (written only after start, as the runtime does) and inbound secret;
  the tool output says "Permission denied" and neither the reply nor any tool output holds the
  secret;
* caller b's agent finds no text of caller a's conversation anywhere it can read: ``grep -r``
  over the whole filesystem (``/proc`` and ``/sys`` left out: ``/proc`` is the sandbox's own pid
  namespace, where grep's own command line holds the pattern), bounded in time and required to
  finish;
* an ``env_http_headers`` variable reaches the gateway (the scripted model sees the header) and
  never the agent's environment (``env``, ``/proc/*/environ``);
* preflight (``doctor``'s checks) and ``serve`` work with HOME under ``/tmp``, HOME=``/`` and an
  unwritable HOME.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from a2a.types import TaskState
from a2a_rig import final_answer, final_message, send, terminal_state, user_message
from google.protobuf import json_format
from test_preflight import unwritable_home
from test_security import _base_env, _client

from molecule_codex.adapter import CodexAdapter
from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, RecordedRequest, ScriptedModel
from molecule_codex.standalone import DEFAULT_CONFIG, host_options_from, serving

pytestmark = pytest.mark.real_codex

HEADER_ENV = "GW_HEADER_SECRET"
HEADER_NAME = "x-gateway-key"
#: Bound on the agent's whole-filesystem grep (about 5 s warm, 75 s cold on the 2-core test VM).
GREP_TIMEOUT_S = 150
TURN_TIMEOUT_S = 60.0
ROLLOUT_WAIT_S = 10.0


def _secret(label: str) -> str:
    return f"{label}-SECRET-{uuid.uuid4().hex[:12]}"


def _config(tmp_path: Path, model: ScriptedModel) -> Path:
    """config.yaml with a gateway provider that authenticates by key *and* a header from the env."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["runtime_config"].update(model="scripted-model", provider="gw", models=[])
    data["providers"] = {"gw": {"base_url": model.base_url, "env_key": SCRIPTED_API_KEY_ENV,
                                "env_http_headers": {HEADER_NAME: HEADER_ENV},
                                "request_max_retries": 0, "stream_max_retries": 0}}
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _args(tmp_path: Path, config: Path, tokens: str | None = None) -> argparse.Namespace:
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    return argparse.Namespace(
        config=config, state_dir=tmp_path / "state", workdir=workspace, base_url=None, api_key_env=None,
        model=None, host="127.0.0.1", port=0, token=tokens, task_store=None, max_body_bytes=None,
    )


def _tool_outputs(model: ScriptedModel) -> list[str]:
    records: list[RecordedRequest] = model.requests
    return [out for record in records for out in record.tool_outputs_since_last_user()]


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _any_holds(directory: Path, text: str) -> bool:
    return any(text in path.read_text() for path in directory.rglob("*.jsonl"))


async def _rollout_holds(codex_home: Path, text: str) -> bool:
    """Whether a rollout holds ``text`` within ROLLOUT_WAIT_S (codex writes rollouts asynchronously)."""
    deadline = time.monotonic() + ROLLOUT_WAIT_S
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_any_holds, codex_home / "sessions", text):
            return True
        await asyncio.sleep(0.1)
    return False


async def _finished(path: Path, marker: str, timeout: float) -> str:
    """The text of ``path`` once it holds ``marker`` (a command codex left running wrote it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(_read, path)
        if marker in text:
            return text
        await asyncio.sleep(0.2)
    raise AssertionError(f"{path} never got {marker!r} within {timeout:g} s")


async def _ask(client: Any, text: str, context_id: str) -> tuple[str, str]:
    """Send ``text``; (the reply, every event of the exchange as JSON)."""
    items = await send(client, user_message(text, context_id=context_id), timeout=TURN_TIMEOUT_S)
    assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, final_message(items)
    return final_answer(items), "\n".join(json_format.MessageToJson(item) for item in items)


async def test_secret_locations_and_other_conversations_are_denied(tmp_path):
    codex_home = tmp_path / "state" / "codex-home"
    configs = tmp_path / "configs"
    configs.mkdir()
    auth_secret, inbound_secret, token_secret = _secret("auth"), _secret("inbound"), _secret("platform-token")
    state_secret, header_secret, key_secret = _secret("connect"), _secret("header"), _secret("key")
    caller_a_text = f"caller-a-private-{uuid.uuid4().hex}"
    # Files there before start: an operator's auth.json and the platform's inbound secret.
    codex_home.mkdir(parents=True, mode=0o700)
    (codex_home / "auth.json").write_text(f'{{"auth_mode": "apikey", "OPENAI_API_KEY": "{auth_secret}"}}')
    (configs / ".platform_inbound_secret").write_text(inbound_secret)
    secrets = (auth_secret, inbound_secret, token_secret, state_secret, header_secret, key_secret, caller_a_text)

    with ScriptedModel() as model:
        env = _base_env(**{SCRIPTED_API_KEY_ENV: key_secret, HEADER_ENV: header_secret, "CONFIGS_DIR": str(configs)})
        async with serving(_args(tmp_path, _config(tmp_path, model), "token-a,token-b"), env=env) as running:
            async with _client(running.url, "token-a") as caller_a:
                reply, _ = await _ask(caller_a, f"remember this: {caller_a_text}", "ctx-a")
                assert caller_a_text in reply
            assert await _rollout_holds(codex_home, caller_a_text), "caller a's rollout must be on disk"
            # Written after start, as the runtime writes its token after setup() and connect its secret.
            (configs / ".auth_token").write_text(token_secret)
            (tmp_path / "state" / "connect").mkdir()
            (tmp_path / "state" / "connect" / "inbound_secret").write_text(state_secret)

            probes = {
                "auth.json": f"cat {codex_home}/auth.json",
                "sessions": f"grep -r {caller_a_text[:18]} {codex_home}/sessions",
                "codex home": f"find {codex_home} -type f",
                "conversation map": f"cat {tmp_path}/state/conversations.sqlite3",
                "state dir": f"find {tmp_path}/state -type f",
                "inbound secret in state dir": f"cat {tmp_path}/state/connect/inbound_secret",
                "platform token": f"cat {configs}/.auth_token",
                "platform inbound secret": f"grep -r SECRET {configs}/.platform_inbound_secret",
            }
            # codex backgrounds a command after 10 s, so the grep writes its findings into the
            # workspace and the test waits for its exit code there.
            grep_out = tmp_path / "workspace" / "grep.out"
            # Positive control: a readable file outside the workspace that the same grep must find.
            control_text = f"control-{uuid.uuid4().hex}"
            control = tmp_path / "control.txt"
            control.write_text(control_text)
            grep = (f"timeout {GREP_TIMEOUT_S} grep -r -l -I -D skip --exclude-dir=proc --exclude-dir=sys "
                    f"-e {caller_a_text[:17]}''{caller_a_text[17:]} -e {control_text[:9]}''{control_text[9:]} / "
                    f"> {grep_out} 2>/dev/null; "
                    f"echo GREP-RC=$? >> {grep_out}")
            environ = f"env; cat /proc/*/environ | tr '\\0' '\\n' | grep -c {HEADER_ENV}"
            async with _client(running.url, "token-b") as caller_b:
                replies = []
                for command in probes.values():
                    reply, events = await _ask(caller_b, f"[tool={command}]", "ctx-b")
                    replies.extend((reply, events))
                outputs = _tool_outputs(model)[-len(probes):]
                _, events = await _ask(caller_b, f"[tool={grep}]", "ctx-b")
                replies.append(events)
                grep_output = await _finished(grep_out, "GREP-RC=", GREP_TIMEOUT_S + 20)
                await _ask(caller_b, f"[tool={environ}]", "ctx-b")
                env_output = _tool_outputs(model)[-1]

    for (name, command), output in zip(probes.items(), outputs, strict=True):
        assert "Permission denied" in output, f"{name}: {command!r} was not denied:\n{output}"
        assert "exited with code 0" not in output, (name, output)
    assert "auth.json" not in outputs[2] and "sqlite3" not in outputs[4], "find listed denied files"
    for text in (*replies, *outputs, grep_output, env_output):
        leaked = [secret for secret in secrets if secret in text]
        assert not leaked, f"{leaked} reached caller b:\n{text[:2000]}"

    rc = re.search(r"GREP-RC=(\d+)", grep_output)
    assert rc and rc.group(1) in ("1", "2"), f"the filesystem grep did not finish: {grep_output[-500:]}"
    matches = [line for line in grep_output.splitlines() if line.startswith("/")]
    assert matches == [str(control)], f"caller a's text is readable at {matches} (only {control} may match)"

    assert f"{HEADER_ENV}=" not in env_output and f"{SCRIPTED_API_KEY_ENV}=" not in env_output, env_output
    assert env_output.rstrip().endswith("0"), env_output  # no process in the sandbox carries the header var
    assert {record.headers.get(HEADER_NAME) for record in model.requests} == {header_secret}
    assert {record.headers.get("authorization") for record in model.requests} == {f"Bearer {key_secret}"}
    assert not (configs / ".agent_snapshot.json").exists(), "a deny entry must not create the file it protects"


@pytest.mark.parametrize("home", ["under-tmp", "root", "unwritable"])
async def test_preflight_and_serve_work_whatever_home_is(tmp_path, home):
    if home == "under-tmp":
        home_dir = tmp_path / "home"
        home_dir.mkdir()
    elif home == "root":
        home_dir = Path("/")
    else:
        home_dir = unwritable_home(tmp_path)
    with ScriptedModel() as model:
        env = _base_env(**{SCRIPTED_API_KEY_ENV: "k", HEADER_ENV: "h", "HOME": str(home_dir)})
        args = _args(tmp_path, _config(tmp_path, model))
        adapter = CodexAdapter(host=host_options_from(args, env))
        report = await adapter.preflight(adapter.standalone_config(args.config))
        assert report.ok, report.render()
        rendered = report.render()
        assert "[PASS] sandbox: workspace-write" in rendered and "[PASS] secrets out of reach: denied" in rendered
        inside = tmp_path / "workspace" / "made-by-agent"
        async with serving(args, env=env) as running, _client(running.url, None) as client:
            reply, _ = await _ask(client, f"[tool=echo ok > {inside} && cat {tmp_path}/state/tasks.sqlite3]", "c")
    assert inside.read_text() == "ok\n"
    assert "Permission denied" in reply, reply


async def test_a_resumed_thread_stays_under_the_profile(tmp_path, caplog):
    """A thread resumed after an unload gets no sandbox param either: the profile must still hold."""
    caplog.set_level(logging.INFO, logger="molecule_codex")
    with ScriptedModel() as model:
        env = _base_env(**{SCRIPTED_API_KEY_ENV: "k", HEADER_ENV: "h"})
        inside = tmp_path / "workspace" / "after-resume"
        async with serving(_args(tmp_path, _config(tmp_path, model)), env=env) as running, \
                _client(running.url, None) as client:
            await _ask(client, "hello", "c-resume")
            assert await running.adapter._executor.unload_idle(now=time.monotonic() + 1e6) == 1
            reply, _ = await _ask(client, f"[tool=echo ok > {inside} && cat {tmp_path}/state/codex-home/auth.json]",
                                  "c-resume")
    assert any("thread resumed" in record.getMessage() for record in caplog.records), "the thread was not resumed"
    assert inside.read_text() == "ok\n", reply  # resumed as workspace-write, not read-only
    assert "Permission denied" in reply, reply


@pytest.mark.parametrize("case", ["danger-full-access", "operator-sandbox-mode"])
async def test_doctor_says_when_secrets_are_not_protected(tmp_path, case):
    with ScriptedModel() as model:
        config = _config(tmp_path, model)
        if case == "danger-full-access":
            data = yaml.safe_load(config.read_text())
            data["runtime_config"]["sandbox"] = "danger-full-access"
            config.write_text(yaml.safe_dump(data))
        else:
            codex_home = tmp_path / "state" / "codex-home"
            codex_home.mkdir(parents=True, mode=0o700)
            (codex_home / "config.toml").write_text('sandbox_mode = "workspace-write"\n')
        env = _base_env(**{SCRIPTED_API_KEY_ENV: "k", HEADER_ENV: "h"})
        args = _args(tmp_path, config)
        adapter = CodexAdapter(host=host_options_from(args, env))
        report = await adapter.preflight(adapter.standalone_config(args.config), probe_sandbox=False)
    line = next(line for line in report.render().splitlines() if "secrets out of reach" in line)
    expected = "lets commands read every file" if case == "danger-full-access" else "sets sandbox_mode"
    assert "NOT in force" in line and expected in line, line
