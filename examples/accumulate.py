"""Gradient accumulation with a rule file: one argument, k micro-batches per optimizer step
(docs/distributed.md).

    python examples/accumulate.py --accumulate 4 [--out weights.pt] [--loss-path]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from scale_toy import RULES, batches, build_model

import regdsl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--out", help="save the trained weights here")
    parser.add_argument("--loss-path", action="store_true", help="every term through the loss, no fold")
    args = parser.parse_args()

    k = args.accumulate
    model = build_model()
    reg = regdsl.compile(RULES, model, accumulation_steps=k)  # penalty() is 1/k of the terms
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-2))
    reg.attach(opt, fold=not args.loss_path)  # folded terms: once per opt.step(), whatever k is
    for x, y in batches(args.steps):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            loss = F.cross_entropy(model(xs), ys) / k + reg.penalty()
            loss.backward()
        opt.step()
    print(f"{reg.step} steps of {k} micro-batches, last loss {loss.item():.4f}")
    if args.out:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
