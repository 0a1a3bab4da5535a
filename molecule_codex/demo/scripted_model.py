"""A loopback fake of the OpenAI Responses API (SSE) that real codex talks to in tests, demo and benches.

Why it exists: every test, the offline demo and the benchmarks need a model that answers instantly,
deterministically and on cue (errors, cut streams, stalls, held streams), without network or keys.
Codex is pointed at it through a custom provider (see :func:`write_codex_config`).

Wire behaviour (stdlib ``http.server``, HTTP/1.1 keep-alive, chunked SSE, TCP_NODELAY, each frame
sent with one ``sendall`` so nothing waits in a buffer):

* ``POST /v1/responses`` - recorded as a :class:`RecordedRequest`, answered with the next reply.
* ``GET /v1/models`` - ``{"data": [], "models": []}``; not recorded.

Choosing a reply, per request: first the FIFO filled by :meth:`ScriptedModel.enqueue`, else
``model.responder(record)`` (default :func:`default_responder`). Replies are the frozen dataclasses
:class:`Text`, :class:`ToolCall`, :class:`FunctionCall`, :class:`CustomToolCall`, :class:`HttpError`,
:class:`StreamCut`, :class:`Stall` and :class:`Hold`. A :class:`ToolCall` makes codex run the command
and POST again with its output; the *next* reply answers that request. :class:`FunctionCall` calls
any other function tool (an MCP tool with ``namespace="mcp__<server>"``, ``request_user_input``);
:class:`CustomToolCall` a freeform tool (``apply_patch``, which codex offers only to models in its
catalog: run such tests with a catalog slug such as ``gpt-5.5``).

Directives understood by :func:`default_responder`, written anywhere in the user prompt. They make
concurrent tests unambiguous, where one shared FIFO would not say which thread gets which reply:

* ``[sleep=SECONDS]`` - stream the final text over that many seconds (spread over its chunks).
* ``[tool=COMMAND]`` - first answer with an ``exec_command`` call running COMMAND (no ``]`` inside);
  repeatable, run in order. Once every tool output is back, the text reply is
  ``echo: <prompt>`` followed by one ``\\n[tool exit=<code>] <output>`` line per tool (output
  stripped and cut to ``TOOL_SUMMARY_CHARS``).
* ``[escalate=COMMAND]`` - like ``[tool=...]`` but with ``sandbox_permissions: require_escalated``,
  so under ``approvalPolicy`` ``on-request``/``untrusted`` codex asks the client for approval.
* ``[patch=PATH]`` - first answer with an ``apply_patch`` that adds PATH (relative to the thread's
  cwd) holding ``PATCH_CONTENT``; needs a catalog model slug (see above).

Review mode: a request whose prompt is codex's review instruction (``Review the ... changes ...``)
gets :func:`review_findings` as JSON, the shape codex parses into the ``exitedReviewMode`` item.

Otherwise, without directives the reply is ``Text("echo: " + <prompt>)`` where ``<prompt>`` is
:attr:`RecordedRequest.last_user_text`.

What codex 0.163.0 sends (observed with ``codex exec`` and ``app-server``): body keys ``model``,
``stream`` (true), ``input`` (the whole history, every time), ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``reasoning``, ``store`` (false), ``include``, ``prompt_cache_key`` (the
thread id) and ``client_metadata``; no ``instructions``. ``input`` starts with ``developer``
messages (the system prompt, ``<skills_instructions>``, permissions), then one ``user`` message
whose ``input_text`` parts are codex's context: ``# AGENTS.md instructions for <dir>`` (when an
AGENTS.md exists) and ``<environment_context>...</environment_context>``. Then, per turn, the real
prompt as its own ``user`` message, assistant ``message`` items, ``function_call`` and
``function_call_output`` items (``output`` like ``"Chunk ID: ..\nWall time: ..\nProcess exited
with code 0\nOriginal token count: ..\nOutput:\n<text>"``). :attr:`RecordedRequest.all_user_texts`
keeps only ``role == "user"`` message text that is not injected context, where injected means the
whole text is one ``<tag>...</tag>`` block (``environment_context``, ``turn_aborted``, ...) or starts
with the AGENTS.md preamble. Headers: ``authorization: Bearer <env key>``, ``originator``
(``codex_exec`` or the app-server client name), ``session-id``, ``thread-id``,
``x-client-request-id``, ``x-codex-window-id``, ``x-codex-turn-metadata`` (JSON with ``turn_id``),
``accept: text/event-stream``, ``content-length`` (plain JSON body, not compressed).
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import itertools
import json
import logging
import re
import socket
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Name of the env var codex reads the provider key from; any dummy value works.
SCRIPTED_API_KEY_ENV = "SCRIPTED_MODEL_API_KEY"
#: Provider id written into config.toml.
SCRIPTED_PROVIDER_ID = "scripted"
DEFAULT_MODEL = "scripted-model"

#: Token counts of the default usage block: fixed, so tests can predict what codex reports.
DEFAULT_INPUT_TOKENS = 100
DEFAULT_CACHED_TOKENS = 20
DEFAULT_REASONING_TOKENS = 0

#: How often waits (stall, hold, delays) look at the stop flag and for a closed client socket.
POLL_INTERVAL_S = 0.02
#: Default bound for :meth:`ScriptedModel.wait_for_requests`.
DEFAULT_WAIT_TIMEOUT_S = 10.0
#: Bound on joining the serving and handler threads in :meth:`ScriptedModel.stop`.
STOP_JOIN_TIMEOUT_S = 5.0
#: Largest request body accepted; codex resends the whole history, so be generous.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Codex's shell tool in 0.163.0.
EXEC_TOOL_NAME = "exec_command"
#: Cap on the tool output quoted back by the default responder.
TOOL_SUMMARY_CHARS = 200
#: Codex's freeform file-edit tool (offered to catalog models only).
APPLY_PATCH_TOOL_NAME = "apply_patch"
#: What a ``[patch=PATH]`` directive writes into PATH.
PATCH_CONTENT = "patched by codex"
#: Title of the one finding :func:`review_findings` reports.
REVIEW_FINDING_TITLE = "[P1] Scripted finding"

_SLEEP_RE = re.compile(r"\[sleep=(\d+(?:\.\d+)?)\]")
_TOOL_RE = re.compile(r"\[(tool|escalate|patch)=([^\]]+)\]")
_REVIEW_PROMPT_RE = re.compile(r"^Review the (?:current )?code changes")
_EXIT_CODE_RE = re.compile(r"exited with code (-?\d+)")
_WORD_RE = re.compile(r"\s*\S+\s*")
_INJECTED_BLOCK_RE = re.compile(r"^<([A-Za-z_][\w-]*)>.*</\1>$", re.DOTALL)
_INJECTED_PREFIXES = ("# AGENTS.md instructions for ",)


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage put in ``response.completed``; codex sums it into ``thread/tokenUsage/updated``."""

    input_tokens: int = DEFAULT_INPUT_TOKENS
    cached_tokens: int = DEFAULT_CACHED_TOKENS
    output_tokens: int = 0
    reasoning_tokens: int = DEFAULT_REASONING_TOKENS

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_json(self) -> dict[str, Any]:
        """The Responses-API ``usage`` object."""
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Text:
    """An assistant message streamed as ``chunks`` deltas (default: one per word).

    ``first_delay`` is slept before the first delta, ``chunk_delay`` between deltas. ``usage``
    defaults to :class:`Usage` with ``output_tokens`` = number of deltas.
    """

    text: str
    chunks: int | None = None
    first_delay: float = 0.0
    chunk_delay: float = 0.0
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A ``function_call`` to codex's ``exec_command``; ``login: false`` keeps it fast."""

    cmd: str
    workdir: str | None = None
    call_id: str | None = None
    sandbox_permissions: str | None = None
    justification: str | None = None
    usage: Usage | None = None

    def arguments(self) -> str:
        """The JSON ``arguments`` string codex parses."""
        args: dict[str, Any] = {"cmd": self.cmd, "login": False}
        for key in ("workdir", "sandbox_permissions", "justification"):
            value = getattr(self, key)
            if value is not None:
                args[key] = value
        return json.dumps(args)


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A ``function_call`` to any codex function tool; MCP tools need ``namespace="mcp__<server>"``."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    namespace: str | None = None
    call_id: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class CustomToolCall:
    """A freeform ``custom_tool_call`` (codex's ``apply_patch``: ``input`` is the patch text)."""

    input: str
    name: str = APPLY_PATCH_TOOL_NAME
    call_id: str | None = None
    usage: Usage | None = None


