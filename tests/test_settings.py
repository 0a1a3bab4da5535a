"""Settings: precedence, validation messages, the schema, and the shipped config.yaml."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from molecule_codex import settings as settings_module
from molecule_codex.settings import (
    CONFIG_SCHEMA,
    ENV_NAMES,
    PLATFORM_DEFAULT_MODEL,
    REASONING_EFFORTS,
    SANDBOX_MODES,
    ModelChoice,
    Settings,
    SettingsError,
    load_config_yaml,
    settings_from_sources,
    validate_model,
)

REPO = Path(__file__).resolve().parent.parent
MODELS = [{"id": "gpt-5.5", "name": "GPT-5.5"}, {"id": "gpt-6.1-sol", "name": "GPT-6.1-Sol"}]


def build(rc: dict | None = None, yaml_rc: dict | None = None, env: dict | None = None, **extra) -> Settings:
    """Settings from a platform runtime_config, a config.yaml runtime_config section and env."""
    config = {"runtime_config": {"model": "gpt-5.5", **(yaml_rc or {})}, **extra}
    return settings_from_sources(rc or {}, config, env or {})


def test_defaults_match_schema_defaults():
    built = build()
    for key, prop in CONFIG_SCHEMA["properties"].items():
        if "default" not in prop or key == "cwd":
            continue
        value = getattr(built, key)
        assert (list(value) if isinstance(value, tuple) else value) == prop["default"], key


def test_schema_documents_every_settings_key_with_env_name():
    fields = set(Settings.__dataclass_fields__) - {"providers", "prompt_files"}
    assert set(CONFIG_SCHEMA["properties"]) == fields
    for key, prop in CONFIG_SCHEMA["properties"].items():
        assert prop["description"], key
        assert ENV_NAMES[key] == f"MOLECULE_CODEX_{key.upper()}"
        assert ENV_NAMES[key] in prop["description"]
    assert CONFIG_SCHEMA["properties"]["sandbox"]["enum"] == list(SANDBOX_MODES)
    assert CONFIG_SCHEMA["properties"]["reasoning_effort"]["enum"] == [*REASONING_EFFORTS, None]
    assert CONFIG_SCHEMA["required"] == ["model"]


def test_yaml_values_are_read_and_typed():
    built = build(
        yaml_rc={
            "sandbox": "read-only",
            "approval_policy": "on-request",
            "on_busy": "steer",
            "turn_timeout": 60,
            "inactivity_timeout": 30.5,
            "reasoning_effort": "high",
            "network_access": True,
            "max_input_chars": 5000,
            "max_concurrent_turns": 4,
            "idle_unload_after": 0,
            "developer_instructions": "  be brief  ",
            "models": MODELS,
        },
        prompt_files=["system-prompt.md"],
    )
    assert built.sandbox == "read-only"
    assert built.approval_policy == "on-request"
    assert built.on_busy == "steer"
    assert built.turn_timeout == 60.0 and isinstance(built.turn_timeout, float)
    assert built.inactivity_timeout == 30.5
    assert built.reasoning_effort == "high"
    assert built.network_access is True
    assert built.max_input_chars == 5000 and built.max_concurrent_turns == 4
    assert built.idle_unload_after == 0
    assert built.developer_instructions == "be brief"
    assert built.models == (ModelChoice("gpt-5.5", "GPT-5.5"), ModelChoice("gpt-6.1-sol", "GPT-6.1-Sol"))
    assert built.prompt_files == ("system-prompt.md",)


def test_env_overrides_yaml_with_string_conversion():
    env = {
        "MOLECULE_CODEX_SANDBOX": "danger-full-access",
        "MOLECULE_CODEX_TURN_TIMEOUT": "90",
        "MOLECULE_CODEX_NETWORK_ACCESS": "yes",
        "MOLECULE_CODEX_MAX_CONCURRENT_TURNS": "3",
        "MOLECULE_CODEX_REASONING_EFFORT": "none",
        "MOLECULE_CODEX_APPROVAL_POLICY": "",  # empty means unset
    }
    built = build(yaml_rc={"sandbox": "read-only", "reasoning_effort": "low", "approval_policy": "untrusted"}, env=env)
    assert built.sandbox == "danger-full-access"
    assert built.turn_timeout == 90.0
    assert built.network_access is True
    assert built.max_concurrent_turns == 3
    assert built.reasoning_effort is None
    assert built.approval_policy == "untrusted"


def test_model_precedence_env_then_platform_then_yaml():
    yaml_only = settings_from_sources({}, {"runtime_config": {"model": "gpt-5.5"}}, {})
    platform = settings_from_sources({"model": "gpt-6-luna"}, {"runtime_config": {"model": "gpt-5.5"}}, {})
    env = settings_from_sources(
        {"model": "gpt-6-luna"}, {"runtime_config": {"model": "gpt-5.5"}}, {"MOLECULE_CODEX_MODEL": "gpt-6-sol"}
    )
    assert (yaml_only.model, platform.model, env.model) == ("gpt-5.5", "gpt-6-luna", "gpt-6-sol")


def test_empty_platform_models_fall_through_to_yaml():
    built = settings_from_sources({"models": []}, {"runtime_config": {"model": "gpt-5.5", "models": MODELS}}, {})
    assert [m.id for m in built.models] == ["gpt-5.5", "gpt-6.1-sol"]


def test_platform_models_take_precedence():
    built = settings_from_sources(
        {"model": "gpt-6-luna", "models": [{"id": "gpt-6-luna"}]}, {"runtime_config": {"models": MODELS}}, {}
    )
    assert [m.id for m in built.models] == ["gpt-6-luna"]
    assert built.models[0].name == "gpt-6-luna"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("sandbox", "sandboxed", "allowed values: auto, read-only, workspace-write, danger-full-access"),
        ("approval_policy", "on-failure", "allowed values: never, on-request, untrusted"),
        ("on_busy", "drop", "allowed values: queue, steer"),
        ("reasoning_effort", "extreme", "allowed values: minimal, low, medium, high, xhigh, max, ultra"),
        ("turn_timeout", 0, "must be > 0"),
        ("turn_timeout", "soon", "expected a number"),
        ("inactivity_timeout", -1, "must be > 0"),
        ("idle_unload_after", -5, "must be >= 0"),
        ("max_input_chars", 0, "must be >= 1"),
        ("max_concurrent_turns", 1.5, "expected a integer"),
        ("max_concurrent_turns", True, "expected a integer"),
        ("network_access", "maybe", "expected true or false"),
        ("sandbox", 3, "expected a string"),
        ("turn_timeout", float("inf"), "expected a finite number"),
    ],
)
def test_each_bad_value_names_key_value_and_allowed(key, value, expected):
    with pytest.raises(SettingsError) as caught:
        build(yaml_rc={key: value})
    message = str(caught.value)
    assert f"config.yaml runtime_config {key}={value!r}" in message
    assert expected in message


def test_bad_env_value_names_the_env_var():
    with pytest.raises(SettingsError, match=r"env MOLECULE_CODEX_ON_BUSY: on_busy='later' is invalid"):
        build(env={"MOLECULE_CODEX_ON_BUSY": "later"})
    with pytest.raises(SettingsError, match="MOLECULE_CODEX_NETWORK_ACCESS"):
        build(env={"MOLECULE_CODEX_NETWORK_ACCESS": "sometimes"})


def test_unknown_keys_warn_platform_keys_do_not(caplog):
    caplog.set_level(logging.WARNING, logger="molecule_codex.settings")
    build(rc={"required_env": [], "timeout": 30, "command": "x"}, yaml_rc={"sandbx": "read-only", "timeout": 5})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unknown keys ignored: sandbx" in warnings[0]
    assert "config.yaml runtime_config" in warnings[0]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("", "runtime_config.model is not set"),
        (None, "runtime_config.model is not set"),
        ("   ", "runtime_config.model is not set"),
        (PLATFORM_DEFAULT_MODEL, "is the platform default 'anthropic:claude-opus-4-7'"),
        ("anthropic:claude-sonnet-4", "is a 'anthropic:' slug"),
        ("google:gemini-2.5-pro", "is a 'google:' slug"),
        ("openai:gpt-5.5", "such as 'gpt-5.5'"),
        ("google/gemini-2.5-pro", "is a 'google/' slug"),
        ("openai", "is a provider name"),
        ("OpenAI", "is a provider name"),
        ("openai-subscription", "is a provider name"),
        ("chatgpt", "is a provider name"),
        ("auto", "is a provider name"),
        ("my-gateway", "is a provider name"),
        ("gpt 5", "contains whitespace"),
    ],
)
def test_model_rejections_say_what_to_set(model, expected):
    providers = {"my-gateway": object()}
    with pytest.raises(SettingsError) as caught:
        validate_model(model, models=(ModelChoice("gpt-5.5", "GPT-5.5"),), providers=providers)
    message = str(caught.value)
    assert expected in message
    assert "Set runtime_config.model" in message
    assert "configured models: gpt-5.5" in message


def test_model_rejection_without_models_says_to_add_them():
    with pytest.raises(SettingsError, match=r"configured models: none \(add runtime_config.models"):
        validate_model("openai")


@pytest.mark.parametrize("model", ["gpt-5.5", "gpt-6.1-sol", "ft:gpt-4o:acme::abc123", "o4-mini"])
def test_codex_model_ids_are_accepted(model):
    assert validate_model(f"  {model} ") == model


def test_vendor_slash_model_is_accepted_for_a_custom_gateway():
    providers = {"gw": object()}
    assert validate_model("openai/gpt-5.5", providers=providers, provider="gw") == "openai/gpt-5.5"
    with pytest.raises(SettingsError):
        validate_model("openai/gpt-5.5", providers=providers, provider="auto")


def test_allow_any_model_accepts_any_non_empty_id():
    assert validate_model("anthropic:claude-opus-4-7", allow_any_model=True) == "anthropic:claude-opus-4-7"
    assert validate_model("scripted", allow_any_model=True) == "scripted"
    with pytest.raises(SettingsError, match="not set"):
        validate_model("", allow_any_model=True)
    built = settings_from_sources({"model": PLATFORM_DEFAULT_MODEL}, {}, {}, allow_any_model=True)
    assert built.model == PLATFORM_DEFAULT_MODEL


def test_settings_reject_the_platform_default_model_end_to_end():
    with pytest.raises(SettingsError, match="platform default"):
        settings_from_sources({"model": PLATFORM_DEFAULT_MODEL}, {"runtime_config": {"models": MODELS}}, {})


def test_provider_name_is_normalised_and_custom_providers_parsed():
    built = build(
        yaml_rc={"provider": "OpenAI"},
        providers={"gw": {"base_url": "https://gw.example/v1", "env_key": "GW_KEY"}},
    )
    assert built.provider == "openai"
    assert built.providers["gw"].env_key == "GW_KEY"


def test_bad_provider_registry_is_a_settings_error():
    with pytest.raises(SettingsError, match="wire_api='chat' is not supported"):
        build(providers={"gw": {"base_url": "https://gw.example/v1", "wire_api": "chat"}})


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ("gpt-5.5", "expected a list"),
        ([{"name": "no id"}], "models[0]"),
        ([{"id": "x", "required_env": "KEY"}], "required_env must be a list"),
    ],
)
def test_bad_models_list(models, expected):
    with pytest.raises(SettingsError) as caught:
        build(yaml_rc={"models": models})
    assert expected in str(caught.value)


def test_models_from_env_are_comma_separated():
    built = build(env={"MOLECULE_CODEX_MODELS": "gpt-5.5, gpt-6-luna"})
    assert [m.id for m in built.models] == ["gpt-5.5", "gpt-6-luna"]


def test_cwd_defaults_and_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    relative = build(yaml_rc={"cwd": "work"})
    assert relative.cwd == tmp_path / "work"
    default = build()
    assert default.cwd == (Path("/workspace") if Path("/workspace").is_dir() else tmp_path)


def test_load_config_yaml_errors_are_actionable(tmp_path):
    assert load_config_yaml(tmp_path / "missing.yaml") == {}
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime_config:\n  model: [unclosed\n")
    with pytest.raises(SettingsError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SettingsError, match="must be a YAML mapping"):
        load_config_yaml(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config_yaml(empty) == {}


# --------------------------------------------------------------------------- the shipped config.yaml


def test_shipped_config_yaml_loads_and_matches_schema(caplog):
    caplog.set_level(logging.WARNING, logger="molecule_codex.settings")
    config = load_config_yaml(REPO / "config.yaml")
    assert config["template_schema_version"] == 1
    assert config["runtime"] == "codex"
    assert config["a2a"] == {"port": 8000, "streaming": True, "push_notifications": False}
    runtime_config = config["runtime_config"]
    assert "OPENAI_API_KEY" not in (runtime_config.get("required_env") or [])
    for key, value in runtime_config.items():
        prop = CONFIG_SCHEMA["properties"].get(key)
        if prop is None:
            assert key in settings_module.PLATFORM_KEYS, key
        elif "default" in prop and key not in ("model", "models"):
            assert value == prop["default"], f"config.yaml {key}={value!r} differs from the schema default"
    built = settings_from_sources({}, config, {})
    assert built.model in {choice.id for choice in built.models}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.real_codex
def test_shipped_models_are_in_the_pinned_codex_catalog(tmp_path):
    from molecule_codex import codex_binary

    binary = codex_binary.resolve_codex_binary()
    env = binary.child_env()
    env.update({"CODEX_HOME": str(tmp_path), "RUST_LOG": "off"})
    done = subprocess.run(
        [str(binary.path), "debug", "models", "--bundled"],
        capture_output=True,
        text=True,
        timeout=15,
        env=env,
        check=True,
    )
    catalog = {model["slug"] for model in json.loads(done.stdout)["models"]}
    shipped = load_config_yaml(REPO / "config.yaml")["runtime_config"]
    ids = [item["id"] for item in shipped["models"]]
    assert shipped["model"] in ids
    assert set(ids) <= catalog, f"not in codex {codex_binary.PINNED_CODEX_VERSION}: {set(ids) - catalog}"
