"""The Molecule adapter for codex: metadata, config schema, preflight, setup, executor, hooks.

The runtime imports this module (``ADAPTER_MODULE=adapter``), takes ``Adapter``, calls
``setup()`` then ``create_executor()``, and serves the executor over A2A. ``molecule-codex
serve`` does the same without the platform, passing :class:`HostOptions`.

``setup()`` is preflight then warm start: every check that can fail is run before anything is
written, each failure says how to fix it (the runtime shows the text and never retries), and the
app-server is started so the first message does not pay for it. Files have one owner, this
module: ``auth.json`` and ``config.toml`` are written here, never by shell.

``capabilities()`` and ``idle_timeout_override()`` are static: the runtime builds a fresh
``Adapter()`` on every heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molecule_codex import codex_config, providers, runtime_seam
from molecule_codex.app_server import AppServer, AppServerExited
from molecule_codex.codex_binary import CodexBinary, CodexBinaryError, resolve_codex_binary
from molecule_codex.conversations import ConversationStore
from molecule_codex.executor import CodexExecutor, ExecutorOptions
from molecule_codex.person import PersonPolicy, server_request_deadline
from molecule_codex.preflight import PreflightError, PreflightReport, check_writable_dir, resolve_sandbox
from molecule_codex.preflight import probe_sandbox as run_sandbox_probe
from molecule_codex.read_deny import ReadDeny, build_read_deny, secret_locations, workspace_conflict
from molecule_codex.runtime_seam import AdapterConfig, BaseAdapter, RuntimeCapabilities
from molecule_codex.settings import (
    CONFIG_SCHEMA,
    DEFAULT_TURN_TIMEOUT_S,
    Settings,
    SettingsError,
    load_config_yaml,
    settings_from_sources,
)
from molecule_codex.transcript import find_rollout, read_transcript

logger = logging.getLogger(__name__)

#: Seconds of silence the platform tolerates per dispatch: longer than our own turn limit, so
#: the caller gets our clear error instead of a proxy timeout.
IDLE_TIMEOUT_OVERRIDE_S = int(DEFAULT_TURN_TIMEOUT_S) + 120
#: The provider entry ``--base-url`` turns into.
ENDPOINT_PROVIDER = "endpoint"
#: Env vars that never reach the app-server (and so never any shell it starts): platform tokens
#: and seeds already written to auth.json. The provider's own key variable is kept.
_SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|AUTH_JSON|_KEY$|API_KEY)", re.IGNORECASE)
CONFIG_FIX = "fix or remove the unknown key outside the managed block of $CODEX_HOME/config.toml"
#: Our modules' loggers (module-level names: the layout is flat, so there is no common parent).
#: Every module logs under ``molecule_codex.<module>``, so one handler here covers them all.
PACKAGE_LOGGER = "molecule_codex"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Hooks into the platform heartbeat must never hold up a turn.
HOOK_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class HostOptions:
    """What a standalone host decides that the platform otherwise would."""

    state_dir: Path
    workspace: Path | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    model: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(slots=True)
class _Prepared:
    """What preflight worked out, reused by setup."""

    binary: CodexBinary
    settings: Settings
    provider: providers.ResolvedProvider
    codex_home: Path
    workspace: Path
    state_dir: Path
    sandbox: str = "workspace-write"
    read_deny: ReadDeny | None = None


def attach_log_handler(env: Mapping[str, str], root: logging.Logger | None = None) -> bool:
    """Give our loggers a stderr handler when nobody configured logging (the runtime does not).

    Without it every INFO line (turn start/end, restarts, preflight) is dropped under the
    platform. Level: ``MOLECULE_CODEX_LOG_LEVEL``, else ``LOG_LEVEL``, else INFO. Returns whether
    a handler was attached; a configured root logger is left to do its job.
    """
    root = root or logging.getLogger()
    if root.handlers:
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = (env.get("MOLECULE_CODEX_LOG_LEVEL") or env.get("LOG_LEVEL") or "INFO").upper()
    package_logger = logging.getLogger(PACKAGE_LOGGER)
    if not package_logger.handlers:
        package_logger.addHandler(handler)
        package_logger.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    return True


def child_env(env: Mapping[str, str], keep: set[str]) -> dict[str, str]:
    """The app-server's environment: ours minus secrets it does not need."""
    return {name: value for name, value in env.items() if name in keep or not _SECRET_ENV.search(name)}


