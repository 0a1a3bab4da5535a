"""Native asyncio JSON-RPC client for one long-lived ``codex app-server`` child over stdio.

Design invariants:

* stdout is one ordered stream, so exactly one reader task consumes it. It routes responses by
  request id, notifications by thread id, and hands server→client requests to the policy.
* Every await is bounded: requests time out (codex silently ignores lines it cannot parse, so a
  request may never be answered) and the bound covers writing the request too; every other write
  has its own bound. A write that cannot finish means the child stopped reading: it is marked
  hung (everything waiting on it fails) and the next use replaces it. The handshake times out,
  close() escalates EOF → SIGTERM → SIGKILL with a deadline at each step.
* Signals reach only our own processes: a child's pid (and group) is signalled only while that
  pid still names the process we started (its start time is checked), so a late stop never hits
  a process that reused the number.
* Every server→client request gets exactly one answer; when the policy is slow or fails, the
  safe refusal from :func:`server_requests.decline_answer` goes out instead.
* Failure is total and explicit: when the child exits or stdout closes, every pending request
  and every subscription fails with the same :class:`AppServerExited` within a second.
* Notifications for a thread nobody subscribes to yet are buffered (bounded), so events that
  arrive before the caller holds a subscription are not lost.

This module never imports a2a or molecule_runtime: it speaks codex only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import random
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from molecule_codex.codex_binary import CodexBinary, parse_version, require_supported, resolve_codex_binary
from molecule_codex.server_requests import Answer, PolicyCallable, ServerRequest, ServerRequestPolicy, decline_answer

logger = logging.getLogger(__name__)

#: Features we always switch off: plugin sync phones home at start-up, shell snapshots make
#: concurrent thread starts ~5x slower on 2 cores, and unbounded retries turn "connection
#: refused" into a turn that never ends.
DISABLED_FEATURES = ("plugins", "shell_snapshot", "unbounded_connection_retries")

#: Lines above 64 KiB are routine (resume results, command output, big prompts).
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024
#: Spawn + initialize takes ~0.1 s idle and under 2 s under load; 30 s means something is wrong.
START_TIMEOUT_S = 30.0
#: Default bound for one JSON-RPC request; callers pass their own for slow methods.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
#: How long the policy may think about a server request before we decline on its behalf.
SERVER_REQUEST_DEADLINE_S = 30.0
#: Bound on a write that is not part of a request (notifications, answers to codex's requests).
WRITE_TIMEOUT_S = 10.0
#: Codex answers overload with -32001; retry a few times with jitter, then give up.
OVERLOADED_CODE = -32001
OVERLOAD_RETRIES = 5
OVERLOAD_BASE_DELAY_S = 0.05
#: close(): EOF exits in < 100 ms normally; SIGTERM the same, even mid-turn.
CLOSE_EOF_WAIT_S = 1.0
CLOSE_TERM_WAIT_S = 2.0
CLOSE_KILL_WAIT_S = 2.0
#: After stdout closes, how long we wait for the exit code before failing waiters anyway.
EXIT_CODE_GRACE_S = 0.5
#: Restart backoff: 1 s doubling to 60 s; a child that lived this long resets it.
BACKOFF_INITIAL_S = 1.0
BACKOFF_CAP_S = 60.0
HEALTHY_UPTIME_S = 30.0
#: stderr kept for error reports: enough to see a panic, bounded so a chatty child can't grow it.
STDERR_TAIL_LINES = 40
STDERR_LINE_CHARS = 500
#: Buffer bounds for notifications no subscriber has claimed yet.
ORPHAN_THREADS = 256
ORPHAN_EVENTS_PER_THREAD = 2048
#: A subscriber that falls this far behind loses its oldest events (logged).
SUBSCRIPTION_BUFFER = 100_000

#: codex colours its stderr log lines; our log wants plain, greppable text.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: Notifications we never want (chatty, unused).
OPTED_OUT_NOTIFICATIONS = ("account/rateLimits/updated", "remoteControl/status/changed")


def _our_version() -> str:
    """Our package version, for clientInfo and --version."""
    try:
        return metadata.version("molecule-codex")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class AppServerError(RuntimeError):
    """codex answered a request with a JSON-RPC error."""

    def __init__(self, method: str, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message
        self.data = data

    @property
    def codex_error_info(self) -> Any:
        """codex's structured error detail, when it sent one."""
        if isinstance(self.data, Mapping):
            return self.data.get("codexErrorInfo", self.data)
        return self.data


