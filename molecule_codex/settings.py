"""Typed adapter settings: the one place that knows every config key molecule-codex reads.

Where each value comes from, highest precedence first:

1. the env var ``MOLECULE_CODEX_<KEY>`` (e.g. ``MOLECULE_CODEX_SANDBOX=read-only``);
2. the platform's ``runtime_config``: only ``model``, ``provider`` and ``models`` matter there, the
   runtime drops every other key under YAML ``runtime_config`` and has already applied its own
   ``MOLECULE_MODEL``/``MODEL`` env overrides to ``model``;
3. the ``runtime_config`` section of config.yaml, read by us because the runtime drops our keys;
4. the default in ``_KEYS``.

Custom providers come from config.yaml's top-level ``providers:``; ``prompt_files`` from its
top-level ``prompt_files``. ``CONFIG_SCHEMA`` is generated from ``_KEYS`` so the Config tab, the
README and the code can't disagree.

Invariant: a bad value fails loudly (``SettingsError`` naming the key, the value and what is
allowed); an unknown key only warns. The platform's default model and provider names are never
accepted as a codex model: codex would send them verbatim and the turn would hang.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from molecule_codex.providers import (
    BUILTIN_PROVIDERS,
    PROVIDER_ALIASES,
    RESERVED_PROVIDER_NAMES,
    ProviderEntry,
    ProviderError,
    parse_providers,
)

logger = logging.getLogger(__name__)

ENV_PREFIX = "MOLECULE_CODEX_"
#: What the May runtime hands the adapter when no model is configured anywhere.
PLATFORM_DEFAULT_MODEL = "anthropic:claude-opus-4-7"
DEFAULT_WORKSPACE = Path("/workspace")

# Defaults: used by both Settings and CONFIG_SCHEMA, and nowhere else.
DEFAULT_PROVIDER = "auto"
DEFAULT_SANDBOX = "auto"
DEFAULT_APPROVAL_POLICY = "never"  # headless: nobody is there to approve
DEFAULT_ON_BUSY = "queue"
#: How long an approval waits for a person before codex is told no; 0 waits until the turn limit.
DEFAULT_APPROVAL_TIMEOUT_S = 600.0
#: Under the platform's 30-minute cap for agent-to-agent dispatches.
DEFAULT_TURN_TIMEOUT_S = 1500.0
#: The platform's default silence window is 5 minutes.
DEFAULT_INACTIVITY_TIMEOUT_S = 300.0
DEFAULT_NETWORK_ACCESS = False
#: The platform proxy caps request bodies at 1 MB.
DEFAULT_MAX_INPUT_CHARS = 1_000_000
#: The 0.163 app-server ran 32 concurrent turns at ~290 MB peak RSS.
DEFAULT_MAX_CONCURRENT_TURNS = 32
#: Codex itself unloads unsubscribed threads after 30 minutes idle.
DEFAULT_IDLE_UNLOAD_AFTER_S = 1800.0

SANDBOX_MODES = ("auto", "read-only", "workspace-write", "danger-full-access")
APPROVAL_POLICIES = ("never", "on-request", "untrusted")
ON_BUSY_MODES = ("queue", "steer")
#: The reasoning-effort variants codex 0.163 knows; its bundled catalog advertises low..ultra per
#: model (``codex debug models --bundled``), ``minimal`` remains a valid variant.
REASONING_EFFORTS = ("minimal", "low", "medium", "high", "xhigh", "max", "ultra")

#: Keys the platform runtime keeps in ``runtime_config``; those we don't use are ignored silently.
PLATFORM_KEYS = frozenset(
    {"command", "args", "required_env", "timeout", "model", "provider", "models", "auth_token_env", "auth_token_file"}
)
#: A model id that is really a provider or vendor name (the control plane once wrote one there).
_PROVIDER_WORDS = frozenset(
    {*BUILTIN_PROVIDERS, *PROVIDER_ALIASES, *RESERVED_PROVIDER_NAMES}
    | {"codex", "subscription", "api", "api-key", "apikey", "openai-api", "anthropic", "google", "gemini"}
    | {"azure", "openrouter", "mistral", "groq", "deepseek", "xai", "bedrock", "vertex"}
)
#: OpenAI fine-tune ids look like ``ft:gpt-4o:org::id``: the only colon slugs we accept.
_FINE_TUNE_PREFIX = "ft:"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_MAX_SHOWN = 80

Sandbox = Literal["auto", "read-only", "workspace-write", "danger-full-access"]
ApprovalPolicy = Literal["never", "on-request", "untrusted"]
OnBusy = Literal["queue", "steer"]


class SettingsError(RuntimeError):
    """A config value is missing or invalid; the message names the key and how to fix it."""


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One runtime_config key: its type, default, allowed values and documentation."""

    key: str
    json_type: str  # "string" | "number" | "integer" | "boolean" | "array"
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    exclusive_minimum: bool = False
    nullable: bool = False

    @property
    def env_name(self) -> str:
        """The env var that overrides this key."""
        return ENV_PREFIX + self.key.upper()


