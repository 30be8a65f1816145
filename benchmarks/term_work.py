"""What does the regularization's own work cost, timed apart from the training step?

    python benchmarks/term_work.py [--models tiny_mlp,mlp400,resnet50,vit_b16,gpt2_tiny]
                                   [--repeats 15] [--quick] [--device cpu|cuda] [--threads N]

step_overhead.py answers the question users ask (what a step costs), but on ResNet-50 and ViT-B a
one-thread step on a shared 2-core machine lasts 1.6 s and moves by tens of milliseconds between
rounds, as much as the regularization itself, so the ratios there come with ranges of ±0.3 to ±1.
This script times only the work each candidate adds to a step, on the same models and workloads
(step_overhead.py's), with every gradient already there, where the noise is a few percent:

  tutorial loop  its penalty's forward and backward, `penalty().backward()`, accumulating into p.grad
  loss path      `reg.penalty().backward()`
  fast path      `reg.fold(opt)` after `reg.attach(opt, fold=True, fold_hook=False)`: the work the
                 fast path's hook does before each update
  floor          one read of the regularized weights (`torch._foreach_norm`)

It prints each one's median time, that time as a multiple of the loop's (and its range over 90% of
2000 resamplings of the rounds) and as a multiple of the floor. What it leaves out: inside a step the
fast path also pays its hook's fixed cost and the add of `loss + reg.penalty()` (tens of µs, which
step_overhead.py measures on the tiny MLP), and the loop's temporaries meet the step's own.

Before timing, each candidate adds its gradients to zeros on a float64 copy of the model; they must
equal the loop's to within 1e-6 of the largest, or the candidate is not timed and the script exits 1.
--quick: 5 rounds, ResNet-50 and ViT-B/16 at toy sizes; seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable

import torch
from step_overhead import (
    LR,
    MODELS,
    WORKLOADS,
    Bench,
    build_bench,
    compile_rules,
    params_by_name,
    regularized,
    tutorial_penalty,
)
from timing import machine, ratio_interval, timed_samples

import regdsl

TOLERANCE = 1e-6
TARGET = 0.25  # the fast path's target in issue 9, a multiple of the loop's step overhead


def candidates(bench: Bench, rules: str, workload: str) -> dict[str, Callable[[], None]]:
    """Each candidate's work, on ``bench.model`` itself: none of them changes a weight."""
    model = bench.model
    names = regularized(compile_rules(rules, model))
    loop = tutorial_penalty(workload, params_by_name(model, names))
    reg = compile_rules(rules, model)
    fast = compile_rules(rules, model)
    opt = torch.optim.SGD(fast.param_groups(lr=LR), lr=LR)
    fast.attach(opt, fold=True, fold_hook=False)
    return {
        "tutorial loop": lambda: loop().backward(),
        "loss path": lambda: reg.penalty().backward(),
        "fast path": lambda: fast.fold(opt),
    }


def check(bench: Bench, rules: str, workload: str) -> dict[str, str]:
    """``max|Δg − Δg(loop)| / max|Δg(loop)|`` of each candidate, from zero gradients on a float64 copy."""
    b64 = bench.cast(torch.float64)
    params = [p for p in b64.model.parameters() if p.requires_grad]
    added = {}
    for label, work in candidates(b64, rules, workload).items():
        for p in params:
            p.grad = torch.zeros_like(p)
        work()
        added[label] = [p.grad.clone() for p in params]
    loop = added.pop("tutorial loop")
    scale = max(g.abs().max().item() for g in loop)
    if scale == 0:
        raise RuntimeError("the check is vacuous: the tutorial loop adds no gradient")
    results = {}
    for label, grads in added.items():
        err = max((g - r).abs().max().item() for g, r in zip(grads, loop)) / scale
        results[label] = f"{err:.1e} " + ("ok" if err <= TOLERANCE else "FAILED")
    return results


def run_workload(
    bench: Bench, workload: str, args: argparse.Namespace, device: torch.device
) -> tuple[bool, dict[str, str]]:
    rules = WORKLOADS[workload]
    params = params_by_name(bench.model, regularized(compile_rules(rules, bench.model)))
    print(f"\n-- {workload}: " + " / ".join(rules.strip().splitlines()))
    print(f"   regularized: {len(params)} tensors, {sum(p.numel() for p in params):,} elements")
    checked = check(bench, rules, workload)
    gc.collect()  # the float64 copy
    print(
        "   check, gradients added to zeros on a float64 copy, max|Δg − Δg(loop)| / max|Δg(loop)|: "
        + ", ".join(f"{lb} {text}" for lb, text in checked.items())
    )
    works = {lb: fn for lb, fn in candidates(bench, rules, workload).items() if "FAILED" not in checked.get(lb, "")}
    for p in bench.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def floor() -> None:
        torch._foreach_norm(params)

    rounds = timed_samples([*works.values(), floor], device, args.repeats, collect=True, warmup=1 if args.quick else 3)
    samples = dict(zip(works, rounds))
    t_floor = statistics.median(rounds[-1])
    zeros = [0.0] * args.repeats
    loop = samples["tutorial loop"]
    print(f"   {'candidate':<15}  {'ms':>9}  {'÷ loop':>6}  {'noise (90%)':>14}  {'÷ floor':>7}")
    row = {"floor": f"{t_floor * 1e3:.3f} ms"}
    for label, s in samples.items():
        t = statistics.median(s)
        ratio = t / statistics.median(loop)
        low, high = ratio_interval(s, zeros, loop, zeros)
        note = ""
        if label == "fast path" and not args.quick:
            verdict = "met" if ratio <= TARGET else "MISSED"
            note = f"  <= {TARGET:.2f} of the loop: {verdict}" + (", within noise" if low <= TARGET < high else "")
        print(f"   {label:<15}  {t * 1e3:9.3f}  {ratio:6.2f}  {low:5.2f} to {high:5.2f}  {t / t_floor:6.1f}x{note}")
        row[label] = f"{t * 1e3:.2f} ms ({ratio:.2f}; {low:.2f} to {high:.2f})"
    for label in checked:
        row.setdefault(label, "not timed: FAILED the check")
    print(f"   {'floor (alone)':<15}  {t_floor * 1e3:9.3f}  one read of the regularized weights")
    return not any("FAILED" in text for text in checked.values()), row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, toy-size ResNet and ViT")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    print(machine(device))
    print(
        f"regdsl {regdsl.__version__}; medians of {args.repeats} interleaved rounds{'; --quick' if args.quick else ''}"
    )
    ok = True
    rows = []
    for key in keys:
        bench = build_bench(key, args.quick, device)
        print(f"\n== {key}: {bench.title}")
        for workload in WORKLOADS:
            passed, row = run_workload(bench, workload, args, device)
            ok &= passed
            rows.append((key + (" (--quick size)" if "--quick size" in bench.title else ""), workload, row))
        del bench
        gc.collect()
    cols = ["tutorial loop", "loss path", "fast path", "floor"]
    print("\nSummary: each candidate's work alone (÷ the loop's; the range of that ratio over 90% of resampled rounds)")
    print("| model | workload | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for key, workload, row in rows:
        print(f"| {key} | {workload} | " + " | ".join(row.get(c, "n/a") for c in cols) + " |")
    if not ok:
        print("\nSome candidate FAILED the correctness check and was not timed.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
