"""molecule-codex benchmark: the served A2A stack against baselines measured in the same run.

Real pinned codex binary, scripted model on loopback, everything in this process (the A2A client,
the server, the scripted model's threads). Every figure is a ratio or a difference against a
baseline measured in the same run, so a busy machine shifts both sides:

* direct floor: :class:`app_server.AppServer` used as a bare JSON-RPC client (thread/start,
  turn/start, wait for turn/completed), same thread parameters as the executor uses;
* exec-per-message: ``codex exec --json`` then ``codex exec resume <id> --json`` per message;
* shared thread: N conversations serialized through one codex thread behind one lock.

Usage: ``python bench/run.py`` (full), ``python bench/run.py --quick --json OUT.json``,
``python bench/run.py --smoke --json OUT.json`` (one sample of each measurement, for tests).
``--profile FILE`` writes a cProfile of the sequential A2A turns (pstats text).
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", "false")

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import platform
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from a2a.client import ClientCallContext, ClientConfig, create_client  # noqa: E402
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState  # noqa: E402

from molecule_codex.app_server import AppServer, ThreadSubscription, descendants  # noqa: E402
from molecule_codex.cli import run_on_fast_loop  # noqa: E402
from molecule_codex.codex_binary import resolve_codex_binary  # noqa: E402
from molecule_codex.demo.scripted_model import (  # noqa: E402
    SCRIPTED_API_KEY_ENV,
    RecordedRequest,
    ScriptedModel,
    Text,
    write_codex_config,
)

logger = logging.getLogger("bench")

CLIENT_TIMEOUT_S = 120.0
TURN_TIMEOUT_S = 60.0
SLOW_TURN_S = 1.0
MODEL = "scripted-model"
STREAM_TEXT = "alpha beta gamma delta epsilon zeta"

#: Every key the JSON always has (null when a mode does not measure it).
KEYS = (
    "quick", "mode", "machine", "runtime_s", "task_store",
    "overhead_p50_ms", "overhead_p95_ms", "overhead_ratio_p50",
    "a2a_turn_ms", "direct_turn_ms",
    "concurrency_ratio_8", "concurrency_ratio_32", "concurrency_wall_s",
    "shared_thread_ratio_8", "shared_thread_ratio_32", "shared_thread_wall_s",
    "exec_speedup", "exec_turn_ms",
    "first_chunk_ms", "first_chunk_a2a_ms", "first_chunk_direct_ms",
    "sdk_floor_ms", "own_overhead_p50_ms",
    "cold_start_ms", "cold_start_direct_ms", "cold_start_diff_ms", "serve_import_ms",
    "process_to_card_ms", "process_to_first_reply_ms",
    "rss_mb_8", "rss_mb_32", "rss_detail_mb", "memory",
    "tokens_check", "tokens_detail",
)

MODES = {
    # sequential turns, concurrency levels, exec turns, first-chunk samples
    "full": {"turns": 50, "levels": (8, 32), "exec_turns": 6, "chunk_samples": 20, "cold_processes": 5,
             "memory_conversations": 200},
    "quick": {"turns": 15, "levels": (8,), "exec_turns": 4, "chunk_samples": 8, "cold_processes": 2,
              "memory_conversations": 32},
    "smoke": {"turns": 1, "levels": (8,), "exec_turns": 2, "chunk_samples": 1, "cold_processes": 1,
              "memory_conversations": 4},
}


# --------------------------------------------------------------------------- helpers


def responder(request: RecordedRequest) -> Text:
    """``[slow]`` → a 1 s turn; ``[stream]`` → several spaced deltas; anything else → instant."""
    prompt = request.last_user_text
    if "[slow]" in prompt:
        return Text("done", first_delay=SLOW_TURN_S)
    if "[stream]" in prompt:
        return Text(STREAM_TEXT, chunks=6, chunk_delay=0.02)
    return Text("ok")


def stats_ms(values: list[float]) -> dict[str, float] | None:
    """min/median/p95/max in ms of values in seconds."""
    if not values:
        return None
    ms = sorted(v * 1000 for v in values)
    return {"min": round(ms[0], 2), "median": round(statistics.median(ms), 2),
            "p95": round(percentile(ms, 95), 2), "max": round(ms[-1], 2), "n": len(ms)}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already-collected values."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().split()[:3]
    binary = resolve_codex_binary()
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "codex": ".".join(map(str, binary.version())), "loadavg_at_start": load}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb(pid: int | None) -> float:
    return sum(rss_mb(p) for p in (pid, *descendants(pid))) if pid else 0.0


def find_request(model: ScriptedModel, marker: str) -> RecordedRequest:
    for record in reversed(model.requests):
        if marker in record.last_user_text:
            return record
    raise LookupError(f"no model request for {marker}")


def user_message(text: str, context_id: str | None = None) -> Message:
    message = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)])
    if context_id:
        message.context_id = context_id
    return message


def find_usage(task: Any) -> dict[str, Any] | None:
    for holder in (task.metadata, task.status.message.metadata):
        if holder and "usage" in holder:
            return {k: int(v) for k, v in dict(holder["usage"]).items()}
    return None


# --------------------------------------------------------------------------- the two sides


class Direct:
    """The floor: AppServer as a bare JSON-RPC client."""

    def __init__(self, app: AppServer, thread_params: Mapping[str, Any]) -> None:
        self.app = app
        self.params = dict(thread_params)

    async def new_thread(self) -> tuple[str, ThreadSubscription]:
        result = await self.app.request("thread/start", self.params, timeout=TURN_TIMEOUT_S)
        thread_id = str(result["thread"]["id"])
        return thread_id, self.app.subscribe(thread_id)

    async def turn(self, thread_id: str, sub: ThreadSubscription, text: str,
                   first_delta: list[float] | None = None) -> Mapping[str, Any]:
        params = {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
        started = await self.app.request("turn/start", params, timeout=TURN_TIMEOUT_S)
        turn_id = started["turn"]["id"]
        while True:
            event = await sub.get(timeout=TURN_TIMEOUT_S)
            if first_delta is not None and not first_delta and event.method == "item/agentMessage/delta":
                first_delta.append(time.perf_counter())
            if event.method == "turn/completed" and event.turn_id == turn_id:
                return event.params["turn"]


class A2A:
    """Real a2a-sdk clients against the served stack."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_connections=200))
        self.plain: Any = None
        self.streaming: Any = None

    async def open(self) -> A2A:
        self.plain = await create_client(self.url, client_config=ClientConfig(streaming=False, httpx_client=self.http))
        self.streaming = await create_client(self.url,
                                             client_config=ClientConfig(streaming=True, httpx_client=self.http))
        return self

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, text: str, context_id: str | None = None) -> Any:
        """Non-streaming send; returns the final Task."""
        task = None
        async for item in self.plain.send_message(SendMessageRequest(message=user_message(text, context_id)),
                                                  context=ClientCallContext(timeout=CLIENT_TIMEOUT_S)):
            if item.WhichOneof("payload") == "task":
                task = item.task
        if task is None or task.status.state != TaskState.TASK_STATE_COMPLETED:
            raise RuntimeError(f"turn did not complete: {task}")
        return task

    async def stream_first_chunk(self, text: str, context_id: str | None) -> tuple[float | None, str]:
        """Streaming send; returns (perf_counter at the first answer chunk, context id)."""
        first, context = None, context_id or ""
        async for item in self.streaming.send_message(SendMessageRequest(message=user_message(text, context_id)),
                                                      context=ClientCallContext(timeout=CLIENT_TIMEOUT_S)):
            kind = item.WhichOneof("payload")
            if kind == "artifact_update" and first is None and not item.artifact_update.last_chunk:
                first = time.perf_counter()
            if kind == "task":
                context = item.task.context_id
            elif kind == "status_update":
                context = item.status_update.context_id or context
        return first, context


