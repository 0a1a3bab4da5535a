"""Soak: many turns over many conversations with cancels, steers, queued messages and child kills.

``soak()`` drives two real stacks at once (``serve_codex``: real a2a-sdk server and client, real
codex, one shared scripted model): conversations with an even number talk to a server with
``on_busy=queue``, odd ones to a server with ``on_busy=steer``. Every conversation runs its own
random plan of operations, all conversations at the same time:

* plain turns (some stretched with ``[sleep=S]``) and tool turns (``[tool=echo ...]``);
* queued pairs: a second message while the first runs (queue server);
* cancels of a running turn, and of a message waiting behind one (queue server);
* steers: a second message joins the running turn (steer server);
* child kills: SIGKILL of the queue server's codex app-server while one of its turns streams (every
  other turn on that server at that moment fails too). The steer server's child is never killed,
  so its memory is measured over the whole run.

Replies are matched to requests by content: every prompt carries a unique id and the scripted
model's default responder answers ``echo: <prompt>``. A reply is *lost* when a turn that should
have answered (not cancelled, not hit by a kill) did not complete with its own echo, and
*duplicated* when a reply carries another request's id (other than a steer partner), when one
reply reached two tasks that were not a steer pair, or when a prompt reached the model more
often than its turn needs. After the run every task is read back with GetTask: all must be
terminal and agree with what the stream said.

The run has a warm-up phase, then the measured phase; memory (RSS) and open file descriptors of
this process and of the codex children are sampled at start, after warm-up and at the end.

``make soak`` runs the long profile (1,000 turns over 50 conversations); the CI test runs a
short one on every ``make test``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import random
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from a2a.server.agent_execution import RequestContext
from a2a.server.context import ServerCallContext
from a2a.types import CancelTaskRequest, GetTaskRequest, TaskState
from a2a_rig import Call, final_answer, final_message, serve_codex, status_texts, terminal_state, user_message

from molecule_codex.app_server import descendants
from molecule_codex.demo.scripted_model import RecordedRequest, ScriptedModel, default_responder
from molecule_codex.executor import CodexExecutor, ExecutorOptions, Publisher, Request
from molecule_codex.inputs import CodexInput

TERMINAL = {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_FAILED,
            TaskState.TASK_STATE_REJECTED}
WAITING = "Waiting for the previous message"
JOINED = "Added to the running turn"
KILLED = "codex process stopped unexpectedly"
#: A turn sent this long after a kill may still meet the dying child (its exit is noticed in ~0.5 s).
KILL_GRACE_S = 2.0
#: A cancel that meets a ``turn/start`` in flight interrupts the turn as soon as it has an id; its
#: model request may trail the cancel by that round trip, never by a codex restart or thread load.
CANCEL_GRACE_S = 0.5
CALL_TIMEOUT_S = 90.0
#: How long the reply of a turn that is about to be cancelled, queued behind or steered runs: long
#: enough that a loaded machine still gets the second request in while it streams.
LONG_REPLY_S = 6
FIRST_CHUNK_TIMEOUT_S = 30.0
RSS_GROWTH_LIMIT_MB = 50.0
#: Sockets and SQLite connections come from pools (HTTP keep-alive, SQLAlchemy) that grow with
#: concurrency up to their caps; a per-turn leak would pass this within a few dozen turns.
FD_GROWTH_LIMIT = 40
SAMPLE_INTERVAL_S = 1.0

QUEUE, STEER = "queue", "steer"
#: Operations and the turns each one sends.
OP_TURNS = {"plain": 1, "tool": 1, "queued": 2, "cancel": 1, "cancel-queued": 2, "steer": 2, "kill": 1}


# ---------------------------------------------------------------------------------------------- records


@dataclass(eq=False)
class Turn:
    """One request: what was sent and how it ended, as the caller saw it."""

    conversation: str
    server: str
    #: plain | tool | queued-first | queued-second | cancel | cancel-queued | steer-first | steer-second | kill
    role: str
    prompt: str
    expected_requests: int = 1  # model requests whose latest user text is this prompt, when it completes
    task_id: str | None = None
    sent_at: float = 0.0
    ended_at: float | None = None
    state: int | None = None
    answer: str | None = None
    message: str = ""
    joined: bool = False
    partner: Turn | None = None
    cancel_outcome: str | None = None
    cancel_returned_at: float | None = None
    history_notice: bool = False
    stored_state: int | None = None
    error: str | None = None

    @property
    def pid(self) -> str:
        return self.prompt.split()[0]


@dataclass
class Sample:
    """RSS (MB) and open fds of this process and of every codex process below it."""

    our_rss: float
    codex_rss: float
    our_fds: int
    our_pipes: int
    codex_fds: int
    codex_processes: int
    codex_rss_by_server: dict[str, float] = field(default_factory=dict)


@dataclass
class SoakReport:
    """Everything the summary prints and the tests assert on."""

    turns: int
    conversations: int
    seed: int
    duration: float = 0.0
    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    records: list[Turn] = field(default_factory=list)
    kills: list[tuple[str, float]] = field(default_factory=list)
    samples: dict[str, Sample] = field(default_factory=dict)
    peak: Sample | None = None
    states: collections.Counter[str] = field(default_factory=collections.Counter)
    store_states: collections.Counter[str] = field(default_factory=collections.Counter)
    non_terminal: list[str] = field(default_factory=list)
    store_mismatch: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    failed_by_kill: int = 0
    cancels_effective: int = 0
    cancels_too_late: int = 0
    cancels_raced_start: int = 0
    cancels_hit_by_kill: int = 0  # a kill of its server came while it was in flight: any outcome is fair
    cancel_streams_cut: int = 0
    steers_joined: int = 0
    history_notices: int = 0
    model_requests: int = 0
    leftovers: list[str] = field(default_factory=list)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)
    warning_texts: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def problems(self) -> list[str]:
        return [*self.non_terminal, *self.store_mismatch, *self.lost, *self.duplicated, *self.unexpected,
                *self.leftovers]

    def growth(self, what: str) -> float:
        warm, end = self.samples["warm-up"], self.samples["end"]
        return getattr(end, what) - getattr(warm, what)

    def codex_growth(self, server: str) -> float:
        return self.samples["end"].codex_rss_by_server[server] - self.samples["warm-up"].codex_rss_by_server[server]


# ---------------------------------------------------------------------------------------------- /proc


def _rss_mb(pid: int | str) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _fds(pid: int | str) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _pipes(pid: int | str) -> int:
    """Open pipes: three per codex child, so a killed child whose pipes stay open shows here."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return count


