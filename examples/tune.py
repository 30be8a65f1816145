"""Tune the λs of a rule file with Optuna (pruning included), then print the file that won.

    python examples/tune.py [tune.reg] [--trials 20] [--grid N]

Each trial compiles the rules with ``regdsl.compile(spec, model, trial=trial)``: every search
space of the file (``loguniform``, ``uniform``, ``choice``) gets a value from the trial, under its
name. Validation loss is reported every 50 steps, so Optuna's MedianPruner stops hopeless trials.
The winner is printed as ``spec.with_values(study.best_params).to_source()``: exactly the checked
file, with numbers. ``--grid N`` walks ``regdsl.grid(spec, n=N)`` instead, without Optuna.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn
from train import Classifier, make_data  # examples/train.py: the model and data of the quick start

import regdsl

STEPS, REPORT_EVERY = 300, 50


def validation_loss(values: dict[str, float] | None, spec: regdsl.Spec, trial=None) -> float:
    torch.manual_seed(0)
    model = Classifier()
    if trial is not None:
        reg = regdsl.compile(spec, model, trial=trial)
    else:
        reg = regdsl.compile(spec.with_values(values or {}), model)
    opt = torch.optim.AdamW(reg.param_groups(lr=3e-3))
    reg.attach(opt, fold=True)  # l1 is folded into the step: nothing changes in the loss
    (x, y), (x_val, y_val) = make_data(256), make_data(1024, seed=1)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if step % REPORT_EVERY == 0:
            with torch.no_grad():
                val = loss_fn(model(x_val), y_val).item()
            if trial is not None:
                trial.report(val, step)
                if trial.should_prune():
                    import optuna

                    raise optuna.TrialPruned()
    return val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rules", nargs="?", default=str(Path(__file__).with_name("tune.reg")))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--grid", type=int, metavar="N", help="walk regdsl.grid(spec, n=N) instead of Optuna")
    args = parser.parse_args()
    spec = regdsl.load(args.rules)
    torch.set_num_threads(1)
    print(f"{os.path.relpath(args.rules)}: " + ", ".join(f"{name} ~ {space}" for name, space in spec.spaces().items()))

    if args.grid:
        results = [(validation_loss(values, spec), values) for values in regdsl.grid(spec, n=args.grid)]
        best_loss, best = min(results, key=lambda r: r[0])
        print(f"grid of {len(results)} points: best validation loss {best_loss:.4f}")
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=0),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=REPORT_EVERY),
        )
        study.optimize(lambda trial: validation_loss(None, spec, trial), n_trials=args.trials)
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
        print(f"{len(study.trials)} trials, {pruned} pruned: best validation loss {study.best_value:.4f}")
        best = study.best_params
    print("the file that won:")
    print(spec.with_values(best).to_source(), end="")


if __name__ == "__main__":
    main()