_KEYS: dict[str, KeySpec] = {
    spec.key: spec
    for spec in (
        KeySpec(
            "model",
            "string",
            None,
            "Codex model id sent on every thread (e.g. gpt-5.5). Required; provider names and "
            "'vendor:model' slugs are rejected.",
        ),
        KeySpec(
            "provider",
            "string",
            DEFAULT_PROVIDER,
            "'auto' (ChatGPT login if present, else OPENAI_API_KEY), 'openai', 'chatgpt', or the name "
            "of an entry under config.yaml providers:.",
        ),
        KeySpec(
            "models",
            "array",
            (),
            "Models offered in the canvas dropdown: list of {id, name, required_env}.",
        ),
        KeySpec(
            "sandbox",
            "string",
            DEFAULT_SANDBOX,
            "Codex sandbox for shell commands; 'auto' lets setup pick (workspace-write where the "
            "bundled sandbox works).",
            choices=SANDBOX_MODES,
        ),
        KeySpec(
            "approval_policy",
            "string",
            DEFAULT_APPROVAL_POLICY,
            "When codex asks before running commands; requests are answered by the adapter.",
            choices=APPROVAL_POLICIES,
        ),
        KeySpec(
            "approval_timeout",
            "number",
            DEFAULT_APPROVAL_TIMEOUT_S,
            "Seconds an approval request (on-request/untrusted) waits for a person's answer before it is "
            "declined; 0 waits until the turn limit.",
            minimum=0,
        ),
        KeySpec(
            "on_busy",
            "string",
            DEFAULT_ON_BUSY,
            "A message for a conversation whose turn is still running: 'queue' runs it next, 'steer' "
            "adds it to the running turn.",
            choices=ON_BUSY_MODES,
        ),
        KeySpec(
            "turn_timeout",
            "number",
            DEFAULT_TURN_TIMEOUT_S,
            "Seconds a turn may run in total before it is interrupted.",
            minimum=0,
            exclusive_minimum=True,
        ),
        KeySpec(
            "inactivity_timeout",
            "number",
            DEFAULT_INACTIVITY_TIMEOUT_S,
            "Seconds without any codex event before a turn is interrupted.",
            minimum=0,
            exclusive_minimum=True,
        ),
        KeySpec(
            "reasoning_effort",
            "string",
            None,
            "model_reasoning_effort for codex; unset (or 'none') uses the model's default. Each model supports a "
            "subset (the pinned catalog lists low..ultra).",
            choices=REASONING_EFFORTS,
            nullable=True,
        ),
        KeySpec(
            "cwd",
            "string",
            str(DEFAULT_WORKSPACE),
            "Working directory of every codex thread; default /workspace if it exists, else the "
            "process's working directory.",
        ),
        KeySpec(
            "network_access",
            "boolean",
            DEFAULT_NETWORK_ACCESS,
            "Allow network access from shell commands in the workspace-write sandbox (pip, git).",
        ),
        KeySpec(
            "max_input_chars",
            "integer",
            DEFAULT_MAX_INPUT_CHARS,
            "Largest accepted message text, in characters; longer messages are refused.",
            minimum=1,
        ),
        KeySpec(
            "max_concurrent_turns",
            "integer",
            DEFAULT_MAX_CONCURRENT_TURNS,
            "Turns running at once across conversations; further turns queue.",
            minimum=1,
        ),
        KeySpec(
            "idle_unload_after",
            "number",
            DEFAULT_IDLE_UNLOAD_AFTER_S,
            "Seconds a conversation's codex thread may sit idle before it is unloaded (it is resumed "
            "on the next message); 0 never unloads.",
            minimum=0,
        ),
        KeySpec(
            "developer_instructions",
            "string",
            None,
            "Extra instructions appended to the platform prompt sent as codex developerInstructions.",
            nullable=True,
        ),
    )
}

