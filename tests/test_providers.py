"""Providers: the resolution table, auth.json handling, and the API-key mechanism of the real binary."""

from __future__ import annotations

import json
import logging
import os
import select
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from molecule_codex import providers
from molecule_codex.providers import (
    ProviderEntry,
    ProviderError,
    ResolvedProvider,
    credential_report,
    install_credentials,
    parse_providers,
    resolve_provider,
    write_api_key_auth,
    write_auth_json,
)
from molecule_codex.settings import Settings

SECRET = "sk-test-not-a-real-key-7f3a"
CHATGPT_LOGIN = {
    "OPENAI_API_KEY": None,
    "tokens": {"id_token": "id.jwt", "access_token": "access.jwt", "refresh_token": "rt-1", "account_id": "acc"},
    "last_refresh": "2026-05-01T10:00:00.123456789Z",
}
GATEWAY = ProviderEntry(name="gw", base_url="https://gw.example/v1", env_key="GW_KEY")


def login(last_refresh: str | None, refresh_token: str = "rt-1") -> dict:
    """A ChatGPT-login auth.json with the given refresh time."""
    data = json.loads(json.dumps(CHATGPT_LOGIN))
    data["tokens"]["refresh_token"] = refresh_token
    if last_refresh is None:
        del data["last_refresh"]
    else:
        data["last_refresh"] = last_refresh
    return data


