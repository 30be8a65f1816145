"""Train a small CNN on generated images with examples/cnn.reg, and show what each term did.

    python examples/train_cnn.py [rules.reg]

The rules use structured sparsity (group_lasso), orthogonality, max-norm, a
proximal L1, L2 toward the initial weights, an activity penalty, an lr
multiplier and schedules. The script trains twice from the same seed, with the
rules and without, and halfway through the regularized run it saves and
restores the whole state, as a resumed job would.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import torch
from torch import nn

import regdsl


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 4):
        super().__init__()
        # No BatchNorm after the convolutions: it would undo any shrinking of their filters.
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def make_images(n: int, classes: int = 4, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stripes in one of four orientations, buried in noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patterns = torch.stack([r % 3 == 0, c % 3 == 0, (r + c) % 3 == 0, (r - c) % 3 == 0]).float()
    x = patterns[y].unsqueeze(1) + torch.randn(n, 1, size, size, generator=g) * 0.8
    return x, y


def train(rules: regdsl.Spec, steps: int = 300, seed: int = 0, log: bool = False) -> tuple[SmallCNN, regdsl.Regularizer]:
    torch.manual_seed(seed)
    model = SmallCNN()
    reg = rules.compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=3e-3))
    reg.attach(opt)  # prox, max_norm and every schedule run after each opt.step()
    x, y = make_images(512)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        if step == steps // 2:
            model, reg, opt = resume(rules, model, reg, opt)
            if log:
                print(f"  (saved and restored at step {reg.step})")
        data_loss = loss_fn(model(x), y)
        penalty = reg.penalty()  # includes the activity term the forward pass just collected
        opt.zero_grad(set_to_none=True)
        (data_loss + penalty).backward()
        opt.step()
        if log and step % 50 == 0:
            decay = next(g["weight_decay"] for g in opt.param_groups if g["params"][0] is model.conv1.weight)
            print(
                f"  step {step:3d}  loss {data_loss.item():.3f}  penalty {penalty.item():.4f}  "
                f"decay {decay:.2e}  group_lasso {reg.strength('conv2.weight', 'group_lasso'):.3f}  "
                f"activity {reg.strength('act2', 'activity_l1'):.1e}  "
                f"l2-to-init {reg.strength('conv1.weight', 'l2'):.2e}"
            )
    return model, reg


def resume(rules: regdsl.Spec, model: SmallCNN, reg: regdsl.Regularizer, opt: torch.optim.Optimizer):
    """Save everything, then rebuild from scratch and load it: the schedules continue where they were."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "reg": reg.state_dict()}, buffer)
    reg.detach()
    buffer.seek(0)
    state = torch.load(buffer)
    model = SmallCNN()
    model.load_state_dict(state["model"])
    reg = rules.compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=3e-3))
    # The regularizer first: it refuses a state whose group layout the rules no longer produce
    # (docs/resume.md), before the optimizer takes moments that would land on the wrong tensors.
    reg.load_state_dict(state["reg"])  # step counter, the initial conv1 weights for 'l2 ... to init', the layout
    opt.load_state_dict(state["opt"])
    reg.attach(opt)
    return model, reg, opt


def report(model: SmallCNN, plain: SmallCNN) -> None:
    x, y = make_images(1024, seed=1)

    def stats(m: SmallCNN) -> dict[str, float]:
        captured = {}
        handle = m.act2.register_forward_hook(lambda mod, args, out: captured.setdefault("act2", out))
        m.eval()
        with torch.no_grad():
            accuracy = (m(x).argmax(1) == y).float().mean().item()
        handle.remove()
        filters = m.conv2.weight.detach().flatten(1).norm(dim=1)
        w1 = m.conv1.weight.detach().flatten(1)
        gram = w1 @ w1.T
        return {
            "conv2 filters with norm < 0.05": float((filters < 0.05).sum()),
            "exact zeros in head.weight": float((m.head.weight == 0).sum()),
            "largest head row norm": m.head.weight.detach().norm(dim=1).max().item(),
            "mean |activation| of act2": captured["act2"].abs().mean().item(),
            "conv1 off-diagonal |W Wt|": (gram - torch.diag(torch.diag(gram))).abs().mean().item(),
            "held-out accuracy": accuracy,
        }

    ruled, unruled = stats(model), stats(plain)
    for key in ruled:
        print(f"  {key:<32} {ruled[key]:8.4g} with rules  {unruled[key]:8.4g} without")


def main(argv: list[str]) -> int:
    argv = list(argv)
    picture = None
    if "--plot" in argv:  # --plot PNG: draw the weights before and after (needs regdsl[plot])
        at = argv.index("--plot")
        picture = argv[at + 1]
        del argv[at : at + 2]
    path = Path(argv[1]) if len(argv) > 1 else Path(os.path.relpath(Path(__file__).with_name("cnn.reg")))
    try:
        rules = regdsl.load(path)
    except regdsl.RegDslError as exc:
        print(exc, file=sys.stderr)
        return 1
    probe = rules.compile(SmallCNN())
    print(f"What each parameter and module gets ('set by' = term:line in {path}):")
    print(regdsl.format_explain(probe.explain(), probe.explain_modules()))
    print("\nOptimizer parameter groups:")
    print(regdsl.format_groups(probe.groups_summary()))
    probe.detach()
    print("\nTraining with the rules:")
    model, _ = train(rules, log=True)
    plain, _ = train(regdsl.parse(""))
    print("\nEffect, against the same run with no rules:")
    report(model, plain)
    if picture is not None:
        from regdsl.plot import weights

        torch.manual_seed(0)  # the initial weights train() started from
        weights(rules, model, [SmallCNN().state_dict(), model.state_dict()], path=picture)
        print(f"\nwrote {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