_MODELS_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "Codex model id."},
        "name": {"type": "string", "description": "Label shown in the canvas."},
        "required_env": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id"],
}


def _json_default(value: Any) -> Any:
    """Defaults as JSON values (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _property_schema(spec: KeySpec) -> dict[str, Any]:
    """JSON Schema for one key."""
    prop: dict[str, Any] = {
        "type": [spec.json_type, "null"] if spec.nullable else spec.json_type,
        "description": f"{spec.description} Env override: {spec.env_name}.",
    }
    if spec.default is not None:
        prop["default"] = _json_default(spec.default)
    if spec.choices:
        prop["enum"] = [*spec.choices, None] if spec.nullable else list(spec.choices)
    if spec.minimum is not None:
        prop["exclusiveMinimum" if spec.exclusive_minimum else "minimum"] = spec.minimum
    if spec.key == "models":
        prop["items"] = _MODELS_ITEM_SCHEMA
    return prop


CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "molecule-codex runtime_config",
    "type": "object",
    "properties": {key: _property_schema(spec) for key, spec in _KEYS.items()},
    "required": ["model"],
    "additionalProperties": True,  # the platform adds its own keys (required_env, timeout, ...)
}

ENV_NAMES: dict[str, str] = {key: spec.env_name for key, spec in _KEYS.items()}


def default_cwd() -> Path:
    """``/workspace`` when it exists (the platform creates it), else the process's cwd."""
    return DEFAULT_WORKSPACE if DEFAULT_WORKSPACE.is_dir() else Path.cwd()


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """One entry of ``runtime_config.models`` (canvas dropdown + per-model preflight)."""

    id: str
    name: str
    required_env: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """Everything the adapter is configured with, validated."""

    model: str
    provider: str = DEFAULT_PROVIDER
    sandbox: Sandbox = DEFAULT_SANDBOX
    approval_policy: ApprovalPolicy = DEFAULT_APPROVAL_POLICY
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT_S
    on_busy: OnBusy = DEFAULT_ON_BUSY
    turn_timeout: float = DEFAULT_TURN_TIMEOUT_S
    inactivity_timeout: float = DEFAULT_INACTIVITY_TIMEOUT_S
    reasoning_effort: str | None = None
    cwd: Path = field(default_factory=default_cwd)
    network_access: bool = DEFAULT_NETWORK_ACCESS
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    max_concurrent_turns: int = DEFAULT_MAX_CONCURRENT_TURNS
    idle_unload_after: float = DEFAULT_IDLE_UNLOAD_AFTER_S
    models: tuple[ModelChoice, ...] = ()
    providers: Mapping[str, ProviderEntry] = field(default_factory=dict, hash=False)
    prompt_files: tuple[str, ...] = ()
    developer_instructions: str | None = None


def load_config_yaml(path: Path) -> dict[str, Any]:
    """Read config.yaml; a missing file is an empty config (standalone runs), a broken one an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        logger.info("no config.yaml at %s; using defaults and env", path)
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingsError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must be a YAML mapping at the top level")
    return data


def _shown(value: Any) -> str:
    """A value for an error message, bounded."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _invalid(spec: KeySpec, source: str, value: Any, expected: str) -> SettingsError:
    """The standard 'bad value' error: where, which key, what value, what is allowed."""
    return SettingsError(f"{source} {spec.key}={_shown(value)} is invalid: {expected}")


