"""A refused call changes nothing, and a mistake is refused, not taken (found by an API audit):
``after_step`` checks its optimizer before a weight moves or the step counts; ``attach`` refused under
warnings-as-errors leaves the groups' decays as they were; a second ``reg.fold()`` with nothing in
between is refused, not added twice."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import regdsl
from regdsl import RegUsageError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_after_step_without_the_decays_group_changes_nothing() -> None:
    # Before, prox and max_norm had run on head.weight and reg.step had counted one when the decay's
    # missing group was found; a retry with the right optimizer counted the step and prox again.
    model = net()
    reg = regdsl.parse("all decay 0.1 warmup 10\nexclude bias\nexclude norm\nlayer head.weight l1 0.5 prox max_norm 0.1\n").compile(model)
    before = weights(model)
    with pytest.raises(RegUsageError, match="the optimizer has no group 'decay=0.1 warmup 10'"):
        reg.after_step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert reg.step == 0
    assert_unchanged(model, before)
    # Without the proximal parameter's group: refused before anything runs too.
    with pytest.raises(RegUsageError, match="'l1 ... prox' parameters are not in the optimizer: 'head.weight'"):
        reg.after_step(torch.optim.SGD(reg.param_groups(of=model.body, lr=0.1)))
    assert reg.step == 0
    assert_unchanged(model, before)
    reg.after_step(torch.optim.SGD(reg.param_groups(lr=0.1)))
    assert reg.step == 1 and (model.head.weight.norm(dim=1) <= 0.1 + 1e-6).all()


def test_after_step_with_another_models_optimizer_is_refused_as_attach_refuses_it() -> None:
    model, other = net(), net()
    reg = regdsl.parse("layer head.weight l2 1.0 warmup 100\n").compile(model)
    foreign = torch.optim.SGD(other.parameters(), lr=0.1)
    for call in (reg.attach, reg.after_step):
        with pytest.raises(RegUsageError, match="steps none of the parameters of the model the rules were compiled for"):
            call(foreign)
    assert reg.step == 0 and reg.strength("head.weight", "l2") == 0.0


@pytest.mark.parametrize("why", ["underflow", "not in groups"])
def test_attach_refused_under_warnings_as_errors_leaves_the_groups_decay(why: str) -> None:
    # Before, the scheduled decay had been written into the groups when the warning raised.
    model = net()
    if why == "underflow":
        model = model.to(torch.bfloat16)
        rules = "all decay 1e-4 warmup 10\nexclude bias\nexclude norm\n"
    else:
        rules = "all decay 0.1 warmup 10\nexclude bias\nexclude norm\nlayer head.weight decay 0.2\n"
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-5))
    if why == "not in groups":
        next(g for g in opt.param_groups if g["name"] == "decay=0.2")["weight_decay"] = 0.3
    reg.load_state_dict({**reg.state_dict(), "step": 5})
    decays = [g["weight_decay"] for g in opt.param_groups]
    hooks = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", regdsl.RegDslWarning)
        with pytest.raises(regdsl.RegDslWarning):
            reg.attach(opt)
    assert [g["weight_decay"] for g in opt.param_groups] == decays
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)
        reg.attach(opt)  # not attached by the refused call: this one is the first
    assert reg.step == 5


def test_a_second_fold_on_the_same_gradients_is_refused() -> None:
    # Before, it added the terms again: grad = data + 2·λ·w, with no word.
    model = net()
    reg = regdsl.parse("all l2 0.5\nexclude bias\nexclude norm\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=True, fold_hook=False)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    data = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.fold()
    folded = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(folded["head.weight"], data["head.weight"] + 0.5 * model.head.weight.detach())
    with pytest.raises(RegUsageError, match="reg.fold\\(\\) ran already on these gradients"):
        reg.fold()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, folded[name]), name
    # A step a GradScaler skipped (no opt.step), then the next batch's gradients: folded as usual.
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        model(x).sum().backward()
        reg.fold()
        torch.testing.assert_close(model.head.weight.grad, data["head.weight"] + 0.5 * model.head.weight.detach())
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    reg.fold()  # after a step: a new gradient


def test_a_second_fold_is_refused_after_the_smallest_folded_tensor_was_frozen() -> None:
    # The second call is told from the smallest trainable folded tensor's gradient. Picked once, at
    # attach, and frozen since, that gradient never moved: the second call added 2·λ·w, with no word.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    reg = regdsl.parse("all l2 0.1").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True, fold_hook=False)
    model[2].bias.requires_grad_(False)  # one element: the smallest
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    data = model[0].weight.grad.clone()
    reg.fold()
    with pytest.raises(RegUsageError, match="reg.fold\\(\\) ran already on these gradients"):
        reg.fold()
    torch.testing.assert_close(model[0].weight.grad, data + 0.1 * model[0].weight.detach(), rtol=1e-12, atol=0)
    model[2].bias.requires_grad_(True)  # unfrozen: it has no gradient yet, and the next steps fold as usual
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
        reg.fold()
        opt.step()


def test_a_spec_copy_takes_only_fields_and_forgets_the_text_it_no_longer_is() -> None:
    spec = regdsl.parse("all decay 0.05\nexclude bias\nlayer head.** decay 0.1 l1 1e-4\n")
    with pytest.raises(TypeError, match="model_copy\\(update=...\\) got 'statement', not a field of it"):
        spec.model_copy(update={"statement": ()})  # before: taken, and the copy was the original
    typo = regdsl.parse("\n\nlayer haed.** l1 1e-4\n")
    copy = spec.model_copy(update={"statements": spec.statements[:2] + typo.statements})
    assert copy.source is None and spec.source is not None
    (d,) = regdsl.check(copy, Net())
    # Before: line 3 quoted from the original text, 'layer head.** decay 0.1 l1 1e-4', under a caret for 'haed.**'.
    assert d.code == "RD101" and d.line == 3 and d.source_line == ""
    assert spec.model_copy(update={}).source == spec.source  # nothing changed: the text still says it


@pytest.mark.parametrize("rules", ["all l1 0.05 prox\n", "all max_norm 0.1\n"])
def test_a_weight_frozen_after_compile_is_left_by_the_post_step_terms(rules: str) -> None:
    # As the folded terms leave it (docs/fold.md): before, prox shrank it by lr·λ and max_norm renormed it.
    model = net()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt)
    model.head.weight.requires_grad_(False)
    frozen = model.head.weight.detach().clone()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert torch.equal(model.head.weight.detach(), frozen)
    assert not torch.equal(model.body[0].weight.detach(), weights(net())["body.0.weight"])  # the others: as ever


def test_a_second_regularizer_folding_the_same_terms_into_one_optimizer_warns() -> None:
    # The same rules compiled twice and both attached (a notebook cell run again while the first is still
    # held): each folded its l2, twice the strength, with no word.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    first = regdsl.parse("all l2 0.1\nexclude bias").compile(model)
    opt = torch.optim.SGD(first.param_groups(lr=0.1))
    first.attach(opt, fold=True)
    for fold in (True, False):
        second = regdsl.parse("all l2 0.1\nexclude bias").compile(model)
        with pytest.warns(regdsl.RegDslWarning, match=r"folds the same terms \(l2 on '0.weight', '2.weight'\)"):
            second.attach(opt, fold=fold)
        second.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Other terms, or the first detached: nothing counts twice.
        regdsl.parse("layer 0.weight l1 0.01").compile(model).attach(opt, fold=True).detach()
        first.detach()
        regdsl.parse("all l2 0.1\nexclude bias").compile(model).attach(opt, fold=True)