def add_file_patch(path: str, content: str = PATCH_CONTENT) -> CustomToolCall:
    """An ``apply_patch`` call that creates ``path`` (relative to the thread's cwd) with ``content``."""
    lines = "".join(f"+{line}\n" for line in content.splitlines())
    return CustomToolCall(input=f"*** Begin Patch\n*** Add File: {path}\n{lines}*** End Patch\n")


@dataclass(frozen=True, slots=True)
class HttpError:
    """A plain HTTP error response; a dict body is sent as JSON, None gives an OpenAI-style error."""

    status: int
    body: dict[str, Any] | str | None = None


@dataclass(frozen=True, slots=True)
class StreamCut:
    """Stream ``text_before`` as deltas, then close the connection without ``response.completed``."""

    text_before: str = "partial"


@dataclass(frozen=True, slots=True)
class Stall:
    """Send headers and ``response.created``, then go silent for ``seconds`` and close the connection.

    Ends early when the server stops or the client goes away, so it never outlives a test.
    """

    seconds: float


@dataclass(frozen=True, slots=True)
class Hold:
    """Play ``then`` but pause mid-stream until ``gate`` is set (for cancel/interrupt tests).

    The pause comes after ``response.created`` and ``after_deltas`` text deltas (for a
    :class:`Text`; other replies pause right after ``response.created``; an :class:`HttpError`
    pauses before anything is sent). ``reached`` (optional) is set when the pause begins, so a test
    knows the model stream is open. Stopping the server or a client disconnect ends the pause.
    Codex's ``stream_idle_timeout_ms`` still runs during the pause: raise it for long holds.
    """

    gate: threading.Event
    then: Reply
    after_deltas: int = 0
    reached: threading.Event | None = None

    def __post_init__(self) -> None:
        if isinstance(self.then, Hold):
            raise TypeError("Hold(then=Hold(...)) is not supported: one pause per reply")


