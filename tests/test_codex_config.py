"""config.toml rendering: validity, ownership, idempotence, operator precedence, codex's own check."""

from __future__ import annotations

import logging
import stat
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from molecule_codex import codex_config
from molecule_codex.codex_config import (
    BLOCK_BEGIN,
    BLOCK_END,
    SHELL_ENV_EXCLUDES,
    CodexConfigError,
    McpServer,
    platform_mcp_server,
    render_config_toml,
    strip_managed_blocks,
    validate_config,
    write_config_toml,
)
from molecule_codex.providers import ProviderEntry, ResolvedProvider
from molecule_codex.read_deny import Location, ReadDeny, build_read_deny
from molecule_codex.settings import Settings

OPENAI = ResolvedProvider(name="openai", kind="openai", credential_env_names=("OPENAI_API_KEY",))
CHATGPT = ResolvedProvider(name="chatgpt", kind="chatgpt", credential_env_names=("CODEX_AUTH_JSON",))
GATEWAY_ENTRY = ProviderEntry(
    name="gw",
    base_url="https://gw.example/v1",
    env_key="GW_KEY",
    query_params={"api-version": "2025-04-01"},
    http_headers={"X-Team": "research"},
    request_max_retries=1,
    stream_max_retries=0,
    stream_idle_timeout_ms=60000,
)
GATEWAY = ResolvedProvider(name="gw", kind="custom", entry=GATEWAY_ENTRY, credential_env_names=("GW_KEY",))
MCP = McpServer(
    command="/usr/bin/python3",
    args=("-m", "molecule_runtime.a2a_mcp_server"),
    env={"WORKSPACE_ID": "ws-1", "PLATFORM_URL": "http://platform:8080", "CONFIGS_DIR": "/configs"},
)

OPERATOR_TEXTS = [
    "",
    '# my settings\npersonality = "pragmatic"\n',
    'model = "gpt-6-luna"\n[features]\nplugins = true\n',
    '[features]\nweb_search_request = true\n\n[mcp_servers.docs]\ncommand = "docs-mcp"\n',
    '[shell_environment_policy]\ninherit = "all"\n',
    '[mcp_servers.molecule]\ncommand = "my-python"\n',
    "features = { plugins = true }\n[tui]\nanimations = false\n",
    '\n\n[mcp_servers]\n\n[mcp_servers.extra]\ncommand = "x"\nargs = ["a"]  # trailing\n',
    '[profiles.fast]\nmodel = "gpt-6-luna"',  # no final newline
]


def settings(**overrides) -> Settings:
    """Settings with test defaults."""
    return Settings(**{"model": "gpt-5.5", "cwd": Path("/tmp"), **overrides})


def parse(text: str) -> dict:
    """tomllib's view of a config."""
    return tomllib.loads(text)


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("provider", [OPENAI, CHATGPT], ids=["openai", "chatgpt"])
def test_builtin_providers_write_no_model_provider(provider):
    config = parse(render_config_toml(None, settings(), provider, None))
    assert "model_provider" not in config
    assert "model_providers" not in config
    assert config["model"] == "gpt-5.5"
    assert config["cli_auth_credentials_store"] == "file"


def test_full_render_contents():
    text = render_config_toml(None, settings(reasoning_effort="high", network_access=True), GATEWAY, MCP)
    config = parse(text)
    assert config["model"] == "gpt-5.5"
    assert config["model_provider"] == "gw"
    assert config["model_reasoning_effort"] == "high"
    assert config["model_providers"]["gw"] == {
        "name": "gw",
        "base_url": "https://gw.example/v1",
        "wire_api": "responses",
        "env_key": "GW_KEY",
        "query_params": {"api-version": "2025-04-01"},
        "http_headers": {"X-Team": "research"},
        "request_max_retries": 1,
        "stream_max_retries": 0,
        "stream_idle_timeout_ms": 60000,
    }
    policy = config["shell_environment_policy"]
    assert policy["inherit"] == "core" and policy["ignore_default_excludes"] is False
    for pattern in ("OPENAI_API_KEY", "CODEX_AUTH_JSON", "MOLECULE_*", "*TOKEN*", "*SECRET*", "*KEY*", "GW_KEY"):
        assert pattern in policy["exclude"]
    assert config["default_permissions"] == "molecule"
    assert config["permissions"]["molecule"] == {"extends": ":workspace", "network": {"enabled": True}}
    assert "sandbox_workspace_write" not in config and "sandbox_mode" not in config  # either disables the profile
    assert config["features"] == {"plugins": False, "shell_snapshot": False, "unbounded_connection_retries": False}
    assert config["mcp_servers"]["molecule"] == {
        "command": "/usr/bin/python3",
        "args": ["-m", "molecule_runtime.a2a_mcp_server"],
        "env": {"WORKSPACE_ID": "ws-1", "PLATFORM_URL": "http://platform:8080", "CONFIGS_DIR": "/configs"},
        "startup_timeout_sec": 30,
        "tool_timeout_sec": 600,
        "default_tools_approval_mode": "approve",
    }
    assert text.splitlines()[0] == BLOCK_BEGIN


