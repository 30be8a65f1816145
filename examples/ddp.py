"""DistributedDataParallel with a rule file (docs/distributed.md).

    torchrun --standalone --nproc_per_node 2 examples/ddp.py [--out weights.pt] [--loss-path]

gloo on the CPU here; on GPUs use "nccl" and move the model to its device first.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scale_toy import RULES, batches, build_model
from torch import nn

import regdsl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="save the trained weights here (rank 0)")
    parser.add_argument("--loss-path", action="store_true", help="every term through the loss, no fold")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE and the rendezvous address
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    # Any DDP setting works, find_unused_parameters=True for a model with layers forward skips too.
    ddp = nn.parallel.DistributedDataParallel(model)
    reg = regdsl.compile(RULES, ddp)  # the wrapper, with the bare model's names ('module.' is read through)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-2))
    reg.attach(opt, fold=not args.loss_path)  # folded after DDP's all-reduce, in opt.step()
    for x, y in batches(args.steps, rank, world):
        loss = F.cross_entropy(ddp(x), y) + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        print(f"rank 0 of {world}: {reg.step} steps, last loss {loss.item():.4f}")
        if args.out:
            torch.save(model.state_dict(), args.out)
    # Every rank is done (rank 0 saving too) before any tears its process group down. With gloo a
    # process still aborts at exit about once in 100 runs, its work done ('terminate called without
    # an active exception'): a bug of torch's gloo teardown (tests/test_recipes.py says what it is).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
