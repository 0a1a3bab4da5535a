"""Fault injection against the whole stack: real codex, real A2A server, scripted model.

Each fault checks the same three things: every A2A task reaches a terminal state (in the stream
and in the task store), the server keeps serving, and the next message on the same conversation
succeeds with its history. Every wait is bounded.

Not here: model 500/429/401/stream cut one at a time, kill -9 once mid-turn and our own stall
watchdog (tests/test_executor_failures.py); our own process SIGKILLed mid-turn and restarted
(tests/test_serve.py::test_task_left_working_by_sigkill_is_failed_after_restart).

Kill profile: short by default (20 turns); ``--soak`` adds the long one (100 turns over 10
conversations). Kill moments come from a seeded random: the seed is printed, and
``FAULTS_SEED=<seed>`` replays a run.

Disk faults need a small tmpfs (``mount -t tmpfs``, root with CAP_SYS_ADMIN), the only way to get
a real ENOSPC; without it those cases skip and say why. Read-only is tested at boot with a
read-only tmpfs and, without privileges, a path below a regular file (root ignores chmod). A
read-only remount under open databases is refused by the kernel (EBUSY), so there is no
mid-run read-only case; a full disk is the mid-run case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from a2a.types import GetTaskRequest, TaskState
from a2a_rig import Call, final_answer, final_message, send, serve_codex, status_texts, terminal_state, user_message

from molecule_codex import runtime_seam
from molecule_codex.adapter import CodexAdapter, HostOptions
from molecule_codex.app_server import RestartBackoff
from molecule_codex.codex_binary import resolve_codex_binary
from molecule_codex.conversations import DB_FILENAME, ConversationStore, ConversationStoreError
from molecule_codex.demo.scripted_model import (
    SCRIPTED_API_KEY_ENV,
    Hold,
    HttpError,
    RecordedRequest,
    ScriptedModel,
    Stall,
    StreamCut,
    Text,
    default_responder,
)
from molecule_codex.preflight import PreflightError

pytestmark = pytest.mark.real_codex

TERMINAL = {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED}
#: Restart backoff for the kill profile: kills come faster than the production backoff resets
#: (a child must live 30 s), which would grow each restart to 60 s. Growth has its own test below.
FAST_BACKOFF = (0.05, 0.2)



@pytest.fixture
def wedge():
    """The process-wide wedge flag, clean before and after."""
    runtime_seam.runtime_wedge.reset_for_test()
    yield runtime_seam
    runtime_seam.runtime_wedge.reset_for_test()


def assert_readable(text: str) -> None:
    """A message for a person: no protocol frames, no stack traces."""
    assert text.strip()
    for raw in ('"jsonrpc"', "Traceback", 'File "', "AppServerError", "Exception"):
        assert raw not in text, text


def is_subsequence(expected: list[str], actual: list[str]) -> bool:
    remaining = iter(actual)
    return all(item in remaining for item in expected)


def history_of(model: ScriptedModel, prompt: str) -> list[str]:
    """The user messages codex sent with the last model request for ``prompt``."""
    records = [record for record in model.requests if record.last_user_text == prompt]
    assert records, f"the model never saw {prompt!r}"
    return records[-1].all_user_texts


def pid_gone(pid: int) -> bool:
    """No such process, or only its zombie entry."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


async def stored_states(served, task_ids: list[str]) -> dict[str, int]:
    """Each task's state as the task store reports it now."""
    client = await served.client(streaming=False)
    return {task_id: (await client.get_task(GetTaskRequest(id=task_id))).status.state for task_id in task_ids}


# ---------------------------------------------------------------------------- kill -9 at random moments

KILL_PROFILES = [
    pytest.param(2, 10, id="short-20-turns"),
    pytest.param(10, 10, id="long-100-turns", marks=pytest.mark.soak),
]
#: Each turn streams its answer over this long, so kills land before, during and after streams.
TURN_STREAM_S = 0.6
KILL_WINDOW_S = 1.2
#: A killed turn ends within this of the kill (it takes < 1 s; generous for 2 shared cores).
KILLED_TURN_BOUND_S = 10.0
ROUND_BOUND_S = 60.0