Reply = Text | ToolCall | FunctionCall | CustomToolCall | HttpError | StreamCut | Stall | Hold


# --------------------------------------------------------------------------- recording


def _content_texts(content: Any) -> list[str]:
    """Texts of a message's content (a string or a list of ``input_text``/``output_text`` parts)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]


def is_injected_context(text: str) -> bool:
    """Whether a user-role text is codex's own context (environment block, AGENTS.md, markers).

    Codex wraps what it injects in one whole ``<tag>...</tag>`` block; a real prompt rarely is one.
    """
    stripped = text.strip()
    return bool(_INJECTED_BLOCK_RE.match(stripped)) or stripped.startswith(_INJECTED_PREFIXES)


def _output_text(output: Any) -> str:
    """A ``function_call_output.output`` as text (codex sends a string or a list of parts)."""
    if isinstance(output, str):
        return output
    return "\n".join(_content_texts(output))


@dataclass(eq=False)
class RecordedRequest:
    """One ``POST /responses``: what codex sent, what it got, and when.

    Filled in while the reply streams: ``first_delta_at``, ``finished_at`` (``time.perf_counter``
    seconds), ``status``, ``usage`` and ``client_disconnected`` (a write failed or the client
    closed before the reply was complete: a cancelled turn really dropped the model stream).
    """

    index: int
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    reply: Reply | None = None
    status: int | None = None
    usage: Usage | None = None
    first_delta_at: float | None = None
    finished_at: float | None = None
    client_disconnected: bool = False
    _done: threading.Event = field(default_factory=threading.Event, repr=False, init=False)

    @property
    def input(self) -> list[dict[str, Any]]:
        value = self.body.get("input")
        return value if isinstance(value, list) else []

    def _user_message_texts(self, items: list[dict[str, Any]]) -> list[str]:
        texts = []
        for item in items:
            if not isinstance(item, dict) or item.get("role") != "user":
                continue
            if item.get("type", "message") != "message":
                continue
            parts = [t for t in _content_texts(item.get("content")) if not is_injected_context(t)]
            if parts:
                texts.append("\n".join(parts))
        return texts

    @property
    def all_user_texts(self) -> list[str]:
        """Real user prompts in ``input`` order (history included), codex's injected context left out."""
        return self._user_message_texts(self.input)

    @property
    def last_user_text(self) -> str:
        """The latest real user prompt, or ``""``."""
        texts = self.all_user_texts
        return texts[-1] if texts else ""

    @property
    def function_call_outputs(self) -> list[dict[str, Any]]:
        """Every ``function_call_output`` item in ``input``, in order."""
        return [item for item in self.input if item.get("type") == "function_call_output"]

    def tool_outputs_since_last_user(self) -> list[str]:
        """Outputs (as text) of tool calls made after the latest real user prompt."""
        outputs: list[str] = []
        for item in self.input:
            if item.get("type") in ("function_call_output", "custom_tool_call_output"):
                outputs.append(_output_text(item.get("output")))
            elif self._user_message_texts([item]):
                outputs = []
        return outputs

    def wait_finished(self, timeout: float) -> bool:
        """Block until the reply is over (completed, failed or abandoned); False on timeout."""
        return self._done.wait(timeout)


