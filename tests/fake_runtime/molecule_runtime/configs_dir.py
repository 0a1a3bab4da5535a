"""Stand-in for the runtime's configs-dir resolver (same order), counting its calls."""

from __future__ import annotations

import os
from pathlib import Path

FAKE_RUNTIME = True

#: One entry per ``resolve()`` call, so tests can prove the seam delegated here.
RESOLVE_CALLS: list[Path] = []


def resolve() -> Path:
    """Explicit ``CONFIGS_DIR`` > writable ``/configs`` > ``$HOME/.molecule-workspace``."""
    explicit = os.environ.get("CONFIGS_DIR", "").strip()
    if explicit:
        path = Path(explicit)
        path.mkdir(parents=True, exist_ok=True)
    elif Path("/configs").is_dir() and os.access("/configs", os.W_OK):
        path = Path("/configs")
    else:
        path = Path.home() / ".molecule-workspace"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    RESOLVE_CALLS.append(path)
    return path
