"""Model providers and credentials: which endpoint codex talks to, and how it authenticates.

Three kinds of provider exist:

* ``openai``: OpenAI's API with an API key. Codex 0.163 ``app-server`` does **not** read
  ``OPENAI_API_KEY`` or ``CODEX_API_KEY`` from its environment (verified: no ``Authorization``
  header is sent); it reads the key from ``$CODEX_HOME/auth.json`` as
  ``{"auth_mode": "apikey", "OPENAI_API_KEY": …}``, the exact file ``codex login --with-api-key``
  writes. We write that file ourselves (0600, atomic), so the key never appears in argv, logs or a
  child's stdin; the agent's commands cannot read it (CODEX_HOME is denied by our permission
  profile, see ``read_deny``).
* ``chatgpt``: a ChatGPT subscription login: ``auth.json`` with OAuth tokens, seeded from the
  ``CODEX_AUTH_JSON`` env var or already present in ``$CODEX_HOME``. A seed never overwrites an
  on-disk file whose ``last_refresh`` is newer (codex or the platform rotated the tokens since).
  The app-server's host-supplied token mode (``account/login/start`` with ``chatgptAuthTokens``)
  would keep tokens off disk, but 0.163 marks it "FOR OPENAI INTERNAL USE ONLY - DO NOT USE" and
  its refresh request would make us a second refresher of a single-use refresh token (the
  "refresh storm" the platform's refresher exists to prevent), so auth.json stays, behind the
  profile's read deny.
* custom: an entry of config.yaml's top-level ``providers:`` mapping, rendered as
  ``[model_providers.<name>]``; codex reads the key from the env var named by ``env_key``.

Built-in kinds never produce a ``model_provider`` override in config.toml: a provider block next to a
subscription login once routed subscription requests to a vendor URL (404 on every turn).

Resolution order for ``provider`` (first match wins)::

    provider          condition                                      result
    auto (default)    CODEX_AUTH_JSON set                            chatgpt (seed -> auth.json)
    auto              auth.json holds a ChatGPT login                 chatgpt
    auto              OPENAI_API_KEY set                             openai  (key -> auth.json)
    auto              auth.json holds an API key                      openai
    auto              none of the above                              ProviderError (how to fix)
    chatgpt           the same ChatGPT sources, in that order         chatgpt, else ProviderError
    openai            the same API-key sources, in that order         openai, else ProviderError
    <custom name>     entry's env_key set (or entry has no env_key)   custom, else ProviderError
    anything else                                                    ProviderError listing names

Invariant: no function here logs, returns or raises a secret value; only env var *names* and
"set"/"unset" leave this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

AUTO = "auto"
OPENAI = "openai"
CHATGPT = "chatgpt"
BUILTIN_PROVIDERS = (AUTO, OPENAI, CHATGPT)
#: Names the control plane has been seen to use for the built-in modes.
PROVIDER_ALIASES: Mapping[str, str] = {"openai-subscription": CHATGPT}
#: Provider ids codex 0.163 refuses to redefine under ``[model_providers]`` (verified with
#: ``--strict-config``), plus our own mode names.
RESERVED_PROVIDER_NAMES = frozenset({"openai", "ollama", "lmstudio", "amazon-bedrock", AUTO, CHATGPT})

API_KEY_ENV = "OPENAI_API_KEY"
AUTH_JSON_ENV = "CODEX_AUTH_JSON"
AUTH_JSON_NAME = "auth.json"
AUTH_MODE_APIKEY = "apikey"

#: Codex 0.163 rejects ``wire_api = "chat"`` while parsing config; only the Responses API works.
WIRE_API_RESPONSES = "responses"
#: Bounded retries: a failing endpoint should fail the turn in seconds, not minutes. 5xx attempts
#: are (request_max_retries + 1) x (stream_max_retries + 1).
DEFAULT_REQUEST_MAX_RETRIES = 2
DEFAULT_STREAM_MAX_RETRIES = 2
MAX_RETRIES_LIMIT = 10

FILE_MODE_SECRET = 0o600
DIR_MODE_CODEX_HOME = 0o700

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENTRY_KEYS = frozenset(
    {
        "base_url",
        "env_key",
        "wire_api",
        "query_params",
        "http_headers",
        "env_http_headers",
        "request_max_retries",
        "stream_max_retries",
        "stream_idle_timeout_ms",
    }
)

ProviderKind = Literal["openai", "chatgpt", "custom"]
AuthJsonKind = Literal["chatgpt", "apikey", "invalid"]


class ProviderError(RuntimeError):
    """Provider configuration or credentials are missing or wrong; the message says how to fix it."""


@dataclass(frozen=True)
class ProviderEntry:
    """One custom Responses-API endpoint from config.yaml ``providers:``."""

    name: str
    base_url: str
    env_key: str | None = None
    wire_api: str = WIRE_API_RESPONSES
    query_params: Mapping[str, str] = field(default_factory=dict, hash=False)
    http_headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: header name -> env var name, so header secrets stay out of config files.
    env_http_headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    request_max_retries: int = DEFAULT_REQUEST_MAX_RETRIES
    stream_max_retries: int = DEFAULT_STREAM_MAX_RETRIES
    stream_idle_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        """Reject entries codex would refuse, so the error names our config, not codex's."""
        where = f"providers.{self.name}"
        if not _NAME_RE.match(self.name):
            raise ProviderError(f"{where}: provider names may use only letters, digits, '-' and '_'")
        if self.name in RESERVED_PROVIDER_NAMES or self.name in PROVIDER_ALIASES:
            raise ProviderError(
                f"{where}: '{self.name}' is a built-in provider name; rename the entry (e.g. '{self.name}-custom')"
            )
        if self.wire_api != WIRE_API_RESPONSES:
            raise ProviderError(
                f"{where}.wire_api={self.wire_api!r} is not supported: codex 0.163 speaks only the "
                f"Responses API (wire_api: responses); Chat-Completions-only endpoints cannot work"
            )
        if not re.match(r"^https?://[^\s/]+", self.base_url):
            raise ProviderError(f"{where}.base_url must be an http(s) URL, got {self.base_url!r}")
        if self.env_key is not None and not _ENV_NAME_RE.match(self.env_key):
            raise ProviderError(f"{where}.env_key must be an environment variable name, got {self.env_key!r}")
        for header, var in self.env_http_headers.items():
            if not _ENV_NAME_RE.match(var):
                raise ProviderError(f"{where}.env_http_headers.{header} must name an environment variable")
        for key in ("request_max_retries", "stream_max_retries"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES_LIMIT:
                raise ProviderError(f"{where}.{key} must be an integer 0..{MAX_RETRIES_LIMIT}, got {value!r}")
        idle = self.stream_idle_timeout_ms
        if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int) or idle <= 0):
            raise ProviderError(f"{where}.stream_idle_timeout_ms must be a positive integer, got {idle!r}")

    @classmethod
    def from_mapping(cls, name: str, raw: Any) -> ProviderEntry:
        """Build an entry from its config.yaml mapping; unknown keys are warned about and ignored."""
        where = f"providers.{name}"
        if not isinstance(raw, Mapping):
            raise ProviderError(f"{where} must be a mapping with at least base_url")
        unknown = sorted(set(raw) - _ENTRY_KEYS)
        if unknown:
            logger.warning("config.yaml %s: unknown keys ignored: %s", where, ", ".join(map(str, unknown)))
        if not raw.get("base_url"):
            raise ProviderError(f"{where}.base_url is required (the endpoint's /v1 URL)")
        return cls(
            name=str(name),
            base_url=str(raw["base_url"]),
            env_key=str(raw["env_key"]) if raw.get("env_key") else None,
            wire_api=str(raw.get("wire_api", WIRE_API_RESPONSES)),
            query_params=_str_mapping(raw.get("query_params"), f"{where}.query_params"),
            http_headers=_str_mapping(raw.get("http_headers"), f"{where}.http_headers"),
            env_http_headers=_str_mapping(raw.get("env_http_headers"), f"{where}.env_http_headers"),
            request_max_retries=raw.get("request_max_retries", DEFAULT_REQUEST_MAX_RETRIES),
            stream_max_retries=raw.get("stream_max_retries", DEFAULT_STREAM_MAX_RETRIES),
            stream_idle_timeout_ms=raw.get("stream_idle_timeout_ms"),
        )