# --------------------------------------------------------------------------- default responder


def _tool_summary(output: str) -> str:
    """``[tool exit=<code>] <output>`` from codex's ``...exited with code N...Output:\\n<text>`` wrapper."""
    code = _EXIT_CODE_RE.search(output)
    _, marker, rest = output.partition("Output:\n")
    text = (rest if marker else output).strip()[:TOOL_SUMMARY_CHARS]
    return f"[tool exit={code.group(1) if code else '?'}] {text}"


def review_findings(prompt: str) -> str:
    """Codex's review-output JSON with one finding that quotes the review instruction it answers."""
    finding = {
        "title": REVIEW_FINDING_TITLE,
        "body": f"Scripted review of: {prompt}",
        "confidence_score": 0.9,
        "priority": 1,
        "code_location": {"absolute_file_path": "/dev/null", "line_range": {"start": 1, "end": 1}},
    }
    return json.dumps(
        {
            "findings": [finding],
            "overall_correctness": "patch is incorrect",
            "overall_explanation": "One scripted finding.",
            "overall_confidence_score": 0.8,
        }
    )


def _directive_reply(kind: str, value: str) -> Reply:
    """The tool call one ``[tool=…]``, ``[escalate=…]`` or ``[patch=…]`` directive asks for."""
    if kind == "escalate":
        return ToolCall(cmd=value, sandbox_permissions="require_escalated", justification=f"scripted: run {value}")
    if kind == "patch":
        return add_file_patch(value)
    return ToolCall(cmd=value)


def default_responder(request: RecordedRequest) -> Reply:
    """Echo the prompt, honouring the directives and review mode (module docstring)."""
    prompt = request.last_user_text
    if _REVIEW_PROMPT_RE.match(prompt):
        return Text(review_findings(prompt))
    tools = _TOOL_RE.findall(prompt)
    outputs = request.tool_outputs_since_last_user()
    if len(outputs) < len(tools):
        kind, value = tools[len(outputs)]
        return _directive_reply(kind, value.strip())
    text = "echo: " + prompt + "".join(f"\n{_tool_summary(out)}" for out in outputs)
    sleep = _SLEEP_RE.search(prompt)
    if not sleep:
        return Text(text)
    seconds = float(sleep.group(1))
    pieces = len(_split_text(text, None)) or 1
    return Text(text, first_delay=seconds / pieces, chunk_delay=seconds / pieces)


def _split_text(text: str, chunks: int | None) -> list[str]:
    """Deltas for ``text``: words (whitespace kept) or ``chunks`` near-equal slices."""
    if not text:
        return []
    if chunks is None:
        return _WORD_RE.findall(text) or [text]
    count = max(1, min(chunks, len(text)))
    size, extra = divmod(len(text), count)
    pieces, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


# --------------------------------------------------------------------------- streaming


class _Abort(Exception):
    """The stream must end now: the client went away or the server is stopping."""


