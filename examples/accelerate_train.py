"""Hugging Face Accelerate with a rule file (docs/distributed.md): prepare, accumulate, and the
regularizer's step counter saved and restored with the rest of the training state.

    accelerate launch examples/accelerate_train.py [--accumulate 2] [--out weights.pt]
    python examples/accelerate_train.py --steps 2 --save ckpt && python examples/accelerate_train.py --steps 2 --resume ckpt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from scale_toy import RULES, batches, build_model

import regdsl
from regdsl.integrations.accelerate import register_for_checkpointing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--save", help="accelerator.save_state() here at the end")
    parser.add_argument("--resume", help="accelerator.load_state() from here first")
    parser.add_argument("--out", help="save the trained weights here")
    args = parser.parse_args()

    k = args.accumulate
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)  # drop cpu=True on GPUs
    model = build_model()
    # accelerator.backward() divides the loss by k itself: leave accumulation_steps at 1.
    reg = regdsl.compile(RULES, model)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-2))
    reg.attach(opt, fold=True)  # before prepare(): the hooks sit on the optimizer Accelerate wraps
    model, opt = accelerator.prepare(model, opt)
    register_for_checkpointing(accelerator, reg)  # regdsl.pt, loaded first: schedules continue on resume
    done = 0
    if args.resume:
        accelerator.load_state(args.resume)
        done = reg.step
    for x, y in batches(done + args.steps):
        if done:  # the steps before the checkpoint: same data, already trained
            done -= 1
            continue
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(xs), ys) + reg.penalty()
                accelerator.backward(loss)
                opt.step()  # Accelerate steps (and the fold runs) on the last micro-batch only
                opt.zero_grad()
    print(f"{reg.step} steps of {k} micro-batches, last loss {loss.item():.4f}")
    if args.save:
        accelerator.save_state(args.save)
    if args.out:
        torch.save(accelerator.unwrap_model(model).state_dict(), args.out)


if __name__ == "__main__":
    main()
