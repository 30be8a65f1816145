"""Activity terms collected by the forward pass but never added to a loss would do nothing: the
first optimizer step after that warns, naming the rule lines, once per regularizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import MLP, seeded

import regdsl
from regdsl import RegDslWarning

RULES = "all l2 0.01\nexclude bias\nlayer fc1 activity l2 0.1"


def steps(with_penalty: bool, fold: bool, n: int = 3) -> list[str]:
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=fold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            loss = model(torch.randn(4, 6)).square().mean()
            if with_penalty:
                loss = loss + reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [str(w.message) for w in caught if issubclass(w.category, RegDslWarning)]


@pytest.mark.parametrize("fold", [True, False])
def test_a_step_without_the_penalty_warns_once(fold: bool) -> None:
    found = steps(with_penalty=False, fold=fold)
    assert len(found) == 1, found
    assert "activity terms (line 3)" in found[0] and "never added to a loss" in found[0]


@pytest.mark.parametrize("fold", [True, False])
def test_a_step_with_the_penalty_does_not(fold: bool) -> None:
    assert steps(with_penalty=True, fold=fold) == []


def test_the_warning_names_the_line_that_stepped() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=True)
    model(torch.randn(2, 6)).sum().backward()
    with pytest.warns(RegDslWarning) as record:
        opt.step()
    assert record[0].filename == __file__
