"""The runtime seam picks the real runtime when importable and matching stand-ins otherwise.

Which implementation is chosen is decided at import time, so the choice is tested in fresh
interpreters (with the stand-in runtime on PYTHONPATH, without it, broken, partial); behaviour is
tested in-process with ``use_fake_runtime`` / ``without_runtime``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import shutil
import stat
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FAKE_RUNTIME_DIR, REPO_ROOT, fake_runtime_env, use_fake_runtime, without_runtime

# Runs in a child interpreter; prints what the seam chose and the shape of every public name.
PROBE = r"""
import dataclasses, inspect, json, sys
from molecule_codex import runtime_seam as seam

def params(fn):
    return [[p.name, p.kind.name, repr(p.default)] for p in inspect.signature(fn).parameters.values()]

def member(cls, name):
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, property):
        return {"kind": "property", "setter": raw.fset is not None}
    kind = "static" if isinstance(raw, staticmethod) else "method"
    fn = getattr(cls, name)
    return {"kind": kind, "async": inspect.iscoroutinefunction(fn), "params": params(fn)}

def fields(cls):
    out = []
    for f in dataclasses.fields(cls):
        default = repr(f.default) if f.default is not dataclasses.MISSING else None
        factory = f.default_factory.__name__ if f.default_factory is not dataclasses.MISSING else None
        out.append([f.name, default, factory])
    return out

MEMBERS = ["name", "display_name", "description", "get_config_schema", "capabilities",
           "idle_timeout_override", "event_log", "memory_filename", "register_tool_hook",
           "register_subagent_hook", "inject_plugins", "transcript_lines", "pre_stop_state",
           "restore_state", "_common_setup", "setup", "create_executor"]
caps = seam.RuntimeCapabilities
wedge = seam.runtime_wedge
runtime_pkg = sys.modules.get("molecule_runtime")
shape = {
    "all_present": all(hasattr(seam, n) for n in seam.__all__),
    "base_members": {n: member(seam.BaseAdapter, n) for n in MEMBERS},
    "abstract": sorted(seam.BaseAdapter.__abstractmethods__),
    "adapter_config": fields(seam.AdapterConfig),
    "setup_result": fields(seam.SetupResult),
    "capabilities": fields(caps),
    "capabilities_frozen": caps.__dataclass_params__.frozen,
    "capabilities_dict": caps().to_dict(),
    "set_current_task": [inspect.iscoroutinefunction(seam.set_current_task), params(seam.set_current_task)],
    "wedge": {n: params(getattr(wedge, n)) for n in ("mark_wedged", "clear_wedge", "is_wedged",
                                                     "wedge_reason", "reset_for_test")},
    "build_system_prompt": [inspect.iscoroutinefunction(seam.build_system_prompt),
                            params(seam.build_system_prompt)],
    "resolve_configs_dir": params(seam.resolve_configs_dir),
}
print(json.dumps({
    "available": seam.RUNTIME_AVAILABLE,
    "version": seam.RUNTIME_VERSION,
    "import_error": seam.RUNTIME_IMPORT_ERROR,
    "fake_marker": getattr(runtime_pkg, "FAKE_RUNTIME", None),
    "base_module": seam.BaseAdapter.__module__,
    "config_module": seam.AdapterConfig.__module__,
    "set_current_task_module": seam.set_current_task.__module__,
    "wedge": getattr(wedge, "__name__", type(wedge).__name__),
    "shape": shape,
}))
"""


def probe(pythonpath_first: Path | None) -> tuple[dict[str, Any], str]:
    """Run PROBE in a fresh interpreter; ``pythonpath_first`` holds a ``molecule_runtime`` or None."""
    env = fake_runtime_env(with_runtime=False)
    if pythonpath_first is not None:
        env["PYTHONPATH"] = f"{pythonpath_first}:{env['PYTHONPATH']}"
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@pytest.fixture(scope="module")
def standalone() -> dict[str, Any]:
    result, stderr = probe(None)
    assert stderr == ""
    return result


@pytest.fixture(scope="module")
def with_fake() -> dict[str, Any]:
    result, stderr = probe(FAKE_RUNTIME_DIR)
    assert stderr == ""
    return result


def copy_fake_runtime(dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the stand-in tree under ``dest`` without the ``drop`` modules."""
    shutil.copytree(FAKE_RUNTIME_DIR / "molecule_runtime", dest / "molecule_runtime")
    for name in drop:
        (dest / "molecule_runtime" / name).unlink()
    return dest