def _str_mapping(raw: Any, where: str) -> dict[str, str]:
    """A ``{str: str}`` mapping from YAML, or an error naming the key."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ProviderError(f"{where} must be a mapping of strings")
    return {str(key): str(value) for key, value in raw.items()}


def parse_providers(raw: Any) -> dict[str, ProviderEntry]:
    """Parse config.yaml's top-level ``providers:`` mapping (None or empty means no custom providers)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ProviderError("config.yaml providers: must be a mapping of name -> {base_url, env_key, ...}")
    return {str(name): ProviderEntry.from_mapping(str(name), entry) for name, entry in raw.items()}


@dataclass(frozen=True)
class ResolvedProvider:
    """The provider a workspace will use, with credential *names* only."""

    name: str
    kind: ProviderKind
    entry: ProviderEntry | None = None
    #: Env var names (or ``auth.json``) the credential comes from, for the boot report.
    credential_env_names: tuple[str, ...] = ()
    #: Extra env for the app-server child. Empty today: codex reads everything it needs from
    #: auth.json or the variables in :attr:`codex_env_names` (kept in its environment).
    child_env_additions: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def codex_env_names(self) -> tuple[str, ...]:
        """Env vars codex itself must receive (``env_key`` and every ``env_http_headers`` value).

        The app-server's environment is otherwise stripped of secret-looking names, and the shell
        policy hides these same names from the agent's commands.
        """
        if self.entry is None:
            return ()
        return tuple(name for name in (self.entry.env_key, *self.entry.env_http_headers.values()) if name)

    @property
    def writes_model_provider(self) -> bool:
        """Only custom providers get a ``model_provider`` override in config.toml."""
        return self.kind == "custom"


