"""A stand-in ``molecule_runtime`` for tests, and helpers to run code with or without it.

The real runtime wheel is not installable here, and tests that need it must run anyway (skipped
executor tests never caught anything). ``FAKE_RUNTIME_DIR`` holds a ``molecule_runtime`` package
shaped like the real one; put that directory first on ``sys.path`` / ``PYTHONPATH`` and
``runtime_seam`` picks it up as if the runtime were installed.

Usage from any test module (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    from fake_runtime import use_fake_runtime, without_runtime

    def test_prompt_comes_from_the_platform():
        with use_fake_runtime("adapter") as seam:   # fresh runtime_seam + adapter on the stand-in
            adapter = importlib.import_module("molecule_codex.adapter")
            assert seam.RUNTIME_AVAILABLE
            ...

    subprocess.run([...], env=fake_runtime_env())  # a fresh interpreter on the stand-in
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

#: Directory to put on ``sys.path`` so ``import molecule_runtime`` finds the stand-in.
FAKE_RUNTIME_DIR = Path(__file__).resolve().parent

#: The project root (where the ``molecule_codex`` package lives).
REPO_ROOT = FAKE_RUNTIME_DIR.parents[1]

_PACKAGE = "molecule_codex"
_SEAM = f"{_PACKAGE}.runtime_seam"
_RUNTIME_PACKAGE = "molecule_runtime"


def fake_runtime_env(base: Mapping[str, str] | None = None, *, with_runtime: bool = True) -> dict[str, str]:
    """Environment for a child interpreter: the project importable, the stand-in only if asked.

    ``base`` defaults to ``os.environ``; an inherited ``PYTHONPATH`` is kept after ours.
    """
    env = dict(os.environ if base is None else base)
    paths = [str(FAKE_RUNTIME_DIR)] if with_runtime else []
    paths.append(str(REPO_ROOT))
    inherited = env.get("PYTHONPATH", "")
    kept = [p for p in inherited.split(os.pathsep) if p and p != str(FAKE_RUNTIME_DIR)]
    env["PYTHONPATH"] = os.pathsep.join(paths + kept)
    return env


class _BlockRuntime(importlib.abc.MetaPathFinder):
    """Makes ``import molecule_runtime`` fail as if the wheel were not installed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        if fullname == _RUNTIME_PACKAGE or fullname.startswith(_RUNTIME_PACKAGE + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=_RUNTIME_PACKAGE)


def _owned(name: str, dependents: Sequence[str]) -> bool:
    qualified = [f"{_PACKAGE}.{dependent}" for dependent in dependents]
    return name in (_SEAM, _RUNTIME_PACKAGE, *qualified) or name.startswith(_RUNTIME_PACKAGE + ".")


def _bind_in_package(modules: Mapping[str, ModuleType]) -> None:
    """Point ``molecule_codex.<leaf>`` attributes at ``modules``: ``from pkg import leaf`` reads them."""
    package = sys.modules.get(_PACKAGE)
    for name, module in modules.items():
        if package is not None and name.startswith(_PACKAGE + "."):
            setattr(package, name.removeprefix(_PACKAGE + "."), module)


@contextmanager
def _fresh_seam(dependents: Sequence[str], *, fake: bool) -> Iterator[ModuleType]:
    """Re-import ``runtime_seam`` (and ``dependents``) under a runtime choice; restore afterwards."""
    saved = {name: mod for name, mod in sys.modules.items() if _owned(name, dependents)}
    for name in saved:
        del sys.modules[name]
    blocker = None
    if fake:
        sys.path.insert(0, str(FAKE_RUNTIME_DIR))
    else:
        blocker = _BlockRuntime()
        sys.meta_path.insert(0, blocker)
    try:
        yield importlib.import_module(_SEAM)
    finally:
        if fake:
            sys.path.remove(str(FAKE_RUNTIME_DIR))
        else:
            sys.meta_path.remove(blocker)
        for name in [name for name in sys.modules if _owned(name, dependents)]:
            del sys.modules[name]
        sys.modules.update(saved)
        _bind_in_package(saved)


@contextmanager
def use_fake_runtime(*dependents: str) -> Iterator[ModuleType]:
    """Run a block with ``runtime_seam`` bound to the stand-in runtime; yields the fresh seam.

    ``dependents`` are package modules that import the seam at import time (``"adapter"`` for
    ``molecule_codex.adapter``): they are dropped from ``sys.modules`` so the block re-imports them
    against the fresh seam, and restored on exit. The stand-in's modules start fresh too (empty call lists).
    """
    with _fresh_seam(dependents, fake=True) as seam:
        yield seam


@contextmanager
def without_runtime(*dependents: str) -> Iterator[ModuleType]:
    """Like ``use_fake_runtime`` but with ``molecule_runtime`` unimportable (standalone seam)."""
    with _fresh_seam(dependents, fake=False) as seam:
        yield seam
