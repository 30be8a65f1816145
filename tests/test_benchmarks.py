"""The benchmarks run: smoke tests, no timing asserted (wall-clock thresholds would flake)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(script: str, *args: str) -> str:
    """``script --quick --repeats 3 ARGS``'s output; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--repeats", "3", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_step_overhead_quick_runs_and_prints_its_table() -> None:
    out = run_quick("step_overhead.py", "--models", "tiny_mlp")
    assert "candidate" in out and "ms/step" in out and "overhead" in out and "÷ loop" in out
    # The correctness guard ran before anything was timed, and passed.
    assert "check, one SGD step from the same start" in out
    assert "FAILED" not in out
    assert "| model | workload | plain step |" in out


def test_decay_overhead_quick_runs_and_checks_before_timing() -> None:
    out = run_quick("decay_overhead.py")
    # Every candidate made the same 3 steps as the hand-built groups before anything was timed.
    assert "weights equal to the hand-built groups': ok" in out
    for label in ("hand-built groups", "regdsl groups", "regdsl attached", "regdsl fold", "attached + penalty()"):
        assert label in out
    assert "median absolute deviation" in out