@pytest.mark.parametrize(("conversations", "rounds"), KILL_PROFILES)
async def test_kill_9_at_random_moments_every_task_ends_and_history_survives(tmp_path, model, conversations, rounds):
    seed = int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"kill -9 profile {conversations}x{rounds}: seed {seed} (replay with FAULTS_SEED={seed})")
    rng = random.Random(seed)
    contexts = [f"kill-{index}" for index in range(conversations)]
    completed: dict[str, list[str]] = {context: [] for context in contexts}
    task_ids: list[str] = []
    killed: list[int] = []
    outcomes = {"completed": 0, "failed": 0}
    backoff = RestartBackoff(*FAST_BACKOFF)
    async with serve_codex(tmp_path, model, backoff=backoff, stream_idle_timeout_ms=20000) as served:
        client = await served.client(streaming=True)
        for round_no in range(rounds):
            # Kill rounds alternate with clean ones: the message after a kill must succeed.
            kill_round = round_no % 2 == 0
            prompts = {context: f"{context} turn {round_no} [sleep={TURN_STREAM_S}]" for context in contexts}
            calls = {
                context: Call(client, user_message(prompts[context], context_id=context), timeout=ROUND_BOUND_S)
                for context in contexts
            }
            killed_at = None
            if kill_round:
                await asyncio.sleep(rng.uniform(0, KILL_WINDOW_S))
                pid = served.app.pid
                assert pid is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                killed_at = time.monotonic()
            for context, call in calls.items():
                items = await call.result(timeout=ROUND_BOUND_S)
                state = terminal_state(items)
                where = f"seed {seed} round {round_no} {context}: {status_texts(items)}"
                task_ids.append(call.task_id)
                if state == TaskState.TASK_STATE_COMPLETED:
                    outcomes["completed"] += 1
                    assert final_answer(items) == "echo: " + prompts[context], where
                    history = history_of(model, prompts[context])
                    assert history[-1] == prompts[context], where
                    assert is_subsequence(completed[context], history), f"{where}: history lost: {history}"
                    completed[context].append(prompts[context])
                else:
                    outcomes["failed"] += 1
                    assert kill_round and state == TaskState.TASK_STATE_FAILED, where
                    assert killed_at is not None and time.monotonic() - killed_at < KILLED_TURN_BOUND_S, where
                    assert "codex process stopped unexpectedly" in final_message(items), where
                    assert_readable(final_message(items))
        states = await stored_states(served, task_ids)
        assert all(state in TERMINAL for state in states.values()), f"seed {seed}: {states}"
        assert served.app.running and served.app.pid not in killed
    assert len(killed) == rounds // 2
    assert all(pid_gone(pid) for pid in killed), f"seed {seed}: a killed codex is still around"
    assert all(completed[context] for context in contexts)
    print(f"seed {seed}: {len(killed)} kills, {outcomes}")


# ---------------------------------------------------------------------------- SIGSTOP: a hung child

INACTIVITY_S = 3.0
#: The issue's bound: no task waits longer than the inactivity timeout plus 5 s.
HUNG_BOUND_S = INACTIVITY_S + 5.0