# --- which implementation is chosen ------------------------------------------------------------


def test_without_the_runtime_the_seam_is_standalone(standalone: dict[str, Any]) -> None:
    assert standalone["available"] is False
    assert standalone["version"] is None
    assert standalone["import_error"] is None
    assert standalone["fake_marker"] is None
    assert standalone["base_module"] == "molecule_codex.runtime_seam"
    assert standalone["set_current_task_module"] == "molecule_codex.runtime_seam"
    assert standalone["wedge"] == "_LocalWedge"


def test_with_the_stand_in_the_seam_re_exports_the_runtime(with_fake: dict[str, Any]) -> None:
    assert with_fake["available"] is True
    assert with_fake["version"] == "0.0.0+fake"
    assert with_fake["import_error"] is None
    assert with_fake["fake_marker"] is True
    assert with_fake["base_module"] == "molecule_runtime.adapters.base"
    assert with_fake["config_module"] == "molecule_runtime.adapters.base"
    assert with_fake["set_current_task_module"] == "molecule_runtime.executor_helpers"
    assert with_fake["wedge"] == "molecule_runtime.runtime_wedge"


def test_names_and_signatures_match_between_the_two(standalone: dict[str, Any], with_fake: dict[str, Any]) -> None:
    assert standalone["shape"]["all_present"] is True
    for key, value in standalone["shape"].items():
        assert with_fake["shape"][key] == value, key


def test_standalone_shape_follows_the_contract(standalone: dict[str, Any]) -> None:
    shape = standalone["shape"]
    assert shape["abstract"] == ["create_executor", "description", "display_name", "name", "setup"]
    assert [f[0] for f in shape["adapter_config"]] == [
        "model",
        "system_prompt",
        "tools",
        "runtime_config",
        "config_path",
        "workspace_id",
        "prompt_files",
        "a2a_port",
        "heartbeat",
    ]
    assert ["config_path", "'/configs'", None] in shape["adapter_config"]
    assert ["a2a_port", "8000", None] in shape["adapter_config"]
    assert shape["capabilities_frozen"] is True
    assert shape["capabilities_dict"] == dict.fromkeys(
        ["heartbeat", "scheduler", "session", "status_mgmt", "retry", "activity_decoration", "channel_dispatch"],
        False,
    )
    members = shape["base_members"]
    assert {n for n, m in members.items() if m["kind"] == "static"} == {
        "name",
        "display_name",
        "description",
        "get_config_schema",
    }
    assert {n for n, m in members.items() if m.get("async")} == {
        "inject_plugins",
        "transcript_lines",
        "_common_setup",
        "setup",
        "create_executor",
    }
    assert members["event_log"] == {"kind": "property", "setter": True}
    assert shape["set_current_task"][0] is True
    assert shape["build_system_prompt"][0] is True


def test_a_broken_runtime_warns_and_falls_back(tmp_path: Path) -> None:
    package = tmp_path / "molecule_runtime"
    package.mkdir()
    (package / "__init__.py").write_text("import molecule_runtime_missing_dependency_xyz\n")
    result, stderr = probe(tmp_path)
    assert result["available"] is False
    assert "molecule_runtime_missing_dependency_xyz" in result["import_error"]
    assert result["base_module"] == "molecule_codex.runtime_seam"
    assert "failed to import" in stderr
    assert "running standalone" in stderr


