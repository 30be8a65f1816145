"""detach() never leaves activity terms silently off: penalty() warns while their forward hooks
are gone, and attach() or after_step() puts them back. Expected values are written here."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import regdsl

RULES = "layer fc1 activity l2 0.5\nlayer fc2.weight l2 0.1\n"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def expected(model: Net, x: torch.Tensor) -> torch.Tensor:
    # activity l2 λ: λ/2·Σ a²/B (B the batch), as docs/language.md defines it; l2 λ: λ/2·Σ w².
    return 0.25 * model.fc1(x).square().sum() / x.shape[0] + 0.05 * model.fc2.weight.square().sum()


def test_penalty_after_detach_warns_and_after_step_brings_activity_back() -> None:
    model = Net()
    reg = regdsl.parse(RULES, "r.reg").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt)
    x = torch.randn(5, 3)
    model(x)
    torch.testing.assert_close(reg.penalty(), expected(model, x))
    reg.detach()
    model(x)
    with pytest.warns(regdsl.RegDslWarning, match=r"no activity terms \(line 1\).*detach\(\)"):
        got = reg.penalty()
    torch.testing.assert_close(got, 0.05 * model.fc2.weight.square().sum())  # said, not silent
    opt.step()
    reg.after_step(opt)  # the manual path: hooks come back for the next forward
    model(x)
    torch.testing.assert_close(reg.penalty(), expected(model, x))


def test_attach_again_brings_activity_back_without_a_warning() -> None:
    model = Net()
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt)
    reg.detach()
    reg.attach(opt)
    x = torch.randn(2, 3)
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", regdsl.RegDslWarning)
        torch.testing.assert_close(reg.penalty(), expected(model, x))


def test_a_file_without_activity_terms_never_warns_after_detach() -> None:
    model = Net()
    reg = regdsl.parse("layer fc2.weight l2 0.1\n").compile(model)
    reg.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    reg.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", regdsl.RegDslWarning)
        torch.testing.assert_close(reg.penalty(), 0.05 * model.fc2.weight.square().sum())
