"""The benchmark runs end to end (``bench/run.py --quick``) and writes every figure it promises.

No target is asserted: timings on a shared CI machine are not a test signal. ``--quick`` takes
~25 s on 2 cores, under the ~120 s budget, so the smoke run is the real quick mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
assert _spec and _spec.loader
_bench = importlib.util.module_from_spec(_spec)
_otel = os.environ.get("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED")
_spec.loader.exec_module(_bench)  # sets that env var by default: undo, the suite decides it
if _otel is None:
    os.environ.pop("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", None)
KEYS = _bench.KEYS

SMOKE_TIMEOUT_S = 240


@pytest.mark.real_codex
def test_quick_benchmark_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    missing = [key for key in KEYS if key not in figures]
    assert not missing, missing
    assert figures["quick"] is True
    assert {"nproc", "cpu"} <= figures["machine"].keys()
    for key in ("overhead_p50_ms", "overhead_p95_ms", "overhead_ratio_p50", "concurrency_ratio_8",
                "shared_thread_ratio_8", "exec_speedup", "first_chunk_ms", "cold_start_ms",
                "cold_start_direct_ms", "rss_mb_8"):
        assert isinstance(figures[key], int | float), (key, figures[key])
    assert isinstance(figures["tokens_check"], bool)
