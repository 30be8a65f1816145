"""Training-time behaviour of issue 4's terms: small seeded runs, schedules, state, hooks, torch.compile.

Every expected value is written out plainly here: schedules as one hand-written
function per case, penalties as torch ops on copies of the weights or on module
outputs captured by the test's own forward hooks. Nothing expected is read back
from regdsl.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from models import MLP, seeded
from torch import nn

import regdsl

STEPS = 40


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> MLP:
    seeded(seed)
    return MLP().to(dtype)


def train(
    rules: str | None,
    *,
    steps: int = STEPS,
    lr: float = 0.1,
    optim: str = "sgd",
    lr_lambda: Callable[[int], float] | None = None,
    after_each: Callable[[MLP], None] | None = None,
) -> MLP:
    """Full-batch MSE training of a seeded MLP; ``rules=None`` trains without any regularizer."""
    model = make_model()
    x, y = data()
    reg = regdsl.parse(rules).compile(model) if rules is not None else None
    groups = reg.param_groups(lr=lr) if reg is not None else [{"params": list(model.parameters())}]
    if optim == "sgd":
        opt = torch.optim.SGD(groups, lr=lr)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if reg is not None:
        reg.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        if reg is not None:
            loss = loss + reg.penalty()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if after_each is not None:
            after_each(model)
    return model


# ================================================================ 1. goes the right direction


def test_l1_prox_one_step_is_sgd_then_soft_threshold() -> None:
    lr, lam = 0.1, 0.05
    x, y = data()
    plain = make_model()
    opt = torch.optim.SGD(plain.parameters(), lr=lr)
    F.mse_loss(plain(x), y).backward()
    opt.step()
    w = plain.fc1.weight.detach()
    expected = torch.sign(w) * torch.clamp(w.abs() - lr * lam, min=0.0)

    model = train(f"layer fc1.weight l1 {lam} prox", steps=1, lr=lr)
    torch.testing.assert_close(model.fc1.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.fc2.weight.detach(), plain.fc2.weight.detach())  # prox only where selected


def test_l1_prox_produces_exact_zeros() -> None:
    zeros = {}
    for label, rules in [
        ("none", None),
        ("loss", "layer fc1.weight l1 0.05"),
        ("prox", "layer fc1.weight l1 0.05 prox"),
    ]:
        zeros[label] = int((train(rules).fc1.weight == 0.0).sum())
    assert zeros["prox"] >= 10, zeros
    assert zeros["prox"] >= 10 * max(zeros["none"], zeros["loss"], 1), zeros
    assert zeros["none"] == 0, zeros
    assert zeros["loss"] <= 1, zeros  # L1 through the loss oscillates around 0, it does not land on it


def test_group_lasso_collapses_whole_rows() -> None:
    def decay(t: int) -> float:  # a small final lr: rows settle near 0
        return max(0.0, 1 - t / STEPS) ** 2

    base = train(None, lr_lambda=decay).fc1.weight.detach()
    lasso = train("layer fc1.weight group_lasso 0.3", lr_lambda=decay).fc1.weight.detach()
    base_norms = base.norm(dim=1)
    relative = lasso.norm(dim=1) / base_norms
    collapsed = relative < 1e-3
    assert int(collapsed.sum()) >= 3, relative
    assert bool((base_norms > 0.1).all()), base_norms  # without it no row collapses
    assert int((relative > 0.1).sum()) >= 3, relative  # structured: other rows survive
    # whole rows: every element of a collapsed row is tiny
    assert float(lasso[collapsed].abs().max()) < 1e-3 * float(base_norms.min())


@pytest.mark.parametrize(("dim", "limit"), [(0, 0.6), (1, 0.9)])
def test_max_norm_holds_after_every_step(dim: int, limit: float) -> None:
    other = 1 - dim
    seen: dict[str, list[float]] = {"with": [], "without": []}

    def record(key: str) -> Callable[[MLP], None]:
        return lambda m: seen[key].append(float(m.fc1.weight.detach().double().norm(dim=other).max()))

    train(f"layer fc1.weight max_norm {limit} dim={dim}", lr=1.0, steps=20, after_each=record("with"))
    train(None, lr=1.0, steps=20, after_each=record("without"))
    assert len(seen["with"]) == 20
    assert max(seen["with"]) <= limit * (1 + 1e-6), seen["with"]
    assert max(seen["without"]) > limit * 1.2, seen["without"]


def test_max_norm_step_matches_torch_renorm() -> None:
    x, y = data()
    plain = make_model()
    opt = torch.optim.SGD(plain.parameters(), lr=1.0)
    F.mse_loss(plain(x), y).backward()
    opt.step()
    expected = torch.renorm(plain.fc1.weight.detach(), 2, 0, 0.3)
    model = train("layer fc1.weight max_norm 0.3", steps=1, lr=1.0)
    torch.testing.assert_close(model.fc1.weight.detach(), expected, rtol=1e-6, atol=1e-7)


def test_l2_to_init_stays_near_init() -> None:
    init = {n: p.detach().clone() for n, p in make_model().named_parameters()}

    def drift(model: MLP) -> float:
        return math.sqrt(sum(float((p.detach() - init[n]).square().sum()) for n, p in model.named_parameters()))

    plain = drift(train(None))
    anchored = drift(train("all l2 1.0 to init"))
    assert plain > 0.05, plain
    assert anchored < 0.5 * plain, (anchored, plain)


def test_activity_l1_lowers_mean_activation() -> None:
    x, _ = data()

    def mean_abs_fc1(model: MLP) -> float:
        with torch.no_grad():
            return float(model.fc1(x).abs().mean())

    plain = mean_abs_fc1(train(None))
    sparse = mean_abs_fc1(train("layer fc1 activity l1 0.05"))
    assert sparse < 0.8 * plain, (sparse, plain)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_lr_mult_zero_freezes_its_group(optim: str) -> None:
    before = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    model = train("all decay 0.01\nlayer head.** lr_mult 0", optim=optim, lr=0.05)
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert torch.equal(after["head.bias"], before["head.bias"])
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert not torch.equal(after[name], before[name]), name


# ================================================================ 2. lr_mult and LR schedulers


def _group_of(groups: list[dict], param: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_lr_mult_groups_follow_steplr() -> None:
    model = make_model()
    reg = regdsl.parse("layer head.** lr_mult 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    head, body = _group_of(opt.param_groups, model.head.weight), _group_of(opt.param_groups, model.fc1.weight)
    assert head is _group_of(opt.param_groups, model.head.bias)
    assert all(_group_of(opt.param_groups, p) is body for p in (model.fc1.bias, model.fc2.weight, model.fc2.bias))
    assert head is not body
    assert body["lr"] == 0.1
    assert math.isclose(head["lr"], 0.01, rel_tol=1e-12)
    ratio = head["lr"] / body["lr"]
    assert math.isclose(ratio, 0.1, rel_tol=1e-12)

    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = data()
    for epoch in range(1, 8):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        factor = 0.5 ** (epoch // 2)  # StepLR: lr_0 · γ^⌊epoch / step_size⌋
        assert math.isclose(body["lr"], 0.1 * factor, rel_tol=1e-12), epoch
        assert math.isclose(head["lr"], 0.01 * factor, rel_tol=1e-12), epoch
        assert head["lr"] / body["lr"] == ratio, epoch  # halving is exact: the ratio never drifts


def test_lr_mult_lr_reaches_the_update() -> None:
    model = make_model()
    before = model.head.weight.detach().clone()
    reg = regdsl.parse("layer head.** lr_mult 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    x, y = data()
    F.mse_loss(model(x), y).backward()
    grad = model.head.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.head.weight.detach(), before - 0.01 * grad)


def test_param_groups_without_lr_when_lr_mult_is_set() -> None:
    reg = regdsl.parse("layer head.** lr_mult 0.1").compile(make_model())
    with pytest.raises(regdsl.RegUsageError):
        reg.param_groups()
    with pytest.raises(regdsl.RegUsageError):
        reg.param_groups(momentum=0.9)


# ================================================================ 3. schedules


def sched_a(t: int) -> float:  # l1 1e-2 warmup 4 from 3 until 20
    if t < 3 or t >= 20:
        return 0.0
    if t < 3 + 4:
        return 1e-2 * (t - 3) / 4
    return 1e-2


def sched_b(t: int) -> float:  # l2 0.1 cosine to 0.01 over 10
    u = min(t, 10) / 10
    return 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * u)) / 2


def sched_c(t: int) -> float:  # l1 1 warmup 2 cosine to 0.5 over 4 from 1
    if t < 1:
        return 0.0
    if t < 1 + 2:
        return 1.0 * (t - 1) / 2
    u = min(t - 3, 4) / 4
    return 0.5 + (1.0 - 0.5) * (1 + math.cos(math.pi * u)) / 2


def sched_d(t: int) -> float:  # l2 0.2 until 5
    return 0.2 if t < 5 else 0.0


def sched_e(t: int) -> float:  # decay 0.1 warmup 3 from 2
    if t < 2:
        return 0.0
    if t < 5:
        return 0.1 * (t - 2) / 3
    return 0.1


def sched_f(t: int) -> float:  # group_lasso 0.5 from 2 cosine to 0 over 3
    if t < 2:
        return 0.0
    u = min(t - 2, 3) / 3
    return 0.5 * (1 + math.cos(math.pi * u)) / 2


def sched_g(t: int) -> float:  # l2 0.3 to init warmup 3
    return 0.3 * min(t, 3) / 3


def sched_h(t: int) -> float:  # orthogonal 0.05 warmup 2 until 9
    if t >= 9:
        return 0.0
    return 0.05 * min(t, 2) / 2


def sched_i(t: int) -> float:  # activity l2 0.2 from 1 until 4
    return 0.2 if 1 <= t < 4 else 0.0


def sched_j(t: int) -> float:  # activity l1 0.05 cosine to 0.01 over 6
    u = min(t, 6) / 6
    return 0.01 + (0.05 - 0.01) * (1 + math.cos(math.pi * u)) / 2


def sum_abs(w: torch.Tensor) -> torch.Tensor:
    return w.abs().sum()


def half_sq(w: torch.Tensor) -> torch.Tensor:
    return w.square().sum() / 2


def row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.square().sum(dim=1).sqrt().sum()


def gram_error(w: torch.Tensor) -> torch.Tensor:
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return (g - torch.eye(g.shape[0], dtype=w.dtype)).square().sum()


# (rules, parameter or module name, kind, schedule, plain value the strength multiplies)
# "init" is the unit value of l2 to init, computed against the test's own copy of the initial weight;
# activity values are computed from the captured fc1 output; None for decay (read from the optimizer).
SCHEDULE_CASES = [
    ("layer fc1.weight l1 1e-2 warmup 4 from 3 until 20", "fc1.weight", "l1", sched_a, sum_abs),
    ("layer fc2.weight l2 0.1 cosine to 0.01 over 10", "fc2.weight", "l2", sched_b, half_sq),
    ("layer fc1.weight l1 1 warmup 2 cosine to 0.5 over 4 from 1", "fc1.weight", "l1", sched_c, sum_abs),
    ("layer head.weight l2 0.2 until 5", "head.weight", "l2", sched_d, half_sq),
    ("all decay 0.1 warmup 3 from 2\nexclude bias", "fc1.weight", "decay", sched_e, None),
    ("layer head.weight group_lasso 0.5 from 2 cosine to 0 over 3", "head.weight", "group_lasso", sched_f, row_norms),
    ("layer fc2.weight l2 0.3 to init warmup 3", "fc2.weight", "l2", sched_g, "init"),
    ("layer fc2.weight orthogonal 0.05 warmup 2 until 9", "fc2.weight", "orthogonal", sched_h, gram_error),
    ("layer fc1 activity l2 0.2 from 1 until 4", "fc1", "activity_l2", sched_i, "act_l2"),
    ("layer fc1 activity l1 0.05 cosine to 0.01 over 6", "fc1", "activity_l1", sched_j, "act_l1"),
]


@pytest.mark.parametrize("advance", ["attach", "after_step"])
@pytest.mark.parametrize(
    ("rules", "name", "kind", "formula", "unit"), SCHEDULE_CASES, ids=[c[0].split("\n")[0] for c in SCHEDULE_CASES]
)
def test_schedule_follows_formula(rules, name, kind, formula, unit, advance) -> None:
    model = make_model(dtype=torch.float64)
    params = dict(model.named_parameters())
    init = {n: p.detach().clone() for n, p in params.items()}
    x, y = data()
    x = x.double()
    y = y.double()
    captured: list[torch.Tensor] = []
    model.fc1.register_forward_hook(lambda mod, args, out: captured.append(out.detach()))
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.01), lr=0.01)
    if advance == "attach":
        reg.attach(opt)
    for t in range(24):
        assert reg.step == t
        expected = formula(t)
        assert reg.strength(name, kind) == pytest.approx(expected, rel=1e-12, abs=1e-15), t
        captured.clear()
        opt.zero_grad()
        out = model(x)
        penalty = reg.penalty()
        if unit is None:  # scheduled decay: the optimizer group carries it
            assert _group_of(opt.param_groups, params[name])["weight_decay"] == pytest.approx(expected, rel=1e-12), t
            assert _group_of(opt.param_groups, params["fc1.bias"])["weight_decay"] == 0.0
            assert float(penalty) == 0.0
        else:
            if unit == "init":
                plain = half_sq(params[name].detach() - init[name])
            elif unit == "act_l1":
                (a,) = captured
                plain = a.abs().sum() / a.shape[0]
            elif unit == "act_l2":
                (a,) = captured
                plain = a.square().sum() / 2 / a.shape[0]
            else:
                plain = unit(params[name].detach())
            if t > 0 or unit != "init":
                assert float(plain) > 0
            # activity-only specs have no float64 parameter term, so their sum is float32 (see the brief)
            rtol = 1e-10 if penalty.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(
                penalty.detach().double(), expected * plain, rtol=rtol, atol=1e-14, msg=lambda m, t=t: f"step {t}: {m}"
            )
        (F.mse_loss(out, y) + penalty).backward()
        opt.step()
        if advance == "after_step":
            reg.after_step(opt)
    assert reg.step == 24


STATE_RULES = """
layer fc1.weight l1 1e-2 warmup 4 from 3 until 20
layer fc2.weight l2 0.3 to init warmup 3
all decay 0.1 warmup 3 from 2
exclude bias
layer fc1 activity l1 0.05 cosine to 0.01 over 6
"""


def _state_expected(before: dict[str, torch.Tensor], init_fc2: torch.Tensor, act: torch.Tensor, t: int) -> torch.Tensor:
    """STATE_RULES' penalty at step t, on the weights that step saw and fc1's captured output."""
    return (
        sched_a(t) * sum_abs(before["fc1.weight"])
        + sched_g(t) * half_sq(before["fc2.weight"] - init_fc2)
        + sched_j(t) * act.abs().sum() / act.shape[0]
    )


class Run:
    """A float64 MLP, its regularizer (STATE_RULES) and an attached SGD, with fc1's output captured."""

    def __init__(self, seed: int, attach_now: bool = True):
        self.model = make_model(seed, torch.float64)
        self.captured: list[torch.Tensor] = []
        self.model.fc1.register_forward_hook(lambda m, a, out: self.captured.append(out.detach()))
        self.reg = regdsl.parse(STATE_RULES).compile(self.model)
        self.opt = torch.optim.SGD(self.reg.param_groups(lr=0.05), lr=0.05, momentum=0.9)
        if attach_now:
            self.reg.attach(self.opt)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One training step; returns its penalty, fc1's captured output and the weights it started from."""
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.captured.clear()
        self.opt.zero_grad()
        out = self.model(x)
        penalty = self.reg.penalty()
        (F.mse_loss(out, y) + penalty).backward()
        self.opt.step()
        (act,) = self.captured
        return penalty.detach(), act, before

    def strengths(self) -> tuple[float, float, float, float]:
        fc1_group = _group_of(self.opt.param_groups, self.model.fc1.weight)
        return (
            self.reg.strength("fc1.weight", "l1"),
            self.reg.strength("fc2.weight", "l2"),
            self.reg.strength("fc1", "activity_l1"),
            fc1_group["weight_decay"],
        )