class AppServerTimeout(AppServerError, TimeoutError):
    """A request got no answer in time (codex ignores unparsable lines, so this can happen)."""

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(method, 0, f"no answer within {timeout:g}s")
        self.timeout = timeout


class AppServerExited(RuntimeError):
    """The app-server child is gone (crashed, killed, closed, or never started)."""

    def __init__(self, reason: str, returncode: int | None = None, stderr_tail: str = "") -> None:
        detail = f"codex app-server {reason}"
        if returncode is not None:
            detail += f" (exit code {returncode})"
        super().__init__(detail)
        self.reason = reason
        self.returncode = returncode
        self.stderr_tail = stderr_tail


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification from codex, wire dict kept as-is in ``params``."""

    method: str
    params: Mapping[str, Any]

    @property
    def thread_id(self) -> str | None:
        """The thread this event belongs to (``threadId``, or ``thread.id`` for thread/started)."""
        params = self.params
        value = params.get("threadId")
        if value is None:
            thread = params.get("thread")
            if isinstance(thread, Mapping):
                value = thread.get("id")
        return value if isinstance(value, str) else None

    @property
    def turn_id(self) -> str | None:
        """The turn this event belongs to, if it says (``turnId`` or ``turn.id``)."""
        value = self.params.get("turnId")
        if value is None:
            turn = self.params.get("turn")
            if isinstance(turn, Mapping):
                value = turn.get("id")
        return value if isinstance(value, str) else None


class ThreadSubscription:
    """The notifications of one codex thread, in order, as an async iterator.

    Raises :class:`AppServerExited` once the child is gone (after handing out what was already
    received), so a consumer never waits on a dead process.
    """

    def __init__(self, owner: AppServer, thread_id: str, wakeup: asyncio.Event | None = None) -> None:
        self._owner = owner
        self.thread_id = thread_id
        self._events: collections.deque[Notification] = collections.deque()
        #: Set on every event and on failure; a caller may share one event across several sources.
        self._wakeup = wakeup or asyncio.Event()
        self._failure: BaseException | None = None
        self._dropped = 0
        self.closed = False

    def _push(self, event: Notification) -> None:
        """Called by the reader; never blocks."""
        if len(self._events) >= SUBSCRIPTION_BUFFER:
            self._events.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                logger.warning("thread %s subscriber is behind; dropped %d events", self.thread_id, self._dropped)
        self._events.append(event)
        self._wakeup.set()

    def _fail(self, exc: BaseException) -> None:
        """Make every later get() raise ``exc`` once the buffer is drained."""
        if self._failure is None:
            self._failure = exc
        self._wakeup.set()

    def pending(self) -> int:
        """How many events are buffered and not yet consumed."""
        return len(self._events)

    def get_nowait(self) -> Notification | None:
        """The next buffered event, or None; raises AppServerExited once drained after the child died."""
        if self._events:
            return self._events.popleft()
        if self._failure is not None:
            raise self._failure
        return None

    async def get(self, timeout: float | None = None) -> Notification:
        """The next event; raises TimeoutError after ``timeout`` s, AppServerExited on death."""
        while not self._events:
            if self._failure is not None:
                raise self._failure
            if self.closed:
                raise AppServerExited("subscription closed")
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
            else:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
        return self._events.popleft()

    def __aiter__(self) -> ThreadSubscription:
        return self

    async def __anext__(self) -> Notification:
        try:
            return await self.get()
        except AppServerExited as exc:
            if exc.reason == "subscription closed":
                raise StopAsyncIteration from None
            raise

    def close(self) -> None:
        """Stop receiving; idempotent."""
        if not self.closed:
            self.closed = True
            self._owner._unsubscribe(self)
            self._wakeup.set()


class RestartBackoff:
    """Delay before the next start: 1 s doubling to 60 s, reset after a healthy run."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_CAP_S) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next_delay(self, previous_uptime: float | None) -> float:
        """Delay for this restart, given how long the previous child lived."""
        if previous_uptime is not None and previous_uptime >= HEALTHY_UPTIME_S:
            self._next = self.initial
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay


