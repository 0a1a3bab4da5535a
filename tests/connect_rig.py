"""``molecule-codex connect`` as a real subprocess against the fake platform and the scripted model.

Each process runs in its own session (so ``kill -9`` takes codex down with it, like a crash of the
whole service) with the workspace token in its environment only; logs of every start are kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from fake_platform import FakePlatform

from molecule_codex.demo.scripted_model import SCRIPTED_API_KEY_ENV, ScriptedModel

CLI = str(Path(sys.executable).parent / "molecule-codex")
EXIT_TIMEOUT_S = 15.0
#: Fast loops for tests; production defaults are 5 s (poll) and 20 s (heartbeat).
POLL_INTERVAL_S = 0.2
HEARTBEAT_INTERVAL_S = 0.5


class Connect:
    """Starts (and restarts) one workspace's ``connect`` process; every start appends to ``logs``."""

    def __init__(self, tmp_path: Path, model: ScriptedModel, fake: FakePlatform, *extra: str,
                 token: str | None = None, env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.model = model
        self.fake = fake
        self.extra = extra
        self.token = fake.token if token is None else token
        self.extra_env = env or {}
        self.workspace = tmp_path / "ws"
        self.workspace.mkdir(exist_ok=True)
        self.state_dir = tmp_path / "state"
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MOLECULE_CODEX_", "MOLECULE_WORKSPACE_TOKEN", "CONFIGS_DIR"))}
        env.update({SCRIPTED_API_KEY_ENV: "x", "PLATFORM_URL": self.fake.url, "WORKSPACE_ID": self.fake.workspace_id,
                    "MOLECULE_WORKSPACE_TOKEN": self.token, "CONFIGS_DIR": str(self.tmp_path / "configs")})
        env.update(self.extra_env)
        return env

    def argv(self, command: str = "connect") -> list[str]:
        common = ["--base-url", self.model.base_url, "--api-key-env", SCRIPTED_API_KEY_ENV, "--model", "scripted-model",
                  "--state-dir", str(self.state_dir), "--workdir", str(self.workspace)]
        if command != "connect":
            return [CLI, command, *common]
        return [CLI, "connect", *common, "--poll-interval", str(POLL_INTERVAL_S),
                "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S), *self.extra]

    def start(self) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"connect-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                         cwd=self.tmp_path, start_new_session=True)
        return self.proc

    def kill9(self) -> None:
        """SIGKILL the whole session (connect and its codex child) and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(EXIT_TIMEOUT_S)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal connect and return its exit code (bounded); kills the session if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs if log.exists())