async def test_sigstop_mid_turn_watchdog_fails_turns_and_replaces_the_child(tmp_path, model):
    async with serve_codex(tmp_path, model, inactivity_timeout=INACTIVITY_S, stream_idle_timeout_ms=60000) as served:
        client = await served.client(streaming=True)
        contexts = ["stop-a", "stop-b"]
        for context in contexts:
            items = await send(client, user_message(f"warm {context}", context_id=context))
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        # Steady progress (a delta every 0.1 s for 30 s): only the stop can silence these turns.
        model.enqueue(*[Text("tick " * 300, chunk_delay=0.1)] * len(contexts))
        calls = [Call(client, user_message(f"long {context}", context_id=context)) for context in contexts]
        for call in calls:
            await call.wait_for(lambda item: item.WhichOneof("payload") == "artifact_update")
        hung = served.app.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            for call in calls:
                items = await call.result(timeout=HUNG_BOUND_S + 5)
                assert time.monotonic() - stopped_at <= HUNG_BOUND_S, status_texts(items)
                assert terminal_state(items) == TaskState.TASK_STATE_FAILED, status_texts(items)
                # The watchdog's reason; a turn whose interrupt was still pending sees the replacement instead.
                assert any(reason in final_message(items) for reason in (
                    "codex made no progress for 3s", "codex process stopped unexpectedly")), final_message(items)
                assert_readable(final_message(items))
            for context in contexts:
                items = await send(client, user_message(f"after {context}", context_id=context))
                assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, status_texts(items)
                assert final_answer(items) == f"echo: after {context}"
                history = history_of(model, f"after {context}")
                assert history[0] == f"warm {context}" and history[-1] == f"after {context}", history
            assert served.app.pid != hung and pid_gone(hung)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
        states = await stored_states(served, [call.task_id for call in calls])
        assert set(states.values()) == {TaskState.TASK_STATE_FAILED}


async def test_sigstop_between_turns_next_message_fails_fast_and_the_one_after_works(tmp_path, model):
    async with serve_codex(tmp_path, model, inactivity_timeout=INACTIVITY_S) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("before the hang", context_id="idle-stop"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        hung = served.app.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        try:
            started = time.monotonic()
            items = await send(client, user_message("into the hang", context_id="idle-stop"), timeout=HUNG_BOUND_S + 5)
            assert time.monotonic() - started <= HUNG_BOUND_S
            assert terminal_state(items) == TaskState.TASK_STATE_FAILED
            assert "codex stopped answering" in final_message(items), final_message(items)
            assert_readable(final_message(items))
            started = time.monotonic()
            items = await send(client, user_message("after the hang", context_id="idle-stop"))
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, status_texts(items)
            # Waits for the replacement: stop (EOF 1 s, SIGTERM 2 s, SIGKILL) + 1 s backoff + start.
            assert time.monotonic() - started <= 15
            history = history_of(model, "after the hang")
            assert history[0] == "before the hang" and history[-1] == "after the hang", history
            assert served.app.pid != hung and pid_gone(hung)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)


# ---------------------------------------------------------------------------- model faults

#: Every model fault at once, one conversation each: (reply, words in the failure, error category).
MODEL_FAULTS = {
    "500": (HttpError(500), "provider is unavailable", "provider"),
    "429": (HttpError(429), "rate limiting", "rate_limit"),
    "401": (HttpError(401), "rejected the credential", "auth"),
    "cut": (StreamCut("half an answer"), "connection to the model provider failed", "connection"),
    "stall": (Stall(30), "idle timeout", "connection"),
}
CODEX_IDLE_TIMEOUT_MS = 1500
_FAULT_RE = re.compile(r"^fault:(\w+)$")


def faulty_responder(record: RecordedRequest):
    match = _FAULT_RE.match(record.last_user_text)
    return MODEL_FAULTS[match.group(1)][0] if match else default_responder(record)


async def test_model_faults_at_once_fail_their_tasks_and_each_conversation_carries_on(tmp_path, model):
    model.responder = faulty_responder
    async with serve_codex(tmp_path, model, stream_idle_timeout_ms=CODEX_IDLE_TIMEOUT_MS) as served:
        client = await served.client(streaming=True)
        started = time.monotonic()
        calls = {kind: Call(client, user_message(f"fault:{kind}", context_id=f"model-{kind}")) for kind in MODEL_FAULTS}
        healthy = Call(client, user_message("unaffected", context_id="model-healthy"))
        for kind, call in calls.items():
            items = await call.result(timeout=30)
            _reply, words, category = MODEL_FAULTS[kind]
            assert terminal_state(items) == TaskState.TASK_STATE_FAILED, (kind, status_texts(items))
            assert words in final_message(items), (kind, final_message(items))
            assert_readable(final_message(items))
            assert items[-1].status_update.metadata["error_category"] == category, kind
        assert final_answer(await healthy.result(timeout=30)) == "echo: unaffected"
        assert time.monotonic() - started < 20
        after = {kind: Call(client, user_message(f"after {kind}", context_id=f"model-{kind}")) for kind in MODEL_FAULTS}
        for kind, call in after.items():
            items = await call.result(timeout=30)
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, (kind, status_texts(items))
            assert final_answer(items) == f"echo: after {kind}"
            assert history_of(model, f"after {kind}") == [f"fault:{kind}", f"after {kind}"], kind
        states = await stored_states(served, [call.task_id for call in [*calls.values(), *after.values()]])
        assert all(state in TERMINAL for state in states.values()), states


