"""Properties of the folded and the loss path's gradients, and of the terms' values, on tensors
hypothesis draws: one to six tensors under one rule (one bucket), of one to four dimensions, some of
one shape (group_lasso stacks those), some over 64 KiB (the CPU's large-tensor kernels), with exact
zeros and all-zero slices, up to three terms each, some without a gradient yet.

The expected gradient of each term is its documented formula (docs/language.md), written out
below on the tensor's values; ``orthogonal``'s is autograd's of its loss, written out too.
Everything runs in float64, so the two paths and the reference agree to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import regdsl

LAMBDAS = [1e-3, 0.25, 3.0]


@dataclass(frozen=True)
class Case:
    shapes: tuple[tuple[int, ...], ...]  # the selected tensors, w0, w1, ...: one bucket, repeated shapes among them
    terms: dict[str, tuple[float, int | None]]  # kind -> (strength, dim for group_lasso), on every tensor
    zero_slice: tuple[bool, ...]  # per tensor: its first slice (along group_lasso's dim, else dim 0) is all zeros
    has_grad: tuple[bool, ...]  # per tensor: a gradient is there before the step
    seed: int


LARGE = [(130, 70), (70, 130), (9000,), (40, 3, 9, 9)]  # over 64 KiB in float64: the CPU's large-tensor kernels


@st.composite
def cases(draw: st.DrawFn) -> Case:
    sizes = st.integers(2, 5) | st.just(1)  # mostly over 1: a size-1 dimension hides which dimension is which
    small = st.lists(sizes, min_size=1, max_size=4).map(tuple)
    kinds_of_shape = draw(st.lists(st.sampled_from(LARGE) | small | small, min_size=1, max_size=3))
    # Drawn from a few shapes, so that same-shaped tensors sit next to each other (group_lasso stacks those).
    shapes = tuple(draw(st.lists(st.sampled_from(kinds_of_shape), min_size=1, max_size=6)))
    ndim = min(len(shape) for shape in shapes)
    kinds = ["l1", "l2", "l2_to", "group_lasso"] + (["orthogonal"] if ndim >= 2 else [])
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3, unique=True))
    if "l2" in chosen and "l2_to" in chosen:  # one l2 term per tensor: the later rule would win
        chosen.remove("l2")
    terms = {
        kind: (
            draw(st.sampled_from(LAMBDAS)),
            draw(st.integers(-ndim, ndim - 1)) if kind == "group_lasso" else None,
        )
        for kind in chosen
    }
    flags = st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)).map(tuple)
    return Case(shapes, terms, draw(flags), draw(flags), draw(st.integers(0, 2**16)))


def rules(case: Case) -> str:
    """One rule on the tensors ``w*`` with every term of ``case``."""
    words = []
    for kind, (lam, dim) in case.terms.items():
        if kind == "l2_to":
            words.append(f"l2 {lam} to init")
        elif kind == "group_lasso":
            words.append(f"group_lasso {lam} dim={dim}")
        else:
            words.append(f"{kind} {lam}")
    return "layer w* " + " ".join(words) + "\n"


def orthogonal_loss(lam: float, w: torch.Tensor) -> torch.Tensor:
    """lam * ||G - I||_F^2, W = w as (out, -1), G the smaller of W W^T and W^T W."""
    m = w.reshape(w.shape[0], -1)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return lam * (gram - torch.eye(gram.shape[0], dtype=w.dtype)).pow(2).sum()


def expected_gradient(case: Case, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Each term's documented gradient at ``w`` (``w0``: its value at compile time), summed."""
    total = torch.zeros_like(w)
    for kind, (lam, dim) in case.terms.items():
        if kind == "l1":
            total += lam * torch.sign(w)
        elif kind == "l2":
            total += lam * w
        elif kind == "l2_to":
            total += lam * (w - w0)
        elif kind == "group_lasso":
            # Slice i along dim: lam * w_i / ||w_i||, 0 on an all-zero slice. A 1-D tensor's slices are its elements.
            moved = w.movedim(dim, 0)
            grad = torch.zeros_like(moved)
            for i in range(moved.shape[0]):
                norm = float(moved[i].pow(2).sum().sqrt())
                if norm > 0:
                    grad[i] = lam * moved[i] / norm
            total += grad.movedim(0, dim)
        else:
            v = w.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(orthogonal_loss(lam, v), v)
            total += grad
    return total


