"""The model and data the recipes of docs/distributed.md share: a stack of residual MLP blocks
on generated classification data, the same global batches whatever the number of processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

RULES = Path(__file__).with_name("scale.reg")
BATCH = 32  # the global batch: every process count sees the same examples per step


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, features: int = 12, width: int = 16, blocks: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model() -> Toy:
    torch.manual_seed(0)
    return Toy()


def batches(steps: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's global batch, this rank's contiguous share of it."""
    share = BATCH // world
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)
        yield x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
