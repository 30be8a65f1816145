"""Terms that would do nothing because no loss received them warn at the first optimizer step
after that, naming the rule lines, once per regularizer: activity terms collected by the forward
pass but never taken, and loss terms ``penalty()`` holds (not folded) with no ``penalty()`` call
since the step before."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

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
    activity = [m for m in found if "activity terms (line 3)" in m and "never added to a loss" in m]
    held = [m for m in found if "no reg.penalty() call since the step before" in m]
    assert len(activity) == 1, found
    # The l2 of line 1 is held by penalty() unless it is folded.
    assert len(held) == (0 if fold else 1), found
    assert len(found) == len(activity) + len(held)
    if not fold:
        assert "holds loss terms (line 1)" in held[0] and "attach(optimizer, fold=True)" in held[0]


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


def held_warnings(run: Callable[[], None]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if "no reg.penalty() call" in str(w.message)]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, penalty: Callable[[], Any], n: int = 3) -> None:
    for _ in range(n):
        opt.zero_grad()
        (model(torch.randn(4, 6)).square().mean() + penalty()).backward()
        opt.step()


@pytest.mark.parametrize("fold", [False, True])
def test_loss_terms_without_penalty_warn_unless_folded(fold: bool) -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all l1 0.01\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt, fold=fold)
    found = held_warnings(lambda: train(model, opt, lambda: 0.0))
    assert len(found) == (0 if fold else 1), found  # once, for three steps


def test_a_term_that_cannot_fold_still_needs_the_penalty() -> None:
    # A complex parameter stays on the loss path under fold=True (docs/fold.md).
    seeded(0)
    model = MLP()
    model.z = torch.nn.Parameter(torch.randn(3, dtype=torch.cfloat))
    reg = regdsl.parse("layer fc1.weight l2 0.1\nlayer z l2 0.1").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt, fold=True)
    found = held_warnings(lambda: train(model, opt, lambda: 0.0))
    assert len(found) == 1 and "loss terms that cannot fold (line 2)" in found[0], found
    reg2 = regdsl.parse("layer fc1.weight l2 0.1\nlayer z l2 0.1").compile(model)
    reg.detach()
    reg2.attach(opt, fold=True)
    assert held_warnings(lambda: train(model, opt, reg2.penalty)) == []


def test_after_step_without_penalty_warns_too() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all l2 0.1").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def run() -> None:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            reg.after_step()

    assert len(held_warnings(run)) == 1


def test_one_penalty_serves_every_optimizer_that_steps_after_it() -> None:
    # One loss for two optimizers (each a part of the model): both steps follow the one penalty().
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all l1 0.01\nexclude bias").compile(model)
    first = torch.optim.SGD(reg.param_groups(model.fc1, lr=0.1))
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc1.")]
    second = torch.optim.SGD(reg.param_groups(rest, lr=0.1))
    reg.attach([first, second])

    def run(with_penalty: bool) -> None:
        for _ in range(3):
            loss = model(torch.randn(4, 6)).square().mean()
            (loss + reg.penalty() if with_penalty else loss).backward()
            first.step()
            second.step()

    assert held_warnings(lambda: run(True)) == []
    assert len(held_warnings(lambda: run(False))) == 1


def test_a_compiled_penalty_counts_and_does_not_recompile() -> None:
    from torch._dynamo.utils import counters

    seeded(0)
    model = MLP()
    reg = regdsl.parse("all l1 0.01 warmup 3\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    torch._dynamo.reset()
    counters.clear()
    penalty = torch.compile(reg.penalty, backend="eager")
    assert held_warnings(lambda: train(model, opt, penalty, n=4)) == []
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_constant_decay_alone_has_nothing_to_watch() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all decay 0.01").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt)
    assert not reg._watch.active
    assert held_warnings(lambda: train(model, opt, lambda: 0.0)) == []
