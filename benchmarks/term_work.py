"""What does the regularization's own work cost, timed apart from the training step?

    python benchmarks/term_work.py [--models tiny_mlp,mlp400,resnet50,vit_b16,gpt2_tiny]
                                   [--repeats 15] [--quick] [--no-compile] [--device cpu|cuda]
                                   [--workloads 'elastic net,group_lasso'] [--threads N]

step_overhead.py answers the question users ask (what a step costs), but on ResNet-50 and ViT-B a
one-thread step on a shared 2-core machine lasts 1.6 s and moves by tens of milliseconds between
rounds, as much as the regularization itself, so the ratios there come with ranges of ±0.3 to ±1.
This script times only the work each candidate adds to a step, on the same models and workloads
(step_overhead.py's), with every gradient already there, where the noise is a few percent:

  tutorial loop  its penalty's forward and backward, `penalty().backward()`, accumulating into p.grad
  loss path      `reg.penalty().backward()`
  fast path      what `reg.fold(opt)` runs after `reg.attach(opt, fold=True, fold_hook=False)`: the
                 work the fast path's hook does before each update
  compiled path  `opt.step = reg.compiled_step(opt)`, less `torch.compile(opt.step)` of a plain SGD:
                 both update weights of their own copies of the model; the work is the median,
                 over rounds, of the difference within each round (not with --quick)
  floor          one read of the regularized weights (`torch._foreach_norm`)

It prints each one's median time, that time as a multiple of the loop's (and its range over 90% of
2000 resamplings of the rounds) and as a multiple of the floor. What it leaves out: inside a step the
fast path also pays its hook's fixed cost and the add of `loss + reg.penalty()` (tens of µs, which
step_overhead.py measures on the tiny MLP), and the loop's temporaries meet the step's own. A
candidate faster than 10 ms is called several times in a row per sample (benchmarks/timing.py), so on
the small models its tensors stay in cache from one call to the next, as they would not after a
forward and backward; ResNet-50's and ViT-B's weights are 3x and 10x this machine's 32 MiB of L3.

Before timing, each candidate adds its gradients to zeros on a float64 copy of the model; they must
equal the loop's to within 1e-6 of the largest, or the candidate is not timed and the script exits 1.
The compiled path is checked on its own float32 copy, before its first timed step: the gradients its
graph leaves in p.grad, from zeros, against the loop's at the same weights, to within 1e-5 (float32
rounding). --quick: 5 rounds, ResNet-50 and ViT-B/16 at toy sizes, no compile; seconds on 2 cores.
--no-compile: full sizes, no compiled path. --workloads: some of the two.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
from collections.abc import Callable

import torch
from timing import machine, paired_overhead, ratio_interval, timed_samples
from torch import nn
from workloads import (
    LR,
    TARGETS,
    WORKLOADS,
    Bench,
    build_bench,
    command_line,
    compile_rules,
    params_by_name,
    regularized,
    tutorial_penalty,
    verdict,
)

import regdsl

TOLERANCE = 1e-6
COMPILED_TOLERANCE = 1e-5  # float32


def candidates(bench: Bench, rules: str, workload: str) -> dict[str, Callable[[], None]]:
    """Each candidate's work, on ``bench.model`` itself: none of them changes a weight."""
    model = bench.model
    reg = compile_rules(rules, model)
    loop = tutorial_penalty(workload, params_by_name(model, regularized(reg)))
    fast = compile_rules(rules, model)
    opt = torch.optim.SGD(fast.param_groups(lr=LR), lr=LR)
    fast.attach(opt, fold=True, fold_hook=False)
    # What reg.fold(opt) runs, called directly: reg.fold() itself refuses a second call on gradients
    # nothing touched since (it would add the terms twice), and these rounds fold into the same ones.
    plan = fast._attached.owner(opt).fold
    return {
        "tutorial loop": lambda: loop().backward(),
        "loss path": lambda: reg.penalty().backward(),
        "fast path": lambda: plan(None),
    }