class _Stream:
    """Writes one SSE reply on a handler's socket; every wait is cut short by stop or disconnect."""

    def __init__(self, sock: socket.socket, record: RecordedRequest, model: ScriptedModel) -> None:
        self._sock = sock
        self._record = record
        self._model = model
        self.headers_sent = False
        self.created_sent = False

    # ---- low level

    def _write(self, data: bytes) -> None:
        if self._model.stopping:
            raise _Abort
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._record.client_disconnected = True
            raise _Abort from exc

    def _client_gone(self) -> bool:
        """Peek without blocking: EOF or reset mid-reply means the client hung up.

        (``select`` is avoided: it fails on descriptors above FD_SETSIZE, which busy benches reach.)
        """
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def wait(self, seconds: float = 0.0, gate: threading.Event | None = None) -> None:
        """Sleep ``seconds`` (or until ``gate`` is set), polling for stop and client disconnect."""
        deadline = time.perf_counter() + seconds
        while True:
            if self._model.stopping:
                raise _Abort
            if self._client_gone():
                self._record.client_disconnected = True
                raise _Abort
            if gate is not None:
                if gate.wait(POLL_INTERVAL_S):
                    return
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._model.stop_event.wait(min(remaining, POLL_INTERVAL_S))

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n"
            "Transfer-Encoding: chunked\r\n"
            "\r\n"
        )
        self._write(head.encode("ascii"))
        self.headers_sent = True
        self._record.status = 200

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        """One SSE frame as one HTTP chunk, in a single send."""
        data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
        frame = f"event: {kind}\ndata: {data}\n\n".encode()
        self._write(b"%x\r\n%s\r\n" % (len(frame), frame))

    def end(self) -> None:
        """The terminating zero-length chunk: the response is complete, the connection reusable."""
        self._write(b"0\r\n\r\n")

    # ---- reply shapes

    def created(self, response_id: str) -> None:
        self.send_headers()
        if not self.created_sent:
            self.event("response.created", {"response": {"id": response_id, "status": "in_progress"}})
            self.created_sent = True

    def completed(self, response_id: str, usage: Usage) -> None:
        self._record.usage = usage
        self.event(
            "response.completed",
            {"response": {"id": response_id, "status": "completed", "usage": usage.to_json()}},
        )
        self.end()

    def delta(self, item_id: str, text: str) -> None:
        if self._record.first_delta_at is None:
            self._record.first_delta_at = time.perf_counter()
        self.event(
            "response.output_text.delta",
            {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": text},
        )


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


# --------------------------------------------------------------------------- HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to the owning :class:`ScriptedModel`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("scripted model %s: " + format, self.address_string(), *args)

    def _send_json(self, status: int, payload: Any, *, content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> str:
        """The request path without query string or trailing slash (codex adds ``?client_version=``)."""
        return urllib.parse.urlsplit(self.path).path.rstrip("/")

    def do_GET(self) -> None:
        if self._route().endswith("/models"):
            self._send_json(200, {"data": [], "models": []})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, {"error": {"message": "request body too large"}})
            return
        raw = self.rfile.read(length) if length else b""
        if not self._route().endswith("/responses"):
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "request body is not JSON"}})
            return
        self.server.model._serve_responses(self, body if isinstance(body, dict) else {})