def _expected_strengths(t: int) -> tuple[float, float, float, float]:
    return (sched_a(t), sched_g(t), sched_j(t), sched_e(t))


@pytest.mark.parametrize("attach_first", [True, False])
def test_state_dict_resume_continues_schedule(attach_first: bool) -> None:
    x, y = (v.double() for v in data())
    k, total = 6, 16
    init_fc2 = make_model(0, torch.float64).fc2.weight.detach().clone()

    straight = Run(0)
    history = []
    for t in range(total):
        assert straight.strengths() == pytest.approx(_expected_strengths(t), rel=1e-12, abs=1e-15), t
        penalty, act, before = straight.step(x, y)
        torch.testing.assert_close(penalty, _state_expected(before, init_fc2, act, t), rtol=1e-10, atol=1e-14)
        history.append(penalty)

    first = Run(0)
    for t in range(k):
        penalty, _, _ = first.step(x, y)
        torch.testing.assert_close(penalty, history[t], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(
        {"model": first.model.state_dict(), "opt": first.opt.state_dict(), "reg": first.reg.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer)
    del first

    resumed = Run(seed=123, attach_now=attach_first)
    assert not torch.equal(resumed.model.fc2.weight, init_fc2)  # a different init: its own 'to init' copy differs
    resumed.model.load_state_dict(saved["model"])
    resumed.opt.load_state_dict(saved["opt"])
    resumed.reg.load_state_dict(saved["reg"])
    if not attach_first:
        resumed.reg.attach(resumed.opt)
    assert resumed.reg.step == k
    for t in range(k, total):
        assert resumed.strengths() == pytest.approx(_expected_strengths(t), rel=1e-12, abs=1e-15), t
        penalty, act, before = resumed.step(x, y)
        # the formula with the original init (restored), not the fresh model's
        expected = _state_expected(before, init_fc2, act, t)
        torch.testing.assert_close(penalty, expected, rtol=1e-10, atol=1e-14, msg=f"step {t}")
        torch.testing.assert_close(penalty, history[t], rtol=1e-12, atol=0.0, msg=f"step {t}")
    assert resumed.reg.step == total
    for (name, p), q in zip(resumed.model.named_parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


def test_state_dict_holds_step_and_init_reference() -> None:
    model = make_model()
    init = model.fc2.weight.detach().clone()
    reg = regdsl.parse("layer fc2.weight l2 0.3 to init").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        (F.mse_loss(model(x), y) + reg.penalty()).backward()
        opt.step()
    state = reg.state_dict()
    assert state["step"] == 3
    assert set(state["references"]) == {"fc2.weight"}
    assert torch.equal(state["references"]["fc2.weight"], init)
    assert not torch.equal(model.fc2.weight.detach(), init)


def _reg_with_reference() -> tuple[MLP, regdsl.Regularizer]:
    model = make_model()
    return model, regdsl.parse("layer fc2.weight l2 0.3 to init warmup 3").compile(model)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda s: s["references"].pop("fc2.weight"), id="missing-reference"),
        pytest.param(lambda s: s["references"].update({"fc2.weight": torch.zeros(3, 3)}), id="wrong-shape"),
        pytest.param(lambda s: s["references"].update({"fc2.weight": s["references"]["fc2.weight"].numpy()}), id="not-a-tensor"),
        pytest.param(lambda s: s.pop("references"), id="no-references"),
        pytest.param(lambda s: s.update(references=None), id="references-none"),
        pytest.param(lambda s: s.update(step=-1), id="negative-step"),
        pytest.param(lambda s: s.update(step="4"), id="step-not-int"),
        pytest.param(lambda s: s.update(step=True), id="step-bool"),
    ],
)
def test_load_state_dict_rejects_bad_state(corrupt) -> None:
    _, source = _reg_with_reference()
    state = source.state_dict()
    state["step"] = 5
    state["references"] = dict(state["references"])
    corrupt(state)
    _, reg = _reg_with_reference()
    penalty_before = reg.penalty().detach()
    with pytest.raises(regdsl.RegUsageError) as err:
        reg.load_state_dict(state)
    if "reference" in str(err.value):
        assert "fc2.weight" in str(err.value)
    assert reg.step == 0  # nothing half-applied
    torch.testing.assert_close(reg.penalty().detach(), penalty_before)


