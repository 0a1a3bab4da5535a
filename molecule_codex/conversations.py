"""The persisted map from A2A conversation (context id) to codex thread id.

Why a database file: the runtime's shutdown snapshot is skipped on SIGTERM, so the map must be
on disk after every change, and a half-written file must never cost the other conversations.
SQLite gives atomic commits; the file is created 0600 inside a 0700 directory.

The executor calls it from worker threads (``asyncio.to_thread``): a write may wait up to
``BUSY_TIMEOUT_S`` for another process's lock, and that must not freeze the event loop, so
every method is safe to call from any thread (one connection, one lock).

A file that is not a readable database is moved aside (kept as a backup) with a warning, and the
service continues with an empty map. The map no longer knows which conversations existed, so
those conversations start fresh threads without a per-conversation notice; the warning in the log
names the backup, from which an operator can restore bindings (``restore_state`` accepts them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

DB_FILENAME = "conversations.sqlite3"
#: A write that waits longer than this for another process's lock is an error, not a hang.
BUSY_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    context_id TEXT PRIMARY KEY,
    thread_id  TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""


class ConversationStoreError(RuntimeError):
    """The state directory cannot hold the conversation map (unwritable, full, …)."""


class ConversationStore:
    """context_id → thread_id, durable after every ``bind``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / DB_FILENAME
        self._lock = threading.Lock()
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise ConversationStoreError(
                f"cannot open the conversation map at {self.path}: {exc}. "
                "Make the state directory writable (MOLECULE_CODEX_STATE_DIR / --state-dir)."
            ) from exc

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            # Create the file 0600 before sqlite opens it, so it is never world-readable.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db: sqlite3.Connection | None = None
        try:
            db = self._connect()
            # Every page, not just the table's first: a damaged index page fails lookups later otherwise.
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            return db
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise  # full, read-only, locked, I/O: no proof of damage, so the map stays where it is
            backup = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            logger.warning("conversation map %s is unreadable (%s); moved to %s, starting empty",
                           self.path, exc, backup)
            for suffix in ("-wal", "-shm"):  # the damaged file's journal must not be replayed into the new one
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, backup.with_name(backup.name + suffix))
            os.replace(self.path, backup)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        return db

    def get(self, context_id: str) -> str | None:
        """The codex thread of a conversation, if it has one."""
        with self._lock:
            row = self._db.execute(
                "SELECT thread_id FROM conversations WHERE context_id = ?", (context_id,)
            ).fetchone()
        return row[0] if row else None

    def bind(self, context_id: str, thread_id: str) -> None:
        """Record (or move) a conversation's thread; durable when this returns."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO conversations (context_id, thread_id, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(context_id) DO UPDATE SET "
                    "thread_id = excluded.thread_id, updated_at = excluded.updated_at",
                    (context_id, thread_id, time.time()),
                )
        except sqlite3.Error as exc:
            raise ConversationStoreError(f"cannot save the conversation map at {self.path}: {exc}") from exc

    def unbind(self, context_id: str) -> None:
        """Forget a conversation's thread (chat /new); durable when this returns. The rollout stays."""
        try:
            with self._lock:
                self._db.execute("DELETE FROM conversations WHERE context_id = ?", (context_id,))
        except sqlite3.Error as exc:
            raise ConversationStoreError(f"cannot save the conversation map at {self.path}: {exc}") from exc

    def touch(self, context_id: str) -> None:
        """Mark a conversation as used now (for 'most recent thread' lookups)."""
        with contextlib.suppress(sqlite3.Error), self._lock:
            self._db.execute("UPDATE conversations SET updated_at = ? WHERE context_id = ?", (time.time(), context_id))

    def most_recent(self) -> tuple[str, str] | None:
        """(context_id, thread_id) of the most recently used conversation."""
        with self._lock:
            row = self._db.execute(
                "SELECT context_id, thread_id FROM conversations ORDER BY updated_at DESC LIMIT 1"
            ).fetchone()
        return (row[0], row[1]) if row else None

    def snapshot(self) -> dict[str, str]:
        """Every binding, for the runtime's pre-stop snapshot."""
        with self._lock:
            return dict(self._db.execute("SELECT context_id, thread_id FROM conversations").fetchall())

    def restore(self, bindings: Mapping[str, str]) -> int:
        """Add bindings from a snapshot without overwriting newer ones; returns how many were new."""
        added = 0
        for context_id, thread_id in bindings.items():
            if isinstance(context_id, str) and isinstance(thread_id, str) and self.get(context_id) is None:
                self.bind(context_id, thread_id)
                added += 1
        return added

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error), self._lock:
            self._db.close()