class _Server(http.server.HTTPServer):
    """HTTPServer with one daemon thread per connection, all tracked so stop() can close and join them."""

    daemon_threads = True
    allow_reuse_address = True
    #: http.server's default backlog is 5; 50 codex connections at once overflow it and, with
    #: retries off in tests, fail turns with "error sending request". A real endpoint takes more.
    request_queue_size = 256

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"scripted-model-conn-{client_address[1]}",
            daemon=True,
        )
        with self._lock:
            self._connections[thread] = request
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError:
            logger.debug("scripted model connection %s ended", client_address, exc_info=True)
        except Exception:
            logger.exception("scripted model connection %s failed", client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def close_connections(self, timeout: float) -> None:
        """Shut every open socket (wakes handlers blocked on keep-alive reads), then join them."""
        with self._lock:
            connections = list(self._connections.items())
        for _thread, sock in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread, _sock in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("scripted model: %s did not end within %.1f s", thread.name, timeout)


class ScriptedModel:
    """The fake Responses-API server. Start it, point codex at :attr:`base_url`, script replies.

    Thread-safe: codex may hold several streams at once (one per thread); replies and records are
    guarded by one lock.
    """

    def __init__(self, responder: Callable[[RecordedRequest], Reply] | None = None) -> None:
        self.responder: Callable[[RecordedRequest], Reply] = responder or default_responder
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[Reply] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> ScriptedModel:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread. Idempotent."""
        with self._lock:
            if self._server is not None:
                return self
            self.stop_event.clear()
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="scripted-model",
                daemon=True,
            )
            self._thread.start()
        logger.info("scripted model listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, end open streams, close sockets and join threads. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server, self._thread = None, None
        if server is None:
            return
        self.stop_event.set()
        server.shutdown()
        server.server_close()
        server.close_connections(STOP_JOIN_TIMEOUT_S)
        if thread is not None:
            thread.join(STOP_JOIN_TIMEOUT_S)
        logger.info("scripted model stopped")

    def __enter__(self) -> ScriptedModel:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    @property
    def port(self) -> int:
        server = self._server
        if server is None:
            raise RuntimeError("ScriptedModel is not running")
        return int(server.server_address[1])

    @property
    def base_url(self) -> str:
        """What codex's provider ``base_url`` must be; codex appends ``/responses``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- scripting and records

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies used, in order, before the responder is asked."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """Queued replies not consumed yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every recorded ``/responses`` request, oldest first."""
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = DEFAULT_WAIT_TIMEOUT_S) -> list[RecordedRequest]:
        """Block until ``count`` requests were recorded; TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"{len(self._requests)} of {count} requests within {timeout} s")
            return list(self._requests)

    def _next_reply(self, record: RecordedRequest) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        try:
            reply = self.responder(record)
        except Exception as exc:
            logger.exception("scripted model responder failed")
            return HttpError(500, {"error": {"message": f"responder failed: {exc}", "type": "server_error"}})
        if not isinstance(reply, Reply):
            logger.error("scripted model responder returned %r, not a reply", reply)
            return HttpError(500, {"error": {"message": f"not a scripted reply: {reply!r}", "type": "server_error"}})
        return reply

    # ---- serving (runs on connection threads)

    def _serve_responses(self, handler: _Handler, body: dict[str, Any]) -> None:
        received = time.perf_counter()
        headers = {key.lower(): value for key, value in handler.headers.items()}
        with self._changed:
            record = RecordedRequest(
                index=len(self._requests), path=handler.path, headers=headers, body=body, received_at=received
            )
            self._requests.append(record)
            self._changed.notify_all()
        reply = self._next_reply(record)
        record.reply = reply
        stream = _Stream(handler.connection, record, self)
        try:
            self._play(handler, stream, record, reply)
        except _Abort:
            handler.close_connection = True
            logger.debug("scripted model stream %d abandoned", record.index)
        finally:
            record.finished_at = time.perf_counter()
            record._done.set()

    def _play(self, handler: _Handler, stream: _Stream, record: RecordedRequest, reply: Reply) -> None:
        seq = next(self._ids)
        response_id = f"resp_{seq}"
        gate: Hold | None = None
        if isinstance(reply, Hold):
            gate, reply = reply, reply.then
        if isinstance(reply, HttpError):
            if gate is not None:
                self._pause(stream, gate)
            self._send_error(handler, record, reply)
            return
        stream.created(response_id)
        if isinstance(reply, Text):
            self._play_text(stream, reply, f"msg_{seq}", response_id, gate)
            return
        if gate is not None:
            self._pause(stream, gate)
        if isinstance(reply, ToolCall | FunctionCall | CustomToolCall):
            self._play_tool(stream, reply, seq, response_id)
        elif isinstance(reply, StreamCut):
            item_id = f"msg_{seq}"
            stream.event(
                "response.output_item.added", {"output_index": 0, "item": _message_item(item_id, "", "in_progress")}
            )
            for piece in _split_text(reply.text_before, None):
                stream.delta(item_id, piece)
            raise _Abort  # closes the socket mid-body: codex sees the stream disconnect
        elif isinstance(reply, Stall):
            stream.wait(reply.seconds)
            raise _Abort
        else:
            raise TypeError(f"not a scripted reply: {reply!r}")

    @staticmethod
    def _pause(stream: _Stream, hold: Hold) -> None:
        if hold.reached is not None:
            hold.reached.set()
        stream.wait(gate=hold.gate)

    def _play_text(self, stream: _Stream, reply: Text, item_id: str, response_id: str, hold: Hold | None) -> None:
        pieces = _split_text(reply.text, reply.chunks)
        hold_at = min(hold.after_deltas, len(pieces)) if hold is not None else -1
        stream.event(
            "response.output_item.added", {"output_index": 0, "item": _message_item(item_id, "", "in_progress")}
        )
        if not pieces and reply.first_delay > 0:
            stream.wait(reply.first_delay)
        for index, piece in enumerate(pieces):
            if index == hold_at and hold is not None:
                self._pause(stream, hold)
            delay = reply.first_delay if index == 0 else reply.chunk_delay
            if delay > 0:
                stream.wait(delay)
            stream.delta(item_id, piece)
        if hold is not None and hold_at == len(pieces):
            self._pause(stream, hold)
        stream.event(
            "response.output_item.done",
            {"output_index": 0, "item": _message_item(item_id, reply.text, "completed")},
        )
        stream.completed(response_id, reply.usage or Usage(output_tokens=len(pieces)))

    @staticmethod
    def _play_tool(
        stream: _Stream, reply: ToolCall | FunctionCall | CustomToolCall, seq: int, response_id: str
    ) -> None:
        item: dict[str, Any] = {"id": f"fc_{seq}", "call_id": reply.call_id or f"call_{seq}", "status": "completed"}
        if isinstance(reply, CustomToolCall):
            item.update(type="custom_tool_call", name=reply.name, input=reply.input)
            partial = {**item, "input": "", "status": "in_progress"}
        else:
            item["type"] = "function_call"
            if isinstance(reply, ToolCall):
                item.update(name=EXEC_TOOL_NAME, arguments=reply.arguments())
            else:
                item.update(name=reply.name, arguments=json.dumps(reply.arguments))
                if reply.namespace is not None:
                    item["namespace"] = reply.namespace
            partial = {**item, "arguments": "", "status": "in_progress"}
        stream.event("response.output_item.added", {"output_index": 0, "item": partial})
        stream.event("response.output_item.done", {"output_index": 0, "item": item})
        stream.completed(response_id, reply.usage or Usage(output_tokens=1))

    @staticmethod
    def _send_error(handler: _Handler, record: RecordedRequest, reply: HttpError) -> None:
        body = reply.body
        if body is None:
            body = {"error": {"message": f"scripted HTTP {reply.status}", "type": "scripted_error", "code": None}}
        payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        content_type = "text/plain; charset=utf-8" if isinstance(body, str) else "application/json"
        record.status = reply.status
        try:
            handler._send_json(reply.status, payload, content_type=content_type)
        except OSError as exc:
            record.client_disconnected = True
            raise _Abort from exc


