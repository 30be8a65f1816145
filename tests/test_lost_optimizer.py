"""An attached optimizer garbage-collected while its regularizer lives on (replaced by a new one that
was never attached) takes its hooks with it: the folded terms, post-step terms and the step count
schedules read. The first penalty() after it warns, once, and holds the folded terms again; a new
attach() needs no detach() first. Expected gradients are the documented formulas written here."""

from __future__ import annotations

import gc
import re
import warnings

import pytest
import torch
from models import MLP, seeded
from torch import nn

import regdsl
from regdsl import RegDslWarning, RegUsageError

LOST = "an optimizer this regularizer was attached to was garbage-collected"


def penalty_grads(reg: regdsl.Regularizer, model: MLP) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    penalty = reg.penalty()
    if penalty.requires_grad:
        penalty.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def attached(rules: str, fold: bool) -> tuple[MLP, regdsl.Regularizer, torch.optim.Optimizer]:
    seeded(0)
    model = MLP()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=fold)
    return model, reg, opt


def test_a_replaced_optimizer_gives_the_folded_terms_back_to_penalty_and_warns_once() -> None:
    model, reg, opt = attached("layer fc1.weight l2 0.1\nlayer head.weight l1 0.01", fold=True)
    assert penalty_grads(reg, model) == {}  # everything folds
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))  # the attached one is garbage-collected here
    gc.collect()
    with pytest.warns(RegDslWarning, match=rf"{LOST}.*\(folded terms\).*penalty\(\) holds the folded terms again"):
        got = penalty_grads(reg, model)
    assert got.keys() == {"fc1.weight", "head.weight"}
    torch.testing.assert_close(got["fc1.weight"], 0.1 * model.fc1.weight.detach())
    torch.testing.assert_close(got["head.weight"], 0.01 * model.head.weight.detach().sign())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        penalty_grads(reg, model)  # once
        # Attached to the new optimizer, without a detach(): its step folds them, penalty() is empty again.
        reg.attach(opt, fold=True)
        assert penalty_grads(reg, model) == {}
        model.zero_grad(set_to_none=False)
        before = model.fc1.weight.detach().clone()
        opt.step()
    torch.testing.assert_close(model.fc1.weight.detach(), before - 0.1 * 0.1 * before)


def test_a_replaced_optimizer_stops_the_schedules_and_says_so() -> None:
    model, reg, opt = attached("all l2 0.1 warmup 10\nexclude bias", fold=False)
    opt.step()
    assert reg.step == 1
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    gc.collect()
    with pytest.warns(RegDslWarning, match=rf"{LOST}.*\(the step count schedules read\)") as caught:
        got = penalty_grads(reg, model)
    assert all(not str(w.message).endswith("again") for w in caught)  # nothing was folded
    opt.step()
    assert reg.step == 1  # nothing counts the new optimizer's steps: the warmup stays where it was
    torch.testing.assert_close(got["fc1.weight"], 0.1 * 0.1 * model.fc1.weight.detach())  # 1/10 of the way


def test_a_replaced_optimizer_whose_hooks_only_counted_is_no_warning() -> None:
    model, reg, opt = attached("all l2 0.1", fold=False)
    want = penalty_grads(reg, model)
    del opt  # garbage-collected, and nothing replaces it
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = penalty_grads(reg, model)
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value)


def test_attach_while_the_attached_optimizer_lives_still_needs_a_detach() -> None:
    _, reg, _opt = attached("all l2 0.1", fold=True)  # held: the attached optimizer lives
    with pytest.raises(RegUsageError, match="already attached"):
        reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))


# ---------------------------------------------------------------- a loop that leaves penalty() out

STEPPED = "this optimizer steps parameters of a regularizer whose attached optimizer was garbage-collected"


