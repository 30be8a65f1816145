"""Models for the model-aware checks (``regdsl.check``), by the name a golden file gives.

Each ``tests/data/check/NAME.reg`` starts with ``# model: NAME``; :data:`FACTORIES`
maps that name to a function that builds the model. The models that only the
checks need live here (lazy, sparse, frozen, a stand-in for FSDP's flat
parameter); the others come from ``models.py``.

Parameter names, in registration order, so the goldens can be derived by hand:

* ``lazy``: fc1.weight, fc1.bias (``nn.LazyLinear(8)``, uninitialized), head.weight, head.bias
* ``sparse``: embed.weight (``nn.Embedding(10, 4, sparse=True)``), head.weight, head.bias
* ``frozen_mlp``: the MLP with fc1.weight and fc1.bias frozen
* ``empty``: ``Sequential(ReLU())``, no parameter; ``all_frozen_mlp``: the MLP, all 6 tensors frozen
* ``fsdp_flat``: ``_fsdp_wrapped_module._flat_param`` (read as ``_flat_param``), 435 elements
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from models import CNN, MLP, TinyTransformer, bert, gpt2, seeded
from torch import nn


class LazyMLP(nn.Module):
    """fc1 is lazy: its weight and bias have no shape until the first forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.LazyLinear(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


class SparseEmbeddingModel(nn.Module):
    """A bag-of-words classifier with a sparse-gradient embedding (embed.weight is 10x4)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


def lazy() -> nn.Module:
    seeded()
    return LazyMLP()


def sparse() -> nn.Module:
    seeded()
    return SparseEmbeddingModel()


def frozen_mlp() -> nn.Module:
    """The MLP with its first layer frozen (as after loading a pretrained trunk)."""
    seeded()
    model = MLP()
    model.fc1.requires_grad_(False)
    return model


def fsdp_flat() -> nn.Module:
    """The parameter layout of ``FSDP(MLP(), use_orig_params=False)``, without a process group.

    FSDP replaces the wrapped module's parameters by one flat parameter registered
    as ``_fsdp_wrapped_module._flat_param``; regdsl removes the wrapper segment, so
    the rule file sees a single parameter called ``_flat_param``.
    """
    seeded()
    numel = sum(p.numel() for p in MLP().parameters())  # 96 + 16 + 256 + 16 + 48 + 3 = 435
    inner = nn.Module()
    inner.register_parameter("_flat_param", nn.Parameter(torch.randn(numel)))
    root = nn.Module()
    root.add_module("_fsdp_wrapped_module", inner)
    return root


def empty() -> nn.Module:
    """A model with no parameters at all (only an activation)."""
    return nn.Sequential(nn.ReLU())


def all_frozen_mlp() -> nn.Module:
    """The MLP with every parameter frozen: nothing left for an optimizer."""
    seeded()
    return MLP().requires_grad_(False)


def _seeded(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        seeded()
        return cls()

    return build


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "mlp": _seeded(MLP),
    "cnn": _seeded(CNN),
    "transformer": _seeded(TinyTransformer),
    "gpt2": gpt2,
    "bert": bert,
    "lazy": lazy,
    "sparse": sparse,
    "frozen_mlp": frozen_mlp,
    "fsdp_flat": fsdp_flat,
    "empty": empty,
    "all_frozen_mlp": all_frozen_mlp,
}


_MODEL_LINE = re.compile(r"# model: (\w+)\s*")


def model_of(path: Path) -> str:
    """The factory name a golden ``.reg`` file names on its first line, ``# model: NAME``."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    match = _MODEL_LINE.fullmatch(first)
    assert match, f"{path.name}: the first line must be '# model: NAME', got {first!r}"
    return match.group(1)


# ---------------------------------------------------------------- issue 4: activity terms need modules with outputs


class ActivityCNN(nn.Module):
    """A small CNN whose activations are modules, for the terms of issue 4 (activity terms select modules).

    Parameters, in registration order (7 tensors, 453 elements):
      conv1.weight 4x3x3x3 (108), conv1.bias 4, bn1.weight 4, bn1.bias 4,
      conv2.weight 8x4x3x3 (288, no bias), head.weight 5x8 (40), head.bias 5.
    Modules, in registration order, none with submodules:
      conv1 (Conv2d), bn1 (BatchNorm2d), act1 (ReLU), conv2 (Conv2d), act2 (ReLU),
      pool (AdaptiveAvgPool2d), head (Linear). act1, act2 and pool own no parameter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.head(self.pool(x).flatten(1))


def act_cnn() -> nn.Module:
    seeded()
    return ActivityCNN()


FACTORIES["act_cnn"] = act_cnn