# --------------------------------------------------------------------------- measurements


class _FloorExecutor:
    """The a2a-sdk path with no codex: the same five events our executor publishes for a reply."""

    async def execute(self, context: Any, event_queue: Any) -> None:
        from molecule_codex.executor import Publisher, TurnResult

        publisher = Publisher(event_queue, context.task_id, context.context_id)
        await publisher.task(context.message)
        await publisher.working()
        await publisher.chunk("ok")
        await publisher.finish(TurnResult(TaskState.TASK_STATE_COMPLETED, "ok"))

    async def cancel(self, context: Any, event_queue: Any) -> None:
        return None


async def measure_sdk_floor(root: Path, turns: int) -> list[float]:
    """Round trips through the same host, task store and client, with a trivial executor."""
    import uvicorn

    from molecule_codex.host import build_agent_card, build_app, running_server
    from molecule_codex.task_store import create_task_store, task_store_url

    store = create_task_store(task_store_url(root / "floor-state", None))
    card = build_agent_card("http://127.0.0.1:0/", name="floor", description="sdk floor", version="0")
    app, handler = build_app(_FloorExecutor(), card=card, task_store=store)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    times = []
    try:
        async with running_server(server, card, "127.0.0.1") as (url, _task):
            client = await A2A(url).open()
            try:
                first = await client.send("warm up")
                for index in range(turns):
                    t0 = time.perf_counter()
                    await client.send(f"floor {index}", first.context_id)
                    times.append(time.perf_counter() - t0)
            finally:
                await client.close()
    finally:
        await handler.aclose()
        await store.close()
    return times