class CodexAdapter(BaseAdapter):
    """OpenAI Codex CLI as a Molecule workspace runtime."""

    def __init__(self, host: HostOptions | None = None) -> None:
        super().__init__()
        self._host = host
        self._prepared: _Prepared | None = None
        self._executor: CodexExecutor | None = None
        self._app: AppServer | None = None
        self._person: PersonPolicy | None = None  # AppServer's policy; the executor asks people through it
        self._store: ConversationStore | None = None
        self._heartbeat: Any = None
        self._hook_tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ static metadata

    @staticmethod
    def name() -> str:
        return "codex"

    @staticmethod
    def display_name() -> str:
        return "OpenAI Codex"

    @staticmethod
    def description() -> str:
        return (
            "OpenAI Codex CLI coding agent: reads, edits and runs code in its workspace, "
            "one codex thread per conversation."
        )

    @staticmethod
    def get_config_schema() -> dict:
        return CONFIG_SCHEMA

    def capabilities(self) -> RuntimeCapabilities:
        """Static: codex keeps its own sessions (one thread per conversation)."""
        return RuntimeCapabilities(provides_native_session=True)

    def idle_timeout_override(self) -> int | None:
        """Static: a little longer than the default turn limit."""
        return IDLE_TIMEOUT_OVERRIDE_S

    def memory_filename(self) -> str:
        """codex reads AGENTS.md natively."""
        return "AGENTS.md"

    # ------------------------------------------------------------------ configuration

    @property
    def _env(self) -> dict[str, str]:
        return dict(self._host.env) if self._host else dict(os.environ)

    def standalone_config(self, config_yaml: Path) -> AdapterConfig:
        """The AdapterConfig the runtime would build from ``config.yaml`` (for serve/doctor)."""
        data = load_config_yaml(config_yaml) if config_yaml.exists() else {}
        runtime_config = dict(data.get("runtime_config") or {})
        env = self._env
        model = env.get("MOLECULE_MODEL") or env.get("MODEL") or runtime_config.get("model") or data.get("model")
        if model:
            runtime_config["model"] = model
        runtime_config.setdefault("name", data.get("name", "codex"))
        return AdapterConfig(
            model=str(model or ""),
            runtime_config=runtime_config,
            config_path=str(config_yaml.parent),
            prompt_files=list(data.get("prompt_files") or []),
        )

    def _config_yaml(self, config: AdapterConfig) -> dict[str, Any]:
        """config.yaml beside the runtime's config: our own keys live there (the runtime drops them)."""
        path = Path(config.config_path) / "config.yaml"
        return load_config_yaml(path) if path.exists() else {}

    def _settings(self, config: AdapterConfig) -> Settings:
        yaml_data = dict(self._config_yaml(config))
        runtime_config = dict(config.runtime_config or {})
        host = self._host
        allow_any = False
        if host and host.base_url:
            entries = dict(yaml_data.get("providers") or {})
            entry: dict[str, Any] = {"base_url": host.base_url}
            if host.api_key_env:
                entry["env_key"] = host.api_key_env
            entries[ENDPOINT_PROVIDER] = entry
            yaml_data["providers"] = entries
            runtime_config["provider"] = ENDPOINT_PROVIDER
            allow_any = True
        if host and host.model:
            runtime_config["model"] = host.model
        runtime_config.pop("name", None)
        return settings_from_sources(runtime_config, yaml_data, self._env, allow_any_model=allow_any)

    def _locations(self, settings: Settings) -> tuple[Path, Path, Path]:
        """(state_dir, codex_home, workspace) for this host."""
        env = self._env
        if self._host:
            state_dir = self._host.state_dir
            workspace = self._host.workspace or settings.cwd
        else:
            state_dir = runtime_seam.resolve_configs_dir(env) / "codex"
            workspace = settings.cwd
        codex_home = Path(env["CODEX_HOME"]).expanduser() if env.get("CODEX_HOME") else state_dir / "codex-home"
        return state_dir, codex_home, workspace

    # ------------------------------------------------------------------ preflight and setup

    async def preflight(
        self, config: AdapterConfig, *, validate_config: bool = True, probe_sandbox: bool = True
    ) -> PreflightReport:
        """Run every boot check without side effects outside probe files; never raises.

        setup() passes False for both: the app-server start runs with ``--strict-config`` (one
        codex spawn less) and the sandbox probe runs while the app-server starts.
        """
        report = PreflightReport()
        return await asyncio.to_thread(self._preflight_sync, config, report, validate_config, probe_sandbox)

    def _preflight_sync(
        self, config: AdapterConfig, report: PreflightReport, validate_config: bool, probe_sandbox: bool
    ) -> PreflightReport:
        env = self._env
        binary: CodexBinary | None = None
        try:
            binary = resolve_codex_binary(env)
            version = binary.check_version()
            report.note("codex binary", True, f"{'.'.join(map(str, version))} at {binary.path} ({binary.source})")
        except CodexBinaryError as exc:
            report.note("codex binary", False, str(exc),
                        "pip install openai-codex-cli-bin==0.163.0, or set CODEX_BIN")
        try:
            settings = self._settings(config)
            report.note("model", True, f"{settings.model} (provider {settings.provider})")
        except SettingsError as exc:
            report.note("configuration", False, str(exc), "fix runtime_config in config.yaml")
            return report
        state_dir, codex_home, workspace = self._locations(settings)
        try:
            provider = providers.resolve_provider(settings, env, codex_home)
            names = ", ".join(provider.credential_env_names) or "none needed"
            report.note("credentials", True, f"provider {provider.name} ({provider.kind}) via {names}")
        except providers.ProviderError as exc:
            report.note("credentials", False, str(exc))
            return report
        writable = report.run("state directory", lambda: check_writable_dir(state_dir, "the state directory", 0o700),
                              "set --state-dir / MOLECULE_CODEX_STATE_DIR to a writable directory")
        writable &= report.run("CODEX_HOME", lambda: check_writable_dir(codex_home, "CODEX_HOME", 0o700),
                               "set CODEX_HOME to a writable directory")
        writable &= report.run("workspace", lambda: check_writable_dir(workspace, "the working directory"),
                               "make the workspace writable by the agent user (runtime_config.cwd / --workdir)")
        if binary is None or not writable:
            return report
        prepared = _Prepared(binary, settings, provider, codex_home, workspace, state_dir)
        report.run("secrets out of reach", lambda: self._check_read_deny(prepared),
                   "put the workspace outside the state directory, CODEX_HOME and the platform's configs directory")
        if validate_config:
            report.run("config.toml", lambda: self._check_config(prepared), CONFIG_FIX)

        if report.ok:
            self._prepared = prepared
        if probe_sandbox:
            report.run("sandbox", lambda: self._check_sandbox(prepared))
        return report

    def _configs_dir(self) -> Path | None:
        """The platform runtime's directory (token, inbound secret, snapshot); None for a standalone host."""
        env = self._env
        if self._host is None:
            return runtime_seam.resolve_configs_dir(env)
        return Path(env["CONFIGS_DIR"]) if env.get("CONFIGS_DIR") else None

    def _check_read_deny(self, prepared: _Prepared) -> str:
        """Work out what the agent's commands may not read; says plainly what is NOT protected."""
        locations = secret_locations(state_dir=prepared.state_dir, codex_home=prepared.codex_home, env=self._env,
                                     configs_dir=self._configs_dir())
        inside = workspace_conflict(locations, prepared.workspace)
        if inside is not None:
            raise PreflightError(f"the workspace {prepared.workspace} lies inside {inside}, which holds secrets "
                                 "the agent must not read")
        prepared.read_deny = build_read_deny(locations, prepared.workspace)
        if not codex_config.uses_profile(prepared.settings.sandbox):
            return f"NOT in force: sandbox {prepared.settings.sandbox} lets commands read every file"
        overridden = codex_config.profile_overridden(codex_config.read_config_toml(prepared.codex_home))
        if overridden:
            logger.warning("secrets are NOT out of the agent's reach: %s", overridden)
            return f"NOT in force: {overridden}"
        return prepared.read_deny.describe()

    def _check_sandbox(self, prepared: _Prepared) -> str:
        """Resolve ``sandbox: auto|…`` with a live probe of our profile; records the mode threads will use."""
        settings = prepared.settings
        deny = prepared.read_deny
        prepared.sandbox, detail = resolve_sandbox(
            settings.sandbox,
            lambda: run_sandbox_probe(
                prepared.binary, prepared.workspace, prepared.state_dir,
                codex_config.profile_config_text("workspace-write", settings.network_access, deny), self._env,
                canary_dirs=(prepared.codex_home,),
            ),
        )
        return detail

    def _render_config(self, prepared: _Prepared) -> str:
        mcp = codex_config.platform_mcp_server(sys.executable, self._mcp_env())
        existing = codex_config.read_config_toml(prepared.codex_home)
        return codex_config.render_config_toml(existing, prepared.settings, prepared.provider, mcp, prepared.read_deny)

    def _check_config(self, prepared: _Prepared) -> str:
        """Render config.toml into a scratch CODEX_HOME and let codex validate it strictly."""
        text = self._render_config(prepared)
        scratch = prepared.state_dir / "config-check"
        shutil.rmtree(scratch, ignore_errors=True)
        codex_config.write_config_toml(scratch, text)
        try:
            error = codex_config.validate_config(prepared.binary, scratch, self._env)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if error:
            raise PreflightError(f"codex rejects the rendered config.toml: {error}")
        return "valid (codex --strict-config)"

    def _mcp_env(self) -> dict[str, str]:
        env = self._env
        if runtime_seam.RUNTIME_AVAILABLE:
            env["CONFIGS_DIR"] = str(runtime_seam.resolve_configs_dir(env))
        return env

    async def setup(self, config: AdapterConfig) -> None:
        """Preflight (raise with every failure), write auth and config, start codex warm."""
        self._heartbeat = config.heartbeat
        attach_log_handler(self._env)
        report = await self.preflight(config, validate_config=False, probe_sandbox=False)
        for result in report.results:
            logger.info("preflight %s: %s %s", "PASS" if result.ok else "FAIL", result.name, result.detail)
        report.raise_for_failures()
        prepared = self._prepared
        assert prepared is not None
        env = self._env
        await asyncio.to_thread(providers.install_credentials, prepared.provider, env, prepared.codex_home)
        await asyncio.to_thread(
            codex_config.write_config_toml, prepared.codex_home, self._render_config(prepared)
        )
        instructions = await runtime_seam.build_system_prompt(self, config) if runtime_seam.RUNTIME_AVAILABLE else None
        if not instructions and config.prompt_files:
            instructions = runtime_seam.read_prompt_files(config.config_path, list(config.prompt_files)) or None
        extra = prepared.settings.developer_instructions
        if extra:
            instructions = f"{instructions}\n\n{extra}" if instructions else extra
        app_env = child_env(env, set(prepared.provider.codex_env_names))
        app_env.update(prepared.provider.child_env_additions)
        self._person = PersonPolicy(prepared.settings.approval_policy)
        self._app = AppServer(
            codex_home=prepared.codex_home,
            cwd=prepared.workspace,
            binary=prepared.binary,
            env=app_env,
            policy=self._person,
            # AppServer declines a request whose policy is slower than this: a person may take until then.
            server_request_deadline=server_request_deadline(prepared.settings.approval_timeout,
                                                            prepared.settings.turn_timeout),
            strict_config=True,
        )
        self._store = ConversationStore(prepared.state_dir)
        sandbox = asyncio.create_task(asyncio.to_thread(self._check_sandbox, prepared))
        try:
            await self._app.start()
        except AppServerExited as exc:
            await asyncio.gather(sandbox, return_exceptions=True)
            detail = codex_config.config_error_text(exc.stderr_tail) or str(exc)
            raise PreflightError(f"molecule-codex preflight failed: config.toml: codex rejects it: {detail} "
                                 f"Fix: {CONFIG_FIX}") from None
        try:
            logger.info("preflight PASS: sandbox %s", await sandbox)
        except PreflightError as exc:
            await self._app.close()
            raise PreflightError(f"molecule-codex preflight failed: sandbox: {exc}") from None
        self._options = self._executor_options(prepared, instructions)
        logger.info(
            "codex ready: model=%s provider=%s sandbox=%s workspace=%s state=%s",
            prepared.settings.model, prepared.provider.name, prepared.sandbox, prepared.workspace, prepared.state_dir,
        )

    def _executor_options(self, prepared: _Prepared, instructions: str | None) -> ExecutorOptions:
        settings = prepared.settings
        return ExecutorOptions(
            workspace=prepared.workspace,
            model=settings.model,
            # Under our profile (config.toml) no sandbox is sent: codex would ignore the profile.
            sandbox=None if codex_config.uses_profile(prepared.sandbox) else prepared.sandbox,
            approval_policy=settings.approval_policy,
            on_busy=settings.on_busy,
            turn_timeout=settings.turn_timeout,
            inactivity_timeout=settings.inactivity_timeout,
            reasoning_effort=settings.reasoning_effort,
            developer_instructions=instructions,
            max_input_chars=settings.max_input_chars,
            max_concurrent_turns=settings.max_concurrent_turns,
            idle_unload_after=settings.idle_unload_after,
            workspace_id=self._env.get("WORKSPACE_ID") or None,
            approval_timeout=settings.approval_timeout,
            allow_any_model=prepared.provider.kind == "custom",  # a custom endpoint serves ids codex does not list
        )

    async def create_executor(self, config: AdapterConfig) -> CodexExecutor:
        """The executor over the warm app-server; stored as ``self._executor``."""
        if self._app is None or self._store is None:
            raise RuntimeError("create_executor() called before a successful setup()")
        self._executor = CodexExecutor(self._app, self._store, self._options, hooks=self, person=self._person)
        return self._executor

    async def shutdown(self, reason: str = "the agent is shutting down") -> None:
        """Interrupt running turns and stop codex (idempotent)."""
        if self._executor is not None:
            await self._executor.shutdown(reason)
        elif self._app is not None:
            await self._app.close()

    # ------------------------------------------------------------------ platform hooks (TurnHooks)

    def _fire(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.wait_for(coro, HOOK_TIMEOUT_S))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._hook_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("platform heartbeat hook failed: %s", task.exception().__class__.__name__)

    def turn_started(self, context_id: str, preview: str) -> None:
        """Tell the canvas what the agent is doing."""
        self._fire(runtime_seam.set_current_task(self._heartbeat, preview or f"conversation {context_id}"))

    def turn_finished(self, context_id: str, ok: bool) -> None:
        """Clear the current task; a good turn also clears a wedge."""
        self._fire(runtime_seam.set_current_task(self._heartbeat, ""))
        if ok and runtime_seam.is_wedged():
            runtime_seam.clear_wedge()
            logger.info("wedge cleared after a good turn (context %s)", context_id)

    def app_server_unavailable(self, reason: str) -> None:
        """codex cannot be (re)started: the workspace shows as degraded until a good turn."""
        runtime_seam.mark_wedged(f"codex app-server unavailable: {reason}")

    # ------------------------------------------------------------------ state hooks

    def pre_stop_state(self) -> dict:
        """The conversation map (it is also on disk after every change)."""
        return {"conversations": self._store.snapshot()} if self._store else {}

    def restore_state(self, snapshot: dict) -> None:
        """Add snapshot bindings the on-disk map lacks (the disk copy is newer when both exist)."""
        bindings = (snapshot or {}).get("conversations") or {}
        if self._store and isinstance(bindings, Mapping):
            added = self._store.restore(bindings)
            logger.info("restored %d conversation binding(s) from the runtime snapshot", added)

    async def transcript_lines(self, since: int = 0, limit: int = 100) -> dict:
        """Readable lines of the most recent conversation's codex rollout, with a cursor."""
        empty = {"runtime": self.name(), "supported": True, "lines": [], "cursor": since, "more": False,
                 "source": None}
        if self._store is None or self._prepared is None:
            return empty
        recent = self._store.most_recent()
        rollout = find_rollout(self._prepared.codex_home, recent[1]) if recent else None
        if rollout is None:
            return empty
        lines, cursor, more = await asyncio.to_thread(read_transcript, rollout, since, limit)
        return {**empty, "lines": lines, "cursor": cursor, "more": more, "source": str(rollout)}

    def credential_report(self) -> dict[str, str]:
        """Credential names → set/unset (never values), for doctor and boot logs."""
        codex_home = self._prepared.codex_home if self._prepared else Path(self._env.get("CODEX_HOME", "~/.codex"))
        return providers.credential_report(self._env, codex_home.expanduser())


Adapter = CodexAdapter
