"""Mixed precision: autocast with GradScaler, 16-bit weights, and decoupled decay that rounds away.

References are written here: the data gradient by autograd on a copy of the model without
regdsl, the terms' gradients by their formulas (docs/language.md), SGD by hand.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, seeded
from torch import nn

import regdsl
from regdsl import RegDslWarning

RULES = "all l2 0.05\nlayer fc1.weight l1 0.01\nexclude bias"


def term_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """``l2 0.05`` on every weight, plus ``l1 0.01`` on fc1.weight."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            out[name] = 0.05 * p.detach().double() + (0.01 * p.detach().double().sign() if name == "fc1.weight" else 0)
    return out


@pytest.mark.parametrize("path", ["loss", "fold"])
def test_autocast_with_grad_scaler_keeps_the_penalty_unscaled(path: str) -> None:
    """The recipe: ``scaler.scale(loss + reg.penalty()).backward()``, then ``unscale_``. The
    gradients the optimizer sees are the data gradient plus the terms' own, not divided by the scale."""
    seeded(3)
    model = MLP()
    plain = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=path == "fold")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(model(x), y) + reg.penalty()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected_terms = term_gradients(model)
    scaler.step(opt)  # the fold adds its terms here, to the unscaled gradients
    scaler.update()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.mse_loss(plain(x), y).backward()
    for name, p in plain.named_parameters():
        data = p.grad.double()
        if path == "loss":  # the terms are in the gradient already
            want = data + expected_terms.get(name, 0)
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
        else:  # the fold adds them inside step(): the unscaled gradient is the data's alone
            torch.testing.assert_close(got[name].double(), data, rtol=1e-5, atol=1e-6, msg=name)
        # Either way the step is w − lr·(data + terms): the scale never reached the terms.
        step = 0.1 * (data + expected_terms.get(name, 0))
        torch.testing.assert_close(dict(model.named_parameters())[name].double(), p.detach().double() - step, rtol=1e-5, atol=1e-6)


def test_penalty_added_after_scaling_is_scaled_away() -> None:
    """Why the order matters: ``scaler.scale(loss) + reg.penalty()`` leaves the terms' gradient
    divided by the scale after ``unscale_``."""
    seeded(4)
    model = MLP()
    reg = regdsl.compile(regdsl.parse("layer fc1.weight l2 1"), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    (scaler.scale(model(torch.zeros(1, 6)).sum() * 0) + reg.penalty()).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(model.fc1.weight.grad, model.fc1.weight.detach() / 2.0**12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", [MLP, CNN], ids=["mlp", "cnn"])
def test_16_bit_weights_get_their_terms_within_their_precision(dtype: torch.dtype, build: type) -> None:
    seeded(5)
    model = build().to(dtype)
    rules = "all l2 0.05 group_lasso 0.02\nexclude bias"
    reg = regdsl.compile(regdsl.parse(rules), model)
    reg.penalty().backward()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.grad is None
            continue
        w = p.detach().double()
        others = list(range(1, w.ndim))
        want = 0.05 * w + 0.02 * (w / torch.linalg.vector_norm(w, dim=others, keepdim=True) if others else w.sign())
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-2, atol=1e-3, msg=name)


def decays(
    model: nn.Module, lr: float, decay: float | str, optimizer: type = torch.optim.AdamW, schedule: str = ""
) -> list[str]:
    reg = regdsl.compile(regdsl.parse(f"all decay {decay}{schedule}\nexclude bias"), model)
    opt = optimizer(reg.param_groups(lr=lr))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg.attach(opt)
    return [str(w.message) for w in caught if issubclass(w.category, RegDslWarning)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoupled_decay_below_the_weights_resolution_warns_and_indeed_does_nothing(dtype: torch.dtype) -> None:
    seeded(6)
    model = MLP().to(dtype)
    found = decays(model, lr=1e-3, decay=0.01)
    assert len(found) == 1 and "line 1" in found[0] and "decay=0.01" in found[0], found
    assert str(dtype).removeprefix("torch.") in found[0]
    # What the warning says: AdamW's decay step leaves every weight as it was.
    before = model.fc1.weight.detach().clone()
    opt = torch.optim.AdamW([model.fc1.weight], lr=1e-3, weight_decay=0.01, eps=1e-3)  # 1e-8 is 0 in float16
    model.fc1.weight.grad = torch.zeros_like(model.fc1.weight)
    opt.step()
    assert torch.equal(model.fc1.weight, before)


@pytest.mark.parametrize("schedule", [" warmup 5", " from 3", " until 100", " cosine to 0.0 over 10"])
def test_a_scheduled_decay_is_read_at_its_peak(schedule: str) -> None:
    # At attach a warmup's (or a 'from''s) group holds 0.0, the step's value: no warning, though from the
    # schedule's peak on the decay moved no weight.
    seeded(6)
    found = decays(MLP().to(torch.bfloat16), lr=1e-3, decay=0.01, schedule=schedule)
    assert len(found) == 1 and "1e-05 is below the resolution" in found[0] and "schedule's peak" in found[0], found
    # A cosine up to a decay that moves the weights is read at its end: 1e-3·10 > 2⁻⁸.
    assert decays(MLP().to(torch.bfloat16), lr=1e-3, decay=0.01, schedule=" cosine to 10.0 over 10") == []


def test_decay_that_moves_the_weights_does_not_warn() -> None:
    seeded(7)
    assert decays(MLP().to(torch.bfloat16), lr=0.1, decay=0.1) == []  # lr·decay = 0.01 > 2⁻⁸
    assert decays(MLP(), lr=1e-3, decay=0.01) == []  # float32 weights resolve 1e-5
    assert decays(MLP().to(torch.bfloat16), lr=1e-3, decay=0.01, optimizer=torch.optim.SGD) == []  # coupled
    model = MLP().to(torch.bfloat16)
    before = model.fc1.weight.detach().clone()
    opt = torch.optim.AdamW([model.fc1.weight], lr=0.1, weight_decay=0.1)
    model.fc1.weight.grad = torch.zeros_like(model.fc1.weight)
    opt.step()
    assert not torch.equal(model.fc1.weight, before)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_step_the_grad_scaler_skips_gets_no_post_step_terms(fused: bool) -> None:
    # A fused optimizer's step still runs when the scaler found an inf (its kernel updates nothing), and
    # its post-step hook ran prox and max_norm on the weights as they were: 1.4 moved, exact zeros made.
    seeded(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(5)
    reg = regdsl.parse("layer weight l1 0.5 prox max_norm 1.0\n").compile(model)
    opt = torch.optim.Adam(reg.param_groups(lr=0.1), fused=fused)
    reg.attach(opt)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))

    def step(inf: bool) -> None:
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if inf:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    before = model.weight.detach().clone()
    step(inf=True)
    assert torch.equal(model.weight.detach(), before)
    # The next step: Adam's update (torch's own, on a copy), then prox at lr·λ = 0.05, then renorm to 1.
    shadow = copy.deepcopy(model)
    shadow_opt = torch.optim.Adam(shadow.parameters(), lr=0.1)
    shadow_opt.zero_grad()
    shadow(x).square().mean().backward()
    shadow_opt.step()
    w = shadow.weight.detach()
    want = torch.renorm(w.sign() * (w.abs() - 0.05).clamp(min=0), 2, 0, 1.0)
    step(inf=False)
    torch.testing.assert_close(model.weight.detach(), want, rtol=1e-5, atol=1e-6)
