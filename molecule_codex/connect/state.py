"""The inbox's durable state: feed cursor, handled rows, replies not yet delivered, acked seq.

Why a file of its own: exactly-once delivery across ``kill -9`` needs each step on disk before
the next one happens. The order for one row is

1. the turn runs (nothing written: a crash re-runs it),
2. its reply is stored in ``outbox`` (a crash re-sends it without re-running the turn),
3. the platform accepts the reply,
4. the row moves from ``outbox`` to ``handled`` and the cursor advances past every row before it
   that is handled too (a crash after this never answers the row again).

The one window left is between 3 and 4: the platform has the reply but the file does not say so,
and a restart sends it once more. notify has no idempotency key, so no client can close it; peer
replies carry a message id derived from the row, which lets a receiver drop the copy.

Rows finish out of order (conversations run in parallel), so the cursor is the last row of the
handled *prefix* of the feed; handled rows after it are remembered by id. The file is JSON,
written 0600 and atomically (temp file, fsync, rename) on every change.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molecule_codex.providers import atomic_write_text

logger = logging.getLogger(__name__)

STATE_FILENAME = "connect-inbox.json"
LOCK_FILENAME = "connect.lock"
#: Handled ids kept for de-duplication after a cursor reset (a 410 re-reads the last ten minutes).
HANDLED_MEMORY = 5000


class StateLocked(RuntimeError):
    """Another ``connect`` holds this state directory."""


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for the life of the process (returns its fd).

    Two ``connect`` processes on one state directory would both answer every message. The lock is
    ``flock``: the kernel drops it when the process dies, ``kill -9`` included, so it never goes stale.
    """
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(Path(state_dir) / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLocked(f"another molecule-codex connect is running with the state directory {state_dir}; "
                          "stop it, or give this one its own --state-dir") from None
    return fd


@dataclass(slots=True)
class Pending:
    """A reply that was produced but not yet accepted by the platform."""

    text: str
    peer: str | None  # None: the canvas user (notify)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "peer": self.peer}


@dataclass(slots=True)
class InboxState:
    """What survives a restart; ``save()`` after every change."""

    path: Path
    cursor: str | None = None
    handled: OrderedDict[str, None] = field(default_factory=OrderedDict)
    outbox: dict[str, Pending] = field(default_factory=dict)
    acked_seq: int = 0

    @classmethod
    def load(cls, state_dir: Path) -> InboxState:
        """The saved state, or a fresh one; an unreadable file is moved aside, never a crash loop."""
        path = Path(state_dir) / STATE_FILENAME
        state = cls(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return state
        except (OSError, ValueError) as exc:
            aside = path.with_name(path.name + ".corrupt")
            logger.error("inbox state %s unreadable (%s): moved to %s; starting from the feed's last "
                         "ten minutes, already answered rows there may be answered again", path, exc, aside)
            path.replace(aside)
            return state
        cursor = data.get("cursor")
        state.cursor = cursor if isinstance(cursor, str) and cursor else None
        state.handled = OrderedDict((str(row), None) for row in data.get("handled") or [])
        for row, entry in (data.get("outbox") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("text"), str):
                peer = entry.get("peer")
                state.outbox[str(row)] = Pending(entry["text"], peer if isinstance(peer, str) else None)
        acked = data.get("acked_seq")
        state.acked_seq = acked if isinstance(acked, int) else 0
        return state

    def save(self) -> None:
        while len(self.handled) > HANDLED_MEMORY:
            self.handled.popitem(last=False)
        data = {
            "cursor": self.cursor,
            "handled": list(self.handled),
            "outbox": {row: pending.to_json() for row, pending in self.outbox.items()},
            "acked_seq": self.acked_seq,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(self.path, json.dumps(data))

    def is_handled(self, row_id: str) -> bool:
        return row_id in self.handled

    def mark_handled(self, row_id: str) -> None:
        self.outbox.pop(row_id, None)
        self.handled[row_id] = None
        self.handled.move_to_end(row_id)
