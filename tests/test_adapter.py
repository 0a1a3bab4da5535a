"""CodexAdapter: static contract, preflight failures, setup/executor with real codex, state hooks, seam."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from a2a_rig import final_answer, send, user_message
from fake_runtime import use_fake_runtime, without_runtime

from molecule_codex import adapter as adapter_module
from molecule_codex import settings
from molecule_codex.adapter import Adapter, CodexAdapter, HostOptions
from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, ScriptedModel, Text, ToolCall
from molecule_codex.host import build_agent_card, build_app, running_server
from molecule_codex.task_store import create_task_store, task_store_url

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("k-secret-value", "platform-token-SECRET", "sk-SECRET-XYZ")
FAKE_KEY = "sk-test-SECRET123"


# ---------------------------------------------------------------------------------------------- helpers


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A controlled environment: PATH/HOME, a private CODEX_HOME, nothing else inherited."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "CODEX_HOME": str(tmp_path / "codex-home"),
    }
    env.update(extra)
    return env


def write_config(tmp_path: Path, **runtime_config: Any) -> Path:
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "codex-test", "runtime_config": {"model": "gpt-5.5", **runtime_config}}))
    return path


def make_adapter(tmp_path: Path, env: dict[str, str], *, workspace: Path | None = None) -> CodexAdapter:
    return CodexAdapter(host=HostOptions(state_dir=tmp_path / "state", workspace=workspace or tmp_path / "ws", env=env))


async def preflight(adapter: CodexAdapter, config_yaml: Path):
    return await adapter.preflight(adapter.standalone_config(config_yaml))


def failure(report: Any, name: str) -> str:
    failed = {result.name: result for result in report.failures}
    assert name in failed, f"expected a {name!r} failure, got:\n{report.render()}"
    result = failed[name]
    return f"{result.detail} {result.fix}"


def scripted_adapter(tmp_path: Path, model: ScriptedModel, *, state_dir: Path, codex_home: Path) -> CodexAdapter:
    env = {
        **os.environ,
        SCRIPTED_API_KEY_ENV: "k-secret-value",
        "MOLECULE_WORKSPACE_TOKEN": "platform-token-SECRET",
        "OPENAI_API_KEY": "sk-SECRET-XYZ",
        "CODEX_HOME": str(codex_home),
    }
    for name in ("MOLECULE_MODEL", "MODEL", "CODEX_AUTH_JSON", "CODEX_BIN"):
        env.pop(name, None)
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    return CodexAdapter(
        host=HostOptions(
            state_dir=state_dir,
            workspace=workspace,
            base_url=model.base_url,
            api_key_env=SCRIPTED_API_KEY_ENV,
            model="scripted-model",
            env=env,
        )
    )


@contextlib.asynccontextmanager
async def serve_adapter(adapter: CodexAdapter, config_yaml: Path, state_dir: Path) -> AsyncIterator[str]:
    """setup() + create_executor() + restore hook, served over real A2A on loopback; yields the URL."""
    config = adapter.standalone_config(config_yaml)
    await adapter.setup(config)
    executor = await adapter.create_executor(config)
    assert adapter._executor is executor
    store = create_task_store(task_store_url(state_dir, None))
    card = build_agent_card("http://127.0.0.1:0/", name="codex-test", description="test", version="0")
    app, handler = build_app(executor, card=card, task_store=store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    try:
        async with running_server(server, card, "127.0.0.1") as (url, _task):
            yield url
    finally:
        await adapter.shutdown()
        await handler.aclose()
        await store.close()


async def ask(url: str, text: str, context_id: str) -> str | None:
    import httpx
    from a2a.client import ClientConfig, create_client

    async with httpx.AsyncClient(timeout=60) as http:
        client = await create_client(url, client_config=ClientConfig(streaming=True, httpx_client=http))
        items = await send(client, user_message(text, context_id=context_id), timeout=30)
    return final_answer(items)


# ---------------------------------------------------------------------------------------------- 1. static


def test_static_contract_without_setup_or_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Adapter is CodexAdapter
    fresh = Adapter()
    assert fresh.name() == "codex"
    assert fresh.capabilities() is not None
    override = fresh.idle_timeout_override()
    assert isinstance(override, int)
    assert override > settings.DEFAULT_TURN_TIMEOUT_S
    assert fresh.memory_filename() == "AGENTS.md"
    props = fresh.get_config_schema()["properties"]
    for key in (
        "model",
        "provider",
        "sandbox",
        "approval_policy",
        "on_busy",
        "turn_timeout",
        "inactivity_timeout",
        "reasoning_effort",
        "cwd",
    ):
        assert key in props, key
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------------------------- 2. preflight


@pytest.mark.real_codex
async def test_preflight_rejects_platform_default_model(tmp_path):
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY))
    report = await preflight(adapter, write_config(tmp_path, model="anthropic:claude-opus-4-7"))
    text = failure(report, "configuration")
    assert "runtime_config.model" in text and "anthropic:claude-opus-4-7" in text
    assert FAKE_KEY not in report.render()


@pytest.mark.real_codex
async def test_preflight_rejects_provider_name_as_model(tmp_path):
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY))
    report = await preflight(adapter, write_config(tmp_path, model="openai"))
    text = failure(report, "configuration")
    assert "provider name" in text and "runtime_config.model" in text


@pytest.mark.real_codex
async def test_preflight_without_credentials_says_how_to_fix(tmp_path):
    adapter = make_adapter(tmp_path, base_env(tmp_path))
    report = await preflight(adapter, write_config(tmp_path))
    text = failure(report, "credentials")
    assert "no codex credential" in text
    assert "OPENAI_API_KEY" in text and "CODEX_AUTH_JSON" in text and "auth.json" in text


@pytest.mark.real_codex
async def test_preflight_unwritable_workspace(tmp_path):
    (tmp_path / "afile").write_text("a regular file")
    workspace = tmp_path / "afile" / "ws"
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY), workspace=workspace)
    report = await preflight(adapter, write_config(tmp_path))
    text = failure(report, "workspace")
    assert str(workspace) in text and "not writable" in text


@pytest.mark.real_codex
async def test_preflight_wrong_codex_version_names_both(tmp_path):
    fake = tmp_path / "fake-codex"
    fake.write_text("#!/bin/sh\necho 'codex-cli 0.1.0'\n")
    fake.chmod(0o755)
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY, CODEX_BIN=str(fake)))
    report = await preflight(adapter, write_config(tmp_path))
    text = failure(report, "codex binary")
    assert "0.1.0" in text and "0.163.0" in text


@pytest.mark.real_codex
async def test_preflight_operator_config_with_unknown_key(tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text('definitely_not_a_codex_key = "x"\n')
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY))
    report = await preflight(adapter, write_config(tmp_path))
    text = failure(report, "config.toml")
    assert "unknown configuration field" in text and "definitely_not_a_codex_key" in text


@pytest.mark.real_codex
async def test_setup_refuses_unknown_config_key_through_the_strict_app_server(tmp_path):
    """setup() leaves the config check to the app-server's own --strict-config start."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text('definitely_not_a_codex_key = "x"\n')
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY))
    with pytest.raises(RuntimeError) as caught:
        await adapter.setup(adapter.standalone_config(write_config(tmp_path)))
    message = str(caught.value)
    assert "unknown configuration field" in message and "definitely_not_a_codex_key" in message
    assert FAKE_KEY not in message