def measure_serve_imports() -> float:
    """Seconds a fresh interpreter takes to import the serve stack (median of three)."""
    import subprocess

    code = ("import time; t=time.perf_counter(); "
            "import molecule_codex.cli, molecule_codex.adapter, molecule_codex.host; print(time.perf_counter()-t)")
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout) for _ in range(3)]
    return statistics.median(runs)


def measure_process_cold_start(root: Path, model: ScriptedModel, env: dict[str, str],
                               runs: int) -> dict[str, float]:
    """``molecule-codex serve`` as an operator starts it: process start → card served → first reply.

    Everything is paid here: interpreter start, imports, preflight, the app-server's start, the
    task store, uvicorn, and the first turn through codex. Median of ``runs`` fresh processes.
    """
    import socket
    import subprocess

    cli = Path(sys.executable).parent / "molecule-codex"
    to_card, to_reply = [], []
    body = {"jsonrpc": "2.0", "id": "1", "method": "message/send",
            "params": {"message": {"messageId": "m1", "role": "user", "parts": [{"kind": "text", "text": "hi"}]}}}
    for index in range(runs):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}/"
        workspace = root / f"cold-ws-{index}"
        workspace.mkdir()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(cli), "serve", "--port", str(port), "--state-dir", str(root / f"cold-state-{index}"),
             "--workdir", str(workspace), "--base-url", model.base_url, "--api-key-env", SCRIPTED_API_KEY_ENV,
             "--model", MODEL, "--log-level", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            card_at = None
            with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
                while card_at is None:
                    if proc.poll() is not None or time.perf_counter() - t0 > CLIENT_TIMEOUT_S:
                        raise RuntimeError(f"serve did not come up (rc={proc.returncode})")
                    with contextlib.suppress(httpx.TransportError):
                        if http.get(url + ".well-known/agent-card.json").status_code == 200:
                            card_at = time.perf_counter()
                    if card_at is None:
                        time.sleep(0.005)
                reply = http.post(url, json=body)
                replied_at = time.perf_counter()
                if reply.status_code != 200 or "ok" not in reply.text:
                    raise RuntimeError(f"first reply failed: {reply.status_code} {reply.text[:200]}")
            to_card.append(card_at - t0)
            to_reply.append(replied_at - t0)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    return {"process_to_card_ms": round(statistics.median(to_card) * 1000, 1),
            "process_to_first_reply_ms": round(statistics.median(to_reply) * 1000, 1)}


