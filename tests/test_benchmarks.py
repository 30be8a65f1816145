"""The benchmarks run: smoke tests, no timing asserted (wall-clock thresholds would flake)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from timing import paired_overhead, ratio_interval


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
    assert "noise (90%)" in out


@pytest.mark.parametrize("script", ["step_overhead.py", "term_work.py"])
def test_no_compile_and_workloads_narrow_a_full_size_run(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--no-compile", "--workloads", "group_lasso"]
        + ["--models", "tiny_mlp", "--repeats", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-- group_lasso:" in result.stdout and "-- elastic net:" not in result.stdout
    assert "n/a (--no-compile" in result.stdout and "--quick" not in result.stdout
    bad = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--workloads", "ridge"], check=False, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown workload(s) ridge" in bad.stderr


def test_term_work_quick_checks_then_times_each_candidates_work() -> None:
    out = run_quick("term_work.py", "--models", "tiny_mlp")
    # Both workloads were checked against the loop's gradients before any timing, and passed.
    assert out.count("check, gradients added to zeros on a float64 copy") == 2
    assert "FAILED" not in out
    assert out.count("ok") >= 4
    for label in ("tutorial loop", "loss path", "fast path", "floor (alone)"):
        assert out.count(f"   {label}") == 2
    assert "| tiny_mlp | group_lasso |" in out


def test_term_work_check_refuses_a_candidate_that_adds_other_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    import term_work
    import torch

    bench = term_work.build_bench("tiny_mlp", True, torch.device("cpu"))
    rules = term_work.WORKLOADS["elastic net"]
    assert all(text.endswith(" ok") for text in term_work.check(bench, rules, "elastic net").values())
    # A loop with twice the strengths: regdsl's gradients are now half of it, and both are refused.
    honest = term_work.tutorial_penalty

    def doubled(workload: str, params: list[torch.nn.Parameter]) -> Any:
        penalty = honest(workload, params)
        return lambda: 2 * penalty()

    monkeypatch.setattr(term_work, "tutorial_penalty", doubled)
    checked = term_work.check(bench, rules, "elastic net")
    assert set(checked) == {"loss path", "fast path"}
    assert all(text.endswith(" FAILED") for text in checked.values())


def test_term_work_checks_the_compiled_path_before_timing_it() -> None:
    import term_work
    import torch

    torch._dynamo.reset()  # as term_work.py does per workload: other tests' compiled steps count toward dynamo's limits
    bench = term_work.build_bench("tiny_mlp", True, torch.device("cpu"))
    rules = term_work.WORKLOADS["group_lasso"]
    params = term_work.params_by_name(bench.model, term_work.regularized(term_work.compile_rules(rules, bench.model)))
    _, path_step, path_model = term_work.compiled_pair(bench, rules)
    assert term_work.check_compiled(bench, "group_lasso", params, path_step, path_model).endswith(" ok")
    # A step that folds nothing (the plain compiled SGD on the same copy's weights) is refused.
    _, _, copy = term_work.compiled_pair(bench, rules)
    plain_on_copy = torch.compile(torch.optim.SGD(copy.parameters(), lr=term_work.LR).step)
    assert term_work.check_compiled(bench, "group_lasso", params, plain_on_copy, copy).endswith(" FAILED")


def test_overhead_is_the_median_of_differences_within_rounds() -> None:
    # The machine slows down in round 3: the differences within each round still say 0.1 or 0.2.
    base = [1.0, 1.0, 5.0, 1.0, 1.0]
    assert paired_overhead([1.1, 1.2, 5.1, 1.1, 1.2], base) == pytest.approx(0.1)
    assert paired_overhead([1.2, 1.2, 5.2, 1.1, 1.1], base) == pytest.approx(0.2)


def test_noise_range_of_the_ratio() -> None:
    plain = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0]
    loop = [p + 0.4 for p in plain]
    # Without noise in the differences every resampling gives the same ratio.
    assert ratio_interval([p + 0.1 for p in plain], plain, loop, plain) == pytest.approx((0.25, 0.25))
    # Noisy differences, 0 to 0.2 against the loop's 0.4: the range holds the whole sample's ratio and
    # stays within what a median of those differences can be.
    noisy = [p + d for p, d in zip(plain, [0.05, 0.2, 0.1, 0.0, 0.15, 0.1])]
    low, high = ratio_interval(noisy, plain, loop, plain)
    assert 0.0 <= low < paired_overhead(noisy, plain) / 0.4 < high <= 0.5
    # A loop that measured no overhead leaves no ratio.
    assert all(math.isnan(v) for v in ratio_interval(noisy, plain, plain, plain))


def test_decay_overhead_quick_runs_and_checks_before_timing() -> None:
    out = run_quick("decay_overhead.py")
    # Every candidate made the same 3 steps as the hand-built groups before anything was timed.
    assert "weights equal to the hand-built groups': ok" in out
    for label in ("hand-built groups", "regdsl groups", "regdsl attached", "regdsl fold", "attached + penalty()"):
        assert label in out
    assert "median absolute deviation" in out