@pytest.mark.real_codex
async def test_setup_raises_with_failure_and_no_secret(tmp_path):
    (tmp_path / "afile").write_text("x")
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY), workspace=tmp_path / "afile" / "ws")
    config = adapter.standalone_config(write_config(tmp_path))
    with pytest.raises(RuntimeError) as caught:
        await adapter.setup(config)
    message = str(caught.value)
    assert "workspace" in message and "not writable" in message
    assert FAKE_KEY not in message
    assert adapter._app is None


# ---------------------------------------------------------------------------------------------- 3-5. real codex


@pytest.mark.real_codex
async def test_setup_with_api_key_writes_private_auth_and_config(tmp_path):
    codex_home = tmp_path / "codex-home"
    adapter = make_adapter(tmp_path, base_env(tmp_path, OPENAI_API_KEY=FAKE_KEY))
    config = adapter.standalone_config(write_config(tmp_path))
    await adapter.setup(config)
    try:
        executor = await adapter.create_executor(config)
        assert adapter._executor is executor
        auth, config_toml = codex_home / "auth.json", codex_home / "config.toml"
        assert FAKE_KEY in auth.read_text()
        assert FAKE_KEY not in config_toml.read_text()
        for path in (auth, config_toml):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await adapter.shutdown()
        await adapter.shutdown()  # idempotent


async def test_create_executor_before_setup_fails_clearly(tmp_path):
    adapter = make_adapter(tmp_path, base_env(tmp_path))
    with pytest.raises(RuntimeError, match="before a successful setup"):
        await adapter.create_executor(adapter.standalone_config(write_config(tmp_path)))



@pytest.mark.real_codex
async def test_setup_executor_and_shell_env_has_no_secrets(tmp_path, model):
    state_dir, codex_home = tmp_path / "state", tmp_path / "codex-home"
    adapter = scripted_adapter(tmp_path, model, state_dir=state_dir, codex_home=codex_home)
    model.enqueue(ToolCall("env"), Text("done"))
    async with serve_adapter(adapter, write_config(tmp_path), state_dir) as url:
        config_toml = codex_home / "config.toml"
        assert config_toml.exists()
        for path in [config_toml, *codex_home.glob("auth*.json")]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        answer = await ask(url, "show me the env", "c-env")
        assert answer == "done"
        requests = model.requests
        assert len(requests) == 2
        outputs = "\n".join(requests[1].tool_outputs_since_last_user())
        assert "PATH=" in outputs  # env really ran
        for secret in SECRETS:
            assert secret not in outputs, f"{secret} leaked into the shell environment"


