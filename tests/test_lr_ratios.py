"""A scheduler that sets every group's lr from one value drops the ratios lr_mult sets; the attached
optimizer's steps 1, 2, 4, 8, ... check them, and the first step that finds them gone warns, once.
Schedulers that scale each group's own lr keep them, and say nothing."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
from models import MLP, seeded

import regdsl
from regdsl import RegDslWarning

RULES = "all decay 0.01\nlayer head lr_mult 0.1\n"
LOST = r"groups no longer have the learning rates lr_mult \(or lr_decay\) sets: .*their ratio 0\.1\b"

Sched = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
DROPS: dict[str, Sched] = {
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False),
}
KEEPS: dict[str, Sched] = {
    "OneCycleLR per group": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] for g in o.param_groups], total_steps=20
    ),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
}


def train(schedule: Sched, fold: bool, steps: int = 9) -> list[warnings.WarningMessage]:
    seeded(0)
    model = MLP()
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=fold)
    scheduler = schedule(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            scheduler.step()
    return [w for w in caught if issubclass(w.category, RegDslWarning)]


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name", list(DROPS))
def test_a_scheduler_that_drops_lr_mult_warns_once(name: str, fold: bool) -> None:
    caught = train(DROPS[name], fold)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].filename == __file__  # the line of opt.step()
    assert re.search(LOST, str(caught[0].message)), str(caught[0].message)


@pytest.mark.parametrize("name", list(KEEPS))
def test_schedulers_that_keep_lr_mult_say_nothing(name: str) -> None:
    assert train(KEEPS[name], fold=True) == []


def test_a_ratio_lost_later_is_found_at_the_next_power_of_two() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)
    found = []
    for step in range(1, 9):
        if step == 6:
            for group in opt.param_groups:
                group["lr"] = 0.05  # as a scheduler given one value would
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        found += [step for w in caught if issubclass(w.category, RegDslWarning)]
    assert found == [8]


def test_a_group_added_with_an_lr_of_its_own_and_a_group_at_lr_0_are_not_compared() -> None:
    seeded(0)
    model = MLP()
    extra = torch.nn.Parameter(torch.zeros(3))
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    reg.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        for group in opt.param_groups:
            if group.get("lr_mult") == 0.1:
                group["lr"] = 0.0  # that part frozen for a while
        opt.step()
    assert not [w for w in caught if issubclass(w.category, RegDslWarning)]


def test_per_group_lambdas_that_differ_warn_once_and_the_documented_filter_silences_it() -> None:
    def lambdas(o: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(o, [lambda s, k=k: 1.0 / (1 + k * s) for k in range(len(o.param_groups))])

    caught = train(lambdas, fold=False)
    assert len(caught) == 1 and re.search(r"groups no longer have the learning rates lr_mult \(or lr_decay\) sets", str(caught[0].message))
    seeded(0)
    model = MLP()
    reg = regdsl.parse(RULES).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)
    scheduler = lambdas(opt)
    with warnings.catch_warnings(record=True) as silenced:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "the optimizer's groups no longer")  # as docs/language.md gives it
        for _ in range(9):
            opt.zero_grad()
            (model(torch.randn(4, 6)).square().mean() + reg.penalty()).backward()
            opt.step()
            scheduler.step()
    assert [str(w.message) for w in silenced] == []


def test_groups_scaled_for_timm_and_stepped_with_no_timm_scheduler_say_what_applies_lr_scale() -> None:
    # param_groups(lr_scale=True) keeps the ratio in lr_scale: every group trains at the base lr until a
    # timm scheduler writes lr × lr_scale. The advice about OneCycleLR did not apply.
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all decay 0.01\nlayer fc1 depth 0\nlayer fc2 depth 1\nlayer head depth 2\nlr_decay 0.5\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr_scale=True), lr=0.1)
    reg.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
    (warning,) = [w for w in caught if issubclass(w.category, RegDslWarning)]
    message = str(warning.message)
    assert "lr_mult (or lr_decay)" in message and "their ratio 0.25" in message, message
    assert "only timm's schedulers apply" in message and "OneCycleLR" not in message, message
