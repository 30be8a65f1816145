"""The compiled paths: attach(optimizer, fold=True) under an optimizer step compiled with torch.compile,
as ``torch.compile(opt.step)`` (the fold's pre-hook traced, a graph of its own) and as
``reg.compiled_step(opt)`` (the fold inside the update's graph).

The fold is traced with tensor strengths, so a schedule moving every strength recompiles
nothing, and the values are the eager fold's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import MLP, seeded
from torch._dynamo.utils import counters

import regdsl
from regdsl import fold_kernels

RULES = (
    "layer fc1.weight l1 0.05 warmup 3\n"
    "layer fc2.weight l2 0.3 to init warmup 2 group_lasso 0.05 from 1\n"
    "layer head.weight orthogonal 0.02 cosine to 0.0 over 4\n"
    "layer fc2.bias l2 0.1 until 3\n"
)
STEPS = 6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def train(compiled: str | None) -> list[dict[str, torch.Tensor]]:
    """``compiled``: None (eager), "hooked" (torch.compile(opt.step)) or "fused" (reg.compiled_step)."""
    seeded(0)
    model = MLP()
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)  # no momentum: no state appears after step 1
    reg.attach(opt, fold=True)
    if compiled == "hooked":
        opt.step = torch.compile(opt.step)
    elif compiled == "fused":
        opt.step = reg.compiled_step(opt)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    weights = []
    for step in range(STEPS):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if compiled and step == 1:
            graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=compiled is not None and step >= 1):
            opt.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    if compiled:
        assert counters["stats"]["unique_graphs"] == graphs
        assert reg.step == STEPS
    return weights


@pytest.mark.parametrize("compiled", ["hooked", "fused"])
def test_a_compiled_step_folds_without_recompiling_as_the_schedules_move(monkeypatch: pytest.MonkeyPatch, compiled: str) -> None:
    eager = train(compiled=None)

    def not_eager(*args: object) -> None:
        raise AssertionError("the fold ran eagerly inside the compiled step")

    for method in ("_fold_float", "_each_l1", "_each_l2", "_all_batched"):  # the last three: a tiny bucket's bare kernels
        monkeypatch.setattr(fold_kernels.Bucket, method, not_eager)
    for step, (got, want) in enumerate(zip(train(compiled), eager)):
        for name, value in want.items():
            torch.testing.assert_close(
                got[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, s=step, n=name: f"{s} {n}: {m}"
            )