def test_optional_parts_are_left_out():
    config = parse(render_config_toml(None, settings(), OPENAI, None))
    assert "model_reasoning_effort" not in config
    assert "mcp_servers" not in config
    assert config["permissions"]["molecule"]["network"] == {"enabled": False}


def test_mcp_tool_timeout_never_exceeds_the_turn_timeout():
    config = parse(render_config_toml(None, settings(turn_timeout=90.5), OPENAI, MCP))
    assert config["mcp_servers"]["molecule"]["tool_timeout_sec"] == 91


def test_shell_excludes_cover_platform_and_provider_secrets():
    assert {"OPENAI_API_KEY", "CODEX_AUTH_JSON", "MOLECULE_*", "*TOKEN*", "*SECRET*", "*KEY*"} <= set(
        SHELL_ENV_EXCLUDES
    )


# --------------------------------------------------------------------------- ownership and idempotence


@pytest.mark.parametrize("operator", OPERATOR_TEXTS)
@pytest.mark.parametrize("provider", [OPENAI, GATEWAY], ids=["openai", "custom"])
def test_render_is_valid_idempotent_and_keeps_operator_text(operator, provider):
    once = render_config_toml(operator, settings(reasoning_effort="low"), provider, MCP)
    parse(once)  # valid TOML
    assert render_config_toml(once, settings(reasoning_effort="low"), provider, MCP) == once
    original = operator if not operator or operator.endswith("\n") else operator + "\n"
    assert strip_managed_blocks(once) in (operator, original)
    operator_config = parse(operator)
    merged = parse(once)
    for key, value in operator_config.items():  # every operator value survives unchanged
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                assert merged[key][sub] == subvalue, f"{key}.{sub}"
        else:
            assert merged[key] == value, key


def test_our_top_level_keys_precede_every_table():
    operator = "[tui]\nanimations = false\n[features]\nweb_search_request = true\n"
    text = render_config_toml(operator, settings(), OPENAI, MCP)
    config = parse(text)
    assert config["model"] == "gpt-5.5"  # a top-level key, not tui.model
    assert "model" not in config["tui"]
    first_header = next(i for i, line in enumerate(text.splitlines()) if line.startswith("["))
    end_of_top_block = text.splitlines().index(BLOCK_END)
    assert end_of_top_block < first_header


def test_settings_change_replaces_our_block_only():
    operator = "# keep me\n[tui]\nanimations = false\n"
    first = render_config_toml(operator, settings(), OPENAI, MCP)
    second = render_config_toml(first, settings(model="gpt-6-luna"), OPENAI, None)
    assert parse(second)["model"] == "gpt-6-luna"
    assert "mcp_servers" not in parse(second)
    assert strip_managed_blocks(second) == operator


def test_operator_keys_win(caplog):
    caplog.set_level(logging.INFO, logger="molecule_codex.codex_config")
    operator = (
        'model = "gpt-6-luna"\n'
        "[features]\nplugins = true\n"
        '[shell_environment_policy]\ninherit = "all"\n'
        '[mcp_servers.molecule]\ncommand = "my-python"\n'
    )
    config = parse(render_config_toml(operator, settings(), OPENAI, MCP))
    assert config["model"] == "gpt-6-luna"
    assert config["features"] == {"plugins": True, "shell_snapshot": False, "unbounded_connection_retries": False}
    assert config["shell_environment_policy"]["inherit"] == "all"
    assert config["shell_environment_policy"]["ignore_default_excludes"] is False  # ours, not set by them
    assert config["mcp_servers"]["molecule"] == {"command": "my-python"}  # their server, whole
    assert any("keeping the operator's mcp_servers.molecule" in r.getMessage() for r in caplog.records)


def test_operator_inline_table_wins_whole(caplog):
    caplog.set_level(logging.WARNING, logger="molecule_codex.codex_config")
    config = parse(render_config_toml("features = { plugins = true }\n", settings(), OPENAI, None))
    assert config["features"] == {"plugins": True}
    assert any("cannot be extended" in r.getMessage() for r in caplog.records)


