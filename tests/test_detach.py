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


@pytest.mark.parametrize("hook", ["pre", "post"])
def test_detach_from_inside_an_optimizer_step_hook(hook: str) -> None:
    """A user's step hook (registered after attach, so run after regdsl's) may detach: this step is
    folded, the next is not, and torch's hook dicts are not broken by the removal mid-step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reg = regdsl.parse("all l2 0.1\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=True)
    register = opt.register_step_pre_hook if hook == "pre" else opt.register_step_post_hook
    register(lambda *_: reg.detach())
    x = torch.randn(5, 4)

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad()
        model(x).square().sum().backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
        opt.step()
        return before

    for name, (w, g) in step().items():  # folded: g + λ·w
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), w - 0.1 * (g + 0.1 * w))
    assert len(opt._optimizer_step_pre_hooks) == (1 if hook == "pre" else 0)
    assert len(opt._optimizer_step_post_hooks) == (1 if hook == "post" else 0)
    for name, (w, g) in step().items():  # detached: nothing folded
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), w - 0.1 * g)
    # The terms are the loss's again: λ/2·Σw² over weight and bias.
    expected = 0.05 * (model.weight.square().sum() + model.bias.square().sum())
    torch.testing.assert_close(reg.penalty(), expected)
