"""Does a constant `decay` cost anything per step through regdsl? Side by side, interleaved, in one run.

    python benchmarks/decay_overhead.py [--repeats 31] [--quick] [--threads N]

Issue 9, point 5: with only constant `decay` (which torch's optimizer applies for free), regdsl's
step must equal hand-built parameter groups within noise. The model is the tiny MLP 10-5-1
(batch 32), where a fixed cost per step shows most; the rule file is
`all decay 0.01` / `exclude bias` / `exclude norm`. Candidates, each a full AdamW training step:
  hand-built groups  the two groups a user writes: weights with weight_decay 0.01, biases with 0
  regdsl groups      `AdamW(reg.param_groups(...))`, no hook at all
  regdsl attached    the same, plus `reg.attach(opt)`: its one hook counts steps
  regdsl fold        the same with `reg.attach(opt, fold=True)` (nothing to fold: the same one hook)
  attached + penalty()  `reg.attach(opt)` and `loss + reg.penalty()` in the step, as the README
                     writes it: here an exact 0-dim zero, so what it costs is one add and its backward
Before timing, every candidate takes 3 steps from the same start, and its weights must equal the
hand-built groups' exactly: the same groups, the same decay. It prints each step's median time,
its difference from the hand-built groups in microseconds and percent, and the spread of the
hand-built step itself (the median absolute deviation of its rounds): a difference inside that
spread is noise. Compare only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from timing import machine, timed_samples
from torch import nn

import regdsl

RULES = "all decay 0.01\nexclude bias\nexclude norm\n"
LR = 1e-3


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))


def compile_rules(model: nn.Module) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)  # 'exclude norm' matches nothing here
        return regdsl.parse(RULES).compile(model)


def candidates() -> dict[str, tuple[nn.Module, Callable[[], None], list[Any]]]:
    """Each candidate's own model and one training step; the regularizers to detach afterwards."""
    x, y = torch.randn(32, 10, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)
    out: dict[str, tuple[nn.Module, Callable[[], None], list[Any]]] = {}

    def step_of(model: nn.Module, opt: torch.optim.Optimizer, reg: Any = None) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            if reg is not None:
                loss = loss + reg.penalty()
            loss.backward()
            opt.step()

        return step

    model = build()
    decayed = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decayed, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    out["hand-built groups"] = (model, step_of(model, torch.optim.AdamW(groups, lr=LR)), [])
    model = build()
    reg = compile_rules(model)
    out["regdsl groups"] = (model, step_of(model, torch.optim.AdamW(reg.param_groups(lr=LR), lr=LR)), [])
    for label, fold, penalty in (
        ("regdsl attached", False, False),
        ("regdsl fold", True, False),
        ("attached + penalty()", False, True),
    ):
        model = build()
        reg = compile_rules(model)
        opt = torch.optim.AdamW(reg.param_groups(lr=LR), lr=LR)
        reg.attach(opt, fold=fold)
        out[label] = (model, step_of(model, opt, reg if penalty else None), [reg])
    return out


def check() -> list[str]:
    """Three steps each from the same start; the labels whose weights differ from the hand-built groups'."""
    runs = candidates()
    for _, step, _ in runs.values():
        for _ in range(3):
            step()
    want = runs["hand-built groups"][0].state_dict()
    wrong = [label for label, (model, _, _) in runs.items() if any(not torch.equal(v, want[k]) for k, v in model.state_dict().items())]
    for _, _, regs in runs.values():
        for reg in regs:
            reg.detach()
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 31, 7 with --quick)")
    parser.add_argument("--quick", action="store_true", help="7 rounds: a few seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: the tiny MLP waits on none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(machine(cpu))
    print(f"model: tiny MLP 10-5-1, batch 32, AdamW; rules: {' / '.join(RULES.strip().splitlines())}")
    wrong = check()
    print("check, 3 steps from the same start, weights equal to the hand-built groups': " + (f"FAILED for {', '.join(wrong)}" if wrong else "ok"))
    if wrong:
        return 1
    runs = candidates()
    labels = list(runs)
    repeats = args.repeats or (7 if args.quick else 31)
    rounds = timed_samples([runs[label][1] for label in labels], cpu, repeats, collect=True, warmup=5)
    samples = dict(zip(labels, rounds))
    medians = {label: statistics.median(v) for label, v in samples.items()}
    base = medians["hand-built groups"]
    spread = statistics.median(abs(t - base) for t in samples["hand-built groups"])
    print(f"   {'candidate':21s} {'µs/step':>9s} {'vs hand-built':>22s}")
    for label in labels:
        diff = medians[label] - base
        note = "" if label == "hand-built groups" else f"{diff * 1e6:+8.1f} µs {diff / base:+7.1%}"
        print(f"   {label:21s} {medians[label] * 1e6:9.1f} {note:>22s}")
    print(f"   spread of the hand-built step across rounds (median absolute deviation): {spread * 1e6:.1f} µs")
    for _, _, regs in runs.values():
        for reg in regs:
            reg.detach()
    return 0


if __name__ == "__main__":
    began = time.perf_counter()
    code = main()
    print(f"\n({time.perf_counter() - began:.0f} s)")
    sys.exit(code)
