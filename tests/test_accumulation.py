"""Gradient accumulation is one argument: ``compile(..., accumulation_steps=k)``.

k micro-batches per optimizer step, each ``loss / k + reg.penalty()``, must give the weights of
one step on the whole batch: on the loss path ``penalty()`` returns ``1/k`` of its terms; on
the fold path the folded terms are added once per optimizer step and ``penalty()`` holds only
the activity terms, which each micro-batch divides like its data loss.
"""

from __future__ import annotations

import pytest
import torch
from ddp_workers import RULES, net, train
from models import MLP, seeded

import regdsl
from regdsl import RegUsageError


@pytest.mark.parametrize("path", ["loss", "fold"])
@pytest.mark.parametrize("micro", [2, 4])
def test_micro_batches_give_the_full_batch_step(path: str, micro: int) -> None:
    whole, split = train(path), train(path, micro=micro)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("path", ["loss", "fold"])
def test_without_the_argument_the_terms_are_k_times_too_strong(path: str) -> None:
    """The failure the argument prevents: adding the whole penalty to each of 2 micro-batches."""
    model = net()
    reg = regdsl.compile(regdsl.parse("layer unused.weight l2 0.2"), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=path == "fold")
    w = model.unused.weight.detach().clone()
    for _ in range(2):
        (model(torch.ones(2, 6, dtype=torch.float64)).sum() / 2 + reg.penalty()).backward()
    opt.step()
    # The fold adds its term once, whatever penalty() does; the loss path counts it twice.
    factor = 1 if path == "fold" else 2
    torch.testing.assert_close(model.unused.weight, w - 0.1 * factor * 0.2 * w, rtol=0, atol=1e-12)


def test_penalty_is_divided_by_accumulation_steps_on_another_model() -> None:
    seeded(1)
    model = MLP()
    spec = regdsl.parse("all l2 0.3\nlayer fc1.weight l1 0.1 group_lasso 0.2\nexclude bias")
    weights = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("bias")}
    # Written out: 0.3/2·Σw² on each weight, plus l1 and group_lasso (rows of fc1.weight).
    w1 = weights["fc1.weight"]
    expected = 0.15 * sum(w.square().sum() for w in weights.values()) + 0.1 * w1.abs().sum() + 0.2 * w1.norm(dim=1).sum()
    for k in (1, 3):
        reg = regdsl.compile(spec, model, accumulation_steps=k)
        torch.testing.assert_close(reg.penalty(), (expected / k).float(), rtol=1e-6, atol=0)
    reg.accumulation_steps = 4
    torch.testing.assert_close(reg.penalty(), (expected / 4).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_accumulation_steps_must_be_a_positive_whole_number(bad: object) -> None:
    model = net()
    with pytest.raises(RegUsageError, match="accumulation_steps must be a whole number >= 1"):
        regdsl.compile(regdsl.parse(RULES), model, accumulation_steps=bad)  # type: ignore[arg-type]
    reg = regdsl.compile(regdsl.parse(RULES), model)
    with pytest.raises(RegUsageError):
        reg.accumulation_steps = bad  # type: ignore[assignment]
    assert reg.accumulation_steps == 1
