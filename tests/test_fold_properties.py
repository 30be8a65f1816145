"""Properties of the folded and the loss path's gradients, and of the terms' values, on tensors
hypothesis draws: any shape of one to four dimensions, exact zeros (elements and whole slices),
several terms on one tensor, a tensor without a gradient, one large enough (over 64 KiB) to take
the CPU's large-tensor kernels.

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
    shape: tuple[int, ...]
    terms: dict[str, tuple[float, int | None]]  # kind -> (strength, dim for group_lasso)
    zero_slice: bool  # the first slice (along group_lasso's dim, else dim 0) is all zeros
    has_grad: bool
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(130, 70), (70, 130), (9000,), (40, 3, 9, 9)]))  # over 64 KiB in float64
    else:
        sizes = st.integers(2, 5) | st.just(1)  # mostly over 1: a size-1 dimension hides which dimension is which
        shape = tuple(draw(st.lists(sizes, min_size=1, max_size=4)))
    kinds = ["l1", "l2", "l2_to", "group_lasso"] + (["orthogonal"] if len(shape) >= 2 else [])
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3, unique=True))
    if "l2" in chosen and "l2_to" in chosen:  # one l2 term per tensor: the later rule would win
        chosen.remove("l2")
    terms = {
        kind: (
            draw(st.sampled_from(LAMBDAS)),
            draw(st.integers(-len(shape), len(shape) - 1)) if kind == "group_lasso" else None,
        )
        for kind in chosen
    }
    return Case(shape, terms, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**16)))


def rules(case: Case, name: str) -> str:
    """One rule on the tensor ``name`` with every term of ``case``."""
    words = []
    for kind, (lam, dim) in case.terms.items():
        if kind == "l2_to":
            words.append(f"l2 {lam} to init")
        elif kind == "group_lasso":
            words.append(f"group_lasso {lam} dim={dim}")
        else:
            words.append(f"{kind} {lam}")
    return f"layer {name} " + " ".join(words) + "\n"


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
        else:  # orthogonal: lam * ||G - I||_F^2, W = w as (out, -1), G the smaller Gram matrix
            v = w.detach().clone().requires_grad_(True)
            m = v.reshape(v.shape[0], -1)
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            loss = lam * (gram - torch.eye(gram.shape[0], dtype=w.dtype)).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, v)
            total += grad
    return total


@dataclass
class Setup:
    model: nn.Module
    reg: regdsl.Regularizer
    w0: torch.Tensor  # the weights at compile time: l2 ... to init's reference
    w: torch.Tensor  # the weights at the step, moved from w0 (its zeros kept)
    grad: torch.Tensor | None


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
            m = w.reshape(w.shape[0], -1)
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            out["orthogonal:1"] = lam * float((gram - torch.eye(gram.shape[0], dtype=w.dtype)).pow(2).sum())
    return out


def build(case: Case) -> Setup:
    gen = torch.Generator().manual_seed(case.seed)
    w = torch.randn(case.shape, generator=gen, dtype=torch.float64)
    if case.zero_slice:
        dim = next((d for kind, (_, d) in case.terms.items() if kind == "group_lasso"), 0)
        w.select(dim, 0).zero_()
    w[(torch.rand(case.shape, generator=gen) < 0.2)] = 0.0  # exact zeros: sign(0) is 0 on both paths
    model = nn.Module()
    model.register_parameter("w", nn.Parameter(w))
    model.register_parameter("other", nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64)))
    w0 = w.clone()
    reg = regdsl.parse(rules(case, "w")).compile(model)
    with torch.no_grad():  # training moved it since compile(), so that w - w0 is not 0
        model.w.add_(torch.randn(case.shape, generator=gen, dtype=torch.float64) * (w0 != 0))
    grad = torch.randn(case.shape, generator=gen, dtype=torch.float64) if case.has_grad else None
    model.w.grad = None if grad is None else grad.clone()
    return Setup(model, reg, w0, model.w.detach().clone(), grad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_fold_and_the_loss_path_both_add_each_terms_documented_gradient(case: Case) -> None:
    """And values() and penalty() give each term's documented loss."""
    # The fast path: one SGD step at lr 1 (w <- w - g), the fold's hook inside it.
    fast = build(case)
    opt = torch.optim.SGD(fast.model.parameters(), lr=1.0)
    fast.reg.attach(opt, fold=True)
    opt.step()
    folded = fast.w - fast.model.w.detach()
    assert float(fast.reg.penalty()) == 0.0  # every term folded: nothing left for the loss
    fast.reg.detach()

    # The loss path: penalty().backward() accumulates into the same gradient.
    slow = build(case)
    want_values = expected_values(case, slow.w, slow.w0)
    values = {label: float(v) for label, v in slow.reg.values().items()}
    assert values.keys() == want_values.keys()
    for label, value in want_values.items():
        assert math.isclose(values[label], value, rel_tol=1e-9, abs_tol=1e-12), label
    penalty = slow.reg.penalty()
    assert math.isclose(float(penalty.detach()), sum(want_values.values()), rel_tol=1e-9, abs_tol=1e-12)
    penalty.backward()
    through_loss = slow.model.w.grad

    want = expected_gradient(case, fast.w, fast.w0) + (fast.grad if fast.grad is not None else 0.0)
    torch.testing.assert_close(folded, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(through_loss, want, rtol=1e-9, atol=1e-12)
    assert fast.model.other.grad is None and slow.model.other.grad is None  # an unselected tensor gets nothing