@pytest.mark.real_codex
async def test_pre_stop_state_restores_into_new_adapter_and_resumes(tmp_path, model):
    codex_home = tmp_path / "codex-home"
    first = scripted_adapter(tmp_path, model, state_dir=tmp_path / "state1", codex_home=codex_home)
    config_yaml = write_config(tmp_path)
    async with serve_adapter(first, config_yaml, tmp_path / "state1") as url:
        assert await ask(url, "remember the word PELICAN", "c1") == "echo: remember the word PELICAN"
        snapshot = first.pre_stop_state()
    assert snapshot.get("conversations"), snapshot

    second = scripted_adapter(tmp_path, model, state_dir=tmp_path / "state2", codex_home=codex_home)
    async with serve_adapter(second, config_yaml, tmp_path / "state2") as url:
        second.restore_state(snapshot)
        before = len(model.requests)
        assert await ask(url, "what word?", "c1") == "echo: what word?"
        request = model.requests[before]
        assert "remember the word PELICAN" in request.all_user_texts, request.all_user_texts


@pytest.mark.real_codex
async def test_transcript_lines_after_a_turn(tmp_path, model):
    state_dir = tmp_path / "state"
    adapter = scripted_adapter(tmp_path, model, state_dir=state_dir, codex_home=tmp_path / "codex-home")
    async with serve_adapter(adapter, write_config(tmp_path), state_dir) as url:
        empty = await adapter.transcript_lines()
        assert empty["lines"] == []
        assert await ask(url, "hello transcript", "c-t") == "echo: hello transcript"
        result = await adapter.transcript_lines()
        assert result["runtime"] == "codex" and result["supported"] is True
        lines = result["lines"]
        assert any("user: hello transcript" in line for line in lines), lines
        assert any("assistant: echo: hello transcript" in line for line in lines), lines
        assert result["cursor"] > 0
        again = await adapter.transcript_lines(since=result["cursor"])
        assert again["lines"] == []
        assert again["cursor"] == result["cursor"]


# ---------------------------------------------------------------------------------------------- 6. seam


async def test_hooks_go_through_the_fake_runtime():
    with use_fake_runtime("adapter") as seam:
        import molecule_runtime
        from molecule_runtime.adapters import base as fake_base
        from molecule_runtime.executor_helpers import CURRENT_TASK_CALLS
        from molecule_runtime.runtime_wedge import is_wedged

        fresh = importlib.import_module("molecule_codex.adapter")

        assert seam.RUNTIME_AVAILABLE
        assert molecule_runtime.FAKE_RUNTIME
        assert issubclass(fresh.CodexAdapter, fake_base.BaseAdapter)
        assert fresh.CodexAdapter is not CodexAdapter
        instance = fresh.CodexAdapter()
        before = len(CURRENT_TASK_CALLS)
        instance.turn_started("ctx", "doing things")
        await asyncio.sleep(0.05)
        assert len(CURRENT_TASK_CALLS) == before + 1
        assert CURRENT_TASK_CALLS[-1][1] == "doing things"

        instance.app_server_unavailable("codex exited")
        assert is_wedged()
        instance.turn_finished("ctx", ok=False)
        assert is_wedged()
        instance.turn_finished("ctx", ok=True)
        await asyncio.sleep(0.05)
        assert not is_wedged()
        assert CURRENT_TASK_CALLS[-1][1] == ""


def test_without_runtime_uses_local_base_adapter():
    with without_runtime("adapter") as seam:
        fresh = importlib.import_module("molecule_codex.adapter")

        assert not seam.RUNTIME_AVAILABLE
        assert issubclass(fresh.CodexAdapter, seam._LocalBaseAdapter)
        assert fresh.CodexAdapter().name() == "codex"
    assert adapter_module.CodexAdapter is CodexAdapter


# ---------------------------------------------------------------------------------------------- 7. config.yaml


def test_repo_config_yaml_matches_schema():
    data = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    runtime_config = data["runtime_config"]
    props = CodexAdapter.get_config_schema()["properties"]
    platform_keys = {"required_env"}
    unknown = set(runtime_config) - set(props) - platform_keys
    assert not unknown, f"config.yaml sets keys the schema does not describe: {unknown}"
    ids = [entry["id"] for entry in runtime_config["models"]]
    assert ids
    assert runtime_config["model"] in ids


def test_our_loggers_get_a_handler_only_when_nobody_configured_logging(monkeypatch):
    import logging

    from molecule_codex.adapter import PACKAGE_LOGGER, attach_log_handler

    configured = logging.Logger("configured-root")
    configured.addHandler(logging.NullHandler())
    assert attach_log_handler({}, root=configured) is False

    package_logger = logging.getLogger(PACKAGE_LOGGER)
    saved = (package_logger.handlers[:], package_logger.level)
    try:
        monkeypatch.setattr(package_logger, "handlers", [])
        assert attach_log_handler({"LOG_LEVEL": "debug"}, root=logging.Logger("bare-root")) is True
        assert package_logger.handlers
        # every module's logger is a child of the package logger: it inherits handler and level
        assert logging.getLogger("molecule_codex.executor").getEffectiveLevel() == logging.DEBUG
    finally:
        package_logger.handlers = saved[0]
        package_logger.setLevel(saved[1])
