"""Stand-in for the runtime's process-wide wedge flag (same API, same first-reason-wins rule)."""

from __future__ import annotations

import logging

FAKE_RUNTIME = True

logger = logging.getLogger(__name__)

#: ``reason`` is None while healthy.
_STATE: dict[str, str | None] = {"reason": None}


def is_wedged() -> bool:
    """True while a reason is recorded."""
    return _STATE["reason"] is not None


def wedge_reason() -> str:
    """The recorded reason, ``""`` when healthy."""
    return _STATE["reason"] or ""


def mark_wedged(reason: str) -> None:
    """Record the first reason only."""
    if _STATE["reason"] is None:
        _STATE["reason"] = reason
        logger.error("fake runtime wedged: %s", reason)


def clear_wedge() -> None:
    """Forget the reason."""
    _STATE["reason"] = None


def reset_for_test() -> None:
    """Same as ``clear_wedge``."""
    _STATE["reason"] = None