def put_auth(home: Path, kind: str | None) -> None:
    """Place an auth.json of the given kind in ``home``."""
    if kind == "chatgpt":
        (home / "auth.json").write_text(json.dumps(CHATGPT_LOGIN))
    elif kind == "apikey":
        (home / "auth.json").write_text(json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": SECRET}))
    elif kind == "invalid":
        (home / "auth.json").write_text("{not json")


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- resolution table

SEED = json.dumps(CHATGPT_LOGIN)
API_KEY_SEED = json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": SECRET})

RESOLUTION_TABLE = [
    # (provider, env, auth.json on disk, expected (name, kind, credential names) or error text)
    ("auto", {"CODEX_AUTH_JSON": SEED}, None, ("chatgpt", "chatgpt", ("CODEX_AUTH_JSON",))),
    ("auto", {"CODEX_AUTH_JSON": SEED, "OPENAI_API_KEY": SECRET}, None, ("chatgpt", "chatgpt", ("CODEX_AUTH_JSON",))),
    ("auto", {}, "chatgpt", ("chatgpt", "chatgpt", ("auth.json",))),
    ("auto", {"OPENAI_API_KEY": SECRET}, "chatgpt", ("chatgpt", "chatgpt", ("auth.json",))),
    ("auto", {"OPENAI_API_KEY": SECRET}, None, ("openai", "openai", ("OPENAI_API_KEY",))),
    ("auto", {"OPENAI_API_KEY": SECRET}, "apikey", ("openai", "openai", ("OPENAI_API_KEY",))),
    ("auto", {"OPENAI_API_KEY": SECRET}, "invalid", ("openai", "openai", ("OPENAI_API_KEY",))),
    ("auto", {}, "apikey", ("openai", "openai", ("auth.json",))),
    ("auto", {"OPENAI_API_KEY": "  "}, None, "no codex credential found: set OPENAI_API_KEY"),
    ("auto", {}, "invalid", "auth.json in CODEX_HOME is unreadable"),
    ("auto", {"CODEX_AUTH_JSON": "{broken"}, None, "CODEX_AUTH_JSON is not valid JSON"),
    ("auto", {"CODEX_AUTH_JSON": '{"a": 1}'}, None, "not a codex auth.json"),
    ("auto", {"CODEX_AUTH_JSON": API_KEY_SEED}, None, ("openai", "openai", ("CODEX_AUTH_JSON",))),
    ("auto", {"CODEX_AUTH_JSON": API_KEY_SEED}, "chatgpt", ("chatgpt", "chatgpt", ("auth.json",))),
    ("chatgpt", {"CODEX_AUTH_JSON": API_KEY_SEED}, None, "provider 'chatgpt' needs a ChatGPT login"),
    ("openai", {"CODEX_AUTH_JSON": API_KEY_SEED}, None, ("openai", "openai", ("CODEX_AUTH_JSON",))),
    (
        "openai",
        {"OPENAI_API_KEY": SECRET, "CODEX_AUTH_JSON": "{broken"},
        None,
        ("openai", "openai", ("OPENAI_API_KEY",)),
    ),
    ("chatgpt", {"CODEX_AUTH_JSON": SEED}, None, ("chatgpt", "chatgpt", ("CODEX_AUTH_JSON",))),
    ("chatgpt", {}, "chatgpt", ("chatgpt", "chatgpt", ("auth.json",))),
    ("openai-subscription", {}, "chatgpt", ("chatgpt", "chatgpt", ("auth.json",))),
    ("chatgpt", {"OPENAI_API_KEY": SECRET}, "apikey", "provider 'chatgpt' needs a ChatGPT login"),
    ("openai", {"OPENAI_API_KEY": SECRET}, "chatgpt", ("openai", "openai", ("OPENAI_API_KEY",))),
    ("OpenAI", {"OPENAI_API_KEY": SECRET}, None, ("openai", "openai", ("OPENAI_API_KEY",))),
    ("openai", {}, "apikey", ("openai", "openai", ("auth.json",))),
    ("openai", {"CODEX_AUTH_JSON": SEED}, "chatgpt", "provider 'openai' needs an API key: set OPENAI_API_KEY"),
    ("gw", {"GW_KEY": SECRET}, None, ("gw", "custom", ("GW_KEY",))),
    ("gw", {"GW_KEY": SECRET, "CODEX_AUTH_JSON": "{broken"}, "chatgpt", ("gw", "custom", ("GW_KEY",))),
    ("gw", {"OPENAI_API_KEY": SECRET}, "chatgpt", "provider 'gw' needs GW_KEY set"),
    ("nope", {"OPENAI_API_KEY": SECRET}, None, "known providers: auto, openai, chatgpt, gw"),
]


@pytest.mark.parametrize(("provider", "env", "on_disk", "expected"), RESOLUTION_TABLE)
def test_resolution_table(tmp_path, provider, env, on_disk, expected):
    put_auth(tmp_path, on_disk)
    settings = Settings(model="gpt-5.5", provider=provider, providers={"gw": GATEWAY}, cwd=tmp_path)
    if isinstance(expected, str):
        with pytest.raises(ProviderError) as caught:
            resolve_provider(settings, env, tmp_path)
        assert expected in str(caught.value)
        assert SECRET not in str(caught.value)
        return
    resolved = resolve_provider(settings, env, tmp_path)
    assert (resolved.name, resolved.kind, resolved.credential_env_names) == expected
    assert resolved.writes_model_provider == (resolved.kind == "custom")
    assert (resolved.entry is GATEWAY) == (resolved.kind == "custom")
    assert SECRET not in repr(resolved)


def test_resolution_writes_nothing(tmp_path):
    settings = Settings(model="gpt-5.5", cwd=tmp_path)
    resolve_provider(settings, {"OPENAI_API_KEY": SECRET, "CODEX_AUTH_JSON": SEED}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_credential_message_lists_every_fix(tmp_path):
    with pytest.raises(ProviderError) as caught:
        resolve_provider(Settings(model="gpt-5.5", cwd=tmp_path), {}, tmp_path / "home")
    message = str(caught.value)
    for hint in ("OPENAI_API_KEY", "CODEX_AUTH_JSON", "/configs/secrets.d/load.sh", "runtime_config.provider"):
        assert hint in message


# --------------------------------------------------------------------------- provider entries


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"base_url": "https://x/v1", "wire_api": "chat"}, "wire_api='chat' is not supported"),
        ({"env_key": "K"}, "base_url is required"),
        ({"base_url": "ftp://x"}, "must be an http(s) URL"),
        ({"base_url": "https://x/v1", "env_key": "NOT A NAME"}, "env_key must be an environment variable name"),
        ({"base_url": "https://x/v1", "request_max_retries": 50}, "request_max_retries must be an integer 0..10"),
        ({"base_url": "https://x/v1", "stream_max_retries": -1}, "stream_max_retries must be an integer 0..10"),
        ({"base_url": "https://x/v1", "stream_idle_timeout_ms": 0}, "stream_idle_timeout_ms must be a positive"),
        ({"base_url": "https://x/v1", "http_headers": ["X"]}, "http_headers must be a mapping"),
        ("https://x/v1", "must be a mapping"),
    ],
)
def test_bad_provider_entries(raw, expected):
    with pytest.raises(ProviderError) as caught:
        parse_providers({"gw": raw})
    assert expected in str(caught.value)
    assert "providers.gw" in str(caught.value)