def _sample(apps: dict[str, Any]) -> Sample:
    gc.collect()
    pids: dict[str, list[int]] = {
        server: [app.pid, *descendants(app.pid)] if app.pid else [] for server, app in apps.items()
    }
    everything = [pid for server_pids in pids.values() for pid in server_pids]
    by_server = {server: sum(_rss_mb(pid) for pid in server_pids) for server, server_pids in pids.items()}
    return Sample(
        our_rss=_rss_mb("self"),
        codex_rss=sum(by_server.values()),
        our_fds=_fds("self"),
        our_pipes=_pipes("self"),
        codex_fds=sum(_fds(pid) for pid in everything),
        codex_processes=len(everything),
        codex_rss_by_server=by_server,
    )


# ---------------------------------------------------------------------------------------------- the driver


class _Soak:
    """Shared state of one soak run."""

    def __init__(self, report: SoakReport, model: ScriptedModel, servers: dict[str, Any], clients: dict[str, Any],
                 rng: random.Random) -> None:
        self.report = report
        self.model = model
        self.servers = servers
        self.clients = clients
        self.rng = rng
        self.kill_at: list[int] = []  # turn counts after which the next eligible op becomes a kill
        self.sent = 0
        self.counter = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.first_request_at: dict[str, float] = {}
        model.responder = self._respond

    def _respond(self, request: RecordedRequest) -> Any:
        self.requests[request.last_user_text] += 1
        self.first_request_at.setdefault(request.last_user_text, time.monotonic())
        return default_responder(request)

    def drain_model_records(self) -> None:
        """The scripted model keeps every request body; the soak counts them itself instead."""
        with self.model._lock:
            self.report.model_requests += len(self.model._requests)
            self.model._requests.clear()

    def new_turn(self, conversation: str, server: str, role: str, suffix: str = "", expected: int = 1) -> Turn:
        self.counter += 1
        prompt = f"p{self.counter:05d}-{uuid.uuid4().hex[:6]}{suffix}"
        turn = Turn(conversation, server, role, prompt, expected_requests=expected)
        self.report.records.append(turn)
        self.sent += 1
        return turn

    def start(self, turn: Turn) -> Call:
        turn.sent_at = time.monotonic()
        return Call(self.clients[turn.server], user_message(turn.prompt, context_id=turn.conversation),
                    timeout=CALL_TIMEOUT_S)

    async def finish(self, turn: Turn, call: Call) -> None:
        """Wait for the call to end and keep only what the checks need."""
        try:
            items = await call.result(timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # a hung or broken call: recorded, judged later
            items = list(call.items)
            turn.error = f"{exc.__class__.__name__}: {exc}"
        turn.ended_at = time.monotonic()
        if items and items[0].WhichOneof("payload") == "task":
            turn.task_id = items[0].task.id
        turn.state = terminal_state(items)
        turn.answer = final_answer(items)
        turn.message = final_message(items)
        texts = status_texts(items)
        turn.joined = any(JOINED in text for text in texts)
        turn.history_notice = any("could not be restored" in text for text in texts)

    async def first_chunk(self, call: Call) -> bool:
        """Until the answer starts streaming (the turn runs); False when the call ended first."""
        try:
            await call.wait_for(lambda item: item.WhichOneof("payload") == "artifact_update", FIRST_CHUNK_TIMEOUT_S)
        except Exception:  # the call ended first, or never got there
            return False
        return True

    async def wait_status(self, call: Call, fragment: str) -> bool:
        try:
            await call.wait_status(fragment, FIRST_CHUNK_TIMEOUT_S)
        except Exception:  # the call ended first, or never got there
            return False
        return True

    async def cancel(self, turn: Turn, call: Call) -> None:
        try:
            await self.wait_task_id(call)
            task = await self.clients[turn.server].cancel_task(CancelTaskRequest(id=call.task_id))
            turn.cancel_outcome = TaskState.Name(task.status.state)
        except Exception as exc:
            turn.cancel_outcome = f"refused ({exc.__class__.__name__})"
        turn.cancel_returned_at = time.monotonic()

    @staticmethod
    async def wait_task_id(call: Call) -> None:
        await call.wait_for(lambda item: item.WhichOneof("payload") == "task", FIRST_CHUNK_TIMEOUT_S)

    # ---------------------------------------------------------------- operations

    async def op_plain(self, conversation: str, server: str) -> None:
        sleep = self.rng.choice([0, 0, 0, 0, 0.2, 0.5])
        turn = self.new_turn(conversation, server, "plain", f" [sleep={sleep}]" if sleep else "")
        await self.finish(turn, self.start(turn))

    async def op_tool(self, conversation: str, server: str) -> None:
        marker = f"t{self.counter + 1:05d}-tool"
        turn = self.new_turn(conversation, server, "tool", f" [tool=echo {marker}]", expected=2)
        await self.finish(turn, self.start(turn))

    async def op_queued(self, conversation: str, server: str) -> None:
        first = self.new_turn(conversation, server, "queued-first", " [sleep=0.5]")
        first_call = self.start(first)
        with contextlib.suppress(Exception):
            await self.wait_task_id(first_call)
        second = self.new_turn(conversation, server, "queued-second")
        second_call = self.start(second)
        await asyncio.gather(self.finish(first, first_call), self.finish(second, second_call))

    async def op_cancel(self, conversation: str, server: str) -> None:
        turn = self.new_turn(conversation, server, "cancel", f" [sleep={LONG_REPLY_S}]")
        call = self.start(turn)
        await self.first_chunk(call)
        await self.cancel(turn, call)
        await self.finish(turn, call)

    async def op_cancel_queued(self, conversation: str, server: str) -> None:
        first = self.new_turn(conversation, server, "queued-first", f" [sleep={LONG_REPLY_S}]")
        first_call = self.start(first)
        await self.first_chunk(first_call)
        second = self.new_turn(conversation, server, "cancel-queued", expected=0)
        second_call = self.start(second)
        await self.wait_status(second_call, WAITING)
        await self.cancel(second, second_call)
        await asyncio.gather(self.finish(first, first_call), self.finish(second, second_call))

    async def op_steer(self, conversation: str, server: str) -> None:
        first = self.new_turn(conversation, server, "steer-first", f" [sleep={LONG_REPLY_S}]")
        first_call = self.start(first)
        await self.first_chunk(first_call)
        second = self.new_turn(conversation, server, "steer-second")
        first.partner, second.partner = second, first
        second_call = self.start(second)
        await asyncio.gather(self.finish(first, first_call), self.finish(second, second_call))

    async def op_kill(self, conversation: str, server: str) -> None:
        turn = self.new_turn(conversation, server, "kill", " [sleep=3]")
        call = self.start(turn)
        app = self.servers[server].app
        if await self.first_chunk(call) and app.pid:
            self.report.kills.append((server, time.monotonic()))
            os.kill(app.pid, signal.SIGKILL)
        await self.finish(turn, call)

    # ---------------------------------------------------------------- plans

    async def run_conversation(self, conversation: str, server: str, plan: list[str], allow_kills: bool) -> None:
        for planned in plan:
            op = planned
            if allow_kills and self.kill_at and self.sent >= self.kill_at[0] and OP_TURNS[op] == 1 and server == QUEUE:
                self.kill_at.pop(0)
                op = "kill"
            self.report.ops[op] += 1
            await getattr(self, "op_" + op.replace("-", "_"))(conversation, server)


def _plans(conversations: list[tuple[str, str]], turns: int, rng: random.Random, *, cancels: int, steers: int,
           queued: int, tools: int) -> dict[str, list[str]]:
    """Random operations per conversation summing to ``turns`` turns, with the requested counts of each kind."""
    per, extra = divmod(turns, len(conversations))
    budget = {name: per + (1 if index < extra else 0) for index, (name, _server) in enumerate(conversations)}
    server_of = dict(conversations)
    plans: dict[str, list[str]] = {name: [] for name, _server in conversations}
    wanted = ["steer"] * steers + ["queued"] * queued + ["cancel-queued"] * (cancels // 2)
    wanted += ["cancel"] * (cancels - cancels // 2) + ["tool"] * tools
    rng.shuffle(wanted)
    for op in wanted:
        eligible = [
            name for name in plans
            if budget[name] >= OP_TURNS[op]
            and (op != "steer" or server_of[name] == STEER)
            and (op not in ("queued", "cancel-queued") or server_of[name] == QUEUE)
        ]
        if not eligible:
            continue
        name = rng.choice(eligible)
        plans[name].append(op)
        budget[name] -= OP_TURNS[op]
    for name, left in budget.items():
        plans[name].extend(["plain"] * left)
        rng.shuffle(plans[name])
    return plans


def _split(plan: list[str], warmup_turns: int) -> tuple[list[str], list[str]]:
    """The first ops of a plan, up to ``warmup_turns`` turns, and the rest."""
    used, cut = 0, 0
    while cut < len(plan) and used + OP_TURNS[plan[cut]] <= warmup_turns:
        used += OP_TURNS[plan[cut]]
        cut += 1
    return plan[:cut], plan[cut:]


async def soak(
    tmp_path: Path,
    turns: int,
    conversations: int,
    *,
    cancels: int,
    steers: int,
    kills: int,
    queued: int = 0,
    tools: int = 0,
    warmup: float = 0.1,
    seed: int | None = None,
) -> SoakReport:
    """Run the soak and check it; the report holds counts, samples and every problem found."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    report = SoakReport(turns=turns, conversations=conversations, seed=seed)
    names = [(f"soak-{index:03d}", QUEUE if index % 2 == 0 else STEER) for index in range(conversations)]
    plans = _plans(names, turns, rng, cancels=cancels, steers=steers, queued=queued, tools=tools)
    warmup_per_conversation = max(1, round(turns * warmup / conversations))
    phases = {name: _split(plans[name], warmup_per_conversation) for name, _server in names}
    for server in (QUEUE, STEER):
        (tmp_path / server).mkdir(exist_ok=True)
    started = time.monotonic()
    with ScriptedModel() as model:
        async with (
            serve_codex(tmp_path / QUEUE, model, on_busy="queue", stream_idle_timeout_ms=30000) as queue_server,
            serve_codex(tmp_path / STEER, model, on_busy="steer", stream_idle_timeout_ms=30000) as steer_server,
        ):
            servers = {QUEUE: queue_server, STEER: steer_server}
            clients = {name: await served.client(streaming=True) for name, served in servers.items()}
            apps = {name: served.app for name, served in servers.items()}
            run = _Soak(report, model, servers, clients, rng)
            report.samples["start"] = _sample(apps)
            sampler = asyncio.create_task(_sample_peaks(report, apps, run))
            try:
                await asyncio.gather(*(run.run_conversation(name, server, phases[name][0], False)
                                       for name, server in names))
                run.drain_model_records()
                report.samples["warm-up"] = _sample(apps)
                main_turns = turns - run.sent
                run.kill_at = [run.sent + main_turns * (index + 1) // (kills + 1) for index in range(kills)]
                await asyncio.gather(*(run.run_conversation(name, server, phases[name][1], True)
                                       for name, server in names))
                run.drain_model_records()
                report.samples["end"] = _sample(apps)  # before GetTask adds its own connections
                await _check_store(report, clients)
                for name, served in servers.items():
                    executor = served.executor
                    if executor._requests:
                        report.leftovers.append(f"{name}: executor still tracks requests {list(executor._requests)}")
                    busy = [c for c, conv in executor._conversations.items() if conv.turn or conv.queue or conv.worker]
                    if busy:
                        report.leftovers.append(f"{name}: conversations still busy: {busy}")
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            report.duration = time.monotonic() - started
            _judge(report, run.requests, run.first_request_at)
    return report


async def _sample_peaks(report: SoakReport, apps: dict[str, Any], run: _Soak) -> None:
    """Every second: the highest value of each measure so far; and the model's records dropped."""
    while True:
        await asyncio.sleep(SAMPLE_INTERVAL_S)
        sample, peak = _sample(apps), report.peak
        if peak is not None:
            by_server = {name: max(rss, peak.codex_rss_by_server.get(name, 0.0))
                         for name, rss in sample.codex_rss_by_server.items()}
            sample = Sample(*(max(getattr(sample, name), getattr(peak, name))
                              for name in ("our_rss", "codex_rss", "our_fds", "our_pipes", "codex_fds",
                                           "codex_processes")), codex_rss_by_server=by_server)
        report.peak = sample
        run.drain_model_records()


async def _check_store(report: SoakReport, clients: dict[str, Any]) -> None:
    """GetTask for every task: terminal, and the same state the stream ended with."""
    limit = asyncio.Semaphore(16)

    async def one(turn: Turn) -> None:
        if turn.task_id is None:
            report.non_terminal.append(f"{turn.prompt}: the call never got a task ({turn.error})")
            return
        async with limit:
            try:
                task = await clients[turn.server].get_task(GetTaskRequest(id=turn.task_id))
            except Exception as exc:
                report.store_mismatch.append(f"{turn.prompt}: GetTask failed: {exc.__class__.__name__}: {exc}")
                return
        state = turn.stored_state = task.status.state
        report.store_states[TaskState.Name(state)] += 1
        if state not in TERMINAL:
            report.non_terminal.append(f"{turn.prompt}: stored state {TaskState.Name(state)}")
        elif state != turn.state and not _cancel_stream_cut(turn):
            report.store_mismatch.append(
                f"{turn.prompt}: stored {TaskState.Name(state)}, streamed {TaskState.Name(turn.state or 0)}"
            )

    await asyncio.gather(*(one(turn) for turn in report.records))


def _cancel_stream_cut(turn: Turn) -> bool:
    """a2a-sdk: the CANCELED write "is not guaranteed to reach an active subscriber stream" (its
    producer may close the subscriber queue before the consumer forwards the event). The canceller
    got CANCELED from the cancel call and GetTask agrees; only the streaming view ends early."""
    return (turn.state not in TERMINAL and turn.cancel_outcome == "TASK_STATE_CANCELED"
            and turn.stored_state == TaskState.TASK_STATE_CANCELED)


def _killed(report: SoakReport, turn: Turn) -> bool:
    """Whether a kill of this turn's server happened while it was in flight."""
    end = turn.ended_at or float("inf")
    return any(server == turn.server and turn.sent_at <= at + KILL_GRACE_S and end >= at
               for server, at in report.kills)


def _judge(report: SoakReport, requests: collections.Counter[str], first_request_at: dict[str, float]) -> None:
    """Classify every turn; fill the problem lists."""
    pids = {turn.pid for turn in report.records}
    answers: collections.defaultdict[str, list[Turn]] = collections.defaultdict(list)
    for turn in report.records:
        state = turn.state
        if _cancel_stream_cut(turn):
            report.cancel_streams_cut += 1
            state = turn.stored_state
        name = TaskState.Name(state) if state is not None else "NONE"
        report.states[name] += 1
        report.history_notices += turn.history_notice
        label = f"{turn.prompt} ({turn.role}, {turn.server})"
        if state not in TERMINAL:
            report.non_terminal.append(f"{label}: stream ended in {name} ({turn.error or 'no error'})")
            continue
        count = requests.get(turn.prompt, 0)
        if count > max(turn.expected_requests, 1):
            report.duplicated.append(f"{label}: reached the model {count} times")
        killed = _killed(report, turn)
        if killed and turn.role in ("cancel", "cancel-queued") and state != TaskState.TASK_STATE_CANCELED:
            report.cancels_hit_by_kill += 1
        if state == TaskState.TASK_STATE_FAILED:
            if killed and (KILLED in turn.message or "ended before producing a reply" in turn.message):
                report.failed_by_kill += 1
            else:
                report.unexpected.append(f"{label}: FAILED: {turn.message[:200]}")
            continue
        if state == TaskState.TASK_STATE_CANCELED:
            if turn.role in ("cancel", "cancel-queued"):
                report.cancels_effective += 1
                arrived = first_request_at.get(turn.prompt)
                returned = turn.cancel_returned_at
                if arrived is not None and returned is not None and arrived > returned + CANCEL_GRACE_S:
                    report.duplicated.append(f"{label}: reached the model {arrived - returned:.1f} s after its "
                                             "cancel returned")
                elif turn.role == "cancel-queued" and count:
                    report.cancels_raced_start += 1  # its turn started (e.g. the one ahead ended) just before
            else:
                report.unexpected.append(f"{label}: CANCELED without a cancel")
            continue
        if state != TaskState.TASK_STATE_COMPLETED:
            report.unexpected.append(f"{label}: {name}")
            continue
        if turn.role in ("cancel", "cancel-queued"):
            report.cancels_too_late += 1
            if turn.cancel_outcome == "TASK_STATE_CANCELED":
                report.unexpected.append(f"{label}: cancel answered CANCELED but the task COMPLETED")
        answer = turn.answer or ""
        allowed = {turn.pid}
        if turn.joined or (turn.partner is not None and turn.partner.joined):
            report.steers_joined += turn.joined
            partner = turn.partner
            assert partner is not None
            allowed.add(partner.pid)
            steered = partner if partner.joined else turn
            if f"echo: {steered.prompt}" not in answer or (partner.state == TaskState.TASK_STATE_COMPLETED
                                                           and partner.answer != answer):
                report.lost.append(f"{label}: steered reply {answer[:120]!r} lacks echo: {steered.prompt}")
        else:
            answers[answer].append(turn)
            if turn.role == "tool":
                marker = turn.prompt.split("[tool=echo ")[1].rstrip("]")
                good = answer.startswith(f"echo: {turn.prompt}\n[tool exit=0]") and marker in answer
            else:
                good = answer == f"echo: {turn.prompt}"
            if not good:
                report.lost.append(f"{label}: reply {answer[:160]!r}")
            if count < turn.expected_requests:
                report.lost.append(f"{label}: completed but reached the model {count} times")
        foreign = {pid for pid in pids - allowed if pid in answer}
        if foreign:
            report.duplicated.append(f"{label}: reply carries other requests' ids {sorted(foreign)[:3]}")
    for turns in answers.values():
        if len(turns) > 1:
            report.duplicated.append(f"one reply reached {len(turns)} tasks: {[t.prompt for t in turns]}")


def summary(report: SoakReport) -> str:
    """One screen."""
    ops = report.ops
    start, warm, end = report.samples["start"], report.samples["warm-up"], report.samples["end"]
    peak = report.peak or end
    states = ", ".join(f"{k.removeprefix('TASK_STATE_').lower()} {v}" for k, v in sorted(report.states.items()))
    stored = ", ".join(f"{k.removeprefix('TASK_STATE_').lower()} {v}" for k, v in sorted(report.store_states.items()))
    warnings = ", ".join(f"{name} {count}" for name, count in report.warnings.most_common(4)) or "none"
    lines = [
        f"soak: {len(report.records)} turns over {report.conversations} conversations "
        f"(2 servers: on_busy=queue and on_busy=steer), seed {report.seed}, "
        f"{report.duration:.1f} s ({len(report.records) / max(report.duration, 1e-9):.1f} turns/s)",
        f"operations: plain {ops['plain']}, tool {ops['tool']}, queued pairs {ops['queued']}, "
        f"cancels {ops['cancel']} running + {ops['cancel-queued']} queued "
        f"({report.cancels_effective} canceled, {report.cancels_raced_start} of the queued ones just after "
        f"their turn started, {report.cancels_too_late} too late, {report.cancels_hit_by_kill} hit by a kill), "
        f"steer pairs {ops['steer']} ({report.steers_joined} joined), child kills {len(report.kills)}",
        f"terminal states (stream): {states}",
        f"terminal states (GetTask): {stored}",
        f"non-terminal {len(report.non_terminal)}, store disagreements {len(report.store_mismatch)}, "
        f"canceled streams closed before their CANCELED event {report.cancel_streams_cut}, "
        f"failed by a kill {report.failed_by_kill}, other unexpected outcomes {len(report.unexpected)}",
        f"replies: lost {len(report.lost)}, duplicated {len(report.duplicated)}; "
        f"model requests {report.model_requests}; history-lost notices {report.history_notices}",
        "                       start   warm-up      end     peak   growth after warm-up",
        f"RSS MB, this process {start.our_rss:8.1f}{warm.our_rss:10.1f}{end.our_rss:9.1f}{peak.our_rss:9.1f}"
        f"{end.our_rss - warm.our_rss:+12.1f}  (limit {RSS_GROWTH_LIMIT_MB:g})",
        *(
            f"RSS MB, codex {server:<6} {start.codex_rss_by_server[server]:8.1f}"
            f"{warm.codex_rss_by_server[server]:10.1f}{end.codex_rss_by_server[server]:9.1f}"
            f"{peak.codex_rss_by_server[server]:9.1f}{report.codex_growth(server):+12.1f}  ({note})"
            for server, note in ((STEER, "one child all along"), (QUEUE, f"restarted by {len(report.kills)} kills"))
        ),
        f"open fds, this proc  {start.our_fds:8d}{warm.our_fds:10d}{end.our_fds:9d}{peak.our_fds:9d}"
        f"{end.our_fds - warm.our_fds:+12d}  (limit +{FD_GROWTH_LIMIT}; pipes {warm.our_pipes} -> {end.our_pipes})",
        f"open fds, codex      {start.codex_fds:8d}{warm.codex_fds:10d}{end.codex_fds:9d}{peak.codex_fds:9d}"
        f"{end.codex_fds - warm.codex_fds:+12d}  ({end.codex_processes} codex processes at the end)",
        f"log records >= WARNING: {sum(report.warnings.values())} ({warnings})",
        *(f"  {count} x {text}" for text, count in report.warning_texts.most_common(4)),
    ]
    for title, items in (("non-terminal", report.non_terminal), ("store", report.store_mismatch),
                         ("lost", report.lost), ("duplicated", report.duplicated), ("unexpected", report.unexpected),
                         ("left over", report.leftovers)):
        if items:
            lines.append(f"{title} ({len(items)}): " + "; ".join(item[:200] for item in items[:3]))
    return "\n".join(lines)


def assert_criteria(report: SoakReport) -> None:
    """The issue's criteria, with the summary in every failure message."""
    text = summary(report)
    assert not report.non_terminal, text
    assert not report.store_mismatch, text
    assert not report.lost, text
    assert not report.duplicated, text
    assert not report.unexpected, text
    assert not report.leftovers, text
    assert len(report.records) == report.turns, text
    assert report.growth("our_rss") < RSS_GROWTH_LIMIT_MB, text
    assert report.codex_growth(STEER) < RSS_GROWTH_LIMIT_MB, text
    assert report.codex_growth(QUEUE) < RSS_GROWTH_LIMIT_MB, text
    assert report.growth("our_fds") <= FD_GROWTH_LIMIT, text
    assert report.growth("our_pipes") <= 0, text
    assert report.growth("codex_fds") <= FD_GROWTH_LIMIT, text


def _count_warnings(report: SoakReport, caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        if record.levelno >= logging.WARNING:
            report.warnings[record.name] += 1
            text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "#", record.getMessage().splitlines()[0])
            report.warning_texts[f"{record.levelname} {record.name}: {text[:90]}"] += 1


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.real_codex
async def test_soak_short_profile(tmp_path, caplog):
    """CI profile: 60 turns over 10 conversations, 4 cancels, 2 steers, 1 child kill, in well under a minute."""
    report = await soak(tmp_path, 60, 10, cancels=4, steers=2, kills=1, queued=2, tools=2, warmup=0.2)
    _count_warnings(report, caplog)
    assert_criteria(report)
    assert report.ops["cancel"] + report.ops["cancel-queued"] == 4, summary(report)
    assert report.ops["steer"] == 2 and report.steers_joined >= 1, summary(report)
    assert len(report.kills) == 1 and report.failed_by_kill >= 1, summary(report)
    # Every cancel landed while the one kill hit its server (the random plan allows it): no proof either way.
    cancels = report.ops["cancel"] + report.ops["cancel-queued"]
    assert report.cancels_effective >= 1 or report.cancels_hit_by_kill == cancels, summary(report)
    assert report.duration < 60, summary(report)


@pytest.mark.soak
@pytest.mark.real_codex
@pytest.mark.timeout(1800)
async def test_soak_long_profile(tmp_path, caplog, capsys):
    """The issue's profile: 1,000 turns over 50 conversations with random cancels, steers and 3 child kills."""
    caplog.set_level(logging.WARNING)  # INFO lines captured in memory would count as our own growth
    seed = int(os.environ.get("SOAK_SEED", "0")) or None
    report = await soak(tmp_path, 1000, 50, cancels=50, steers=40, kills=3, queued=40, tools=50, warmup=0.1,
                        seed=seed)
    _count_warnings(report, caplog)
    with capsys.disabled():
        print("\n" + summary(report))
    assert_criteria(report)
    assert len(report.kills) == 3, summary(report)
    assert report.cancels_effective >= 25 and report.steers_joined >= 20, summary(report)


async def test_cancel_that_loses_the_race_publishes_nothing(tmp_path):
    """Found by the long soak: a cancel the SDK let through just as the answer went out published
    CANCELED after COMPLETED, so GetTask said CANCELED for a task whose caller got the answer."""
    events: list[Any] = []

    class Queue:
        async def enqueue_event(self, event: Any) -> None:
            events.append(event)

    executor = CodexExecutor(None, None, ExecutorOptions(workspace=tmp_path, model="m"))  # type: ignore[arg-type]
    await executor.cancel(RequestContext(ServerCallContext(), task_id="t-gone", context_id="c"), Queue())
    answered = Publisher(Queue(), "t-answered", "c")
    answered.terminal = True
    executor._requests["t-answered"] = Request("t-answered", answered, CodexInput(text="x"), "m")
    await executor.cancel(RequestContext(ServerCallContext(), task_id="t-answered", context_id="c"), Queue())
    assert events == []
    assert not executor._requests["t-answered"].canceled