def _coerce(spec: KeySpec, value: Any, source: str, from_env: bool) -> Any:
    """Check (and for env strings, convert) one value against its spec."""
    if value is None:
        if spec.nullable:
            return None
        raise _invalid(spec, source, value, f"expected a {spec.json_type}")
    kind = spec.json_type
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if from_env and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise _invalid(spec, source, value, "expected true or false")
    if kind in ("number", "integer"):
        number: float | int
        if isinstance(value, bool):
            raise _invalid(spec, source, value, f"expected a {kind}")
        try:
            if kind == "integer":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                number = int(str(value).strip()) if from_env else int(value)
            else:
                number = float(str(value).strip()) if from_env else float(value)
        except (TypeError, ValueError):
            raise _invalid(spec, source, value, f"expected a {kind}") from None
        if not math.isfinite(number):
            raise _invalid(spec, source, value, "expected a finite number")
        if spec.minimum is not None:
            too_small = number <= spec.minimum if spec.exclusive_minimum else number < spec.minimum
            if too_small:
                bound = ">" if spec.exclusive_minimum else ">="
                raise _invalid(spec, source, value, f"must be {bound} {spec.minimum:g}")
        return number
    if kind == "string":
        if not isinstance(value, str):
            raise _invalid(spec, source, value, "expected a string")
        text = value.strip()
        if spec.nullable and (not text or (spec.choices and text.lower() in ("none", "null"))):
            return None
        if spec.choices and text not in spec.choices:
            raise _invalid(spec, source, value, f"allowed values: {', '.join(spec.choices)}")
        return text
    return value  # arrays are parsed by their own helpers


def _parse_models(raw: Any, source: str) -> tuple[ModelChoice, ...]:
    """``models`` as typed choices; strings are shorthand for ``{id: s}``."""
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise SettingsError(f"{source} models={_shown(raw)} is invalid: expected a list of {{id, name, required_env}}")
    choices = []
    for index, raw_item in enumerate(raw):
        where = f"{source} models[{index}]"
        item = {"id": raw_item} if isinstance(raw_item, str) else raw_item
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str) or not item["id"].strip():
            raise SettingsError(f"{where}={_shown(item)} is invalid: each model needs a non-empty string id")
        required = item.get("required_env") or []
        if not isinstance(required, list | tuple) or not all(isinstance(name, str) for name in required):
            raise SettingsError(f"{where}.required_env must be a list of env var names")
        model_id = item["id"].strip()
        choices.append(ModelChoice(id=model_id, name=str(item.get("name") or model_id), required_env=tuple(required)))
    return tuple(choices)


def _parse_prompt_files(raw: Any) -> tuple[str, ...]:
    """config.yaml's top-level ``prompt_files`` (a list of paths)."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,)
    if not isinstance(raw, list | tuple) or not all(isinstance(item, str) for item in raw):
        raise SettingsError(f"config.yaml prompt_files={_shown(raw)} is invalid: expected a list of file names")
    return tuple(raw)


def validate_model(
    model: Any,
    *,
    models: tuple[ModelChoice, ...] = (),
    providers: Mapping[str, ProviderEntry] | None = None,
    provider: str = "auto",
    allow_any_model: bool = False,
) -> str:
    """Return the usable model id or raise SettingsError saying what to set.

    Rejected: empty, the platform default ``anthropic:claude-opus-4-7``, ``vendor:model`` slugs
    (other than ``ft:`` fine-tunes), ``vendor/model`` slugs unless a custom gateway provider is
    selected, and provider names used as a model. ``allow_any_model`` (a custom ``--base-url``
    endpoint) accepts any non-empty id.
    """
    providers = providers or {}
    listed = ", ".join(choice.id for choice in models) or "none (add runtime_config.models to config.yaml)"
    fix = (
        f"Set runtime_config.model in config.yaml (or MOLECULE_MODEL) to a codex model id; configured models: {listed}"
    )
    text = model.strip() if isinstance(model, str) else ""
    if not text:
        raise SettingsError(f"runtime_config.model is not set. {fix}")
    if allow_any_model:
        return text
    if text == PLATFORM_DEFAULT_MODEL:
        raise SettingsError(f"runtime_config.model is the platform default {text!r}, which codex cannot run. {fix}")
    if any(ch.isspace() for ch in text):
        raise SettingsError(f"runtime_config.model {_shown(text)} contains whitespace. {fix}")
    lowered = text.lower()
    if lowered in _PROVIDER_WORDS or text in providers:
        raise SettingsError(
            f"runtime_config.model {text!r} is a provider name, not a model (providers go in "
            f"runtime_config.provider). {fix}"
        )
    if ":" in text and not lowered.startswith(_FINE_TUNE_PREFIX):
        vendor, _, rest = text.partition(":")
        raise SettingsError(
            f"runtime_config.model {text!r} is a '{vendor}:' slug; codex takes a bare model id"
            f"{f' such as {rest!r}' if vendor.lower() == 'openai' and rest else ''}. {fix}"
        )
    if "/" in text and provider not in providers:
        vendor = text.partition("/")[0]
        raise SettingsError(
            f"runtime_config.model {text!r} is a '{vendor}/' slug; the OpenAI providers take a bare model "
            f"id (vendor/model ids work only with a custom gateway provider). {fix}"
        )
    return text


class _Sources:
    """Looks a key up across env, platform runtime_config and config.yaml, remembering where."""

    def __init__(self, runtime_config: Mapping[str, Any], yaml_rc: Mapping[str, Any], env: Mapping[str, str]):
        self.runtime_config = runtime_config
        self.yaml_rc = yaml_rc
        self.env = env

    def get(self, spec: KeySpec) -> tuple[Any, str, bool] | None:
        """(value, source description, came-from-env) of the highest-precedence source, or None."""
        env_value = self.env.get(spec.env_name)
        if env_value is not None and env_value.strip() != "":
            return env_value, f"env {spec.env_name}:", True
        if spec.key in ("model", "provider", "models"):
            value = self.runtime_config.get(spec.key)
            if value not in (None, "", [], ()):
                return value, "runtime_config", False
        if spec.key in self.yaml_rc:
            return self.yaml_rc[spec.key], "config.yaml runtime_config", False
        return None


def _warn_unknown(mapping: Mapping[str, Any], where: str) -> None:
    """Log keys nothing reads, so typos don't silently do nothing."""
    unknown = sorted(str(key) for key in mapping if key not in _KEYS and key not in PLATFORM_KEYS)
    if unknown:
        logger.warning("%s: unknown keys ignored: %s (known: %s)", where, ", ".join(unknown), ", ".join(sorted(_KEYS)))