@pytest.mark.parametrize("name", ["openai", "ollama", "lmstudio", "amazon-bedrock", "chatgpt", "auto"])
def test_reserved_provider_names_are_refused(name):
    with pytest.raises(ProviderError, match="built-in provider name"):
        parse_providers({name: {"base_url": "https://x/v1"}})


def test_provider_entry_defaults_and_unknown_keys(caplog):
    caplog.set_level(logging.WARNING, logger="molecule_codex.providers")
    entries = parse_providers(
        {"gw": {"base_url": "https://gw.example/v1", "env_key": "GW_KEY", "query_params": {"v": 1}, "typo": 1}}
    )
    entry = entries["gw"]
    assert (entry.wire_api, entry.request_max_retries, entry.stream_max_retries) == ("responses", 2, 2)
    assert entry.stream_idle_timeout_ms is None
    assert entry.query_params == {"v": "1"}
    assert any("unknown keys ignored: typo" in r.getMessage() for r in caplog.records)
    assert parse_providers(None) == {}


def test_env_http_header_variables_are_required_too(tmp_path):
    entry = ProviderEntry(name="gw", base_url="https://x/v1", env_key="GW_KEY", env_http_headers={"X-K": "GW_HDR"})
    settings = Settings(model="m", provider="gw", providers={"gw": entry}, cwd=tmp_path)
    with pytest.raises(ProviderError, match="needs GW_HDR set"):
        resolve_provider(settings, {"GW_KEY": SECRET}, tmp_path)
    resolved = resolve_provider(settings, {"GW_KEY": SECRET, "GW_HDR": SECRET}, tmp_path)
    assert resolved.credential_env_names == ("GW_KEY", "GW_HDR")


def test_keyless_custom_endpoint_resolves(tmp_path):
    entry = ProviderEntry(name="local", base_url="http://127.0.0.1:9/v1")
    resolved = resolve_provider(
        Settings(model="m", provider="local", providers={"local": entry}, cwd=tmp_path), {}, tmp_path
    )
    assert (resolved.kind, resolved.credential_env_names) == ("custom", ())


# --------------------------------------------------------------------------- auth.json writing


def test_seed_creates_home_0700_and_file_0600_from_creation(tmp_path, monkeypatch):
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(providers.os, "open", spy)
    old_umask = os.umask(0)  # the file must be private even when the umask allows everything
    try:
        assert write_auth_json(tmp_path / "home", SEED) is True
    finally:
        os.umask(old_umask)
    home = tmp_path / "home"
    assert mode(home) == 0o700
    assert mode(home / "auth.json") == 0o600
    assert json.loads((home / "auth.json").read_text()) == CHATGPT_LOGIN
    created = [(path, flags, perms) for path, flags, perms in opened if flags & os.O_CREAT]
    assert len(created) == 1
    path, flags, perms = created[0]
    assert flags & os.O_EXCL and perms == 0o600 and Path(path).parent == home
    assert sorted(p.name for p in home.iterdir()) == ["auth.json"]  # no temp file left


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    home = tmp_path
    (home / "auth.json").write_text(json.dumps(login("2026-01-01T00:00:00Z")))
    before = (home / "auth.json").read_text()

    def broken_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(providers.os, "write", broken_write)
    with pytest.raises(OSError):
        write_auth_json(home, json.dumps(login("2026-06-01T00:00:00Z")))
    assert (home / "auth.json").read_text() == before
    assert sorted(p.name for p in home.iterdir()) == ["auth.json"]


@pytest.mark.parametrize(
    ("on_disk", "seed", "written"),
    [
        ("2026-05-02T00:00:00Z", "2026-05-01T00:00:00Z", False),  # disk newer: rotated since the seed
        ("2026-05-02T00:00:00.5Z", "2026-05-02T00:00:00.4Z", False),
        ("2026-05-01T00:00:00Z", "2026-05-02T00:00:00Z", True),  # seed newer: the platform refreshed it
        ("2026-05-01T00:00:00Z", "2026-05-01T00:00:00Z", True),  # same age, different tokens: take the seed
        (None, "2026-05-01T00:00:00Z", True),
        ("2026-05-01T00:00:00Z", None, False),  # a seed of unknown age never replaces a dated login
        ("garbage", "2026-05-01T00:00:00Z", True),
    ],
)
def test_seed_never_clobbers_a_newer_login(tmp_path, caplog, on_disk, seed, written):
    caplog.set_level(logging.INFO, logger="molecule_codex.providers")
    (tmp_path / "auth.json").write_text(json.dumps(login(on_disk, refresh_token="rt-disk")))
    assert write_auth_json(tmp_path, json.dumps(login(seed, refresh_token="rt-seed"))) is written
    token = json.loads((tmp_path / "auth.json").read_text())["tokens"]["refresh_token"]
    assert token == ("rt-seed" if written else "rt-disk")
    assert mode(tmp_path / "auth.json") == 0o600
    if not written:
        assert any("newer than the CODEX_AUTH_JSON seed" in r.getMessage() for r in caplog.records)
    assert all("rt-" not in r.getMessage() for r in caplog.records)


