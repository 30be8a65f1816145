"""How much does `reg.penalty()` cost per training step? Ratios measured side by side, in one run.

    python benchmarks/penalty.py [--device cpu|cuda] [--layers 12] [--width 256]

Compares, on the same model and the same rule (`all l2 1e-4`, plus `exclude bias; exclude norm`):
  loop     the tutorial's loss loop: `sum(p.pow(2).sum() for p in params)`
  regdsl   `reg.penalty()` (one torch._foreach_norm per dtype/device bucket)
  read     a one-pass read of the same parameters (`torch._foreach_norm`, no strengths, no grouping):
           the floor any penalty must pay
each forward+backward, and a plain training step (forward, backward, AdamW step) without any penalty,
so the last column says what the penalty adds to a step. Times are medians of interleaved rounds
(benchmarks/timing.py); only the ratios are meant to be compared, and only within one run.
"""

from __future__ import annotations

import torch
from timing import parse_args, timed_together
from torch import nn

import regdsl


def build(layers: int, width: int) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def main() -> None:
    args = parse_args(layers=12, repeats=30)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.layers, args.width).to(device)
    reg = regdsl.parse("all l2 1e-4; exclude bias; exclude norm").compile(model)
    params = [p for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1]
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(10, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-4))

    def loop() -> None:
        (1e-4 / 2 * sum(p.pow(2).sum() for p in params)).backward()

    def with_regdsl() -> None:
        reg.penalty().backward()

    def read() -> None:
        torch.stack(torch._foreach_norm(params, 2)).sum().backward()

    def step(penalty=None) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()

    t_loop, t_reg, t_read, t_step, t_step_reg, t_step_loop = timed_together(
        [
            loop,
            with_regdsl,
            read,
            step,
            lambda: step(reg.penalty),
            lambda: step(lambda: 1e-4 / 2 * sum(p.pow(2).sum() for p in params)),
        ],
        device,
        args.repeats,
    )

    print(f"model: {len(params)} penalized tensors, {sum(p.numel() for p in params):,} elements, on {device}")
    print(f"penalty forward+backward, relative to a one-pass read:  regdsl {t_reg / t_read:5.2f}x   loop {t_loop / t_read:5.2f}x")
    print(f"penalty, regdsl relative to the loop:                    {t_reg / t_loop:5.2f}x")
    print(f"training step overhead of the penalty:                   regdsl {t_step_reg / t_step - 1:+6.1%}   loop {t_step_loop / t_step - 1:+6.1%}")


if __name__ == "__main__":
    main()
