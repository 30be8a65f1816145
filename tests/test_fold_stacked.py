"""group_lasso's fold off the CPU (regdsl.fold_stacked): weights of one shape stacked, their norms in
one kernel and their gradients in one ``_foreach_add_``. Run here on the CPU with the CPU's own path
switched off (FoldPlan.scratch_devices), as CUDA takes it; tests/test_cuda.py counts the kernels
on a GPU. Every expected gradient is the documented formula, λ·w_i/‖w_i‖₂ per slice (0 on an
all-zero slice, λ·sign(w) for a 1-D tensor), written in the test."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import ProfilerActivity, profile

import regdsl
from regdsl import fold, fold_stacked


@pytest.fixture(autouse=True)
def off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fold.FoldPlan, "scratch_devices", ())


class Shapes(nn.Module):
    """One weight (and a bias, unless ``biases=False``) per shape listed, in that order, as ``w0``, ``w1``, ..."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float64, biases: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(len(shapes))
        for k, shape in enumerate(shapes):
            self.register_parameter(f"w{k}", nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)))
            if biases:
                self.register_parameter(f"b{k}", nn.Parameter(torch.randn(shape[0], generator=gen, dtype=dtype)))


def by_hand(model: nn.Module, lam: float, dim: int) -> dict[str, torch.Tensor]:
    want = {}
    for name, p in model.named_parameters():
        w = p.detach().double()
        if w.ndim == 1:
            want[name] = lam * w.sign()
            continue
        keep = dim % w.ndim
        norms = w.pow(2).sum(dim=[d for d in range(w.ndim) if d != keep], keepdim=True).sqrt()
        want[name] = torch.where(norms > 0, lam * w / norms, torch.zeros_like(w))
    return want


def fold_once(model: nn.Module, rules: str) -> tuple[dict[str, torch.Tensor], collections.Counter[str]]:
    """What one folded step (lr 0) adds to zero gradients, and the ops the step called."""
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    calls = collections.Counter(e.name for e in prof.events() if e.cpu_parent is None or "_foreach" not in e.cpu_parent.name)
    return {n: p.grad.double() for n, p in model.named_parameters()}, calls


def assert_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_weights_of_one_shape_fold_as_one_stack_wherever_they_are() -> None:
    # A ResNet stage's order: shapes A, B, A, B, A, B, then C alone and D twice (too few to stack:
    # two weights cost fewer kernels one at a time). Two stacks (A x3, B x3), not runs.
    a, b, c, d = (8, 4), (4, 8, 3), (5, 6), (2, 7)
    model = Shapes([a, b, a, b, a, b, c, d, d])
    with torch.no_grad():
        model.w2[1].zero_()  # an all-zero slice in a stack adds 0
    got, calls = fold_once(model, "all group_lasso 0.05")
    assert_grads(got, by_hand(model, 0.05, 0))
    assert torch.equal(got["w2"][1], torch.zeros(4, dtype=torch.float64))
    assert calls["aten::stack"] == 2
    assert calls["aten::_foreach_add_"] == 2  # one per stack, into its weights' gradients
    assert calls["aten::_foreach_addcdiv_"] == 1  # C and the two D


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_each_stack_takes_the_norms_along_the_rules_dimension(dim: int) -> None:
    model = Shapes([(6, 4, 3)] * 3 + [(6, 4)] * 4, biases=False)
    got, calls = fold_once(model, f"all group_lasso 0.3 dim={dim}")
    assert_grads(got, by_hand(model, 0.3, dim))
    assert calls["aten::stack"] == 2


def test_a_weight_over_the_size_limit_and_a_stack_over_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Shapes([(4, 4)] * 7 + [(16, 16)] * 3)
    monkeypatch.setattr(fold_stacked, "STACKED", 16 * 16 * 8 - 1)  # the three 16x16 go one at a time
    monkeypatch.setattr(fold_stacked, "STACK_LIMIT", 3 * 4 * 4 * 8)  # three 4x4 a stack: 3 + 3, the seventh alone
    got, calls = fold_once(model, "all group_lasso 0.1")
    assert_grads(got, by_hand(model, 0.1, 0))
    assert calls["aten::stack"] == 2


def test_a_nan_weight_stays_nan_in_its_slice_only() -> None:
    model = Shapes([(3, 4)] * 3, biases=False)
    with torch.no_grad():
        model.w1[2, 1] = float("nan")
    got, _ = fold_once(model, "all group_lasso 1e6")
    assert got["w1"][2].isnan().all()
    assert not got["w1"][[0, 1]].isnan().any() and not got["w0"].isnan().any() and not got["w2"].isnan().any()
    want = by_hand(model, 1e6, 0)
    torch.testing.assert_close(got["w1"][[0, 1]], want["w1"][[0, 1]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_not_stacked_and_fold_alike(dtype: torch.dtype) -> None:
    # The stack divides in place, in the weights' dtype: only float32 and float64 are stacked.
    model = Shapes([(4, 8)] * 3, dtype=dtype)
    got, calls = fold_once(model, "all group_lasso 0.05")
    assert calls["aten::stack"] == 0
    want = by_hand(model, 0.05, 0)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-2, atol=1e-4)


SHAPES = [(3, 4), (4, 3), (2, 3, 2), (3, 4)]


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(SHAPES) - 1), min_size=1, max_size=8),
    dim=st.sampled_from([0, 1, -1]),
    lam=st.floats(1e-4, 10.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_any_mix_of_shapes_folds_the_documented_gradient(picks: list[int], dim: int, lam: float, dtype: torch.dtype) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fold.FoldPlan, "scratch_devices", ())
        model = Shapes([SHAPES[k] for k in picks], dtype=dtype, biases=dim != 1)
        got, _ = fold_once(model, f"all group_lasso {lam!r} dim={dim}")
    for name, value in by_hand(model, lam, dim).items():
        torch.testing.assert_close(got[name], value, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-9 * lam)


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_step_takes_the_stacks_norms_before_its_graph() -> None:
    model = Shapes([(4, 3), (5, 2), (4, 3), (4, 3)])
    reg = regdsl.parse("all group_lasso 0.05").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    for _ in range(2):  # the second step reuses the buffer the first one laid out
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
    assert collections.Counter(e.name for e in prof.events())["aten::stack"] == 1  # the three (4, 3)
    assert_grads({n: p.grad.double() for n, p in model.named_parameters()}, by_hand(model, 0.05, 0))
