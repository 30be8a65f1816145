"""Loss terms keep their documented precision whatever the caller's ``torch.autocast`` state.

Training code calls ``reg.penalty()`` (and runs the forward pass whose activity terms it
collects) inside ``torch.autocast``. The terms must not follow it down to bfloat16: every loss
term, value and gradients, must come out inside ``torch.autocast("cpu", torch.bfloat16)``
exactly as it does outside. The cases are driven by the registry: every kind of
``regdsl.spec.VALUE_TERMS`` that ``tests/test_terms.py``'s ``REFERENCES`` exercises as a loss
(``LossRef``) or activity (``ActivityRef``) term runs here, on several models. Kinds that act
through the optimizer step (``StepRef``) compute no loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from models import CNN, MLP, TinyTransformer, randomize
from test_terms import REFERENCES, ActivityRef, LossRef
from torch import Tensor, nn

import regdsl
from regdsl.spec import VALUE_TERMS

AUTOCAST_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    input: Callable[[], Tensor]
    params: str  # a selector of weights that every parameter term accepts (2-D or more)
    modules: str  # a selector of modules that return one tensor


def _floats(*shape: int, dtype: torch.dtype = torch.float32) -> Callable[[], Tensor]:
    return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)


MODELS = {
    "mlp": Case(lambda: randomize(MLP()), _floats(4, 6), "layer fc1.weight, fc2.weight, head.weight", "layer fc1, fc2"),
    "cnn": Case(
        lambda: randomize(CNN()), _floats(2, 3, 6, 6),
        "layer conv1.weight, conv2.weight, head.weight", "layer conv1, bn2",
    ),
    "transformer": Case(
        lambda: randomize(TinyTransformer()),
        lambda: torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(5)),
        "layer pos_embed, embed.weight, blocks.*.attn.in_proj_weight, blocks.*.attn.out_proj.weight, "
        "blocks.*.mlp.*.weight",
        "layer blocks.*.mlp.0, ln_f",
    ),
    # Weights already in bfloat16: autocast leaves the forward pass as it is, so activity terms
    # see the same outputs inside and outside it, and the Gram matrix would still drop to bf16.
    "mlp_bf16": Case(
        lambda: randomize(MLP()).to(torch.bfloat16), _floats(4, 6, dtype=torch.bfloat16),
        "layer fc1.weight, fc2.weight, head.weight", "layer fc1, fc2",
    ),
}

LOSS_REFS = [(kind, ref) for kind in VALUE_TERMS for ref in REFERENCES[kind] if isinstance(ref, LossRef)]
LOSS_IDS = [ref.rule.format(sel="", s="").strip() for _, ref in LOSS_REFS]
ACTIVITY_REFS = [(kind, ref) for kind in VALUE_TERMS for ref in REFERENCES[kind] if isinstance(ref, ActivityRef)]


def test_every_loss_kind_runs_here() -> None:
    covered = {kind for kind, _ in LOSS_REFS + ACTIVITY_REFS}
    assert {"l1", "l2", "group_lasso", "orthogonal", "activity_l1", "activity_l2"} <= covered
    assert any(ref.anchor == "init" for _, ref in LOSS_REFS)


def _autocast(on: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", AUTOCAST_DTYPE) if on else contextlib.nullcontext()


def _value_and_grads(
    reg: regdsl.Regularizer, params: list[nn.Parameter], forward: Callable[[], object] | None, *, autocast: bool,
    backward_inside: bool,
) -> tuple[Tensor, list[Tensor]]:
    def grads(value: Tensor) -> list[Tensor]:
        got = torch.autograd.grad(value, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]

    with _autocast(autocast):
        if forward is not None:
            forward()
        value = reg.penalty()
        if backward_inside:
            return value, grads(value)
    return value, grads(value)


def _same(got: Tensor, expected: Tensor, what: str) -> None:
    # Autocast off inside the terms means the same kernels on the same inputs: equal to float32
    # rounding, where a bfloat16 Gram matrix is percent-level off.
    assert got.dtype == expected.dtype, what
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def _compare(case: Case, rule: str, anchor: str | None, with_forward: bool, backward_inside: bool) -> None:
    torch.manual_seed(0)
    model = case.build()
    reference = None
    if anchor == "ref":
        g = torch.Generator().manual_seed(7)
        reference = {
            k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) for k, v in model.state_dict().items()
        }
    reg = regdsl.parse(rule).compile(model, reference=reference)
    if anchor == "init":  # move off w0, or the term and its gradient are zero
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    params = list(model.parameters())
    x = case.input()
    forward = (lambda: model(x)) if with_forward else None

    plain, plain_grads = _value_and_grads(reg, params, forward, autocast=False, backward_inside=backward_inside)
    mixed, mixed_grads = _value_and_grads(reg, params, forward, autocast=True, backward_inside=backward_inside)
    assert plain.dtype == torch.float32 and bool(plain != 0)
    _same(mixed.detach(), plain.detach(), "penalty")
    names = [n for n, _ in model.named_parameters()]
    assert any(bool(g.any()) for g in plain_grads)
    for name, got, expected in zip(names, mixed_grads, plain_grads, strict=True):
        _same(got, expected, f"grad of {name}")


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(("kind", "ref"), LOSS_REFS, ids=LOSS_IDS)
def test_parameter_terms_ignore_autocast(kind: str, ref: LossRef, model: str, backward_inside: bool) -> None:
    case = MODELS[model]
    _compare(case, ref.rule.format(sel=case.params, s=ref.strength), ref.anchor, False, backward_inside)


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize(("kind", "ref"), ACTIVITY_REFS, ids=[kind for kind, _ in ACTIVITY_REFS])
def test_activity_terms_ignore_autocast(kind: str, ref: ActivityRef, backward_inside: bool) -> None:
    # Only a model whose forward pass autocast leaves alone has the same outputs both ways.
    case = MODELS["mlp_bf16"]
    model, x = case.build(), case.input()
    with torch.no_grad():
        with _autocast(True):
            mixed = model(x)
        assert torch.equal(mixed, model(x))
    _compare(case, ref.rule.format(sel=case.modules, s=ref.strength), None, True, backward_inside)


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize(("kind", "ref"), ACTIVITY_REFS, ids=[kind for kind, _ in ACTIVITY_REFS])
def test_activity_of_bf16_outputs_is_reduced_in_float32(kind: str, ref: ActivityRef, model: str) -> None:
    # A float32 model under autocast produces bfloat16 outputs (float32 ones from a LayerNorm).
    # The term is still their formula's value in float32 (against a float64 reference on the very
    # tensors the hooks saw), and its gradient reaches the weights as the reference's does.
    case = MODELS[model]
    torch.manual_seed(0)
    net = case.build()
    reg = regdsl.parse(ref.rule.format(sel=case.modules, s=ref.strength)).compile(net)
    seen: list[Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _a, out: seen.append(out))
        for name, module in net.named_modules()
        if name in {row.name for row in reg.explain_modules()}
    ]
    with _autocast(True):
        net(case.input())
        value = reg.penalty()
    for h in hooks:
        h.remove()
    assert any(a.dtype == AUTOCAST_DTYPE for a in seen), [a.dtype for a in seen]
    assert value.dtype == torch.float32
    expected = sum(ref.strength * ref.value(a.double()) for a in seen)
    torch.testing.assert_close(value.detach().double(), expected.detach(), rtol=1e-6, atol=0)

    params = list(net.parameters())
    got = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for (name, _), g, w in zip(net.named_parameters(), got, want, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-6, atol=0, msg=lambda m, name=name: f"{name}: {m}")