async def measure_cold_start(root: Path, model: ScriptedModel, env: dict[str, str],
                             task_store: str | None = None) -> tuple[Any, float]:
    """Served: serving() entered → first reply, modules already imported (imports are measured apart)."""
    from molecule_codex import (
        adapter,  # noqa: F401 - the import cost is reported as serve_import_ms
        host,  # noqa: F401
    )
    from molecule_codex.standalone import DEFAULT_CONFIG, serving

    workspace = root / "workspace"
    workspace.mkdir(exist_ok=True)
    args = argparse.Namespace(
        config=DEFAULT_CONFIG, state_dir=root / "served-state", workdir=workspace, base_url=model.base_url,
        api_key_env=SCRIPTED_API_KEY_ENV, model=MODEL, host="127.0.0.1", port=0,
        token=None, task_store=task_store, max_body_bytes=None,
    )
    stack = contextlib.AsyncExitStack()
    t0 = time.perf_counter()
    running = await stack.enter_async_context(serving(args, env=env))
    client = await A2A(running.url).open()
    stack.push_async_callback(client.close)
    await client.send("cold start")
    return (stack, running, client), time.perf_counter() - t0


async def measure_direct_cold_start(root: Path, model: ScriptedModel, env: dict[str, str],
                                    params: Mapping[str, Any]) -> tuple[Direct, float]:
    home = root / "direct-home"
    write_codex_config(home, model.base_url)
    t0 = time.perf_counter()
    app = AppServer(codex_home=home, cwd=root / "workspace", env=env)
    await app.start()
    direct = Direct(app, params)
    thread_id, sub = await direct.new_thread()
    await direct.turn(thread_id, sub, "cold start")
    elapsed = time.perf_counter() - t0
    sub.close()
    return direct, elapsed


async def measure_sequential(direct: Direct, client: A2A, turns: int,
                             profile: cProfile.Profile | None) -> tuple[list[float], list[float], Any]:
    """Paired, interleaved trivial turns: one direct, one A2A, on one conversation each."""
    thread_id, sub = await direct.new_thread()
    first = await client.send("warm up")
    context_id = first.context_id
    await direct.turn(thread_id, sub, "warm up")
    direct_times, a2a_times, last_task = [], [], first
    for index in range(turns):
        t0 = time.perf_counter()
        await direct.turn(thread_id, sub, f"seq {index}")
        direct_times.append(time.perf_counter() - t0)
        if profile:
            profile.enable()
        t0 = time.perf_counter()
        last_task = await client.send(f"seq {index}", context_id)
        a2a_times.append(time.perf_counter() - t0)
        if profile:
            profile.disable()
    sub.close()
    return direct_times, a2a_times, last_task


async def measure_tokens(client: A2A, model: ScriptedModel) -> tuple[bool, dict[str, Any]]:
    marker = f"tokens-{uuid.uuid4().hex[:8]}"
    task = await client.send(marker)
    record = find_request(model, marker)
    got = find_usage(task)
    usage = record.usage
    expected = None if usage is None else {
        "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_tokens, "reasoning_output_tokens": usage.reasoning_tokens,
    }
    ok = got is not None and expected is not None and all(got.get(k) == v for k, v in expected.items())
    return ok, {"metadata": got, "model": expected}


async def measure_first_chunk(direct: Direct, client: A2A, model: ScriptedModel,
                              samples: int) -> tuple[list[float], list[float]]:
    a2a, floor = [], []
    thread_id, sub = await direct.new_thread()
    context_id = None
    for index in range(samples):
        marker = f"[stream] a2a-{index}-{uuid.uuid4().hex[:6]}"
        received, context_id = await client.stream_first_chunk(marker, context_id)
        record = find_request(model, marker)
        if received is not None and record.first_delta_at is not None:
            a2a.append(received - record.first_delta_at)
        marker = f"[stream] direct-{index}-{uuid.uuid4().hex[:6]}"
        first: list[float] = []
        await direct.turn(thread_id, sub, marker, first_delta=first)
        record = find_request(model, marker)
        if first and record.first_delta_at is not None:
            floor.append(first[0] - record.first_delta_at)
    sub.close()
    return a2a, floor