def test_a_runtime_lacking_optional_modules_keeps_its_core(tmp_path: Path) -> None:
    root = copy_fake_runtime(tmp_path, drop=("runtime_wedge.py", "executor_helpers.py", "configs_dir.py"))
    result, stderr = probe(root)
    assert result["available"] is True
    assert result["base_module"] == "molecule_runtime.adapters.base"
    assert result["wedge"] == "_LocalWedge"
    assert result["set_current_task_module"] == "molecule_codex.runtime_seam"
    assert "runtime_wedge missing" in stderr
    assert "set_current_task missing" in stderr


def test_only_the_seam_imports_the_runtime() -> None:
    offenders = []
    for path in sorted([*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "molecule_codex").rglob("*.py")]):
        if path.name == "runtime_seam.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in {"import_module", "__import__"}:
                    names = [str(node.args[0].value)]
            if any(n == "molecule_runtime" or n.startswith("molecule_runtime.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


# --- behaviour -----------------------------------------------------------------------------------


def minimal_adapter(base: type) -> type:
    """The smallest concrete subclass of the chosen ``BaseAdapter``."""

    class Minimal(base):  # type: ignore[misc, valid-type]
        @staticmethod
        def name() -> str:
            return "codex"

        @staticmethod
        def display_name() -> str:
            return "Codex"

        @staticmethod
        def description() -> str:
            return "test adapter"

        async def setup(self, config: Any) -> None:
            return None

        async def create_executor(self, config: Any) -> Any:
            return object()

    return Minimal


def test_standalone_base_adapter_defaults() -> None:
    with without_runtime() as seam:
        with pytest.raises(TypeError):
            seam.BaseAdapter()
        adapter = minimal_adapter(seam.BaseAdapter)()
        assert adapter.capabilities() == seam.RuntimeCapabilities()
        assert adapter.idle_timeout_override() is None
        assert adapter.memory_filename() == "CLAUDE.md"
        assert adapter.get_config_schema() == {}
        lines = asyncio.run(adapter.transcript_lines(since=7))
        assert lines["supported"] is False
        assert lines["cursor"] == 7
        assert adapter.pre_stop_state() == {}
        adapter._executor = type("Executor", (), {"_session_id": "s-1"})()
        assert adapter.pre_stop_state() == {"session_id": "s-1"}
        adapter.restore_state({"session_id": "s-2"})
        assert adapter._snapshot_session_id == "s-2"
        assert adapter.event_log.append(kind="turn", payload={}) is None
        sink = object()
        adapter.event_log = sink
        assert adapter.event_log is sink


def test_capabilities_are_frozen_and_keep_wire_names() -> None:
    with without_runtime() as seam:
        caps = seam.RuntimeCapabilities(provides_native_session=True)
        with pytest.raises(FrozenInstanceError):
            caps.provides_native_session = False  # type: ignore[misc]
        assert caps.to_dict()["session"] is True
        assert caps.to_dict()["heartbeat"] is False


def test_standalone_wedge_keeps_the_first_reason(caplog: pytest.LogCaptureFixture) -> None:
    with without_runtime() as seam:
        caplog.set_level(logging.WARNING, logger="molecule_codex.runtime_seam")
        assert seam.is_wedged() is False
        assert seam.wedge_reason() == ""
        seam.mark_wedged("codex app-server died and cannot restart")
        seam.mark_wedged("a later, less specific failure")
        assert seam.is_wedged() is True
        assert seam.wedge_reason() == "codex app-server died and cannot restart"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "cannot restart" in errors[0].getMessage()
        seam.clear_wedge()
        assert seam.is_wedged() is False
        assert seam.wedge_reason() == ""


def test_wedge_reaches_the_runtime_module_the_heartbeat_reads() -> None:
    with use_fake_runtime() as seam:
        runtime_wedge = sys.modules["molecule_runtime.runtime_wedge"]
        seam.mark_wedged("auth permanently rejected")
        assert runtime_wedge.is_wedged() is True
        assert runtime_wedge.wedge_reason() == "auth permanently rejected"
        seam.clear_wedge()
        assert runtime_wedge.is_wedged() is False


async def test_set_current_task_goes_to_the_runtime() -> None:
    with use_fake_runtime() as seam:
        from molecule_runtime.executor_helpers import CURRENT_TASK_CALLS
        from molecule_runtime.heartbeat import HeartbeatLoop

        heartbeat = HeartbeatLoop()
        await seam.set_current_task(heartbeat, "fix the build")
        assert (heartbeat.active_tasks, heartbeat.current_task) == (1, "fix the build")
        await seam.set_current_task(heartbeat, "")
        assert (heartbeat.active_tasks, heartbeat.current_task) == (0, "")
        assert [task for _, task in CURRENT_TASK_CALLS] == ["fix the build", ""]


async def test_standalone_set_current_task_is_a_no_op() -> None:
    with without_runtime() as seam:
        heartbeat = type("Beat", (), {"active_tasks": 0, "current_task": ""})()
        assert await seam.set_current_task(heartbeat, "task") is None
        assert (heartbeat.active_tasks, heartbeat.current_task) == (0, "")


@pytest.fixture
def prompt_dir(tmp_path: Path) -> Path:
    (tmp_path / "system-prompt.md").write_text("You are the codex workspace.\n")
    (tmp_path / "team.md").write_text("\nWork with the team.\n\n")
    (tmp_path / "empty.md").write_text("   \n")
    return tmp_path


async def test_standalone_prompt_joins_prompt_files_and_warns_on_missing(
    prompt_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with without_runtime() as seam:
        caplog.set_level(logging.WARNING, logger="molecule_codex.runtime_seam")
        config = seam.AdapterConfig(
            model="gpt-5",
            config_path=str(prompt_dir),
            prompt_files=["system-prompt.md", "missing.md", "empty.md", "team.md"],
        )
        prompt = await seam.build_system_prompt(minimal_adapter(seam.BaseAdapter)(), config)
        assert prompt == "You are the codex workspace.\n\nWork with the team."
        assert any("missing.md" in r.getMessage() for r in caplog.records)


async def test_standalone_prompt_is_none_without_prompt_files(tmp_path: Path) -> None:
    with without_runtime() as seam:
        config = seam.AdapterConfig(model="gpt-5", config_path=str(tmp_path))
        assert await seam.build_system_prompt(minimal_adapter(seam.BaseAdapter)(), config) is None


async def test_runtime_prompt_comes_from_common_setup(prompt_dir: Path) -> None:
    with use_fake_runtime() as seam:
        from molecule_runtime.adapters.base import COMMON_SETUP_CALLS as setup_calls
        from molecule_runtime.adapters.base import FAKE_PLATFORM_PROMPT

        config = seam.AdapterConfig(model="gpt-5", config_path=str(prompt_dir), prompt_files=["team.md"])
        prompt = await seam.build_system_prompt(minimal_adapter(seam.BaseAdapter)(), config)
        assert prompt == f"{FAKE_PLATFORM_PROMPT}\n\nWork with the team."
        assert setup_calls == [config]


async def test_a_prompt_the_runtime_already_built_is_kept(prompt_dir: Path) -> None:
    with use_fake_runtime() as seam:
        from molecule_runtime.adapters.base import COMMON_SETUP_CALLS

        config = seam.AdapterConfig(model="gpt-5", system_prompt="built by the runtime")
        assert await seam.build_system_prompt(minimal_adapter(seam.BaseAdapter)(), config) == "built by the runtime"
        assert COMMON_SETUP_CALLS == []


async def test_failing_common_setup_falls_back_to_prompt_files(
    prompt_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with use_fake_runtime() as seam:
        caplog.set_level(logging.WARNING, logger="molecule_codex.runtime_seam")

        class Failing(minimal_adapter(seam.BaseAdapter)):  # type: ignore[misc]
            async def _common_setup(self, config: Any) -> Any:
                raise ConnectionError("platform unreachable at http://token@host")

        config = seam.AdapterConfig(model="gpt-5", config_path=str(prompt_dir), prompt_files=["team.md"])
        assert await seam.build_system_prompt(Failing(), config) == "Work with the team."
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "ConnectionError" in messages
        assert "token@host" not in messages


async def test_privileged_plugin_failure_is_not_swallowed(prompt_dir: Path) -> None:
    with use_fake_runtime() as seam:
        from molecule_runtime.adapters.base import PrivilegedPluginInstallError

        class Privileged(minimal_adapter(seam.BaseAdapter)):  # type: ignore[misc]
            async def _common_setup(self, config: Any) -> Any:
                raise PrivilegedPluginInstallError("molecule-platform-mcp failed")

        config = seam.AdapterConfig(model="gpt-5", config_path=str(prompt_dir))
        with pytest.raises(PrivilegedPluginInstallError):
            await seam.build_system_prompt(Privileged(), config)


async def test_hanging_common_setup_is_time_limited(prompt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with use_fake_runtime() as seam:
        monkeypatch.setattr(seam, "COMMON_SETUP_TIMEOUT_S", 0.05)

        class Hanging(minimal_adapter(seam.BaseAdapter)):  # type: ignore[misc]
            async def _common_setup(self, config: Any) -> Any:
                await asyncio.sleep(30)

        config = seam.AdapterConfig(model="gpt-5", config_path=str(prompt_dir), prompt_files=["team.md"])
        assert await asyncio.wait_for(seam.build_system_prompt(Hanging(), config), 5) == "Work with the team."


def test_configs_dir_explicit_wins(tmp_path: Path) -> None:
    with without_runtime() as seam:
        target = tmp_path / "state" / "configs"
        assert seam.resolve_configs_dir({"CONFIGS_DIR": str(target), "HOME": str(tmp_path)}) == target
        assert target.is_dir()


def test_configs_dir_prefers_a_writable_container_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with without_runtime() as seam:
        container = tmp_path / "configs"
        container.mkdir()
        monkeypatch.setattr(seam, "CONTAINER_CONFIGS_DIR", container)
        assert seam.resolve_configs_dir({"HOME": str(tmp_path / "home")}) == container


def test_configs_dir_falls_back_to_a_private_home_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with without_runtime() as seam:
        monkeypatch.setattr(seam, "CONTAINER_CONFIGS_DIR", tmp_path / "absent")
        resolved = seam.resolve_configs_dir({"HOME": str(tmp_path / "home")})
        assert resolved == tmp_path / "home" / ".molecule-workspace"
        assert stat.S_IMODE(resolved.stat().st_mode) == 0o700


def test_configs_dir_delegates_to_the_runtime_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIGS_DIR", str(tmp_path / "from-env"))
    with use_fake_runtime() as seam:
        from molecule_runtime.configs_dir import RESOLVE_CALLS as resolve_calls

        assert seam.resolve_configs_dir() == tmp_path / "from-env"
        assert resolve_calls == [tmp_path / "from-env"]
        # A child env that disagrees with this process cannot use the runtime's env-reading resolver.
        other = seam.resolve_configs_dir({"CONFIGS_DIR": str(tmp_path / "child"), "HOME": str(tmp_path)})
        assert other == tmp_path / "child"
        assert len(resolve_calls) == 1


def test_helpers_restore_the_previous_modules() -> None:
    from molecule_codex import runtime_seam as before

    with use_fake_runtime() as seam:
        assert seam is not before
        assert seam.RUNTIME_AVAILABLE is True
    with without_runtime() as seam:
        assert seam.RUNTIME_AVAILABLE is False
    assert sys.modules["molecule_codex.runtime_seam"] is before
    assert "molecule_runtime" not in sys.modules
