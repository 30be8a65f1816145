"""The fold of a tiny model: each folded tensor checked once per step, and CPU buckets of a few
small tensors running their kernels with nothing around them (docs/fold.md, "Checked once per
step"). When a check fails (a gradient missing, a tensor frozen or unfrozen) the buckets take the
general path, and the next step that passes the check is bare again.

The references are the formulas of docs/fold.md written out per tensor, in float64.
"""

from __future__ import annotations

import collections
import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import ProfilerActivity, profile

import regdsl
from regdsl import fold_kernels


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)).double()


def by_hand(w: torch.Tensor, l1: float, l2: float, gl: float) -> torch.Tensor:
    """``l1·sign(w) + l2·w + gl·w_i/‖w_i‖`` with rows as slices (0 for an all-zero row)."""
    w = w.detach()
    rows = torch.sqrt((w * w).sum(dim=1, keepdim=True))
    lasso = torch.where(rows > 0, w / torch.where(rows > 0, rows, torch.ones_like(rows)), torch.zeros_like(w))
    return l1 * torch.sign(w) + l2 * w + gl * lasso


def fold_calls(reg: regdsl.Regularizer) -> collections.Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        reg.fold()
    # What the fold calls itself, not what a _foreach kernel calls per tensor on the CPU.
    return collections.Counter(
        e.name for e in prof.events() if e.cpu_parent is None or "_foreach" not in e.cpu_parent.name
    )


@pytest.mark.parametrize(
    ("rules", "l1", "l2", "gl", "kernels"),
    [
        ("all l1 0.01 l2 0.1\nexclude bias", 0.01, 0.1, 0.0, {"aten::sign": 2, "aten::add_": 4}),
        (
            "all group_lasso 0.05\nexclude bias",
            0.0,
            0.0,
            0.05,
            {"aten::linalg_vector_norm": 2, "aten::clamp_min_": 1, "aten::addcdiv_": 2},
        ),
    ],
    ids=["elastic net", "group_lasso"],
)
def test_a_tiny_models_fold_runs_one_kernel_per_tensor_and_term(
    rules: str, l1: float, l2: float, gl: float, kernels: dict[str, int]
) -> None:
    # Two weights: a _foreach call over two small tensors costs more inside a step than their kernels.
    model = tiny()
    with torch.no_grad():
        model[0].weight[3].zero_()  # an all-zero row: group_lasso adds 0 there
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True, fold_hook=False)
    model(torch.randn(4, 10, dtype=torch.float64)).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    calls = fold_calls(reg)
    assert {name: calls[name] for name in kernels} == kernels
    assert not [name for name in calls if "_foreach" in name]
    for name, p in model.named_parameters():
        want = before[name] + (by_hand(p, l1, l2, gl) if name.endswith("weight") else 0)
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-15)


STATES = ("gradient", "no gradient", "frozen", "unfrozen")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(STATES), st.sampled_from(STATES)), min_size=1, max_size=4),
    st.sampled_from([0.0, 0.01]),
    st.sampled_from([0.0, 0.1]),
    st.sampled_from([0.0, 0.05]),
)
def test_each_step_folds_by_the_formulas_whatever_the_gradients_and_flags_were(
    steps: list[tuple[str, str]], l1: float, l2: float, gl: float
) -> None:
    """Per step and per weight: a gradient (backward ran), none (``.grad`` is None: the term alone is
    its gradient, as the loss path gives it), frozen before the step (nothing added, whatever
    ``.grad`` it kept) or unfrozen again."""
    terms = " ".join(f"{kind} {lam}" for kind, lam in (("l1", l1), ("l2", l2), ("group_lasso", gl)) if lam)
    if not terms:
        return
    model = tiny()
    reg = regdsl.parse(f"all {terms}\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True, fold_hook=False)
    weights = [model[0].weight, model[2].weight]
    x = torch.randn(4, 10, dtype=torch.float64)
    for states in steps:
        for w, state in zip(weights, states):
            w.requires_grad_(state != "frozen")
        opt.zero_grad(set_to_none=False)
        model(x).sum().backward()
        for w, state in zip(weights, states):
            if state == "no gradient":
                w.grad = None
        before = [None if w.grad is None else w.grad.clone() for w in weights]
        reg.fold()
        for w, state, old in zip(weights, states, before):
            if state == "frozen":
                assert w.grad is None or torch.equal(w.grad, old)
                continue
            start = torch.zeros_like(w) if old is None else old
            torch.testing.assert_close(w.grad, start + by_hand(w, l1, l2, gl), rtol=1e-12, atol=1e-15)
        opt.step()


def test_the_step_bookkeeping_runs_without_dynamos_wrapper_outside_a_trace() -> None:
    # Through torch.compiler.disable a call cost about 10 µs inside a tiny MLP's step.
    stacks: list[list[str]] = []

    def probe() -> None:
        stacks.append([frame.filename for frame in inspect.stack()])

    run = fold_kernels.eager(probe)
    run()

    @torch.compile(backend="eager", fullgraph=False)
    def traced(x: torch.Tensor) -> torch.Tensor:
        run()
        return x + 1

    traced(torch.ones(2))
    eager_stack, traced_stack = stacks
    assert not [name for name in eager_stack if "_dynamo" in name]
    assert [name for name in traced_stack if "_dynamo" in name]  # run eagerly, through dynamo's wrapper