async def measure_concurrency(direct: Direct, client: A2A, n: int) -> dict[str, float]:
    """N fresh conversations, one 1 s turn each, all at once: A2A vs direct vs one shared thread."""
    t0 = time.perf_counter()
    await asyncio.gather(*(client.send(f"[slow] conc {n} {i}") for i in range(n)))
    a2a = time.perf_counter() - t0

    async def one_direct(i: int) -> None:
        thread_id, sub = await direct.new_thread()
        try:
            await direct.turn(thread_id, sub, f"[slow] direct conc {n} {i}")
        finally:
            sub.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_direct(i) for i in range(n)))
    floor = time.perf_counter() - t0
    return {"a2a": a2a, "direct": floor}


async def measure_memory(client: A2A, running: Any, conversations: int) -> dict[str, Any]:
    """RSS after ``conversations`` fresh conversations (one turn each, 16 at a time), with their
    threads kept loaded (``idle_unload_after: 0``, never) and after the idle sweep unloaded them
    (what any ``idle_unload_after`` such as 60 s leads to once they are idle that long)."""
    executor, app = running.adapter._executor, running.adapter._app
    python_before, codex_before = rss_mb(os.getpid()), tree_rss_mb(app.pid)
    for start in range(0, conversations, 16):
        batch = range(start, min(start + 16, conversations))
        await asyncio.gather(*(client.send(f"memory {index}") for index in batch))
    loaded = {"python": round(rss_mb(os.getpid()), 1), "codex": round(tree_rss_mb(app.pid), 1)}
    unloaded_count = await executor.unload_idle(now=time.monotonic() + executor.options.idle_unload_after + 1)
    await asyncio.sleep(1.0)  # let codex finish archiving and free what it frees
    unloaded = {"python": round(rss_mb(os.getpid()), 1), "codex": round(tree_rss_mb(app.pid), 1)}
    return {"conversations": conversations, "threads_unloaded": unloaded_count,
            "before": {"python": round(python_before, 1), "codex": round(codex_before, 1)},
            "never_unloaded": loaded, "after_idle_unload": unloaded}


async def measure_shared(direct: Direct, n: int) -> float:
    """N conversations through one codex thread behind one lock."""
    thread_id, sub = await direct.new_thread()
    lock = asyncio.Lock()

    async def one(i: int) -> None:
        async with lock:
            await direct.turn(thread_id, sub, f"[slow] shared {n} {i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    sub.close()
    return elapsed


async def measure_exec(root: Path, model: ScriptedModel, env: dict[str, str], turns: int) -> list[float]:
    """codex exec --json, then codex exec resume <id> --json per message; wall time per process."""
    home = root / "exec-home"
    write_codex_config(home, model.base_url)
    workspace = root / "workspace"
    binary = str(resolve_codex_binary(env).path)
    exec_env = {**env, "CODEX_HOME": str(home)}
    common = ["--json", "--skip-git-repo-check", "-c", 'sandbox_mode="workspace-write"', "-m", MODEL]
    times, thread_id = [], None
    for index in range(turns):
        argv = [binary, "exec", *common, "-C", str(workspace), f"exec {index}"] if thread_id is None else \
            [binary, "exec", "resume", *common, thread_id, f"exec {index}"]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=exec_env, cwd=workspace, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), TURN_TIMEOUT_S)
        times.append(time.perf_counter() - t0)
        events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not any(e.get("type") == "turn.completed" for e in events):
            raise RuntimeError(f"codex exec failed ({proc.returncode}): {err.decode()[-500:]}")
        thread_id = thread_id or next(e["thread_id"] for e in events if e.get("type") == "thread.started")
    return times


# --------------------------------------------------------------------------- driver