# ================================================================ 4. activity hooks


class Capture:
    def __init__(self, module: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(lambda m, a, out: self.outputs.append(out))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_activity_penalty_matches_own_hook(kind: str) -> None:
    model = make_model()
    cap = Capture(model.fc1)
    reg = regdsl.parse(f"layer fc1 activity {kind} 0.3").compile(model)
    x = data(5)[0]
    model(x)
    penalty = reg.penalty()
    (a,) = cap.outputs
    a64 = a.double()
    expected = 0.3 * a64.abs().sum() / 5 if kind == "l1" else 0.3 / 2 * a64.square().sum() / 5
    assert penalty.shape == () and penalty.dtype == torch.float32
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-6, atol=0.0)
    got = torch.autograd.grad(penalty, model.fc1.weight, retain_graph=True)[0]
    want = torch.autograd.grad(expected, model.fc1.weight)[0]
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)


def test_activity_two_forwards_then_consumed() -> None:
    model = make_model(dtype=torch.float64)
    cap = Capture(model.fc1)
    reg = regdsl.parse("layer fc1 activity l1 0.3\nlayer head.weight l2 0.1").compile(model)
    params_only = 0.1 / 2 * model.head.weight.detach().square().sum()
    model(data(5)[0].double())
    model(data(3, seed=2)[0].double())
    a1, a2 = cap.outputs
    expected = params_only + 0.3 * a1.abs().sum() / 5 + 0.3 * a2.abs().sum() / 3
    torch.testing.assert_close(reg.penalty().detach(), expected.detach(), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(reg.penalty().detach(), params_only, rtol=1e-12, atol=0.0)  # consumed


def test_activity_not_collected_without_grad() -> None:
    model = make_model(dtype=torch.float64)
    reg = regdsl.parse("layer fc1 activity l1 0.3\nlayer head.weight l2 0.1").compile(model)
    params_only = 0.1 / 2 * model.head.weight.detach().square().sum()
    x = data(5)[0].double()
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    torch.testing.assert_close(reg.penalty().detach(), params_only, rtol=1e-12, atol=0.0)


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, 2 * x


class Named(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x}


class WithPair(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(self.lin(x))
        return out["out"] if isinstance(out, dict) else out[0]


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize(
    ("factory", "rules", "shape"),
    [
        (lambda: WithPair(Pair()), "layer inner activity l1 0.1", (2, 4)),
        (lambda: WithPair(Named()), "layer inner activity l2 0.1", (2, 4)),
        (WithLSTM, "layer lstm activity l1 0.1", (2, 3, 4)),
    ],
    ids=["tuple", "dict", "lstm"],
)
def test_activity_on_non_tensor_output_is_rd106(factory, rules, shape) -> None:
    seeded(0)
    model = factory()
    reg = regdsl.parse(rules).compile(model)  # compiling is fine; the output type shows at the first forward
    with pytest.raises(regdsl.RegCompileError) as err:
        model(torch.randn(*shape))
    assert [d.code for d in err.value.diagnostics] == ["RD106"]
    assert reg.step == 0


def test_detach_removes_hooks() -> None:
    model = make_model()
    reg = regdsl.parse("layer fc1 activity l1 0.3\nlayer head.weight l1 0.1 prox").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)
    assert len(model.fc1._forward_hooks) == 1
    assert len(opt._optimizer_step_post_hooks) == 1
    reg.detach()
    assert len(model.fc1._forward_hooks) == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    model(data(5)[0])
    assert float(reg.penalty()) == 0.0  # nothing collected after detach
    opt.step()
    assert reg.step == 0
    reg.after_step(opt)  # allowed again once detached
    assert reg.step == 1


def test_deleting_regularizer_removes_its_forward_hooks_and_empties_its_step_hooks() -> None:
    model = make_model()
    reg = regdsl.parse("layer fc1 activity l1 0.3\nlayer fc2 activity l2 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)
    assert len(model.fc1._forward_hooks) == 1 and len(model.fc2._forward_hooks) == 1
    attached = weakref.ref(reg._attached)
    del reg
    gc.collect()
    assert len(model.fc1._forward_hooks) == 0 and len(model.fc2._forward_hooks) == 0
    assert attached() is None  # the step hook holds nothing of it
    model(data(5)[0]).sum().backward()
    opt.step()  # no dangling hook fires


# Rules whose step hooks apply terms, each with what the warning names when they go.
ORPHANED = [
    ("layer fc1.weight l2 0.5", True, "folded terms"),
    ("layer fc1.weight l1 0.1 prox", False, "post-step terms"),
    ("all decay 0.1 warmup 5", False, "a decay schedule"),
]


@pytest.mark.parametrize("rules, fold, what", ORPHANED)
def test_a_regularizer_collected_inside_the_step_leaves_the_step_intact(rules: str, fold: bool, what: str) -> None:
    # The cyclic collector runs wherever an allocation triggers it: here inside a hook that torch calls
    # before regdsl's own. Removing a hook there broke torch's loop over them ("OrderedDict mutated
    # during iteration") and the user's step raised.
    model = make_model()
    plain = copy.deepcopy(model)
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)

    def collect(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        gc.collect()

    opt.register_step_pre_hook(collect)
    reg.attach(opt, fold=fold)
    reg.cycle = reg  # only the cyclic collector frees it, in the middle of the step
    del reg
    x = data(5)[0]
    for k in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        said = [str(w.message) for w in caught if issubclass(w.category, regdsl.RegDslWarning)]
        assert len(said) == (1 if k == 0 else 0)
        assert k or f"({what})" in said[0]
    if "decay" not in rules:  # the terms went with it, from the first step on: plain SGD's weights
        ref = torch.optim.SGD(plain.parameters(), lr=0.1)
        for _ in range(2):
            ref.zero_grad()
            plain(x).sum().backward()
            ref.step()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p, q)


def step_warnings(model: MLP, opt: torch.optim.Optimizer) -> list[str]:
    """The RegDslWarnings of one training step."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        model(data(5)[0]).sum().backward()
        opt.step()
    return [str(w.message) for w in caught if issubclass(w.category, regdsl.RegDslWarning)]


@pytest.mark.parametrize("rules, fold, what", ORPHANED)
def test_a_regularizer_dropped_while_attached_warns_at_the_next_step(rules: str, fold: bool, what: str) -> None:
    # Only the regularizer holds these terms: dropped (attach() in a function that returns the
    # optimizer), its hooks go with it, and the optimizer's next step says so, once.
    def build(detach: bool) -> tuple[MLP, torch.optim.Optimizer]:
        model = make_model()
        reg = regdsl.parse(rules).compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
        reg.attach(opt, fold=fold)
        if detach:
            reg.detach()
        return model, opt

    model, opt = build(detach=False)
    gc.collect()
    first = step_warnings(model, opt)
    assert len(first) == 1 and "garbage-collected" in first[0] and f"({what})" in first[0]
    assert step_warnings(model, opt) == []  # once
    model, opt = build(detach=True)  # detached first: nothing to say
    gc.collect()
    assert step_warnings(model, opt) == []


def test_a_regularizer_replaced_by_one_attached_since_is_no_warning_and_one_attached_before_is() -> None:
    # 'reg = compile(...); reg.attach(opt, fold=True)' run again: the first one is freed at the rebinding,
    # the second folds its terms once, and the warning that they "go without" was false. A regularizer
    # attached beside the dropped one (before it was dropped) takes nobody's place: the drop is still told.
    model = make_model()
    reg = regdsl.parse("all l2 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.0), lr=0.0)
    reg.attach(opt, fold=True)
    reg = regdsl.parse("all l2 0.1").compile(model)
    gc.collect()
    reg.attach(opt, fold=True)
    plain = make_model()  # the same weights, no regularizer: the data gradient alone
    plain(data(5)[0]).sum().backward()
    assert step_warnings(model, opt) == []
    torch.testing.assert_close(model.fc1.weight.grad, plain.fc1.weight.grad + 0.1 * model.fc1.weight.detach())

    for kept_first in (True, False):
        model = make_model()
        kept = regdsl.parse("layer fc1.weight l1 0.01").compile(model)
        dropped = regdsl.parse("layer fc2.weight l2 0.1").compile(model)
        opt = torch.optim.SGD(kept.param_groups(lr=0.0), lr=0.0)
        for reg in (kept, dropped) if kept_first else (dropped, kept):
            reg.attach(opt, fold=True)
        del dropped, reg
        gc.collect()
        (told,) = step_warnings(model, opt)
        assert "garbage-collected" in told and "(folded terms)" in told


# ================================================================ 5. attach errors


def test_after_step_on_attached_regularizer() -> None:
    model = make_model()
    reg = regdsl.parse("all l2 0.1 warmup 3").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)
    with pytest.raises(regdsl.RegUsageError):
        reg.after_step(opt)
    with pytest.raises(regdsl.RegUsageError):
        reg.after_step()
    with pytest.raises(regdsl.RegUsageError):
        reg.attach(opt)  # twice
    assert reg.step == 0


@pytest.mark.parametrize("rules", ["all l1 0.1 prox", "all decay 0.1 warmup 3"])
def test_after_step_needs_optimizer(rules: str) -> None:
    reg = regdsl.parse(rules).compile(make_model())
    with pytest.raises(regdsl.RegUsageError):
        reg.after_step()
    assert reg.step == 0


def test_attach_scheduled_decay_needs_param_groups_optimizer() -> None:
    model = make_model()
    reg = regdsl.parse("layer head.** decay 0.1 warmup 3").compile(model)
    with pytest.raises(regdsl.RegUsageError):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_attach_scheduled_decay_rejects_mixed_group() -> None:
    # A plain SGD(model.parameters()) whose first tensor is in the scheduled-decay group must not be
    # accepted: the decay would be written into a group that also holds the excluded biases.
    model = make_model()
    reg = regdsl.parse("all decay 0.1 warmup 3\nexclude bias").compile(model)
    with pytest.raises(regdsl.RegUsageError):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))


# ================================================================ 6. torch.compile


def test_torch_compile_penalty_does_not_recompile_across_schedule() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = make_model()
    reg = regdsl.parse("layer fc1.weight l1 0.5 warmup 4\nlayer fc2.weight l2 0.3 warmup 4 until 6").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.01), lr=0.01)
    reg.attach(opt)

    compiled_graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compiled_graphs.append(1)
        return gm.forward

    def f() -> torch.Tensor:
        return reg.penalty()

    torch._dynamo.reset()
    counters.clear()
    cf = torch.compile(f, backend=backend)
    graphs_after_first = None
    for t in range(8):
        w1 = model.fc1.weight.detach().clone()
        w2 = model.fc2.weight.detach().clone()
        opt.zero_grad()
        value = cf()
        if t == 0:
            graphs_after_first = (len(compiled_graphs), counters["stats"]["unique_graphs"])
            assert graphs_after_first[0] >= 1
        else:
            assert (len(compiled_graphs), counters["stats"]["unique_graphs"]) == graphs_after_first, t
        l1 = 0.5 * min(t, 4) / 4
        l2 = 0.3 * min(t, 4) / 4 if t < 6 else 0.0
        expected = l1 * w1.abs().sum() + l2 * w2.square().sum() / 2
        torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-7, msg=f"step {t}")
        value.backward()
        if t > 0:
            torch.testing.assert_close(model.fc1.weight.grad, l1 * torch.sign(w1), rtol=1e-5, atol=1e-7)
        opt.step()
    torch._dynamo.reset()


# ---------------------------------------------------------------- CUDA


CUDA_RULES = """all decay 0.01 warmup 2
exclude bias
layer fc1 group_lasso 0.05 l1 0.01 prox
layer fc2 orthogonal 0.01 l2 0.1 to init cosine to 0.01 over 3
layer head max_norm 0.5
layer fc2 activity l1 0.001 from 1
layer head.** lr_mult 0.5
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_term_runs_on_cuda_as_on_cpu() -> None:
    # The same run on CPU and on the GPU: penalties, post-step effects and schedules agree,
    # and nothing leaves the device (no .cuda() in regdsl; each tensor's own device is used).
    runs = {}
    for device in ("cpu", "cuda"):
        model = make_model().to(device)
        reg = regdsl.parse(CUDA_RULES).compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
        reg.attach(opt)
        x, y = (t.to(device) for t in data())
        penalties = []
        for _ in range(4):
            loss = F.cross_entropy(model(x), y)
            penalty = reg.penalty()
            assert penalty.device.type == device
            penalties.append(penalty.item())
            opt.zero_grad()
            (loss + penalty).backward()
            opt.step()
        runs[device] = (penalties, {n: p.detach().cpu() for n, p in model.named_parameters()})
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-4)
    for name, value in runs["cpu"][1].items():
        torch.testing.assert_close(runs["cuda"][1][name], value, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- found in review


def test_after_step_refuses_a_wider_group_for_a_scheduled_decay() -> None:
    # Writing the decay into SGD(model.parameters())'s one group would decay fc1.bias, fc2.*, head.*.
    model = make_model()
    reg = regdsl.parse("layer fc1.weight decay 0.1 warmup 2").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
    opt.step()
    with pytest.raises(regdsl.RegUsageError, match="no group 'decay=0.1 warmup 2'"):
        reg.after_step(opt)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_attach_after_detach_brings_the_activity_hooks_back() -> None:
    model = make_model()
    reg = regdsl.parse("layer fc1 activity l1 1.0").compile(model)
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    reg.detach()
    assert not model.fc1._forward_hooks
    reg.attach(torch.optim.SGD(reg.param_groups(lr=0.1)))
    x, _ = data()
    captured = model.fc1(x)
    expected = captured.abs().sum() / x.shape[0]
    torch.testing.assert_close(reg.penalty(), expected.detach(), check_dtype=False)


def test_a_half_round_trip_does_not_round_the_init_reference() -> None:
    model = make_model()
    w0 = model.fc1.weight.detach().clone()
    reg = regdsl.parse("layer fc1.weight l2 1.0 to init").compile(model)
    model.half()
    reg.penalty()  # the reference follows the half model...
    model.float()
    with torch.no_grad():
        model.fc1.weight.copy_(w0)
    assert reg.penalty().item() == 0.0  # ...and comes back exact
    assert torch.equal(reg.state_dict()["references"]["fc1.weight"], w0)


def test_a_model_that_is_one_layer_is_an_activity_target() -> None:
    layer = nn.Linear(3, 2)
    reg = regdsl.parse("all activity l2 2.0").compile(layer)
    x = torch.randn(4, 3)
    out = layer(x)
    torch.testing.assert_close(reg.penalty(), (2.0 / 2 * out.pow(2).sum() / 4).detach())
    assert [m.name for m in reg.explain_modules()] == [""]
    assert "(model)" in regdsl.format_explain(reg.explain(), reg.explain_modules())


def test_schedule_steps_in_another_order_share_a_group() -> None:
    model = make_model()
    reg = regdsl.parse("all decay 0.1 warmup 3 from 2\nlayer head.** decay 0.1 from 2 warmup 3").compile(model)
    assert len(reg.param_groups()) == 1


def test_load_state_dict_of_no_mapping_and_remap_of_no_optimizer_state_are_usage_errors() -> None:
    _, reg = _reg_with_reference()
    with pytest.raises(regdsl.RegUsageError, match="the mapping reg.state_dict\\(\\) returns, not NoneType"):
        reg.load_state_dict(None)  # type: ignore[arg-type]
    with pytest.raises(regdsl.RegStateError, match="needs an optimizer's state_dict"):
        reg.remap_optimizer_state(None, reg.state_dict())  # type: ignore[arg-type]
    assert reg.step == 0


# ---------------------------------------------------------------- activity terms: output kinds, fullgraph


def test_activity_terms_trace_whole_under_torch_compile_fullgraph() -> None:
    # Before: torch._dynamo.exc.Unsupported (the hook asked autograd for its graph task id), and a graph
    # break at every hooked module without fullgraph.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    reg = regdsl.parse("layer 0 activity l2 0.3\nlayer 2 activity l1 0.2").compile(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4)
    compiled(x)
    got = reg.penalty()
    a0 = model[0](x).double()
    a2 = model[2](torch.tanh(model[0](x))).double()
    want = 0.3 / 2 * a0.square().sum() / 3 + 0.2 * a2.abs().sum() / 3
    torch.testing.assert_close(got.double(), want)


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.long, torch.complex64])
def test_an_activity_term_on_a_non_float_output_is_rd106(kind: str, dtype: torch.dtype) -> None:
    # Before: l2 on token ids penalized the integers themselves, silently; l1 failed inside torch.
    class Ids(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(dtype)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ids, self.fc = Ids(), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.ids(x).real.float())

    model = Net()
    reg = regdsl.parse(f"layer ids activity {kind} 0.1").compile(model)
    with pytest.raises(regdsl.RegCompileError) as info:
        model(torch.ones(2, 3))
    (d,) = info.value.diagnostics
    assert d.code == "RD106" and f"returned a {str(dtype).removeprefix('torch.')} tensor" in d.message
    assert reg is not None