def test_operator_model_provider_for_builtin_mode_is_kept():
    operator = 'model_provider = "azure"\n[model_providers.azure]\nname = "Azure"\nbase_url = "https://a/v1"\n'
    config = parse(render_config_toml(operator, settings(), CHATGPT, None))
    assert config["model_provider"] == "azure"


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ("model = \n", "is not valid TOML"),
        (f"{BLOCK_BEGIN}\nmodel = 'x'\n", "never closed"),
        (f"{BLOCK_END}\n", "without its begin marker"),
        (f"{BLOCK_BEGIN}\n{BLOCK_BEGIN}\n{BLOCK_END}\n", "nested"),
    ],
)
def test_broken_existing_files_are_reported(existing, expected):
    with pytest.raises(CodexConfigError, match=expected):
        render_config_toml(existing, settings(), OPENAI, None)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_any_string_survives_the_toml_writer(text):
    rendered = render_config_toml(
        None, settings(developer_instructions=None, model="m"), OPENAI, McpServer(command=text, env={"K": text})
    )
    server = parse(rendered)["mcp_servers"]["molecule"]
    assert server["command"] == text and server["env"] == {"K": text}


# --------------------------------------------------------------------------- writing


def test_write_config_toml_is_atomic_private_and_reports_change(tmp_path):
    home = tmp_path / "home"
    text = render_config_toml(None, settings(), OPENAI, None)
    assert write_config_toml(home, text) is True
    assert write_config_toml(home, text) is False
    assert stat.S_IMODE((home / "config.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert sorted(p.name for p in home.iterdir()) == ["config.toml"]
    assert codex_config.read_config_toml(home) == text
    assert codex_config.read_config_toml(tmp_path / "none") is None


# --------------------------------------------------------------------------- the platform MCP server

PLATFORM_ENV = {
    "WORKSPACE_ID": "ws-1",
    "PLATFORM_URL": "http://platform:8080",
    "CONFIGS_DIR": "/configs",
    "MOLECULE_ORG_ID": "org-1",
    "MOLECULE_WORKSPACE_TOKEN": "secret-token",
    "OPENAI_API_KEY": "sk-secret",
}


@pytest.fixture
def fake_runtime_package(tmp_path, monkeypatch):
    """A real importable ``molecule_runtime`` package on sys.path."""
    package = tmp_path / "site" / "molecule_runtime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a2a_mcp_server.py").write_text("")
    monkeypatch.delitem(sys.modules, "molecule_runtime", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_platform_mcp_server_gets_only_the_platform_env(fake_runtime_package):
    server = platform_mcp_server("/venv/bin/python", PLATFORM_ENV)
    assert server == McpServer(
        command="/venv/bin/python",
        args=("-m", "molecule_runtime.a2a_mcp_server"),
        env={
            "WORKSPACE_ID": "ws-1",
            "PLATFORM_URL": "http://platform:8080",
            "CONFIGS_DIR": "/configs",
            "MOLECULE_ORG_ID": "org-1",
        },
    )
    optional_unset = platform_mcp_server("/venv/bin/python", {"WORKSPACE_ID": "ws-1", "PLATFORM_URL": "http://p"})
    assert optional_unset is not None and set(optional_unset.env) == {"WORKSPACE_ID", "PLATFORM_URL"}


def test_platform_mcp_server_needs_workspace_id(fake_runtime_package, caplog):
    caplog.set_level(logging.WARNING, logger="molecule_codex.codex_config")
    assert platform_mcp_server("/venv/bin/python", {"PLATFORM_URL": "http://p"}) is None
    assert any("WORKSPACE_ID" in r.getMessage() for r in caplog.records)


def test_no_platform_mcp_server_without_the_runtime(monkeypatch):
    monkeypatch.setitem(sys.modules, "molecule_runtime", None)  # import of it fails: not installed
    assert platform_mcp_server("/venv/bin/python", PLATFORM_ENV) is None


# --------------------------------------------------------------------------- codex's own validation


@pytest.fixture(scope="module")
def binary():
    """The pinned codex binary."""
    from molecule_codex import codex_binary

    return codex_binary.resolve_codex_binary()


@pytest.mark.real_codex
@pytest.mark.parametrize("provider", [OPENAI, GATEWAY], ids=["openai", "custom"])
def test_real_codex_accepts_our_config(binary, tmp_path, provider):
    operator = "[tui]\nanimations = false\n[features]\nweb_search_request = false\n"
    text = render_config_toml(operator, settings(reasoning_effort="high", network_access=True), provider, MCP)
    write_config_toml(tmp_path, text)
    assert validate_config(binary, tmp_path, {"PATH": "/usr/bin:/bin"}) is None


# --------------------------------------------------------------------------- permission profile


def _deny(tmp_path: Path) -> ReadDeny:
    state = tmp_path / "state dir"  # a space: the key must be quoted
    state.mkdir()
    return build_read_deny([Location(state, True), Location(tmp_path / "configs-token")], tmp_path / "ws")


@pytest.mark.parametrize(("sandbox", "base"), [("auto", ":workspace"), ("workspace-write", ":workspace"),
                                               ("read-only", ":read-only")])
def test_sandboxed_modes_select_our_profile_with_its_denies(tmp_path, sandbox, base):
    deny = _deny(tmp_path)
    config = parse(render_config_toml(None, settings(sandbox=sandbox), OPENAI, None, deny))
    assert config["default_permissions"] == "molecule"
    profile = config["permissions"]["molecule"]
    assert profile["extends"] == base
    assert profile["filesystem"] == {str(tmp_path / "state dir"): "none", str(tmp_path / "configs-toke[n]"): "none"}


def test_danger_full_access_has_no_profile(tmp_path):
    config = parse(render_config_toml(None, settings(sandbox="danger-full-access"), OPENAI, None, _deny(tmp_path)))
    assert "default_permissions" not in config and "permissions" not in config


@pytest.mark.parametrize(
    ("operator", "reason"),
    [
        ('sandbox_mode = "workspace-write"\n', "sandbox_mode"),
        ('default_permissions = "mine"\n[permissions.mine]\nextends = ":workspace"\n', "'mine'"),
        ('[permissions.molecule]\nextends = ":danger-full-access"\n', "its own [permissions.molecule]"),
    ],
)
def test_operator_settings_that_disable_the_profile_are_reported(operator, reason):
    rendered = render_config_toml(operator, settings(), OPENAI, None)
    found = codex_config.profile_overridden(rendered)
    assert found is not None and reason in found


def test_our_own_profile_is_not_reported_as_overridden(tmp_path):
    rendered = render_config_toml("[tui]\nanimations = false\n", settings(), OPENAI, None, _deny(tmp_path))
    assert codex_config.profile_overridden(rendered) is None
    assert codex_config.profile_overridden(None) is None


@pytest.mark.real_codex
def test_real_codex_accepts_the_profile_and_the_probe_config(binary, tmp_path):
    deny = _deny(tmp_path)
    home = tmp_path / "home"
    write_config_toml(home, render_config_toml(None, settings(), GATEWAY, MCP, deny))
    assert validate_config(binary, home, {"PATH": "/usr/bin:/bin"}) is None
    probe_home = tmp_path / "probe-home"
    write_config_toml(probe_home, codex_config.profile_config_text("workspace-write", True, deny))
    assert validate_config(binary, probe_home, {"PATH": "/usr/bin:/bin"}) is None


@pytest.mark.real_codex
@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        ("bogus_key = 1\n", "unknown configuration field `bogus_key`"),
        ("[features]\nnot_a_feature = true\n", "unknown configuration field `features.not_a_feature`"),
        ("[mcp_servers.docs]\ncommand = 'x'\ncomand = 'y'\n", "unknown configuration field `mcp_servers.docs.comand`"),
    ],
)
def test_real_codex_rejects_unknown_operator_keys(binary, tmp_path, operator, expected):
    write_config_toml(tmp_path, render_config_toml(operator, settings(), OPENAI, MCP))
    error = validate_config(binary, tmp_path, {"PATH": "/usr/bin:/bin"})
    assert error is not None and expected in error
    assert "Stack backtrace" not in error and "PATH aliases" not in error


@pytest.mark.real_codex
def test_real_codex_reports_toml_syntax_errors(binary, tmp_path):
    write_config_toml(tmp_path, render_config_toml(None, settings(), OPENAI, None) + 'personality = "open\n')
    error = validate_config(binary, tmp_path, {})
    assert error is not None and "TOML parse error" in error


@pytest.mark.real_codex
def test_real_codex_rejects_chat_wire_api(binary, tmp_path):
    text = 'model_provider = "old"\n[model_providers.old]\nname = "old"\nbase_url = "https://x/v1"\nwire_api = "chat"\n'
    write_config_toml(tmp_path, text)
    error = validate_config(binary, tmp_path, {})
    assert error is not None and 'wire_api = "chat"' in error


def test_validate_config_reports_a_missing_binary(tmp_path):
    from molecule_codex import codex_binary

    missing = codex_binary.CodexBinary(path=tmp_path / "no-codex", source="CODEX_BIN")
    error = validate_config(missing, tmp_path, {})
    assert error is not None and "cannot run" in error