async def run(mode: str, profile_path: Path | None, task_store: str | None = None) -> dict[str, Any]:
    cfg = MODES[mode]
    started = time.perf_counter()
    out: dict[str, Any] = dict.fromkeys(KEYS)
    out.update(quick=mode != "full", mode=mode, machine=machine_info(),
               task_store=task_store or "sqlite file (default)")
    profile = cProfile.Profile() if profile_path else None
    with tempfile.TemporaryDirectory(prefix="molecule-codex-bench-") as tmp, ScriptedModel(responder) as model:
        root = Path(tmp)
        env = {**os.environ, SCRIPTED_API_KEY_ENV: "bench-key"}
        # warm the binary's pages so neither cold start pays for the first read from disk
        warm = await asyncio.create_subprocess_exec(str(resolve_codex_binary(env).path), "--version",
                                                    stdout=asyncio.subprocess.DEVNULL)
        await warm.wait()

        (stack, running, client), served_cold = await measure_cold_start(root, model, env, task_store)
        async with stack:
            executor = running.adapter._executor
            served_app: AppServer = running.adapter._app
            direct, direct_cold = await measure_direct_cold_start(root, model, env, executor._thread_params())
            try:
                out.update(cold_start_ms=round(served_cold * 1000, 1),
                           cold_start_direct_ms=round(direct_cold * 1000, 1),
                           cold_start_diff_ms=round((served_cold - direct_cold) * 1000, 1))

                out["serve_import_ms"] = round(measure_serve_imports() * 1000, 1)
                out.update(await asyncio.to_thread(measure_process_cold_start, root, model, env,
                                                   cfg["cold_processes"]))
                direct_t, a2a_t, _ = await measure_sequential(direct, client, cfg["turns"], profile)
                diffs = [a - d for a, d in zip(a2a_t, direct_t, strict=True)]
                floor = statistics.median(await measure_sdk_floor(root, cfg["turns"]))
                out.update(
                    sdk_floor_ms=round(floor * 1000, 2),
                    own_overhead_p50_ms=round((statistics.median(diffs) - floor) * 1000, 2),
                    overhead_p50_ms=round(statistics.median(diffs) * 1000, 2),
                    overhead_p95_ms=round(percentile(diffs, 95) * 1000, 2),
                    overhead_ratio_p50=round(statistics.median(a2a_t) / statistics.median(direct_t), 3),
                    a2a_turn_ms=stats_ms(a2a_t), direct_turn_ms=stats_ms(direct_t),
                )

                out["tokens_check"], out["tokens_detail"] = await measure_tokens(client, model)

                chunk_a2a, chunk_direct = await measure_first_chunk(direct, client, model, cfg["chunk_samples"])
                out.update(first_chunk_ms=round(statistics.median(chunk_a2a) * 1000, 2) if chunk_a2a else None,
                           first_chunk_a2a_ms=stats_ms(chunk_a2a), first_chunk_direct_ms=stats_ms(chunk_direct))

                exec_t = await measure_exec(root, model, env, cfg["exec_turns"])
                out.update(exec_turn_ms=stats_ms(exec_t),
                           exec_speedup=round(statistics.median(exec_t) / statistics.median(a2a_t), 2))

                walls: dict[str, Any] = {}
                shared_walls: dict[str, float] = {}
                rss: dict[str, Any] = {}
                for n in cfg["levels"]:
                    walls[str(n)] = {k: round(v, 3) for k, v in (await measure_concurrency(direct, client, n)).items()}
                    out[f"concurrency_ratio_{n}"] = round(walls[str(n)]["a2a"] / walls[str(n)]["direct"], 3)
                    python_mb, codex_mb = rss_mb(os.getpid()), tree_rss_mb(served_app.pid)
                    rss[str(n)] = {"python": round(python_mb, 1), "served_codex": round(codex_mb, 1),
                                   "direct_codex": round(tree_rss_mb(direct.app.pid), 1)}
                    out[f"rss_mb_{n}"] = round(python_mb + codex_mb, 1)
                    shared_walls[str(n)] = round(await measure_shared(direct, n), 3)
                    out[f"shared_thread_ratio_{n}"] = round(shared_walls[str(n)] / walls[str(n)]["a2a"], 2)
                out.update(concurrency_wall_s=walls, shared_thread_wall_s=shared_walls, rss_detail_mb=rss)
                out["memory"] = await measure_memory(client, running, cfg["memory_conversations"])
            finally:
                await direct.app.close()
    out["runtime_s"] = round(time.perf_counter() - started, 1)
    if profile and profile_path:
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        out["profile_text"] = text.getvalue()
    return out


