"""What does each term of issue 4 add to a training step? Ratios measured side by side, in one run.

    python benchmarks/terms.py [--device cpu|cuda] [--layers 8] [--width 256]

For each term, on the same MLP and the same selection (every Linear weight), three training
steps (forward, backward, AdamW step) are timed: plain (no term), with the term through regdsl
(`reg.penalty()` in the loss and `reg.attach(opt)` for what runs after the step), and with a
hand-written reference: the per-parameter loop a tutorial would write. The printed numbers are
what each adds to the plain step. Times are medians of interleaved rounds (benchmarks/timing.py);
only the ratios are meant to be compared, and only within one run.
"""

from __future__ import annotations

import functools

import torch
from timing import parse_args, timed_together
from torch import nn

import regdsl


def build(layers: int, width: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


# term -> (rule text, hand-written loss term or None, hand-written after-step or None).
# The references take the selected weights, the initial copies and the optimizer.
def references(lam: float = 1e-4):
    def group_lasso(ws, w0s, opt):
        return lam * sum(w.norm(dim=1).sum() for w in ws)

    def orthogonal(ws, w0s, opt):
        total = 0
        for w in ws:
            g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            total = total + (g - torch.eye(g.shape[0], device=w.device)).pow(2).sum()
        return lam * total

    def to_init(ws, w0s, opt):
        return lam / 2 * sum((w - w0).pow(2).sum() for w, w0 in zip(ws, w0s))

    @torch.no_grad()
    def prox(ws, w0s, opt):
        for w in ws:
            tau = opt.param_groups[0]["lr"] * lam
            w.copy_(torch.sign(w) * torch.clamp(w.abs() - tau, min=0))

    @torch.no_grad()
    def max_norm(ws, w0s, opt):
        for w in ws:
            w.copy_(torch.renorm(w, 2, 0, 1.0))

    return {
        "l1 prox": (f"layer **.weight l1 {lam} prox", None, prox),
        "max_norm": ("layer **.weight max_norm 1.0", None, max_norm),
        "group_lasso": (f"layer **.weight group_lasso {lam}", group_lasso, None),
        "orthogonal": (f"layer **.weight orthogonal {lam}", orthogonal, None),
        "l2 to init": (f"layer **.weight l2 {lam} to init", to_init, None),
        "l1 warmup": (f"layer **.weight l1 {lam} warmup 1000", lambda ws, w0s, opt: lam * sum(w.abs().sum() for w in ws), None),
    }


def main() -> None:
    args = parse_args(layers=8, repeats=40)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(10, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step_fn(model, opt, penalty=None, after=None):
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            opt.step()
            if after is not None:
                after()

        return step

    torch.manual_seed(0)
    model = build(args.layers, args.width).to(device)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    print(f"model: {len(weights)} Linear weights, {sum(w.numel() for w in weights):,} elements, on {device}")
    print(f"{'term':<12}  {'regdsl':>8}  {'by hand':>8}   (added to a plain AdamW step)")
    for name, (rule, loss_ref, after_ref) in references().items():
        reg = regdsl.parse(rule).compile(model)
        opt = torch.optim.AdamW(reg.param_groups(lr=1e-4))
        reg.attach(opt)
        plain_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        w0s = [w.detach().clone() for w in weights]
        penalty = functools.partial(loss_ref, weights, w0s, ref_opt) if loss_ref else None
        after = functools.partial(after_ref, weights, w0s, ref_opt) if after_ref else None
        t_plain, t_reg, t_ref = timed_together(
            [step_fn(model, plain_opt), step_fn(model, opt, reg.penalty), step_fn(model, ref_opt, penalty, after)],
            device,
            args.repeats,
        )
        reg.detach()
        print(f"{name:<12}  {t_reg / t_plain - 1:+8.1%}  {t_ref / t_plain - 1:+8.1%}")


if __name__ == "__main__":
    main()