def test_identical_seed_is_not_rewritten(tmp_path):
    assert write_auth_json(tmp_path, SEED) is True
    first = (tmp_path / "auth.json").stat().st_mtime_ns
    assert write_auth_json(tmp_path, SEED) is False
    assert (tmp_path / "auth.json").stat().st_mtime_ns == first


def test_invalid_seed_error_has_position_not_content(tmp_path):
    with pytest.raises(ProviderError) as caught:
        write_auth_json(tmp_path, '{"tokens": {"refresh_token": "rt-secret-value"')
    assert "line 1" in str(caught.value)
    assert "rt-secret-value" not in str(caught.value)
    assert not (tmp_path / "auth.json").exists()


def test_unreadable_on_disk_login_is_replaced(tmp_path):
    (tmp_path / "auth.json").write_text("{truncated")
    assert write_auth_json(tmp_path, SEED) is True
    assert json.loads((tmp_path / "auth.json").read_text()) == CHATGPT_LOGIN


def test_api_key_login_matches_codex_login_format(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="molecule_codex.providers")
    assert write_api_key_auth(tmp_path / "home", SECRET) is True
    path = tmp_path / "home" / "auth.json"
    assert json.loads(path.read_text()) == {"auth_mode": "apikey", "OPENAI_API_KEY": SECRET}
    assert mode(path) == 0o600
    assert write_api_key_auth(tmp_path / "home", SECRET) is False
    assert write_api_key_auth(tmp_path / "home", SECRET + "-rotated") is True
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    with pytest.raises(ProviderError):
        write_api_key_auth(tmp_path / "home", " ")


def test_api_key_replaces_chatgpt_login_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="molecule_codex.providers")
    put_auth(tmp_path, "chatgpt")
    assert write_api_key_auth(tmp_path, SECRET) is True
    assert providers.auth_json_kind(tmp_path) == "apikey"
    assert any("replacing the ChatGPT login" in r.getMessage() for r in caplog.records)


def test_install_credentials_per_kind(tmp_path):
    chatgpt = ResolvedProvider(name="chatgpt", kind="chatgpt", credential_env_names=("CODEX_AUTH_JSON",))
    openai = ResolvedProvider(name="openai", kind="openai", credential_env_names=("OPENAI_API_KEY",))
    custom = ResolvedProvider(name="gw", kind="custom", entry=GATEWAY, credential_env_names=("GW_KEY",))
    assert install_credentials(custom, {"GW_KEY": SECRET}, tmp_path / "c") is False
    assert not (tmp_path / "c" / "auth.json").exists()
    assert install_credentials(chatgpt, {"CODEX_AUTH_JSON": SEED}, tmp_path / "g") is True
    assert providers.auth_json_kind(tmp_path / "g") == "chatgpt"
    on_disk = ResolvedProvider(name="chatgpt", kind="chatgpt", credential_env_names=("auth.json",))
    assert install_credentials(on_disk, {"OPENAI_API_KEY": SECRET}, tmp_path / "g") is False  # used as is
    assert providers.auth_json_kind(tmp_path / "g") == "chatgpt"
    assert install_credentials(openai, {"OPENAI_API_KEY": SECRET}, tmp_path / "o") is True
    assert providers.auth_json_kind(tmp_path / "o") == "apikey"
    seeded = ResolvedProvider(name="openai", kind="openai", credential_env_names=("CODEX_AUTH_JSON",))
    assert install_credentials(seeded, {"CODEX_AUTH_JSON": API_KEY_SEED}, tmp_path / "s") is True
    assert providers.auth_json_kind(tmp_path / "s") == "apikey"
    from_disk = ResolvedProvider(name="openai", kind="openai", credential_env_names=("auth.json",))
    assert install_credentials(from_disk, {}, tmp_path / "s") is False


