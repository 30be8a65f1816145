"""Activity terms collect from the compiled model's own modules only. A copy of the model (an EMA,
``AveragedModel``, a distillation teacher made with ``copy.deepcopy``) copied the forward hooks with
it: its forwards doubled the penalty, and after ``detach()`` kept adding to it. Expected values are
the documented formula, λ/2·Σa²/B, computed here from the student's own activations."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import regdsl

LAM = 0.5


def student() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def by_hand(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    a = model[1](model[0](x))
    return LAM / 2 * a.square().sum() / x.shape[0]


@pytest.mark.parametrize("copier", ["deepcopy", "AveragedModel", "shallow copy"])
def test_a_copys_forward_adds_nothing_to_the_penalty(copier: str) -> None:
    model = student()
    reg = regdsl.parse(f"layer 1 activity l2 {LAM}").compile(model)
    if copier == "deepcopy":
        other = copy.deepcopy(model)
    elif copier == "AveragedModel":
        other = AveragedModel(model)
    else:
        other = copy.copy(model)  # shares the modules' hook dicts, not the modules
        other._modules = {k: copy.copy(m) for k, m in model._modules.items()}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    other(x)  # the teacher's, or the EMA's, forward
    model(x)
    torch.testing.assert_close(reg.penalty(), by_hand(model, x))
    reg.detach()
    other(x)
    with pytest.warns(regdsl.RegDslWarning, match="holds no activity terms"):
        assert reg.penalty().item() == 0.0


def test_a_model_with_activity_hooks_pickles_and_its_copy_collects_nothing() -> None:
    # Before: TypeError: cannot pickle 'weakref.ReferenceType' (torch.save(model), a full pickle).
    model = student()
    reg = regdsl.parse(f"layer 1 activity l2 {LAM}").compile(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 4)
    loaded(x)
    assert reg.penalty().item() == 0.0
    model(x)
    torch.testing.assert_close(reg.penalty(), by_hand(model, x))


def test_a_step_between_a_forward_and_its_backward_keeps_the_forwards_strength() -> None:
    # A GAN: the generator's forward, then the discriminator's step (reg.step moves a schedule), then the
    # generator's backward. Before: "modified by an inplace operation" (the strength autograd kept).
    def gradients(step_between: bool) -> dict[str, torch.Tensor]:
        gan = nn.ModuleDict({"gen": student(), "disc": nn.Linear(2, 2)})
        model = gan["gen"]
        reg = regdsl.parse(f"layer gen.1 activity l2 {LAM} warmup 4").compile(gan)
        opt_model = torch.optim.SGD(reg.param_groups(gan["gen"], lr=0.0))
        opt_other = torch.optim.SGD(reg.param_groups(gan["disc"], lr=0.0))
        reg.attach([opt_model, opt_other])
        opt_other.step()  # reg.step 1: inside the warmup
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)))
        penalty = reg.penalty()
        if step_between:
            opt_other.step()  # reg.step 2: the strength moves
        penalty.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want, got = gradients(False), gradients(True)
    assert want.keys() == got.keys() and want
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0)