# --------------------------------------------------------------------------- codex config


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON escaping is a valid subset for these values)."""
    return json.dumps(value)


def write_codex_config(
    codex_home: Path,
    base_url: str,
    *,
    model: str = DEFAULT_MODEL,
    env_key: str = SCRIPTED_API_KEY_ENV,
    stream_idle_timeout_ms: int = 3000,
    extra_toml: str = "",
) -> None:
    """Write ``codex_home/config.toml`` pointing codex at a scripted model, with every retry off.

    Retries are off so failure tests take one request, not 6-30 (brief §9); the three features are
    off because they retry forever, slow each new thread, or reach the network. ``extra_toml`` is
    appended verbatim (put top-level keys in it only if it has no tables before them). The child
    must get ``env_key`` in its environment, any value.
    """
    codex_home.mkdir(parents=True, exist_ok=True)
    text = f"""model = {_toml_string(model)}
model_provider = "{SCRIPTED_PROVIDER_ID}"

[model_providers.{SCRIPTED_PROVIDER_ID}]
name = "scripted"
base_url = {_toml_string(base_url)}
wire_api = "responses"
env_key = {_toml_string(env_key)}
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = {int(stream_idle_timeout_ms)}

[features]
unbounded_connection_retries = false
shell_snapshot = false
plugins = false
"""
    if extra_toml:
        text += "\n" + extra_toml.strip() + "\n"
    tomllib.loads(text)  # fail here, not inside codex, when extra_toml breaks the file
    (codex_home / "config.toml").write_text(text, encoding="utf-8")
