"""regdsl.integrations.accelerate in one process: ``load_state()`` loads regdsl's state before the
optimizer's, so a rule file edited since the checkpoint is refused with the optimizer untouched; a
checkpoint saved without it is refused the same way; ``attach()`` after ``prepare()`` hooks the
optimizer Accelerate wraps. (tests/test_recipes.py runs examples/accelerate_train.py: accumulation,
and a resume that continues the schedules.)"""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import regdsl
from regdsl.integrations.accelerate import STATE_FILE, register_for_checkpointing

RULES = "all decay 0.01\nexclude bias\nlayer 0.weight l1 1e-2 warmup 3\nlayer 2.weight group_lasso 1e-2\n"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def prepared(rules: str, *, attach_after: bool = False) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer, regdsl.Regularizer]:
    accelerator = Accelerator(cpu=True)
    net = model()
    reg = regdsl.parse(rules).compile(net)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-2))
    if not attach_after:
        reg.attach(opt, fold=True)
    net, opt = accelerator.prepare(net, opt)
    if attach_after:
        reg.attach(opt, fold=True)  # the AcceleratedOptimizer: its inner optimizer gets the hooks
    register_for_checkpointing(accelerator, reg)
    return accelerator, net, opt, reg


def train(accelerator: Accelerator, net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        accelerator.backward(F.cross_entropy(net(x), y))
        opt.step()
        opt.zero_grad()


def plain(steps: int) -> dict[str, torch.Tensor]:
    """The rule file written out by hand: decay in AdamW's groups, l1 under its warmup and group_lasso's
    rows as gradients added before each step."""
    net = model()
    params = dict(net.named_parameters())
    weights = [params["0.weight"], params["2.weight"]]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.01}, {"params": [params["0.bias"], params["2.bias"]], "weight_decay": 0.0}], lr=1e-2)
    for step in range(steps):
        x, y = batch(step)
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            w0, w2 = weights
            w0.grad += 1e-2 * min(1.0, step / 3) * torch.sign(w0)  # warmup: λ·t/W from t = 0
            w2.grad += 1e-2 * w2 / w2.norm(dim=1, keepdim=True)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("attach_after", [False, True], ids=["attach-then-prepare", "prepare-then-attach"])
def test_training_and_a_resume_give_the_hand_written_weights(tmp_path, attach_after: bool) -> None:
    accelerator, net, opt, reg = prepared(RULES, attach_after=attach_after)
    train(accelerator, net, opt, range(2))
    accelerator.save_state(str(tmp_path))
    assert (tmp_path / STATE_FILE).is_file()
    accelerator, net, opt, reg = prepared(RULES, attach_after=attach_after)
    accelerator.load_state(str(tmp_path))
    assert reg.step == 2  # the warmup goes on where it was
    train(accelerator, net, opt, range(2, 5))
    want = plain(5)
    for name, p in accelerator.unwrap_model(net).named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=0, atol=1e-6, msg=name)


def test_a_resume_with_edited_rules_is_refused_before_the_optimizer_is_touched(tmp_path) -> None:
    # Before (accelerator.register_for_checkpointing(reg)), the optimizer's groups and moments were
    # the checkpoint's by the time regdsl refused: Accelerate loads registered objects last.
    accelerator, net, opt, _ = prepared(RULES)
    train(accelerator, net, opt, range(2))
    accelerator.save_state(str(tmp_path))
    for edited in (RULES.replace("all decay 0.01", "all decay 0.3"), RULES.replace("exclude bias\n", "")):
        accelerator, net, opt, _ = prepared(edited)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        with pytest.raises(regdsl.RegStateError):
            accelerator.load_state(str(tmp_path))
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
        assert not opt.state


def test_a_checkpoint_saved_without_it_is_refused(tmp_path) -> None:
    accelerator = Accelerator(cpu=True)
    net = model()
    accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-2))
    accelerator.save_state(str(tmp_path))
    accelerator, net, opt, _ = prepared(RULES)
    with pytest.raises(regdsl.RegStateError, match=rf"has no {STATE_FILE}: it was saved without"):
        accelerator.load_state(str(tmp_path))
    assert not opt.state and [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_misuse_is_a_clear_error() -> None:
    accelerator, net, opt, reg = prepared(RULES)
    with pytest.raises(regdsl.RegUsageError, match="takes a compiled regdsl.Regularizer"):
        register_for_checkpointing(accelerator, RULES)
    with pytest.raises(regdsl.RegUsageError, match="takes an accelerate.Accelerator"):
        register_for_checkpointing(opt, reg)
    # An optimizer look-alike without torch's step hooks (no Optimizer.__init__) is said to be one.
    class Bare(torch.optim.Optimizer):
        def __init__(self, params) -> None:
            self.param_groups = [{"params": list(params)}]

    fresh = regdsl.parse(RULES).compile(net)
    with pytest.raises(regdsl.RegUsageError, match="needs an optimizer with torch's step hooks.*Bare has none"):
        fresh.attach(Bare(net.parameters()))