def settings_from_sources(
    runtime_config: Mapping[str, Any],
    config_yaml: Mapping[str, Any] | None,
    env: Mapping[str, str],
    *,
    allow_any_model: bool = False,
) -> Settings:
    """Build validated Settings from the platform's runtime_config, config.yaml and env."""
    config_yaml = config_yaml or {}
    yaml_rc = config_yaml.get("runtime_config") or {}
    if not isinstance(yaml_rc, Mapping):
        raise SettingsError("config.yaml runtime_config must be a mapping")
    _warn_unknown(runtime_config, "runtime_config")
    _warn_unknown(yaml_rc, "config.yaml runtime_config")
    try:
        providers = parse_providers(config_yaml.get("providers"))
    except ProviderError as exc:
        raise SettingsError(str(exc)) from None

    sources = _Sources(runtime_config, yaml_rc, env)
    values: dict[str, Any] = {}
    for key, spec in _KEYS.items():
        found = sources.get(spec)
        if found is None:
            continue
        raw, source, from_env = found
        if key == "models":
            if from_env:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
            values[key] = _parse_models(raw, source)
        elif key == "model":
            values[key] = raw  # validated below, once provider and models are known
        else:
            values[key] = _coerce(spec, raw, source, from_env)

    provider = values.get("provider") or DEFAULT_PROVIDER
    if provider.lower() in BUILTIN_PROVIDERS:
        provider = provider.lower()
    values["provider"] = provider
    models = values.get("models", ())
    values["model"] = validate_model(
        values.get("model"),
        models=models,
        providers=providers,
        provider=provider,
        allow_any_model=allow_any_model,
    )
    if models and not allow_any_model and values["model"] not in {choice.id for choice in models}:
        logger.warning("runtime_config.model %r is not among runtime_config.models", values["model"])
    if "cwd" in values:
        values["cwd"] = Path(os.path.expanduser(values["cwd"])).absolute()
        if not values["cwd"].is_dir():
            logger.warning("cwd %s does not exist yet; codex commands will fail until it does", values["cwd"])
    return Settings(
        **values,
        providers=providers,
        prompt_files=_parse_prompt_files(config_yaml.get("prompt_files")),
    )
