"""Elastic net folded in one sweep (regdsl.fold_elastic): l1 and l2 on the same large CPU tensors,
slice by slice. Expected values are the plain formulas, differentiated by autograd in float64."""

from __future__ import annotations

import pytest
import torch
from models import seeded
from torch import nn
from torch.profiler import ProfilerActivity, profile

import regdsl
from regdsl import fold_elastic
from regdsl.fold import FoldPlan, can_fold
from regdsl.fold_elastic import ElasticBucket

L1, L2 = 0.01, 0.1


class Shapes(nn.Module):
    """Large tensors of every shape the sweep slices differently, one small one, one with l1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Parameter(torch.randn(600, 1000))  # 2.4 MB: several slices of whole rows
        self.conv = nn.Parameter(torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last))
        self.flat = nn.Parameter(torch.randn(40_000))  # one dimension: slices of elements
        self.wide = nn.Parameter(torch.randn(2, 300_000))  # one row is larger than a slice
        self.small = nn.Parameter(torch.randn(5, 7))  # 140 bytes: stays in the l1 and l2 buckets
        self.only = nn.Parameter(torch.randn(128, 256))  # l1 alone
        with torch.no_grad():
            self.tall[3, :10].zero_()  # sign(0) = 0
            self.flat[:5].zero_()


RULES = "layer tall, conv, flat, wide, small l1 0.01 l2 0.1\nlayer only l1 0.01"


def by_hand(model: nn.Module, l1: float = L1, l2: float = L2) -> dict[str, torch.Tensor]:
    """The gradient of λ₁·Σ|w| + λ₂/2·Σw² (l1 alone on `only`), by autograd in float64."""
    grads = {}
    for name, p in model.named_parameters():
        w = p.detach().double().requires_grad_()
        value = l1 * w.abs().sum() + (0.0 if name == "only" else l2 / 2 * w.square().sum())
        value.backward()
        grads[name] = w.grad
    return grads


def folded(model: nn.Module, reg: regdsl.Regularizer, grads: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What one folded SGD step (lr 0) adds to the gradients (zeros, or ``grads``)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    for name, p in model.named_parameters():
        p.grad = torch.zeros_like(p) if grads is None else grads[name].clone()
    opt.step()
    reg.detach()
    return {n: p.grad for n, p in model.named_parameters()}


def plan_of(model: nn.Module, rules: str) -> FoldPlan:
    reg = regdsl.parse(rules).compile(model)
    return FoldPlan([i for i in reg._loss_items if can_fold(i)])


def test_the_sweep_is_the_formula_on_every_shape() -> None:
    seeded(0)
    model = Shapes()
    plan = plan_of(model, RULES)
    (elastic,) = [b for b in plan._buckets if isinstance(b, ElasticBucket)]
    assert [p.shape for p in elastic.params] == [model.tall.shape, model.conv.shape, model.flat.shape, model.wide.shape]
    reg = regdsl.parse(RULES).compile(model)
    got = folded(model, reg)
    want = by_hand(model)
    assert got["conv"].is_contiguous(memory_format=torch.channels_last)
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def test_slices_cover_each_tensor_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 64 KiB slice: tall (600 rows of 4000 bytes) takes 16 rows per slice, 38 slices; added onto a
    # gradient that is not zero, every element gets the terms exactly once.
    monkeypatch.setattr(fold_elastic, "SLICE", 64 << 10)
    seeded(1)
    model = Shapes()
    reg = regdsl.parse("layer tall l1 0.01 l2 0.1").compile(model)
    start = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = folded(model, reg, start)
    assert sum(e.name == "aten::sign" for e in prof.events()) == 38
    want = start["tall"].double() + L1 * model.tall.detach().double().sign() + L2 * model.tall.detach().double()
    torch.testing.assert_close(got["tall"].double(), want, rtol=1e-6, atol=1e-6)  # float32 sums


def attached(rules: str, seed: int) -> tuple[Shapes, regdsl.Regularizer, torch.optim.Optimizer]:
    """A fresh Shapes under ``rules``, attached with fold=True to an SGD of lr 0 (the weights stay)."""
    seeded(seed)
    model = Shapes()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    return model, reg, opt


def test_each_strength_moves_on_its_own_schedule() -> None:
    # l1 ramps from 0 over 2 steps: at step 0 only l2 folds, at step 1 l1 at half strength.
    model, _, opt = attached("layer tall, wide l1 0.01 warmup 2 l2 0.1", seed=2)
    for l1 in (0.0, L1 / 2, L1):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for name in ("tall", "wide"):
            w = getattr(model, name).detach()
            torch.testing.assert_close(getattr(model, name).grad, l1 * w.sign() + L2 * w)


def test_a_parameter_without_gradient() -> None:
    # A frozen one is skipped; one that requires grad but has none gets the terms alone, as on the loss path.
    model, _, opt = attached(RULES, seed=3)
    model.tall.requires_grad_(False)
    opt.step()
    assert model.tall.grad is None
    w = model.conv.detach()
    torch.testing.assert_close(model.conv.grad, L1 * w.sign() + L2 * w)


def test_at_strength_zero_a_missing_gradient_becomes_zeros() -> None:
    # Both terms ramp from 0: at step 0 they add nothing, but the gradient exists, as on the loss path.
    model, _, opt = attached("layer tall l1 0.01 warmup 2 l2 0.1 warmup 2", seed=3)
    opt.step()
    assert torch.equal(model.tall.grad, torch.zeros_like(model.tall))


def test_a_tensor_strength_folds_each_term_apart_with_the_same_result() -> None:
    # A fused optimizer under GradScaler hands the fold its grad_scale: the two terms then fold as
    # their own buckets, with tensor strengths, and scaled.
    seeded(4)
    model = Shapes()
    plan = plan_of(model, RULES)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    plan(torch.tensor(8.0))
    want = by_hand(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), 8 * want[name], rtol=1e-6, atol=1e-8)


def test_the_sweep_allocates_nothing_per_step() -> None:
    seeded(5)
    model = Shapes()
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, foreach=False)
    reg.attach(opt, fold=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # warm up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    # The small tensor's and `only`'s l1 (sign into a _foreach temporary and the scratch buffer).
    assert allocated <= 4 * 5 * 7 * 2


@pytest.mark.parametrize(
    ("rules", "swept"),
    [
        ("layer tall l1 0.01\nlayer tall, wide l2 0.1", ["tall"]),  # wide has l2 alone
        ("layer tall, wide l1 0.01 l2 0.1 to init", []),  # 'to init' is another term
        ("layer tall, small l1 0.01 l2 0.1", ["tall"]),  # small is within SMALL
    ],
)
def test_only_large_tensors_with_l1_and_l2_are_swept(rules: str, swept: list[str]) -> None:
    seeded(6)
    model = Shapes()
    plan = plan_of(model, rules)
    got = [p for b in plan._buckets if isinstance(b, ElasticBucket) for p in b.params]
    assert [id(p) for p in got] == [id(getattr(model, n)) for n in swept]


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_step_folds_the_pair_in_its_graph() -> None:
    # Inside compiled_step's graph the pair folds as two buckets with tensor strengths, in one graph.
    from torch._dynamo.utils import counters

    seeded(7)
    model = nn.Linear(200, 100, bias=False)  # 80 KB: a swept tensor when eager
    reg = regdsl.parse("all l1 0.01 l2 0.1").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    start = torch.randn_like(model.weight)
    for _ in range(2):
        model.weight.grad = start.clone()
        opt.step()
    w = model.weight.detach()
    torch.testing.assert_close(model.weight.grad, start + L1 * w.sign() + L2 * w)
    assert counters["stats"]["unique_graphs"] == 1