def expected_values(case: Case, w: torch.Tensor, w0: torch.Tensor) -> dict[str, float]:
    """Each term's documented loss at ``w``, by ``values()``' label (kind and rule line)."""
    out = {}
    for kind, (lam, dim) in case.terms.items():
        if kind == "l1":
            out["l1:1"] = lam * float(w.abs().sum())
        elif kind == "l2":
            out["l2:1"] = lam / 2 * float(w.pow(2).sum())
        elif kind == "l2_to":
            out["l2:1"] = lam / 2 * float((w - w0).pow(2).sum())
        elif kind == "group_lasso":
            moved = w.movedim(dim, 0)
            out["group_lasso:1"] = lam * sum(float(moved[i].pow(2).sum().sqrt()) for i in range(moved.shape[0]))
        else:
            out["orthogonal:1"] = float(orthogonal_loss(lam, w))
    return out


@dataclass
class Setup:
    model: nn.Module
    reg: regdsl.Regularizer
    params: list[nn.Parameter]
    w0: list[torch.Tensor]  # the weights at compile time: l2 ... to init's reference
    w: list[torch.Tensor]  # the weights at the step, moved from w0 (their zeros kept)
    grads: list[torch.Tensor | None]


def build(case: Case) -> Setup:
    gen = torch.Generator().manual_seed(case.seed)
    model = nn.Module()
    dim = next((d for kind, (_, d) in case.terms.items() if kind == "group_lasso"), 0)
    for k, (shape, zero_slice) in enumerate(zip(case.shapes, case.zero_slice)):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        if zero_slice:
            w.select(dim, 0).zero_()
        w[(torch.rand(shape, generator=gen) < 0.2)] = 0.0  # exact zeros: sign(0) is 0 on both paths
        model.register_parameter(f"w{k}", nn.Parameter(w))
    model.register_parameter("other", nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64)))
    params = [getattr(model, f"w{k}") for k in range(len(case.shapes))]
    w0 = [p.detach().clone() for p in params]
    reg = regdsl.parse(rules(case)).compile(model)
    grads = []
    with torch.no_grad():
        for p, has_grad in zip(params, case.has_grad):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (p != 0))  # moved since compile()
            grads.append(torch.randn(p.shape, generator=gen, dtype=torch.float64) if has_grad else None)
            p.grad = None if grads[-1] is None else grads[-1].clone()
    return Setup(model, reg, params, w0, [p.detach().clone() for p in params], grads)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_fold_and_the_loss_path_both_add_each_terms_documented_gradient(case: Case) -> None:
    """And values() and penalty() give each term's documented loss."""
    # The fast path: one SGD step at lr 1 (w <- w - g), the fold's hook inside it.
    fast = build(case)
    opt = torch.optim.SGD(fast.model.parameters(), lr=1.0)
    fast.reg.attach(opt, fold=True)
    opt.step()
    folded = [w - p.detach() for w, p in zip(fast.w, fast.params)]
    assert float(fast.reg.penalty()) == 0.0  # every term folded: nothing left for the loss
    fast.reg.detach()

    # The loss path: penalty().backward() accumulates into the same gradients.
    slow = build(case)
    want_values: dict[str, float] = {}
    for w, w0 in zip(slow.w, slow.w0):
        for label, value in expected_values(case, w, w0).items():
            want_values[label] = want_values.get(label, 0.0) + value
    values = {label: float(v) for label, v in slow.reg.values().items()}
    assert values.keys() == want_values.keys()
    for label, value in want_values.items():
        assert math.isclose(values[label], value, rel_tol=1e-9, abs_tol=1e-12), label
    penalty = slow.reg.penalty()
    assert math.isclose(float(penalty.detach()), sum(want_values.values()), rel_tol=1e-9, abs_tol=1e-12)
    penalty.backward()

    for k, (w, w0, grad) in enumerate(zip(fast.w, fast.w0, fast.grads)):
        want = expected_gradient(case, w, w0) + (grad if grad is not None else 0.0)
        torch.testing.assert_close(folded[k], want, rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"fold, w{k}: {m}")
        torch.testing.assert_close(
            slow.params[k].grad, want, rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"loss, w{k}: {m}"
        )
    assert fast.model.other.grad is None and slow.model.other.grad is None  # an unselected tensor gets nothing
