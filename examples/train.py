"""Train a small MLP on generated data with the rules in rules.reg, and show what they did.

    python examples/train.py [rules.reg]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

import regdsl


class Classifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_data(n: int, features: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs with label noise, so an unregularized model has something to overfit."""
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g) * 2.0
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(classes, (n,), generator=g), y)
    return x, y


def train(rules: regdsl.Spec, steps: int = 300, seed: int = 0, verbose: bool = False) -> tuple[Classifier, regdsl.Regularizer, float]:
    torch.manual_seed(seed)
    model = Classifier()
    reg = rules.compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=3e-3))
    x, y = make_data(256)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        data_loss = loss_fn(model(x), y)
        penalty = reg.penalty()
        (data_loss + penalty).backward()
        opt.step()
        if verbose and step % 100 == 0:
            print(f"  step {step:3d}  loss {data_loss.item():.4f}  penalty {penalty.item():.5f}")
    x_test, y_test = make_data(2048, seed=1)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, reg, accuracy


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path(os.path.relpath(Path(__file__).with_name("rules.reg")))
    try:
        rules = regdsl.load(path)
    except regdsl.RegDslError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Rules from {path}:\n{rules.to_source()}")
    print("Training with the rules:")
    model, reg, accuracy = train(rules, verbose=True)
    print(f"\nWhat each parameter got ('set by' = term:line in {path}):")
    print(regdsl.format_explain(reg.explain()))
    print("\nOptimizer parameter groups:")
    print(regdsl.format_groups(reg.groups_summary()))
    plain_model, _, plain_accuracy = train(regdsl.parse(""))
    print("\nEffect, against the same run with no rules:")
    for name in ("body.0.weight", "body.3.weight", "head.weight", "head.bias"):
        ruled = dict(model.named_parameters())[name].norm().item()
        plain = dict(plain_model.named_parameters())[name].norm().item()
        print(f"  {'norm of ' + name:<24} {ruled:7.3f} with rules  {plain:7.3f} without")
    print(f"  {'held-out accuracy':<24} {accuracy:7.3f} with rules  {plain_accuracy:7.3f} without")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