def train_step(model: MLP, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    model(torch.ones(2, 6)).sum().backward()  # the loss alone: every term was folded
    opt.step()


@pytest.mark.parametrize(
    ("rules", "fold", "what"),
    [
        ("layer fc1.weight l2 0.1", True, "folded terms"),
        ("all max_norm 1.0", False, "post-step terms"),
        ("all l2 0.1 warmup 5", True, "folded terms, the step count schedules read"),
    ],
)
def test_a_replacement_stepping_without_penalty_warns_at_its_first_step_once(rules: str, fold: bool, what: str) -> None:
    # Before, nothing said so: the new optimizer trained on without the terms, and penalty() was never called.
    model, reg, opt = attached(rules, fold=fold)
    train_step(model, opt)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))  # the attached one is garbage-collected here
    gc.collect()
    with pytest.warns(RegDslWarning, match=re.escape(f"{STEPPED}, and with it what its hooks did ({what})")) as caught:
        train_step(model, opt)
    assert len([w for w in caught if STEPPED in str(w.message)]) == 1
    assert caught[0].filename == __file__  # the user's opt.step(), through torch's frames
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt)  # once
    assert reg is not None


def test_no_step_warning_where_regdsl_has_said_it_or_has_nothing_to_say() -> None:
    # penalty() warned already: the step does not repeat it.
    model, reg, opt = attached("layer fc1.weight l2 0.1", fold=True)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    gc.collect()
    with pytest.warns(RegDslWarning, match=LOST):
        reg.penalty()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt)
        # Attached anew: the new optimizer's hooks apply the terms.
        model, reg, opt = attached("layer fc1.weight l2 0.1", fold=True)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1))
        gc.collect()
        reg.attach(opt, fold=True)
        train_step(model, opt)
        # Detached first: regdsl was told the terms stop.
        model, reg, opt = attached("layer fc1.weight l2 0.1", fold=True)
        reg.detach()
        opt = torch.optim.SGD(reg.param_groups(lr=0.1))
        gc.collect()
        train_step(model, opt)
        # An optimizer over other tensors steps, while the lost one's own replacement is yet to come.
        model, reg, opt = attached("layer fc1.weight l2 0.1", fold=True)
        del opt
        gc.collect()
        other = nn.Linear(2, 2)
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
        other(torch.ones(1, 2)).sum().backward()
        other_opt.step()
        other_opt.step()
    assert reg is not None


def test_the_step_watch_is_one_hook_for_the_process() -> None:
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    attached("layer fc1.weight l2 0.1", fold=True)
    before = len(_global_optimizer_pre_hooks)
    for _ in range(3):
        attached("layer fc1.weight l2 0.1", fold=True)
    assert len(_global_optimizer_pre_hooks) == before


def test_the_watch_never_breaks_the_step_of_an_unhashable_optimizer() -> None:
    class Unhashable(torch.optim.SGD):
        __hash__ = None  # type: ignore[assignment]

        def __eq__(self, other: object) -> bool:
            return self is other

    model, reg, opt = attached("layer fc1.weight l2 0.1", fold=True)
    del opt
    gc.collect()
    other = nn.Linear(2, 2)
    other_opt = Unhashable(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    before = other.weight.detach().clone()
    other_opt.step()
    other_opt.step()
    assert not torch.equal(other.weight.detach(), before)
    with pytest.warns(RegDslWarning, match=re.escape(STEPPED)):
        train_step(model, Unhashable(reg.param_groups(lr=0.1)))


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("watched", ["other tensors", "the replacement"])
def test_the_watch_stays_out_of_a_step_compiled_with_torch_compile(watched: str) -> None:
    # torch.compile(opt.step) traces the process-wide pre-hooks: the watch's weak references and sets
    # made dynamo fail (SpeculationLogDivergence) for any optimizer of the process, once an attached
    # one was lost. The compiled step skips the watch; an eager step of the replacement still warns.
    model, reg, opt = attached("layer fc1.weight l2 0.1", fold=True)
    del opt
    gc.collect()
    if watched == "other tensors":
        other = nn.Linear(2, 2)
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
        other_opt.step = torch.compile(other_opt.step)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                other_opt.zero_grad()
                other(torch.ones(1, 2)).sum().backward()
                other_opt.step()
        return
    new = torch.optim.SGD(reg.param_groups(lr=0.1), momentum=0.9)
    compiled = torch.compile(new.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            new.zero_grad()
            model(torch.ones(2, 6)).sum().backward()
            compiled()
    with pytest.warns(RegDslWarning, match=re.escape(STEPPED)):
        train_step(model, new)
    assert reg is not None