def _present(env: Mapping[str, str], name: str) -> bool:
    """Whether an env var is set to something non-blank."""
    return bool(env.get(name, "").strip())


def auth_json_path(codex_home: Path) -> Path:
    """Where codex keeps its login."""
    return Path(codex_home) / AUTH_JSON_NAME


def auth_json_kind(codex_home: Path) -> AuthJsonKind | None:
    """Classify ``$CODEX_HOME/auth.json`` without exposing it: None when absent."""
    path = auth_json_path(codex_home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "invalid"
    return _classify_auth(data)


def _classify_auth(data: Any) -> AuthJsonKind:
    """ChatGPT logins carry OAuth ``tokens``; API-key logins carry ``OPENAI_API_KEY``."""
    if not isinstance(data, dict):
        return "invalid"
    if isinstance(data.get("tokens"), dict) and data["tokens"]:
        return "chatgpt"
    if isinstance(data.get("OPENAI_API_KEY"), str) and data["OPENAI_API_KEY"].strip():
        return "apikey"
    return "invalid"


def _parse_seed(content: str) -> dict[str, Any]:
    """Parse ``CODEX_AUTH_JSON``; the error text carries the position, never the content."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ProviderError(
            f"{AUTH_JSON_ENV} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}). "
            "Multi-line secrets must be delivered through /configs/secrets.d/load.sh; the env-file path "
            "drops newlines"
        ) from None
    if _classify_auth(data) == "invalid":
        raise ProviderError(
            f"{AUTH_JSON_ENV} is JSON but not a codex auth.json (no 'tokens' or 'OPENAI_API_KEY'); "
            "paste the whole ~/.codex/auth.json written by `codex login`"
        )
    return data


def _how_to_fix(known: list[str]) -> str:
    """The standard list of ways to give codex a credential."""
    return (
        f"set {API_KEY_ENV} (OpenAI API key), or {AUTH_JSON_ENV} (the contents of a ChatGPT-login "
        f"auth.json, delivered via /configs/secrets.d/load.sh), or place auth.json in CODEX_HOME, or "
        f"choose a provider with runtime_config.provider (known: {', '.join(known)})"
    )


def _first_source(*candidates: tuple[bool, str]) -> str | None:
    """The name of the first available credential source, in priority order."""
    return next((name for available, name in candidates if available), None)


def known_provider_names(providers: Mapping[str, ProviderEntry]) -> list[str]:
    """Built-in mode names followed by custom entry names."""
    return [*BUILTIN_PROVIDERS, *sorted(providers)]


class ProviderChoice(Protocol):
    """What provider resolution reads from the settings (kept structural: settings imports us)."""

    @property
    def provider(self) -> str | None: ...

    @property
    def providers(self) -> Mapping[str, ProviderEntry]: ...


def resolve_provider(settings: ProviderChoice, env: Mapping[str, str], codex_home: Path) -> ResolvedProvider:
    """Pick the provider per the table in the module docstring. Reads files, writes nothing."""
    requested = (settings.provider or AUTO).strip() or AUTO
    requested = PROVIDER_ALIASES.get(requested.lower(), requested)
    if requested.lower() in BUILTIN_PROVIDERS:
        requested = requested.lower()
    providers = settings.providers
    known = known_provider_names(providers)
    on_disk = auth_json_kind(codex_home)
    # The seed is parsed only when it could be used: fail at setup, clearly, on a mangled secret.
    has_key = _present(env, API_KEY_ENV)
    seed: AuthJsonKind | None = None
    if _present(env, AUTH_JSON_ENV) and (requested in (AUTO, CHATGPT) or (requested == OPENAI and not has_key)):
        seed = _classify_auth(_parse_seed(env[AUTH_JSON_ENV]))
    chatgpt_source = _first_source((seed == "chatgpt", AUTH_JSON_ENV), (on_disk == "chatgpt", AUTH_JSON_NAME))
    api_key_source = _first_source(
        (has_key, API_KEY_ENV), (seed == "apikey", AUTH_JSON_ENV), (on_disk == "apikey", AUTH_JSON_NAME)
    )
    if requested == AUTO:
        if chatgpt_source:
            return ResolvedProvider(name=CHATGPT, kind="chatgpt", credential_env_names=(chatgpt_source,))
        if api_key_source:
            return ResolvedProvider(name=OPENAI, kind="openai", credential_env_names=(api_key_source,))
        invalid = " (the auth.json in CODEX_HOME is unreadable or not a codex login)" if on_disk else ""
        raise ProviderError(f"no codex credential found{invalid}: {_how_to_fix(known)}")
    if requested == CHATGPT:
        if chatgpt_source:
            return ResolvedProvider(name=CHATGPT, kind="chatgpt", credential_env_names=(chatgpt_source,))
        raise ProviderError(
            f"provider 'chatgpt' needs a ChatGPT login: set {AUTH_JSON_ENV} to the contents of the "
            "auth.json written by `codex login` (deliver it via /configs/secrets.d/load.sh), or place "
            "that auth.json in CODEX_HOME"
        )
    if requested == OPENAI:
        if api_key_source:
            return ResolvedProvider(name=OPENAI, kind="openai", credential_env_names=(api_key_source,))
        raise ProviderError(f"provider 'openai' needs an API key: set {API_KEY_ENV} in the workspace secrets")
    entry = providers.get(requested)
    if entry is None:
        raise ProviderError(
            f"unknown provider {requested!r} in runtime_config.provider; known providers: {', '.join(known)} "
            "(custom providers are declared under the top-level providers: key of config.yaml)"
        )
    names = tuple(name for name in (entry.env_key, *entry.env_http_headers.values()) if name)
    missing = [name for name in names if not _present(env, name)]
    if missing:
        raise ProviderError(
            f"provider {entry.name!r} needs {', '.join(missing)} set in the workspace secrets "
            f"(its endpoint is {entry.base_url})"
        )
    return ResolvedProvider(name=entry.name, kind="custom", entry=entry, credential_env_names=names)


def ensure_codex_home(codex_home: Path) -> Path:
    """Create CODEX_HOME (0700) if missing; an existing directory keeps its mode."""
    path = Path(codex_home)
    if not path.is_dir():
        path.mkdir(parents=True, mode=DIR_MODE_CODEX_HOME, exist_ok=True)
        os.chmod(path, DIR_MODE_CODEX_HOME)  # mkdir's mode is filtered by the umask
    return path


def atomic_write_text(path: Path, text: str, mode: int = FILE_MODE_SECRET) -> None:
    """Write ``text`` so readers see the old or the new file, never a partial or world-readable one.

    The temp file is created with ``O_EXCL`` and its final mode from the start, fsynced, then
    renamed over ``path``; the directory is fsynced so the rename survives a crash.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we asked for
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _last_refresh(data: Mapping[str, Any]) -> datetime | None:
    """``last_refresh`` as an aware datetime, or None when missing or unparsable."""
    raw = data.get("last_refresh")
    if not isinstance(raw, str):
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def write_auth_json(codex_home: Path, content: str) -> bool:
    """Install an auth.json seed (``CODEX_AUTH_JSON``); False when the on-disk file is kept.

    The on-disk file is kept when it is identical, or when it carries a ``last_refresh`` and the
    seed's is older or missing: rewriting a rotated login from a stale seed burns its single-use
    refresh token (``refresh_token_reused``).
    """
    seed = _parse_seed(content)
    home = ensure_codex_home(codex_home)
    path = auth_json_path(home)
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        current = None
    except (OSError, ValueError):
        logger.warning("%s is unreadable or not JSON; replacing it with the %s seed", path, AUTH_JSON_ENV)
        current = None
    if isinstance(current, dict):
        if current == seed:
            _tighten_mode(path)
            return False
        on_disk, seeded = _last_refresh(current), _last_refresh(seed)
        if on_disk is not None and (seeded is None or on_disk > seeded):
            logger.info(
                "keeping %s: its token (last_refresh %s) is newer than the %s seed (%s)",
                path,
                on_disk.isoformat(),
                AUTH_JSON_ENV,
                seeded.isoformat() if seeded else "none",
            )
            _tighten_mode(path)
            return False
    atomic_write_text(path, json.dumps(seed, indent=2) + "\n")
    logger.info("wrote %s from %s", path, AUTH_JSON_ENV)
    return True


def write_api_key_auth(codex_home: Path, api_key: str) -> bool:
    """Store an API key as codex's API-key login (what ``codex login --with-api-key`` writes).

    Returns whether the file changed. Replaces a ChatGPT login only because the caller resolved
    the ``openai`` provider, which happens only when the operator chose it explicitly.
    """
    key = api_key.strip()
    if not key:
        raise ProviderError(f"{API_KEY_ENV} is empty")
    home = ensure_codex_home(codex_home)
    path = auth_json_path(home)
    desired = {"auth_mode": AUTH_MODE_APIKEY, "OPENAI_API_KEY": key}
    kind = auth_json_kind(home)
    if kind is not None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")) == desired:
                _tighten_mode(path)
                return False
    if kind == "chatgpt":
        logger.warning("provider 'openai' selected: replacing the ChatGPT login in %s with the API key", path)
    atomic_write_text(path, json.dumps(desired, indent=2) + "\n")
    logger.info("stored %s as codex's API-key login in %s", API_KEY_ENV, path)
    return True


def install_credentials(provider: ResolvedProvider, env: Mapping[str, str], codex_home: Path) -> bool:
    """Put the resolved provider's credential where codex reads it; True when auth.json changed."""
    if provider.kind == "custom":
        return False  # codex reads the key from the entry's env_key variable
    if AUTH_JSON_ENV in provider.credential_env_names and _present(env, AUTH_JSON_ENV):
        return write_auth_json(codex_home, env[AUTH_JSON_ENV])
    if API_KEY_ENV in provider.credential_env_names and _present(env, API_KEY_ENV):
        return write_api_key_auth(codex_home, env[API_KEY_ENV])
    return False  # the auth.json already in CODEX_HOME is the credential


def _tighten_mode(path: Path) -> None:
    """Make an existing secret file 0600 (it may predate us)."""
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o777 != FILE_MODE_SECRET:
            os.chmod(path, FILE_MODE_SECRET)


def credential_report(
    env: Mapping[str, str],
    codex_home: Path,
    providers: Mapping[str, ProviderEntry] | None = None,
) -> dict[str, str]:
    """Credential names -> "set"/"unset" for boot logs and the doctor command; never values."""
    report = {
        API_KEY_ENV: "set" if _present(env, API_KEY_ENV) else "unset",
        AUTH_JSON_ENV: "set" if _present(env, AUTH_JSON_ENV) else "unset",
        AUTH_JSON_NAME: "set" if auth_json_kind(codex_home) in ("chatgpt", "apikey") else "unset",
    }
    for entry in (providers or {}).values():
        for name in (entry.env_key, *entry.env_http_headers.values()):
            if name:
                report[name] = "set" if _present(env, name) else "unset"
    return report
