"""Training runs shared by the DDP parity tests: each runs in one process, or in each of two
gloo processes under DistributedDataParallel (spawned by tests/test_ddp.py), on the same data.

Each rank trains on its half of every full batch. The data loss is a mean, so DDP's averaged
gradient is the full batch's, and activity terms are per-sample means, so theirs is too: the
two-process weights must equal one process trained on the whole batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import regdsl

STEPS = 4
BATCH = 8
LR = 0.05

# Every term kind: loss terms (l1, l2, l2 to init, group_lasso, orthogonal), optimizer decay,
# post-step terms (l1 prox, max_norm), an activity term, schedules, and a penalized layer the
# forward never calls.
RULES = """\
all decay 0.02 warmup 2
exclude bias
layer fc1.weight l1 0.01 warmup 2
layer fc2.weight l2 0.1 to init orthogonal 0.01
layer out.weight group_lasso 0.05 dim=1
layer head.weight l1 0.002 prox max_norm 0.8
layer unused.weight l2 0.2
layer fc1 activity l2 0.01 from 1
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Linear(8, 8, bias=False)  # never called: its only gradient is its term

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))))


def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randn(BATCH, 1, generator=g, dtype=torch.float64)


def train(path: str, ddp: dict[str, Any] | None = None, micro: int = 1, toggle: bool = False) -> dict[str, torch.Tensor]:
    """Weights after :data:`STEPS` SGD steps. ``path`` is "loss" (``loss + reg.penalty()``) or
    "fold" (``attach(opt, fold=True)``); ``ddp``, the DistributedDataParallel keyword arguments
    (None: one process on the whole batch); ``micro`` micro-batches per step, accumulated
    (under ``no_sync`` except the last with DDP); ``toggle``: fc2.weight frozen at even steps
    (the first included) and trainable at odd ones."""
    model = net()
    wrapped: nn.Module = model
    rank, world = 0, 1
    if ddp is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        wrapped = nn.parallel.DistributedDataParallel(model, **ddp)
    reg = regdsl.compile(regdsl.parse(RULES), wrapped, accumulation_steps=micro)
    opt = torch.optim.SGD(reg.param_groups(lr=LR, momentum=0.9))
    reg.attach(opt, fold=path == "fold")
    for step in range(STEPS):
        if toggle:
            model.fc2.weight.requires_grad_(step % 2 == 1)
        x, y = data(step)
        share = BATCH // world
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.zero_grad()
        for k, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            last = k == micro - 1
            sync = wrapped.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            with sync:
                loss = F.mse_loss(wrapped(xs), ys) / micro + reg.penalty()
                loss.backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def worker(rank: int, world: int, init: str, out: str, runs: list[tuple[str, dict[str, Any], int, bool]]) -> None:
    """One rank: every run in ``runs``, results saved to ``out/rank{rank}.pt`` (an exception's text if one raised)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    results: list[Any] = []
    try:
        for path, settings, micro, toggle in runs:
            try:
                results.append(train(path, settings, micro, toggle))
            except Exception as error:  # noqa: BLE001 - reported to the test, which names the run
                results.append(f"{type(error).__name__}: {error}")
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
