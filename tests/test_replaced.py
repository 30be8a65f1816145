"""Parameters replaced after compile() (fully_shard, load_state_dict(assign=True), a new
nn.Parameter or layer) are refused by attach(), with what to do, instead of regularizing tensors
that nothing trains any more; so are trainable parameters added since, which no rule reaches."""

from __future__ import annotations

import pytest
import torch
from models import MLP, seeded
from torch import nn

import regdsl
from regdsl import RegUsageError

RULES = "all l2 0.1\nexclude bias"


def replace_by_assignment(model: nn.Module) -> None:
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach().clone())


def replace_a_later_one(model: nn.Module) -> None:
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())


def replace_the_layer(model: nn.Module) -> None:
    model.fc2 = nn.Linear(16, 16)  # the old layer still holds the old tensors


def replace_by_loading(model: nn.Module) -> None:
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


@pytest.mark.parametrize(
    ("replace", "named"),
    [
        (replace_by_assignment, "'fc1.weight' is"),
        (replace_a_later_one, "'head.weight' is"),
        (replace_the_layer, "'fc2.weight', 'fc2.bias' are"),
        (replace_by_loading, "'fc1.weight', 'fc1.bias', 'fc2.weight' and 3 more are"),
    ],
)
@pytest.mark.parametrize("fold", [False, True])
def test_attach_refuses_parameters_replaced_since_compile(replace, named: str, fold: bool) -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    replace(model)
    with pytest.raises(RegUsageError, match=rf"{named} not the tensors? compile\(\) saw.*compile again"):
        reg.attach(opt, fold=fold)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # nothing half-applied
    # Compiled again, it attaches, and the new tensor is the one regularized.
    reg = regdsl.compile(regdsl.parse(RULES), model)
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    reg.penalty().backward()
    for layer in (model.fc1, model.fc2, model.head):
        torch.testing.assert_close(layer.weight.grad, 0.1 * layer.weight.detach())


def test_param_groups_refuse_parameters_replaced_since_compile() -> None:
    """An optimizer built from the tensors compile() saw would train none of the model's (after
    load_state_dict(assign=True), a checkpoint loaded that way): param_groups() refuses too."""
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    replace_by_loading(model)
    with pytest.raises(RegUsageError, match=r"not the tensors compile\(\) saw.*compile again"):
        reg.param_groups(lr=0.1)


def test_attach_refuses_trainable_parameters_added_since_compile() -> None:
    """An 'all' rule resolved before a layer was added does not reach it: compile again."""
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    model.extra = nn.Linear(3, 3)
    with pytest.raises(RegUsageError, match=r"trainable parameters 'extra.weight', 'extra.bias' that compile\(\) did not see"):
        reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    model.extra.requires_grad_(False)  # a frozen one changes nothing regdsl does
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))


@pytest.mark.parametrize("call", ["param_groups", "attach"])
def test_a_parameter_frozen_at_compile_and_trainable_now_is_refused(call: str) -> None:
    # A backbone frozen for phase 1, unfrozen for phase 2: a new optimizer from param_groups() left it
    # out, and one it was added to by hand trained it without the file's 'all l2': silently, both.
    seeded(0)
    model = MLP()
    model.fc1.requires_grad_(False)
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    model.fc1.requires_grad_(True)
    says = r"parameters 'fc1.weight', 'fc1.bias' were frozen when compile\(\) read the model and are trainable now"
    with pytest.raises(RegUsageError, match=says):
        reg.param_groups(lr=0.1) if call == "param_groups" else reg.attach(opt)
    again = regdsl.compile(regdsl.parse(RULES), model)  # what the message says to do
    groups = again.param_groups(lr=0.1)
    assert any(p is model.fc1.weight for g in groups for p in g["params"])
    again.attach(torch.optim.SGD(groups))


def test_a_replaced_frozen_parameter_is_not_refused() -> None:
    seeded(0)
    model = MLP()
    model.head.bias.requires_grad_(False)
    reg = regdsl.compile(regdsl.parse("all l2 0.1"), model)
    model.head.bias = nn.Parameter(torch.zeros(3), requires_grad=False)  # nothing regdsl does reads it
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    reg.penalty().backward()
    torch.testing.assert_close(model.head.weight.grad, 0.1 * model.head.weight.detach())


def test_data_replaced_in_place_is_the_same_parameter() -> None:
    """model.to(), .data = ... and to_empty() keep the Parameter objects: nothing to refuse."""
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    model.to(torch.float64)
    model.to_empty(device="cpu")
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    assert reg.penalty().dtype == torch.float64
