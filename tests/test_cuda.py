"""What only a CUDA device can show: the fold's kernels are batched (``_foreach``, and group_lasso's
stacks of same-shaped weights), not one per tensor; the compiled path's Triton graph folds the terms and keeps them across a moving
schedule; a fused AdamW under ``GradScaler`` and float16 autocast gets exactly the gradients of
a hand-written penalty. Every test here skips without CUDA (CI has none)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import regdsl

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def deep(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)]).cuda()


def fold_kernels(layers: int, rules: str) -> collections.Counter[str]:
    """The CUDA kernels (and copies) one ``reg.fold(opt)`` launches, after a first fold made its plan."""
    model = deep(layers)
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt, fold=True, fold_hook=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    reg.fold(opt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        reg.fold(opt)
        torch.cuda.synchronize()
    return collections.Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)


@pytest.mark.parametrize(
    "rules",
    [
        "all l2 1e-3",
        "all l1 1e-4",
        "all l1 1e-4 l2 1e-3",
        "all l2 1e-3 to init",
        "all group_lasso 1e-3",
    ],
)
def test_the_fold_launches_as_many_kernels_for_32_weights_as_for_8(rules: str) -> None:
    # Counted, not timed: a per-tensor loop would launch 4x as many kernels for 4x the weights.
    few, many = fold_kernels(8, rules + "\nexclude bias"), fold_kernels(32, rules + "\nexclude bias")
    assert 0 < sum(few.values()) < 8, few
    assert many == few, (few, many)


def test_group_lasso_stacks_on_cuda_fold_the_documented_gradient() -> None:
    # Shapes A, B, A, A, C: one stack of three (A), B and C alone; an all-zero slice adds 0.
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 16), (16, 8), (16, 8), (4, 4, 3)]
    weights = nn.ParameterList(nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes).cuda()
    with torch.no_grad():
        weights[2][5].zero_()
    reg = regdsl.parse("all group_lasso 0.07").compile(weights)
    opt = torch.optim.SGD(weights.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    for p in weights:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in weights:
        w = p.detach().cpu()
        norms = w.pow(2).sum(dim=list(range(1, w.ndim)), keepdim=True).sqrt()
        want = torch.where(norms > 0, 0.07 * w / norms, torch.zeros_like(w))
        torch.testing.assert_close(p.grad.cpu(), want, rtol=1e-9, atol=1e-12)
    assert torch.equal(weights[2].grad[5].cpu(), torch.zeros(8, dtype=torch.float64))


def test_the_compiled_path_on_cuda_folds_as_the_eager_fold_without_recompiling(fresh_dynamo: None) -> None:
    from torch._dynamo.utils import counters

    rules = (
        "layer 0.weight l1 0.05 warmup 3\n"
        "layer 1.weight l2 0.3 to init warmup 2 group_lasso 0.05 from 1\n"
        "layer 2.weight orthogonal 0.02 cosine to 0.0 over 4\n"
        "layer 2.bias l2 0.1 until 3\n"
    )
    x = torch.randn(16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    for compiled in (False, True):
        model = deep(3)
        reg = regdsl.parse(rules).compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
        reg.attach(opt, fold=True)
        if compiled:
            opt.step = reg.compiled_step(opt)
        for step in range(6):
            opt.zero_grad()
            model(x).square().mean().backward()
            if step == 1:
                graphs = counters["stats"]["unique_graphs"]
            with torch._dynamo.config.patch(error_on_recompile=compiled and step >= 1):
                opt.step()
        assert not compiled or counters["stats"]["unique_graphs"] == graphs
        runs[compiled] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in runs[False].items():
        torch.testing.assert_close(runs[True][name], value, rtol=1e-5, atol=1e-6)


L1, L2, GROUP, TO_INIT = 1e-3, 1e-2, 1e-2, 5e-2
AMP_RULES = f"layer 0.weight l1 {L1} l2 {L2}\nlayer 2.weight group_lasso {GROUP}\nlayer 4.weight l2 {TO_INIT} to init\n"


def hand_written_penalty(model: nn.Sequential, w0: torch.Tensor) -> torch.Tensor:
    """AMP_RULES' terms as docs/language.md writes them: λ·Σ|w| + λ/2·Σw², λ·Σ_i‖w_i‖ (rows), λ/2·Σ(w − w₀)²."""
    a, b, c = model[0].weight, model[2].weight, model[4].weight
    return (
        L1 * a.abs().sum()
        + L2 / 2 * (a * a).sum()
        + GROUP * b.norm(dim=1).sum()
        + TO_INIT / 2 * ((c - w0) ** 2).sum()
    )


@pytest.mark.parametrize("path", ["fold", "loss"])
def test_fused_adamw_under_grad_scaler_and_float16_autocast_gets_the_hand_written_gradients(path: str) -> None:
    # A fused optimizer unscales inside its kernel: the fold must add terms scaled by the same
    # factor (optimizer.grad_scale), and the loss path's penalty is scaled with the loss.
    x = torch.randn(32, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    y = torch.randn(32, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    runs = []
    for regularize in ("regdsl", "by hand"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).cuda()
        w0 = model[4].weight.detach().clone()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
        scaler = torch.amp.GradScaler("cuda")
        reg = regdsl.parse(AMP_RULES).compile(model) if regularize == "regdsl" else None
        if reg is not None:
            reg.attach(opt, fold=path == "fold")
        for _ in range(5):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.mse_loss(model(x).float(), y)
            loss = loss + (reg.penalty() if reg is not None else hand_written_penalty(model, w0))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    got, want = runs
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(want["4.weight"], w0, atol=1e-3)  # the steps were taken, not all skipped
