"""Parameters replaced after compile() (fully_shard, load_state_dict(assign=True), a new
nn.Parameter) are refused by attach(), with what to do, instead of regularizing tensors that
nothing trains any more."""

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


def replace_by_loading(model: nn.Module) -> None:
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


@pytest.mark.parametrize("replace", [replace_by_assignment, replace_by_loading])
def test_attach_refuses_parameters_replaced_since_compile(replace) -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    replace(model)
    with pytest.raises(RegUsageError, match=r"'fc1.weight' is not the tensor compile\(\) saw.*compile again"):
        reg.attach(opt)
    # Compiled again, it attaches, and the new tensor is the one regularized.
    reg = regdsl.compile(regdsl.parse(RULES), model)
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    reg.penalty().backward()
    torch.testing.assert_close(model.fc1.weight.grad, 0.1 * model.fc1.weight.detach())


def test_data_replaced_in_place_is_the_same_parameter() -> None:
    """model.to(), .data = ... and to_empty() keep the Parameter objects: nothing to refuse."""
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    model.to(torch.float64)
    model.to_empty(device="cpu")
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    assert reg.penalty().dtype == torch.float64