class Relay:
    """A TCP relay on a fixed loopback port to the model; closed, the port refuses connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()
                self._writers.discard(sink)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class _Endpoint:
    """What serve_codex needs of a model: where codex should send requests."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url


async def test_connection_refused_fails_fast_with_connection_then_recovers(tmp_path, model):
    relay = Relay(model.port)
    await relay.open()
    endpoint = _Endpoint(f"http://127.0.0.1:{relay.port}/v1")
    async with serve_codex(tmp_path, endpoint) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("while it listens", context_id="refused"))
        assert final_answer(items) == "echo: while it listens"
        await relay.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
        started = time.monotonic()
        items = await send(client, user_message("while it refuses", context_id="refused"), timeout=30)
        assert time.monotonic() - started < 10  # unbounded_connection_retries is off: no endless retry
        assert terminal_state(items) == TaskState.TASK_STATE_FAILED
        assert "connection" in final_message(items).lower(), final_message(items)
        assert items[-1].status_update.metadata["error_category"] == "connection"
        assert_readable(final_message(items))
        await relay.open()  # same port again
        try:
            items = await send(client, user_message("listening again", context_id="refused"))
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, status_texts(items)
            assert history_of(model, "listening again") == ["while it listens", "while it refuses", "listening again"]
        finally:
            await relay.close()


# ---------------------------------------------------------------------------- app-server crash loop