class AppServer:
    """One ``codex app-server`` child and the JSON-RPC conversation with it."""

    def __init__(
        self,
        *,
        codex_home: Path,
        cwd: Path | None = None,
        binary: CodexBinary | None = None,
        env: Mapping[str, str] | None = None,
        config_overrides: Sequence[str] = (),
        policy: PolicyCallable | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        start_timeout: float = START_TIMEOUT_S,
        server_request_deadline: float = SERVER_REQUEST_DEADLINE_S,
        write_timeout: float = WRITE_TIMEOUT_S,
        backoff: RestartBackoff | None = None,
        strict_config: bool = False,
    ) -> None:
        self.codex_home = Path(codex_home)
        self.cwd = Path(cwd) if cwd else None
        self._binary = binary
        self._base_env = dict(os.environ if env is None else env)
        self._config_overrides = tuple(config_overrides)
        self._policy: PolicyCallable = policy or ServerRequestPolicy()
        self._max_line_bytes = max_line_bytes
        self._start_timeout = start_timeout
        self._server_request_deadline = server_request_deadline
        self._write_timeout = write_timeout
        self._backoff = backoff or RestartBackoff()
        #: --strict-config: codex refuses unknown config.toml keys and exits before initialize.
        self._strict_config = strict_config

        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._subscribers: dict[str, list[ThreadSubscription]] = {}
        self._orphans: collections.OrderedDict[str, collections.deque[Notification]] = (
            collections.OrderedDict()
        )
        self._global_listeners: list[Callable[[Notification], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._child_tasks: list[asyncio.Task[Any]] = []
        self._write_lock = asyncio.Lock()
        self._lifecycle_lock = asyncio.Lock()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._exit: AppServerExited | None = AppServerExited("not started")
        self._started_at: float | None = None
        self._child_start: int | None = None  # /proc start time of the current child: proof a pid is still it
        self._closed = False
        self.generation = 0
        self.init_result: Mapping[str, Any] = {}
        self.codex_version: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        """Whether a handshaken child is up and its channel open."""
        return self._proc is not None and self._exit is None

    @property
    def pid(self) -> int | None:
        """Process id of the current child (also its process group id)."""
        return self._proc.pid if self._proc else None

    @property
    def binary(self) -> CodexBinary:
        """The codex binary, resolved on first use."""
        if self._binary is None:
            self._binary = resolve_codex_binary(self._base_env)
        return self._binary

    def command(self) -> list[str]:
        """argv for the child: native binary, stdio transport, our overrides."""
        argv = [str(self.binary.path), "app-server", "--listen", "stdio://"]
        if self._strict_config:
            argv.append("--strict-config")
        for feature in DISABLED_FEATURES:
            argv += ["--disable", feature]
        for override in self._config_overrides:
            argv += ["-c", override]
        return argv

    async def start(self) -> None:
        """Spawn and handshake, bounded by the start timeout. Idempotent while running."""
        async with self._lifecycle_lock:
            if self._closed:
                raise AppServerExited("closed")
            if self.running:
                return
            await self._spawn_and_initialize()

    async def ensure_running(self) -> None:
        """Start if needed; after a crash this restarts with backoff (once, however many callers)."""
        if self.running:
            return
        async with self._lifecycle_lock:
            if self._closed:
                raise AppServerExited("closed")
            if self.running:
                return  # another caller restarted it while we waited for the lock
            if self.generation == 0:
                await self._spawn_and_initialize()
            else:
                await self._restart_locked()

    async def restart(self, if_generation: int | None = None) -> None:
        """Replace the child after the backoff delay.

        With ``if_generation``, only if that child is still the current one: several callers
        that saw the same hung child restart it once.
        """
        async with self._lifecycle_lock:
            if self._closed:
                raise AppServerExited("closed")
            if if_generation is not None and if_generation != self.generation:
                return
            await self._restart_locked()

    async def _restart_locked(self) -> None:
        """Stop, wait out the backoff, start; the caller holds the lifecycle lock."""
        uptime = time.monotonic() - self._started_at if self._started_at is not None else None
        await self._stop_child("restarting")
        delay = self._backoff.next_delay(uptime)
        logger.warning(
            "codex app-server restart generation=%d in %.1fs (previous uptime %s)",
            self.generation + 1,
            delay,
            f"{uptime:.1f}s" if uptime is not None else "n/a",
        )
        await asyncio.sleep(delay)
        await self._spawn_and_initialize()

    async def close(self) -> None:
        """Stop the child (EOF, SIGTERM, SIGKILL of its group); idempotent; no orphan, no task left."""
        async with self._lifecycle_lock:
            self._closed = True
            await self._stop_child("closed")
            background = list(self._tasks)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _spawn_and_initialize(self) -> None:
        self.codex_home.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = self.binary.child_env(self._base_env)
        env["CODEX_HOME"] = str(self.codex_home)
        argv = self.command()
        self._stderr_tail.clear()
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(self.cwd) if self.cwd else None,
            limit=self._max_line_bytes,
            start_new_session=True,
        )
        self._child_start = _start_time(self._proc.pid)
        self._exit = None
        self.generation += 1
        self._started_at = time.monotonic()
        proc = self._proc
        self._child_tasks = [
            self._spawn(self._read_stdout(proc), "stdout"),
            self._spawn(self._drain_stderr(proc), "stderr"),
            self._spawn(self._watch_exit(proc), "exit-watch"),
        ]
        try:
            self.init_result = await self._request_once(
                "initialize",
                {
                    "clientInfo": {"name": "molecule-codex", "title": "Molecule Codex", "version": _our_version()},
                    "capabilities": {
                        "experimentalApi": True,
                        "optOutNotificationMethods": list(OPTED_OUT_NOTIFICATIONS),
                    },
                },
                self._start_timeout,
            )
            # The handshake names the codex version: check it on every start, restarts included.
            self.codex_version = require_supported(
                parse_version(str(self.init_result.get("userAgent", ""))), self.binary.path
            )
            await self.notify("initialized")
        except BaseException:
            await self._stop_child("failed to start")
            raise
        logger.info(
            "codex app-server started pid=%d generation=%d agent=%s",
            proc.pid,
            self.generation,
            self.init_result.get("userAgent", "?"),
        )

    async def _stop_child(self, reason: str) -> None:
        """Terminate the current child and fail everything waiting on it."""
        proc = self._proc
        if proc is None:
            return
        if self._exit is None:
            # No longer "running" while it stops (seconds, for a hung child): ensure_running() callers
            # wait for the replacement instead of sending requests the stop is about to fail.
            self._exit = AppServerExited(reason)
        # Walked only while the pid is still our child: after a late stop it may name another process.
        children = descendants(proc.pid) if _start_time(proc.pid) == self._child_start else []
        if proc.returncode is None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            if not await _wait_exit(proc, CLOSE_EOF_WAIT_S):
                self._signal_child_group(proc, signal.SIGTERM)
                if not await _wait_exit(proc, CLOSE_TERM_WAIT_S):
                    self._signal_child_group(proc, signal.SIGKILL)
                    await _wait_exit(proc, CLOSE_KILL_WAIT_S)
        # Commands codex started may outlive it (an interrupt does not kill them).
        self._signal_child_group(proc, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._fail_all(AppServerExited(reason, proc.returncode, self.stderr_tail()))
        for task in self._child_tasks:
            task.cancel()
        await asyncio.gather(*self._child_tasks, return_exceptions=True)
        self._child_tasks = []
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.returncode is not None:
            logger.info("codex app-server pid=%d stopped (%s) rc=%s", proc.pid, reason, proc.returncode)

    def _signal_child_group(self, proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        """Signal the child's process group, unless its number now belongs to someone else.

        The group outlives the child while commands codex started still run in it; once the child
        is reaped its pid may be reused, and a live process with that pid but another start time
        means the number (and the group of the same number) is no longer ours.
        """
        leader = _start_time(proc.pid)
        if leader is not None and leader != self._child_start:
            logger.warning("codex pid=%d was reused by another process; not signalling it", proc.pid)
            return
        _signal_group(proc.pid, sig)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start a background task we keep a strong reference to until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=f"app-server-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ requests

    async def request(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    ) -> Any:
        """Send a request and return its ``result``; retries codex's overload answer with jitter."""
        for attempt in range(OVERLOAD_RETRIES + 1):
            try:
                return await self._request_once(method, params, timeout)
            except AppServerError as exc:
                if exc.code != OVERLOADED_CODE or attempt == OVERLOAD_RETRIES:
                    raise
                delay = OVERLOAD_BASE_DELAY_S * (2**attempt) * (0.5 + random.random())
                logger.warning("codex overloaded on %s; retry %d in %.2fs", method, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _request_once(self, method: str, params: Mapping[str, Any] | None, timeout: float) -> Any:
        if self._exit is not None:
            raise self._exit
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (method, future)
        message: dict[str, Any] = {"id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        deadline = asyncio.get_running_loop().time() + timeout  # one bound for writing and answering
        try:
            await self._send(message, deadline)
            async with asyncio.timeout_at(deadline):
                return await future
        except TimeoutError:
            raise AppServerTimeout(method, timeout) from None
        finally:
            self._pending.pop(request_id, None)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a notification (no answer expected), bounded like every write."""
        message: dict[str, Any] = {"method": method}
        if params is not None:
            message["params"] = params
        try:
            await self._send(message, asyncio.get_running_loop().time() + self._write_timeout)
        except TimeoutError:
            raise AppServerTimeout(method, self._write_timeout) from None

    async def _send(self, message: Mapping[str, Any], deadline: float) -> None:
        """Write one line by ``deadline`` (loop time); raises TimeoutError after it.

        A child that stops reading (hung, SIGSTOP) leaves ``drain()`` waiting forever once the pipe
        is full. A write still not drained at the deadline therefore marks the child hung:
        everything waiting on it fails, and the next use replaces it.
        """
        proc = self._proc
        if proc is None or proc.stdin is None or self._exit is not None:
            raise self._exit or AppServerExited("not started")
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        written = False
        try:
            async with asyncio.timeout_at(deadline), self._write_lock:
                if proc is not self._proc or self._exit is not None:
                    raise self._exit or AppServerExited("replaced")
                proc.stdin.write(data)
                written = True
                await proc.stdin.drain()
        except TimeoutError:
            if written and proc is self._proc and self._exit is None:
                logger.error("codex app-server pid=%d stopped reading its input; marking it hung", proc.pid)
                self._fail_all(AppServerExited("stopped reading its input (hung)", None, self.stderr_tail()))
            raise
        except (ConnectionError, RuntimeError) as exc:
            # The child closed its input or died: it is unusable now, whether or not its stdout has
            # ended yet (kill -9 often shows here first). Fail everything waiting on it at once so
            # the next call restarts it instead of writing into the same broken pipe.
            gone = AppServerExited(f"stdin closed ({exc.__class__.__name__})", proc.returncode, self.stderr_tail())
            if proc is self._proc and self._exit is None:
                logger.error("codex app-server pid=%d closed its input (%s); replacing it", proc.pid,
                             exc.__class__.__name__)
                self._signal_child_group(proc, signal.SIGKILL)
                self._fail_all(gone)
            raise gone from exc

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, thread_id: str, *, wakeup: asyncio.Event | None = None) -> ThreadSubscription:
        """Receive this thread's notifications, starting with any buffered before now.

        ``wakeup`` (optional) is set on every event and on failure, so a consumer can wait on
        this thread and on its own signals at once.
        """
        sub = ThreadSubscription(self, thread_id, wakeup)
        if self._exit is not None and self._exit.reason != "not started":
            sub._fail(self._exit)
        for event in self._orphans.pop(thread_id, ()):
            sub._push(event)
        self._subscribers.setdefault(thread_id, []).append(sub)
        return sub

    def _unsubscribe(self, sub: ThreadSubscription) -> None:
        subs = self._subscribers.get(sub.thread_id)
        if subs and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subscribers[sub.thread_id]

    def forget_thread(self, thread_id: str) -> None:
        """Drop buffered events of a thread nobody will subscribe to."""
        self._orphans.pop(thread_id, None)

    def add_listener(self, listener: Callable[[Notification], None]) -> None:
        """Call ``listener`` for every notification that names no thread."""
        self._global_listeners.append(listener)

    # ------------------------------------------------------------------ reader side

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        """The one reader: frame NDJSON, route each message; survives any bad line."""
        assert proc.stdout is not None
        stream = proc.stdout
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                # Over the cap: asyncio dropped the buffered part; the rest arrives as junk.
                logger.error("codex sent a line over %d bytes; dropped it", self._max_line_bytes)
                continue
            if not line:
                break
            if line.strip():
                self._dispatch_line(line)
        await self._on_channel_closed(proc, "stdout closed")

    def _dispatch_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            logger.warning("codex sent a malformed line (%d bytes); skipped: %r", len(line), line[:120])
            return
        if not isinstance(message, dict):
            logger.warning("codex sent a non-object JSON line; skipped: %r", line[:120])
            return
        try:
            self._route(message)
        except Exception:
            logger.exception("failed to route a codex message; reader continues")

    def _route(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method is None:
            self._resolve_response(message)
        elif "id" in message:
            request = ServerRequest(message["id"], str(method), message.get("params") or {})
            self._spawn(self._answer(request), f"answer-{method}")
        else:
            self._deliver(Notification(str(method), message.get("params") or {}))

    def _resolve_response(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        entry = self._pending.get(request_id) if isinstance(request_id, int) else None
        if entry is None:
            logger.debug("codex answered unknown or expired request id %r", request_id)
            return
        method, future = entry
        if future.done():
            return
        error = message.get("error")
        if error is not None:
            if not isinstance(error, Mapping):
                error = {"code": 0, "message": str(error)}
            future.set_exception(
                AppServerError(method, int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
            )
        else:
            future.set_result(message.get("result"))

    def _deliver(self, event: Notification) -> None:
        thread_id = event.thread_id
        if thread_id is None:
            for listener in self._global_listeners:
                listener(event)
            logger.debug("codex notification %s", event.method)
            return
        subs = self._subscribers.get(thread_id)
        if subs:
            for sub in subs:
                sub._push(event)
            return
        buffer = self._orphans.get(thread_id)
        if buffer is None:
            buffer = collections.deque(maxlen=ORPHAN_EVENTS_PER_THREAD)
            self._orphans[thread_id] = buffer
            while len(self._orphans) > ORPHAN_THREADS:
                self._orphans.popitem(last=False)
        buffer.append(event)

    async def _answer(self, request: ServerRequest) -> None:
        """Produce exactly one answer for a server request, whatever the policy does."""
        try:
            answer: Answer = await asyncio.wait_for(self._policy(request), self._server_request_deadline)
        except TimeoutError:
            answer = decline_answer(request.method, f"no decision within {self._server_request_deadline:g}s")
        except Exception:
            logger.exception("server request policy failed for %s", request.method)
            answer = decline_answer(request.method, "policy error")
        logger.info(
            "codex server request %s id=%s thread=%s answered: %s",
            request.method,
            request.id,
            request.thread_id or "-",
            answer.summary or "result",
        )
        try:
            await self._send(answer.to_wire(request.id), asyncio.get_running_loop().time() + self._write_timeout)
        except (AppServerExited, TimeoutError):
            logger.info("could not answer %s id=%s: app-server gone or hung", request.method, request.id)

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Read stderr continuously so the child never blocks on a full pipe."""
        assert proc.stderr is not None
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:
                continue
            if not line:
                return
            text = _ANSI_ESCAPE.sub("", line.decode(errors="replace")).rstrip()[:STDERR_LINE_CHARS]
            if text:
                self._stderr_tail.append(text)
                logger.info("codex stderr: %s", text)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        """Catch a child that exits while something else still holds its stdout open."""
        await proc.wait()
        # Let the reader deliver what the child wrote last before we fail the waiters.
        await asyncio.sleep(EXIT_CODE_GRACE_S / 2)
        await self._on_channel_closed(proc, "exited")

    async def _on_channel_closed(self, proc: asyncio.subprocess.Process, reason: str) -> None:
        if proc is not self._proc or self._exit is not None:
            return  # not current, or already handled (a stop we asked for sets _exit first)
        if proc.returncode is None:
            await _wait_exit(proc, EXIT_CODE_GRACE_S)
        if proc is not self._proc or self._exit is not None:
            return
        logger.error("codex app-server pid=%d %s rc=%s", proc.pid, reason, proc.returncode)
        self._signal_child_group(proc, signal.SIGKILL)
        self._fail_all(AppServerExited(reason, proc.returncode, self.stderr_tail()))

    def _fail_all(self, exc: AppServerExited) -> None:
        """Fail every pending request and subscription with the same error."""
        if self._exit is None:
            self._exit = exc
        for _method, future in list(self._pending.values()):
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        # Failed subscriptions are detached: events of the next child go to fresh subscribers.
        for subs in self._subscribers.values():
            for sub in subs:
                sub._fail(exc)
        self._subscribers.clear()
        self._orphans.clear()

    def stderr_tail(self) -> str:
        """The last lines codex wrote to stderr (bounded)."""
        return "\n".join(self._stderr_tail)


async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Wait for the child to exit; True if it did within ``timeout``."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal the child's process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc field 22), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # field 3 (state) onwards
    return int(fields[19]) if len(fields) > 19 else None


def descendants(root: int) -> list[int]:
    """Pids below ``root`` (Linux /proc), so children that left the process group die too."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found
