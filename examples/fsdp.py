"""FSDP2 (fully_shard) with a rule file (docs/distributed.md).

    torchrun --standalone --nproc_per_node 2 examples/fsdp.py [--out weights.pt] [--loss-path]

gloo on the CPU here; on GPUs use "nccl" and init_device_mesh("cuda", ...).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scale_toy import RULES, batches, build_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import regdsl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="save the trained (unsharded) weights here (rank 0)")
    parser.add_argument("--loss-path", action="store_true", help="every term through the loss, no fold")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reg = regdsl.compile(RULES, model)  # after fully_shard: the parameters are DTensors now
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-2))
    reg.attach(opt, fold=not args.loss_path)
    for x, y in batches(args.steps, rank, world):
        loss = F.cross_entropy(model(x), y) + reg.penalty()  # a plain tensor with the unsharded value
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = {name: t.full_tensor() for name, t in model.state_dict().items()}  # a collective: every rank
    if rank == 0:
        print(f"rank 0 of {world}: {reg.step} steps, last loss {loss.item():.4f}")
        if args.out:
            torch.save(weights, args.out)
    # Every rank is done (rank 0 saving too) before any tears its process group down. With gloo a
    # process can still abort at exit, rarely, its work done ('terminate called without an active
    # exception'): a bug of torch's gloo teardown (tests/test_recipes.py says what it is).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