async def test_app_server_crash_loop_backs_off_marks_wedged_and_recovery_clears_it(tmp_path, model, wedge, caplog,
                                                                                  monkeypatch):
    crash = tmp_path / "crash-on-start"
    wrapper = tmp_path / "codex-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{crash}" ]; then echo "simulated codex crash at start" >&2; exit 3; fi\n'
        f'exec "{resolve_codex_binary().path}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CODEX_BIN", str(wrapper))
    backoff = RestartBackoff(initial=0.3, cap=1.2)
    async with serve_codex(tmp_path, model, hooks=CodexAdapter(), backoff=backoff) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("healthy", context_id="loop"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
        crash.touch()
        os.kill(served.app.pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            while served.app.running:  # noqa: ASYNC110 - a message sent sooner fails as "stopped unexpectedly"
                await asyncio.sleep(0.02)
        for attempt in range(3):
            items = await send(client, user_message(f"crashing {attempt}", context_id="loop"), timeout=30)
            assert terminal_state(items) == TaskState.TASK_STATE_FAILED
            assert "codex is not available right now" in final_message(items), final_message(items)
            assert_readable(final_message(items))
            assert wedge.is_wedged()
            assert "codex app-server unavailable" in wedge.wedge_reason()
        crash.unlink()
        items = await send(client, user_message("recovered", context_id="loop"), timeout=30)
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, status_texts(items)
        assert history_of(model, "recovered") == ["healthy", "recovered"]
        assert not wedge.is_wedged()
    delays = re.findall(r"codex app-server restart generation=\d+ in ([\d.]+)s", caplog.text)
    assert delays == ["0.3", "0.6", "1.2", "1.2"], delays
    assert "simulated codex crash at start" in caplog.text


# ---------------------------------------------------------------------------- state directory

DISK_BOUND_S = 15.0


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A small tmpfs at ``path``; skips (saying why) where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full or read-only disk needs a tmpfs mount (root)")
    spec = ",".join([f"size={size}", "mode=0700", *options])
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", spec, "tmpfs", str(path)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full (ENOSPC); returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "ab", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    probe = directory / "probe"
    with pytest.raises(OSError, match="No space left"):
        probe.write_bytes(b"x" * 8192)
    return filler


def scripted_host(tmp_path: Path, model: ScriptedModel, state_dir: Path) -> CodexAdapter:
    env = {**os.environ, SCRIPTED_API_KEY_ENV: "scripted-key", "CODEX_HOME": str(tmp_path / "codex-home")}
    for name in ("MOLECULE_MODEL", "MODEL", "CODEX_AUTH_JSON", "CODEX_BIN"):
        env.pop(name, None)
    (tmp_path / "workspace").mkdir(exist_ok=True)
    return CodexAdapter(host=HostOptions(state_dir=state_dir, workspace=tmp_path / "workspace", base_url=model.base_url,
                                         api_key_env=SCRIPTED_API_KEY_ENV, model="scripted-model", env=env))


@pytest.mark.parametrize("fault", ["below-a-file", "read-only", "full"])
async def test_unusable_state_dir_is_a_clear_error_at_boot(tmp_path, model, fault):
    with contextlib.ExitStack() as stack:
        filler = None
        if fault == "below-a-file":
            (tmp_path / "a-file").write_text("not a directory")
            state_dir, cause, store_cause = tmp_path / "a-file" / "state", "Not a directory", "Not a directory"
        elif fault == "read-only":
            state_dir = stack.enter_context(tmpfs(tmp_path / "ro", "1m", "ro"))
            cause = store_cause = "Read-only file system"
        else:
            state_dir = stack.enter_context(tmpfs(tmp_path / "full", "256k"))
            cause, store_cause = "No space left on device", "(disk I/O error|database or disk is full)"
            existing = ConversationStore(state_dir)  # a healthy map from an earlier run
            existing.bind("ctx-kept", "thread-kept")
            existing.close()
            filler = fill(state_dir)
        adapter = scripted_host(tmp_path, model, state_dir)
        config = adapter.standalone_config(tmp_path / "no-config.yaml")
        with pytest.raises(PreflightError) as caught:
            await asyncio.wait_for(adapter.setup(config), 30)
        text = str(caught.value)
        assert f"the state directory {state_dir} is not writable ({cause})" in text, text
        assert "--state-dir" in text  # how to fix it
        # Hosts that skip preflight get the same clarity from the store itself.
        with pytest.raises(ConversationStoreError, match=f"{store_cause}.*Make the state directory writable"):
            ConversationStore(state_dir)
        await adapter.shutdown()
        if filler is not None:
            # A full disk is not a damaged map: nothing moved aside, every binding still there after.
            assert not list(state_dir.glob("*.corrupt-*"))
            filler.unlink()
            assert ConversationStore(state_dir).get("ctx-kept") == "thread-kept"
        else:
            assert not (state_dir / DB_FILENAME).exists()


def disk_full_outcome(outcome: list | BaseException) -> str:
    """What the caller was told while the disk was full: an A2A error or a FAILED task, saying so."""
    if isinstance(outcome, BaseException):
        return str(outcome)
    assert terminal_state(outcome) == TaskState.TASK_STATE_FAILED, status_texts(outcome)
    return final_message(outcome)


async def test_full_state_dir_mid_run_fails_clearly_without_corruption_then_recovers(tmp_path, model):
    codex_home = tmp_path / "codex-home"  # codex's own files stay off the full disk: ours are under test
    with tmpfs(tmp_path / "state", "4m") as state_dir:
        async with serve_codex(tmp_path, model, state_dir=state_dir, codex_home=codex_home,
                               stream_idle_timeout_ms=30000) as served:
            client = await served.client(streaming=True)
            items = await send(client, user_message("one", context_id="disk-a"))
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
            # A turn under way when the disk fills.
            gate, reached = threading.Event(), threading.Event()
            model.enqueue(Hold(gate, Text("the answer of the held turn"), after_deltas=2, reached=reached))
            held = Call(client, user_message("held", context_id="disk-c"))
            assert await asyncio.to_thread(reached.wait, 20)
            await held.wait_for(lambda item: item.WhichOneof("payload") == "artifact_update")
            filler = fill(state_dir)
            gate.set()
            told = []
            started = time.monotonic()
            for outcome in [
                await _outcome(held.result(timeout=DISK_BOUND_S)),
                await _outcome(send(client, user_message("two", context_id="disk-b"), timeout=DISK_BOUND_S)),
                await _outcome(send(client, user_message("three", context_id="disk-a"), timeout=DISK_BOUND_S)),
            ]:
                told.append(disk_full_outcome(outcome))
            assert time.monotonic() - started < DISK_BOUND_S * 2
            assert all("full" in text for text in told), told
            assert not any("sqlalche" in text or "OperationalError" in text for text in told), told
            filler.unlink()
            for context, text in (("disk-b", "four"), ("disk-a", "five"), ("disk-c", "six")):
                items = await send(client, user_message(text, context_id=context))
                assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, status_texts(items)
            assert history_of(model, "five")[0] == "one"
            assert history_of(model, "six") == ["held", "six"]
            states = await stored_states(served, [held.task_id])
            assert states[held.task_id] in TERMINAL, "the task under way when the disk filled is still working"
        for name in (DB_FILENAME, "tasks.sqlite3"):
            with contextlib.closing(sqlite3.connect(state_dir / name)) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], name
        with contextlib.closing(sqlite3.connect(state_dir / DB_FILENAME)) as db:
            bound = dict(db.execute("SELECT context_id, thread_id FROM conversations").fetchall())
        assert set(bound) == {"disk-a", "disk-b", "disk-c"}, bound
        # A new process finds every conversation that went on after the fault.
        async with serve_codex(tmp_path, model, state_dir=state_dir, codex_home=codex_home) as served:
            client = await served.client(streaming=True)
            items = await send(client, user_message("seven", context_id="disk-b"))
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
            history = history_of(model, "seven")  # "two" ran only if its binding fit in the full disk
            assert history in (["four", "seven"], ["two", "four", "seven"]), history


async def _outcome(awaitable) -> list | BaseException:
    try:
        return await awaitable
    except Exception as exc:
        return exc


def damage(path: Path, how: str, seed: int) -> bytes:
    """Corrupt the conversation map file; returns the damaged bytes."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file, none left in the WAL
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'conversations'").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    if how == "garbage":
        data = random.Random(seed).randbytes(8192)
    else:
        buffer = bytearray(path.read_bytes())
        # The table's root: count(*) reads only the primary-key index, lookups read the table.
        buffer[(root - 1) * page_size : root * page_size] = b"\xde\xad\xbe\xef" * (page_size // 4)
        data = bytes(buffer)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("how", ["garbage", "damaged-table-page"])
async def test_corrupt_conversation_map_is_backed_up_with_a_warning_and_service_continues(tmp_path, model, caplog,
                                                                                          how):
    state_dir = tmp_path / "state"
    async with serve_codex(tmp_path, model, state_dir=state_dir) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("before the damage", context_id="map-a"))
        assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED
    map_path = state_dir / DB_FILENAME
    damaged = damage(map_path, how, seed=7)
    caplog.clear()
    async with serve_codex(tmp_path, model, state_dir=state_dir) as served:
        assert f"conversation map {map_path} is unreadable" in caplog.text
        backups = [path for path in state_dir.glob(f"{DB_FILENAME}.corrupt-*")
                   if not path.name.endswith(("-wal", "-shm"))]
        assert len(backups) == 1 and backups[0].read_bytes() == damaged, backups
        client = await served.client(streaming=True)
        for context, text in (("map-a", "after the damage"), ("map-b", "a new conversation")):
            items = await send(client, user_message(text, context_id=context))
            assert terminal_state(items) == TaskState.TASK_STATE_COMPLETED, status_texts(items)
            assert final_answer(items) == f"echo: {text}"
    with contextlib.closing(sqlite3.connect(map_path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert {row[0] for row in db.execute("SELECT context_id FROM conversations")} == {"map-a", "map-b"}
    async with serve_codex(tmp_path, model, state_dir=state_dir) as served:
        client = await served.client(streaming=True)
        items = await send(client, user_message("still there?", context_id="map-b"))
        assert history_of(model, "still there?") == ["a new conversation", "still there?"]