def compiled_pair(bench: Bench, rules: str) -> tuple[Callable[[], None], Callable[[], None], nn.Module]:
    """A plain SGD's ``torch.compile(opt.step)`` and the compiled path's step, each on its own copy of
    the model (they update its weights), and the compiled path's copy."""
    plain_model, path_model = copy.deepcopy(bench.model), copy.deepcopy(bench.model)
    for p in plain_model.parameters():  # without a gradient SGD skips a parameter: there would be no update to time
        p.grad = torch.zeros_like(p)
    plain_step = torch.compile(torch.optim.SGD(plain_model.parameters(), lr=LR).step)
    reg = compile_rules(rules, path_model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    reg.attach(opt, fold=True)
    return plain_step, reg.compiled_step(opt), path_model


def check_compiled(
    bench: Bench, workload: str, params: list[nn.Parameter], step: Callable[[], None], model: nn.Module
) -> str:
    """The gradients the compiled path's first step (it compiles) leaves in ``p.grad``, from zeros,
    against the loop's over ``params`` (``bench.model``'s regularized tensors; ``model`` copies it)."""
    loop = tutorial_penalty(workload, params)
    for p in bench.model.parameters():
        p.grad = torch.zeros_like(p)
    loop().backward()
    expected = {name: p.grad.clone() for name, p in bench.model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    step()
    got = dict(model.named_parameters())
    scale = max(g.abs().max().item() for g in expected.values())
    err = max((got[name].grad - g).abs().max().item() for name, g in expected.items()) / scale
    return verdict(err, COMPILED_TOLERANCE)


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
        results[label] = verdict(err, TOLERANCE)
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
    if args.compile:
        torch._dynamo.reset()  # every compiled opt.step shares SGD.step's code: keep its recompile count low
        plain_step, path_step, path_model = compiled_pair(bench, rules)
        checked["compiled path"] = check_compiled(bench, workload, params, path_step, path_model)
        print(
            f"   check, the compiled path's p.grad from zeros in float32, against the loop's: {checked['compiled path']}"
        )
        works["plain update, compiled"] = plain_step
        if "FAILED" not in checked["compiled path"]:
            works["compiled path"] = path_step
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
        if label == "plain update, compiled":
            print(f"   {label:<15}  {statistics.median(s) * 1e3:9.3f}  the compiled path's baseline, not regularized")
            continue
        base = samples["plain update, compiled"] if label == "compiled path" else zeros
        t = paired_overhead(s, base)
        ratio = t / statistics.median(loop)
        low, high = ratio_interval(s, base, loop, zeros)
        note = "  over the plain update, compiled" if label == "compiled path" else ""
        if label in TARGETS and bench.key in TARGETS[label][1] and not args.quick:
            bound = TARGETS[label][0]
            verdict = "met" if ratio <= bound else "MISSED"
            note += f"  <= {bound:.2f} of the loop: {verdict}" + (", within noise" if low <= bound < high else "")
        print(f"   {label:<15}  {t * 1e3:9.3f}  {ratio:6.2f}  {low:5.2f} to {high:5.2f}  {t / t_floor:6.1f}x{note}")
        row[label] = f"{t * 1e3:.2f} ms ({ratio:.2f}; {low:.2f} to {high:.2f})"
    for label in checked:
        row.setdefault(label, "not timed: FAILED the check")
    if not args.compile:
        row["compiled path"] = "n/a (--quick)" if args.quick else "n/a (--no-compile)"
    print(f"   {'floor (alone)':<15}  {t_floor * 1e3:9.3f}  one read of the regularized weights")
    return not any("FAILED" in text for text in checked.values()), row


def main() -> int:
    args, keys, device = command_line(__doc__)
    print(machine(device))
    print(
        f"regdsl {regdsl.__version__}; medians of {args.repeats} interleaved rounds{'; --quick' if args.quick else ''}"
    )
    ok = True
    rows = []
    for key in keys:
        bench = build_bench(key, args.quick, device)
        print(f"\n== {key}: {bench.title}")
        for workload in args.workloads:
            passed, row = run_workload(bench, workload, args, device)
            ok &= passed
            rows.append((key + (" (--quick size)" if "--quick size" in bench.title else ""), workload, row))
        del bench
        gc.collect()
    cols = ["tutorial loop", "loss path", "fast path", "compiled path", "floor"]
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
