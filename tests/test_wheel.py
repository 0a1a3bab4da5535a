"""A non-editable wheel install, as an operator gets it from ``pip install``: clean and runnable anywhere.

The wheel is built from this checkout and installed into a fresh virtual environment (its
dependencies come from the package index, as on any new machine). The installed command then runs
from a directory that is not the checkout, so nothing can be imported from the source tree by
accident: ``config.yaml`` must come from the package data, the scripted model from the package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, ScriptedModel, Text

pytestmark = pytest.mark.real_codex

REPO = Path(__file__).resolve().parents[1]
#: The fresh environment installs the pinned codex wheel and a2a-sdk from the index (~15 s idle).
INSTALL_TIMEOUT_S = 600
CARD_TIMEOUT_S = 60.0
#: The only names the wheel may put at the top of site-packages (besides its dist-info).
ALLOWED_TOP_LEVEL = {"molecule_codex"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout; returns the venv's directory."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist),
                    str(REPO)], check=True, timeout=INSTALL_TIMEOUT_S, cwd=root)
    (wheel,) = dist.glob("molecule_codex-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=INSTALL_TIMEOUT_S, cwd=root)
    return env_dir


def _record_top_level(env_dir: Path) -> set[str]:
    (record,) = env_dir.glob("lib/python*/site-packages/molecule_codex-*.dist-info/RECORD")
    names = {line.split(",", 1)[0].split("/", 1)[0] for line in record.read_text().splitlines() if line}
    return {name for name in names if not name.endswith(".dist-info") and name != ".."}


def test_the_wheel_installs_only_the_package(installed: Path) -> None:
    assert _record_top_level(installed) == ALLOWED_TOP_LEVEL
    site = next(installed.glob("lib/python*/site-packages"))
    assert (site / "molecule_codex" / "config.yaml").is_file()  # package data, not a symlink to the checkout
    assert not (site / "molecule_codex" / "config.yaml").is_symlink()
    for generic in ("cli", "settings", "host", "adapter", "executor", "app_server", "demo", "scripted_model"):
        assert not (site / f"{generic}.py").exists(), generic


def test_serve_finds_config_yaml_in_the_installed_package(installed: Path, tmp_path: Path) -> None:
    probe = "from molecule_codex.standalone import DEFAULT_CONFIG as c; print(c); print(c.read_text()[:400])"
    done = subprocess.run([str(installed / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=_clean_env(), check=True)
    path, text = done.stdout.split("\n", 1)
    assert path.startswith(str(installed))
    assert "template_schema_version: 1" in text


def test_version_runs_from_another_directory(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(installed / "bin" / "molecule-codex"), "--version"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=_clean_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("molecule-codex 0.1.0 (codex 0.163.0 at ")
    assert str(installed) in done.stdout  # the codex binary of the fresh venv, not the checkout's


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH and no project variables: only what an operator's shell would have."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MOLECULE_CODEX_", "PYTHON", "CODEX_"))}
    return {**keep, **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(installed: Path, tmp_path: Path, model: ScriptedModel) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    workdir = tmp_path / "ws"
    workdir.mkdir()
    proc = subprocess.Popen(
        [str(installed / "bin" / "molecule-codex"), "serve", "--port", str(port), "--state-dir",
         str(tmp_path / "state"), "--workdir", str(workdir), "--base-url", model.base_url, "--api-key-env",
         SCRIPTED_API_KEY_ENV, "--model", "scripted-model"],
        cwd=tmp_path, env=_clean_env(**{SCRIPTED_API_KEY_ENV: "x"}), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}/", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def test_serve_from_the_wheel_answers_with_its_card_and_a_reply(installed: Path, tmp_path: Path) -> None:
    with ScriptedModel(lambda _request: Text("hello from the wheel")) as model, \
            _serving(installed, tmp_path, model) as (url, proc):
        deadline = time.monotonic() + CARD_TIMEOUT_S
        card = None
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(url + ".well-known/agent-card.json", timeout=2)
                if answer.status_code == 200:
                    card = answer.json()
                    break
            time.sleep(0.1)
        assert card is not None, (tmp_path / "serve.log").read_text(errors="replace")
        assert card["name"] == "codex"
        reply = httpx.post(url, timeout=60, json={
            "jsonrpc": "2.0", "id": "1", "method": "message/send",
            "params": {"message": {"messageId": "m1", "role": "user", "parts": [{"kind": "text", "text": "hi"}]}},
        })
        assert reply.status_code == 200
        assert "hello from the wheel" in reply.text