def test_existing_home_keeps_its_mode(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    write_api_key_auth(home, SECRET)
    assert mode(home) == 0o755
    assert mode(home / "auth.json") == 0o600


def test_credential_report_has_names_and_set_unset_only(tmp_path):
    put_auth(tmp_path, "chatgpt")
    report = credential_report({"OPENAI_API_KEY": SECRET, "GW_KEY": ""}, tmp_path, {"gw": GATEWAY})
    assert report == {"OPENAI_API_KEY": "set", "CODEX_AUTH_JSON": "unset", "auth.json": "set", "GW_KEY": "unset"}
    assert credential_report({}, tmp_path / "none")["auth.json"] == "unset"


# --------------------------------------------------------------------------- the real binary


class _Recorder(BaseHTTPRequestHandler):
    """Records the Authorization header of the first request codex makes, answers 404."""

    protocol_version = "HTTP/1.1"
    seen: list[str | None]
    arrived: threading.Event

    def log_message(self, *args):  # keep test output clean
        pass

    def _answer(self):
        if self.path.endswith("/responses"):
            type(self).seen.append(self.headers.get("authorization"))
            type(self).arrived.set()
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = _answer
    do_POST = _answer


def _first_authorization(
    codex_home: Path,
    env_extra: dict[str, str],
    settings: Settings | None = None,
    resolved: ResolvedProvider | None = None,
) -> str | None:
    """Start a turn with the built-in openai provider aimed at a loopback recorder; return its auth header.

    With ``settings`` and ``resolved`` the config.toml is ours (rendered by codex_config) plus the
    operator-style ``openai_base_url`` line; otherwise it is that line alone.
    """
    from molecule_codex import codex_binary, codex_config

    handler = type("Recorder", (_Recorder,), {"seen": [], "arrived": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    binary = codex_binary.resolve_codex_binary()
    env = {k: v for k, v in binary.child_env().items() if not k.startswith(("OPENAI", "CODEX_"))}
    env.update({"CODEX_HOME": str(codex_home), "RUST_LOG": "off", **env_extra})
    base_url = f'openai_base_url = "http://127.0.0.1:{server.server_address[1]}/v1"\n'
    if settings is not None and resolved is not None:
        base_url = codex_config.render_config_toml(base_url, settings, resolved, None)
    (codex_home / "config.toml").write_text(base_url)
    process = subprocess.Popen(
        [str(binary.path), "app-server", "--disable", "plugins", "--disable", "shell_snapshot"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
        start_new_session=True,
    )

    def send(message: dict) -> None:
        process.stdin.write(json.dumps(message) + "\n")
        process.stdin.flush()

    try:
        send(
            {"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "molecule-codex-test", "version": "0"}}}
        )
        send({"id": 2, "method": "thread/start", "params": {"cwd": str(codex_home), "model": "gpt-5.5"}})
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not handler.arrived.is_set():
            ready, _, _ = select.select([process.stdout], [], [], 0.2)
            if not ready:
                continue
            message = json.loads(process.stdout.readline() or "{}")
            if message.get("id") == 2:
                thread_id = message["result"]["thread"]["id"]
                send(
                    {
                        "id": 3,
                        "method": "turn/start",
                        "params": {"threadId": thread_id, "input": [{"type": "text", "text": "hi"}]},
                    }
                )
        assert handler.arrived.wait(1), "codex never called the Responses endpoint"
        return handler.seen[0]
    finally:
        process.stdin.close()
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        server.shutdown()
        server.server_close()


@pytest.mark.real_codex
def test_real_codex_reads_the_api_key_from_our_auth_json(tmp_path):
    settings = Settings(model="gpt-5.5", cwd=tmp_path)
    env = {"OPENAI_API_KEY": SECRET}
    resolved = resolve_provider(settings, env, tmp_path)
    assert install_credentials(resolved, env, tmp_path) is True
    assert _first_authorization(tmp_path, {}, settings, resolved) == f"Bearer {SECRET}"


@pytest.mark.real_codex
def test_real_codex_app_server_ignores_openai_api_key_env(tmp_path):
    """Why we write auth.json: the 0.163 app-server sends no key when it is only in the env."""
    assert _first_authorization(tmp_path, {"OPENAI_API_KEY": SECRET}) is None