def table(out: dict[str, Any]) -> str:
    def fmt(stat: dict[str, float] | None) -> str:
        return "-" if not stat else f"{stat['min']:.1f} / {stat['median']:.1f} / {stat['max']:.1f} (n={stat['n']})"

    m = out["machine"]
    rows = [
        ("mode", f"{out['mode']}  ({out['runtime_s']} s, {m['nproc']} cpu {m['cpu']}, codex {m['codex']})"),
        ("A2A turn ms min/med/max", fmt(out["a2a_turn_ms"])),
        ("direct turn ms min/med/max", fmt(out["direct_turn_ms"])),
        ("overhead p50 / p95 ms", f"{out['overhead_p50_ms']} / {out['overhead_p95_ms']}   (target p50 <= 10)"),
        ("overhead ratio p50", f"{out['overhead_ratio_p50']}   (target <= 1.10)"),
        ("a2a-sdk floor / ours ms", f"{out['sdk_floor_ms']} / {out['own_overhead_p50_ms']}   "
                                    "(trivial executor through the same host, store and client)"),
        ("concurrency ratio 8 / 32", f"{out['concurrency_ratio_8']} / {out['concurrency_ratio_32']}   "
                                     f"(target 32 <= 1.15)  walls {out['concurrency_wall_s']}"),
        ("shared thread ratio 8 / 32", f"{out['shared_thread_ratio_8']} / {out['shared_thread_ratio_32']}"),
        ("exec turn ms min/med/max", fmt(out["exec_turn_ms"])),
        ("exec speedup", f"{out['exec_speedup']}   (target >= 3)"),
        ("first chunk A2A ms", fmt(out["first_chunk_a2a_ms"]) + "   (target median <= 15)"),
        ("first chunk direct ms", fmt(out["first_chunk_direct_ms"])),
        ("cold start served / direct", f"{out['cold_start_ms']} / {out['cold_start_direct_ms']} ms, "
                                       f"diff {out['cold_start_diff_ms']} ms   (target diff <= 300); "
                                       f"+ imports {out['serve_import_ms']} ms"),
        ("serve process → card / reply", f"{out['process_to_card_ms']} / {out['process_to_first_reply_ms']} ms   "
                                         "(target reply <= 1000)"),
        ("rss MB 8 / 32 (python+codex)", f"{out['rss_mb_8']} / {out['rss_mb_32']}  {out['rss_detail_mb']}"),
        ("memory (MB) after N conversations", _memory_row(out["memory"])),
        ("tokens check", str(out["tokens_check"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _memory_row(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "-"
    kept, freed = memory["never_unloaded"], memory["after_idle_unload"]
    return (f"N={memory['conversations']}: loaded (never unload) python {kept['python']} codex {kept['codex']}; "
            f"after idle unload python {freed['python']} codex {freed['codex']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="short run (< 3 min on 2 cores)")
    group.add_argument("--smoke", action="store_true", help="one sample of each measurement (for tests)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--profile", type=Path, help="cProfile the sequential A2A turns into this file")
    parser.add_argument("--task-store", help="SQLAlchemy URL for the served task store (default: SQLite file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    # The loop serve runs on (uvloop where installed): client, server and model share it here.
    out = run_on_fast_loop(run(mode, args.profile, args.task_store))
    if args.profile:
        args.profile.write_text(out.pop("profile_text"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
