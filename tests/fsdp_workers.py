"""Training runs for the FSDP2 parity tests (tests/test_fsdp.py): the same model and data as the
DDP runs (tests/ddp_workers.py), each layer and the root wrapped with ``fully_shard`` on a 1-D
gloo mesh of two CPU processes. Shards are uneven where a dimension is odd (``head``, ``out``).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_workers import BATCH, LR, RULES, STEPS, data, net

import regdsl

# The DDP file plus what only sharding makes interesting: group_lasso along the sharded
# dimension and across it, max_norm along both, an unsharded reference for 'to ref'.
SHARDED_RULES = RULES + """\
layer fc1.weight group_lasso 0.03
layer head.weight l2 0.05 to ref
layer out.weight max_norm 0.7 dim=1
layer fc1.weight max_norm 1.2
"""


def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {name: torch.randn_like(p) for name, p in net().state_dict().items()}


def train(path: str, sharded: bool, rules: str = SHARDED_RULES, hsdp: bool = False) -> dict[str, Any]:
    """Unsharded weights after :data:`STEPS` SGD steps, the first penalty() value and reg.values().
    ``hsdp``: a 2-D mesh (replicate 1 x shard 2), so the placements are (Replicate(), Shard(0))."""
    model = net()
    rank, world = 0, 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")) if hsdp else init_device_mesh("cpu", (world,))
        for layer in (model.fc1, model.fc2, model.out, model.head, model.unused):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    reg = regdsl.compile(regdsl.parse(rules), model, reference=reference_state())
    opt = torch.optim.SGD(reg.param_groups(lr=LR, momentum=0.9))
    reg.attach(opt, fold=path == "fold")
    first = None
    for step in range(STEPS):
        x, y = data(step)
        share = BATCH // world
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.zero_grad()
        penalty = reg.penalty()
        assert type(penalty) is torch.Tensor, type(penalty)  # something a plain loss can be added to
        loss = F.mse_loss(model(x), y) + penalty
        if first is None:
            first = penalty.detach().clone()
        loss.backward()
        opt.step()
    weights = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[name] = p.detach().clone()
    values = {k: v.detach().clone() for k, v in reg.values().items()}
    shapes = {row.name: tuple(row.shape) for row in reg.explain()}
    # `check` judges shapes on the unsharded weight: dim=2 is out of range for (8, 6), not for a shard.
    found = regdsl.check(regdsl.parse("layer fc1.weight group_lasso 0.1 dim=2"), model)
    return {"weights": weights, "penalty": first, "values": values, "shapes": shapes, "check": [d.message for d in found]}


def partial_placement() -> str:
    """The error compiling against a parameter placed as Partial (pending sums, no whole values)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    layer = nn.Linear(4, 4, bias=False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layer.weight = nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))
    try:
        regdsl.compile(regdsl.parse("all l2 0.1"), layer)
    except regdsl.RegCompileError as error:
        return f"RegCompileError: {error}"
    return "compiled"


def compiled_before_sharding() -> str:
    """The error attaching a regularizer compiled before fully_shard replaced the parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = net()
    reg = regdsl.compile(regdsl.parse("all l2 0.1"), model)
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    try:
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    except regdsl.RegUsageError as error:
        return f"RegUsageError: {error}"
    return "attached"


def reference_sharded_otherwise() -> list[dict[str, Any]]:
    """``l2 1.0 to ref`` where the reference is the state_dict of a layer sharded on the default 1-D
    mesh (Shard(0)) and the trained layer is laid out otherwise: on HSDP's 2-D mesh, and Shard(1).
    For each layout and path: the penalty, values() and the unsharded weight after one SGD step."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    world = dist.get_world_size()
    out = []
    for layout in ("hsdp", "shard1"):
        for fold in (False, True):
            torch.manual_seed(5)
            pre = nn.Linear(4, 4, bias=False).double()
            fully_shard(pre, mesh=init_device_mesh("cpu", (world,)))
            torch.manual_seed(0)
            model = nn.Linear(4, 4, bias=False).double()
            if layout == "hsdp":
                fully_shard(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
            else:
                fully_shard(model, mesh=init_device_mesh("cpu", (world,)), shard_placement_fn=lambda p: Shard(1))
            reg = regdsl.compile(regdsl.parse("all l2 1.0 to ref"), model, reference=pre.state_dict())
            opt = torch.optim.SGD(reg.param_groups(lr=0.1))
            reg.attach(opt, fold=fold)
            value = reg.values()["l2:1"].detach().clone()
            penalty = reg.penalty()
            (penalty + 0 * model(torch.zeros(1, 4, dtype=torch.float64)).sum()).backward()
            opt.step()
            out.append({"penalty": penalty.detach().clone(), "value": value, "weight": model.weight.full_tensor().detach().clone()})
    return out


def worker(rank: int, world: int, init: str, out: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    results: list[Any] = []
    try:
        for run in runs:
            try:
                if run in SPECIAL:
                    results.append(SPECIAL[run]())
                else:
                    results.append(train(run.removesuffix("-hsdp"), True, hsdp=run.endswith("-hsdp")))
            except Exception as error:  # noqa: BLE001 - reported to the test, which names the run
                import traceback

                results.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


SPECIAL = {"partial": partial_placement, "stale": compiled_before_sharding, "refs": reference_sharded_otherwise}
