"""Resuming with an edited rule file: refused, or remapped by name, never silently wrong.

torch's optimizer.load_state_dict pairs saved state with parameters by position and
restores the saved group settings. The models here have equal shapes everywhere
(16x16 weights, 16-long biases), so a wrong pairing would load without any error:
exactly the case that must not pass unnoticed. Every expectation is written out here:
per-parameter state is read from the optimizer with torch's own API, by the test's
own parameter names, and cloned at save time.
"""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import MLP, seeded
from torch import nn

import regdsl

LR = 1e-2
OPTIMIZERS = ["adamw", "sgd"]


def make_model(seed: int = 0) -> MLP:
    seeded(seed)
    return MLP(n_in=16, hidden=16, n_out=16)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=0.9)


class Run:
    def __init__(self, rules: str, kind: str, seed: int = 0, model: nn.Module | None = None):
        self.model = model if model is not None else make_model(seed)
        self.reg = regdsl.parse(rules).compile(self.model)
        self.opt = make_optimizer(kind, self.reg.param_groups(lr=LR))
        self.reg.attach(self.opt)

    def train(self, steps: int) -> None:
        x, y = data()
        for _ in range(steps):
            self.opt.zero_grad()
            (F.mse_loss(self.model(x), y) + self.reg.penalty()).backward()
            self.opt.step()

    def per_param(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each parameter's optimizer state by name, copied."""
        return {
            name: {k: v.clone() for k, v in self.opt.state[p].items()}
            for name, p in self.model.named_parameters()
            if p in self.opt.state
        }

    def group_of(self, name: str) -> dict:
        param = self.model.get_parameter(name)
        return next(g for g in self.opt.param_groups if any(q is param for q in g["params"]))

    def saved(self) -> dict:
        """What a checkpoint holds, through torch.save and torch.load (weights_only: plain data only)."""
        buffer = io.BytesIO()
        torch.save(
            {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "reg": self.reg.state_dict()}, buffer
        )
        buffer.seek(0)
        return torch.load(buffer)


def resumed(rules: str, kind: str, saved: dict, remap: bool) -> Run:
    """A fresh run with ``rules``, resumed from ``saved`` (the optimizer state remapped or as saved)."""
    run = Run(rules, kind, seed=7)
    run.model.load_state_dict(saved["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if remap:
            run.opt.load_state_dict(run.reg.remap_optimizer_state(saved["opt"], saved["reg"]))
            run.reg.load_state_dict(saved["reg"], strict=False)
        else:
            run.reg.load_state_dict(saved["reg"])
            run.opt.load_state_dict(saved["opt"])
    return run


def assert_own_state(run: Run, before: dict[str, dict[str, torch.Tensor]], names: list[str]) -> None:
    after = run.per_param()
    for name in names:
        assert after[name].keys() == before[name].keys(), name
        for key, value in before[name].items():
            assert torch.equal(after[name][key], value), (name, key)


# ================================================================ what state_dict records


def test_state_dict_records_the_group_layout() -> None:
    model = make_model()
    rules = "all decay 0.05\nexclude bias\nlayer head decay 0.1 warmup 10\nlayer fc1 lr_mult 0.5\nlayer fc2.weight l2 0.01 to init"
    reg = regdsl.parse(rules).compile(model)
    state = reg.state_dict()
    assert set(state) == {"step", "references", "reference_kinds", "groups"}
    assert state["reference_kinds"] == {"fc2.weight": "init"}
    assert state["step"] == 0
    assert set(state["references"]) == {"fc2.weight"}
    assert state["groups"] == [
        {
            "name": "decay=0.05 lr_mult=0.5",
            "weight_decay": 0.05,
            "lr_mult": 0.5,
            "schedule": "",
            "params": ["fc1.weight"],
        },
        {"name": "no_decay lr_mult=0.5", "weight_decay": 0.0, "lr_mult": 0.5, "schedule": "", "params": ["fc1.bias"]},
        {"name": "decay=0.05", "weight_decay": 0.05, "lr_mult": 1.0, "schedule": "", "params": ["fc2.weight"]},
        {"name": "no_decay", "weight_decay": 0.0, "lr_mult": 1.0, "schedule": "", "params": ["fc2.bias", "head.bias"]},
        {
            "name": "decay=0.1 warmup 10",
            "weight_decay": 0.1,
            "lr_mult": 1.0,
            "schedule": "warmup 10",
            "params": ["head.weight"],
        },
    ]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["groups"] == state["groups"]


# ================================================================ unchanged rules: resume simply works


RULES = "all decay 0.05\nexclude bias\nlayer head decay 0.1 warmup 6\nlayer fc2 l1 1e-3"


@pytest.mark.parametrize("remap", [False, True], ids=["load", "remap"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_same_rules_resume_is_bit_identical(kind: str, remap: bool) -> None:
    straight = Run(RULES, kind)
    straight.train(10)

    first = Run(RULES, kind)
    first.train(4)
    saved = first.saved()
    run = resumed(RULES, kind, saved, remap)
    assert run.reg.step == 4
    run.train(6)
    for (name, p), q in zip(run.model.named_parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert run.group_of("head.weight")["weight_decay"] == 0.1  # the warmup is over at step 6


# ================================================================ membership moves, equal group sizes

MOVE_BEFORE = "all decay 0.05\nlayer fc1, fc2 decay 0.1"  # [fc1.*, fc2.*] 0.1, [head.*] 0.05
MOVE_AFTER = "all decay 0.05\nlayer fc1, head decay 0.1"  # [fc1.*, head.*] 0.1, [fc2.*] 0.05


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_moved_parameters_are_refused(kind: str) -> None:
    first = Run(MOVE_BEFORE, kind)
    first.train(3)
    saved = first.saved()

    # The hazard: torch loads it without complaint, fc2.weight getting head.weight's state.
    blind = Run(MOVE_AFTER, kind, seed=7)
    blind.opt.load_state_dict(saved["opt"])
    wrong, fc2 = blind.per_param()["head.weight"], first.per_param()["fc2.weight"]
    assert all(torch.equal(wrong[k], fc2[k]) for k in fc2)

    run = Run(MOVE_AFTER, kind, seed=7)
    with pytest.raises(regdsl.RegStateError) as err:
        run.reg.load_state_dict(saved["reg"])
    message = str(err.value)
    assert "'fc2.weight', 'fc2.bias' moved from group 'decay=0.1' to group 'decay=0.05'" in message
    assert "'head.weight', 'head.bias' moved from group 'decay=0.05' to group 'decay=0.1'" in message
    assert "remap_optimizer_state" in message
    assert isinstance(err.value, regdsl.RegDslError)
    assert run.reg.step == 0  # nothing half-applied


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_moved_parameters_keep_their_own_state_when_remapped(kind: str) -> None:
    first = Run(MOVE_BEFORE, kind)
    first.train(3)
    own = first.per_param()
    saved = first.saved()
    names = [n for n, _ in first.model.named_parameters()]

    run = resumed(MOVE_AFTER, kind, saved, remap=True)
    assert_own_state(run, own, names)
    assert run.reg.step == 3
    assert run.group_of("head.weight")["weight_decay"] == 0.1
    assert run.group_of("fc2.weight")["weight_decay"] == 0.05
    assert [g["name"] for g in run.opt.param_groups] == ["decay=0.1", "decay=0.05"]
    assert all(g["lr"] == LR for g in run.opt.param_groups)

    # The next step is the one of an optimizer given each parameter's own state by hand.
    by_hand = Run(MOVE_AFTER, kind, seed=7)
    by_hand.model.load_state_dict(saved["model"])
    by_hand.reg.load_state_dict(saved["reg"], strict=False)
    for name, p in by_hand.model.named_parameters():
        by_hand.opt.state[p] = {k: v.clone() for k, v in own[name].items()}
    run.train(2)
    by_hand.train(2)
    for (name, p), q in zip(run.model.named_parameters(), by_hand.model.parameters(), strict=True):
        assert torch.equal(p, q), name


# ================================================================ a changed decay


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_changed_decay_takes_effect(kind: str) -> None:
    first = Run("all decay 0.1\nexclude bias", kind)
    first.train(4)
    own = first.per_param()
    saved = first.saved()

    rules = "all decay 0.3\nexclude bias"
    blind = Run(rules, kind, seed=7)
    blind.opt.load_state_dict(saved["opt"])
    assert blind.group_of("fc1.weight")["weight_decay"] == 0.1  # the hazard: torch restores the old value

    run = Run(rules, kind, seed=7)
    with pytest.raises(regdsl.RegStateError) as err:
        run.reg.load_state_dict(saved["reg"])
    assert "group 'decay=0.1' is now 'decay=0.3': weight_decay 0.1 -> 0.3" in str(err.value)
    assert run.reg.step == 0

    run = resumed(rules, kind, saved, remap=True)
    assert run.group_of("fc1.weight")["weight_decay"] == 0.3
    assert run.group_of("fc1.bias")["weight_decay"] == 0.0
    assert all(g["lr"] == LR for g in run.opt.param_groups)
    assert_own_state(run, own, list(own))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_changed_decay_schedule_continues_at_the_saved_step(kind: str) -> None:
    first = Run("all decay 0.1\nexclude bias", kind)
    first.train(4)
    saved = first.saved()

    run = Run("all decay 0.3 warmup 10\nexclude bias", kind, seed=7)
    with pytest.raises(regdsl.RegStateError) as err:
        run.reg.load_state_dict(saved["reg"])
    assert "weight_decay 0.1 -> 0.3, schedule '' -> 'warmup 10'" in str(err.value)
    remapped = run.reg.remap_optimizer_state(saved["opt"], saved["reg"])
    assert remapped["param_groups"][0]["weight_decay"] == pytest.approx(0.3 * 4 / 10)  # the warmup at step 4
    run.opt.load_state_dict(remapped)
    run.reg.load_state_dict(saved["reg"], strict=False)
    run.train(1)
    assert run.group_of("fc1.weight")["weight_decay"] == pytest.approx(0.3 * 5 / 10)


# ================================================================ an added and a removed rule


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_added_rule_splits_a_group(kind: str) -> None:
    before = "all decay 0.1\nexclude bias"
    first = Run(before, kind)
    # A scheduler stores each group's initial_lr; lr has moved from it by the save.
    scheduler = torch.optim.lr_scheduler.LambdaLR(first.opt, lambda t: 0.5**t)
    for _ in range(3):
        first.train(1)
        scheduler.step()
    own = first.per_param()
    saved = first.saved()
    saved_scheduler = scheduler.state_dict()

    after = before + "\nlayer head lr_mult 0.25"
    run = Run(after, kind, seed=7)
    with pytest.raises(regdsl.RegStateError) as err:
        run.reg.load_state_dict(saved["reg"])
    assert "'head.weight' moved from group 'decay=0.1' to group 'decay=0.1 lr_mult=0.25'" in str(err.value)
    assert "'head.bias' moved from group 'no_decay' to group 'no_decay lr_mult=0.25'" in str(err.value)

    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda t: 0.5**t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.opt.load_state_dict(run.reg.remap_optimizer_state(saved["opt"], saved["reg"]))
    run.reg.load_state_dict(saved["reg"], strict=False)
    resumed_scheduler.load_state_dict(saved_scheduler)
    resumed_scheduler.base_lrs = [g["initial_lr"] for g in run.opt.param_groups]  # the documented recipe

    groups = {g["name"]: g for g in run.opt.param_groups}
    assert list(groups) == ["decay=0.1", "no_decay", "decay=0.1 lr_mult=0.25", "no_decay lr_mult=0.25"]
    for name, mult in [
        ("decay=0.1", 1.0),
        ("no_decay", 1.0),
        ("decay=0.1 lr_mult=0.25", 0.25),
        ("no_decay lr_mult=0.25", 0.25),
    ]:
        assert groups[name]["lr"] == pytest.approx(LR * 0.5**3 * mult), name
        assert groups[name]["initial_lr"] == pytest.approx(LR * mult), name
        assert groups[name].get("lr_mult", 1.0) == mult
    assert groups["decay=0.1 lr_mult=0.25"]["weight_decay"] == 0.1
    assert_own_state(run, own, list(own))
    for _ in range(2):
        run.train(1)
        resumed_scheduler.step()
    for g in run.opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5**5), g["name"]


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_removed_rule_merges_groups(kind: str) -> None:
    before = "all decay 0.1\nexclude bias\nlayer fc2 lr_mult 2"
    first = Run(before, kind)
    first.train(3)
    own = first.per_param()
    saved = first.saved()
    assert [len(g["params"]) for g in saved["opt"]["param_groups"]] == [2, 2, 1, 1]

    after = "all decay 0.1\nexclude bias"
    run = Run(after, kind, seed=7)
    with pytest.raises(regdsl.RegStateError) as err:
        run.reg.load_state_dict(saved["reg"])
    assert "'fc2.weight' moved from group 'decay=0.1 lr_mult=2.0' to group 'decay=0.1'" in str(err.value)

    run = resumed(after, kind, saved, remap=True)
    assert_own_state(run, own, list(own))
    assert [(g["name"], len(g["params"])) for g in run.opt.param_groups] == [("decay=0.1", 3), ("no_decay", 3)]
    assert all(g["lr"] == LR and "lr_mult" not in g for g in run.opt.param_groups)


# ================================================================ parameters that come and go


def test_new_and_gone_parameters_are_reported() -> None:
    saved_model = make_model()
    saved_model.fc1.requires_grad_(False)
    first = Run("all decay 0.1", "adamw", model=saved_model)
    first.train(2)
    own = first.per_param()
    saved = first.saved()

    model = make_model(7)
    model.head.requires_grad_(False)
    run = Run("all decay 0.1", "adamw", model=model)
    with pytest.raises(regdsl.RegStateError) as err:
        run.reg.load_state_dict(saved["reg"])
    assert "new to the groups (no saved state): 'fc1.weight', 'fc1.bias'" in str(err.value)
    assert "no longer in any group: 'head.weight', 'head.bias'" in str(err.value)

    with pytest.warns(regdsl.RegDslWarning) as caught:
        remapped = run.reg.remap_optimizer_state(saved["opt"], saved["reg"])
    (warning,) = caught
    assert "'fc1.weight', 'fc1.bias' start with fresh optimizer state" in str(warning.message)
    assert "'head.weight', 'head.bias' is dropped" in str(warning.message)
    run.opt.load_state_dict(remapped)
    assert model.fc1.weight not in run.opt.state and model.fc1.bias not in run.opt.state
    assert_own_state(run, own, ["fc2.weight", "fc2.bias"])
    run.train(1)  # fc1 starts from fresh state
    assert run.opt.state[model.fc1.weight]["step"] == 1


class Reordered(MLP):
    """MLP's parameters under MLP's names, registered head first."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.head = nn.Linear(16, 16)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)


def test_reordered_parameters_are_refused_and_remapped() -> None:
    first = Run("all decay 0.1", "sgd")
    first.train(2)
    own = first.per_param()
    saved = first.saved()

    run = Run("all decay 0.1", "sgd", model=Reordered())
    with pytest.raises(regdsl.RegStateError, match="the same groups and members in another order"):
        run.reg.load_state_dict(saved["reg"])
    run.opt.load_state_dict(run.reg.remap_optimizer_state(saved["opt"], saved["reg"]))
    assert_own_state(run, own, list(own))


# ================================================================ states saved before layouts, and bad input


def test_state_without_layout_loads_with_a_warning() -> None:
    first = Run(RULES, "adamw")
    first.train(3)
    legacy = {k: v for k, v in first.reg.state_dict().items() if k != "groups"}

    run = Run(RULES, "adamw", seed=7)
    with pytest.warns(regdsl.RegDslWarning, match="saved before regdsl recorded optimizer group layouts"):
        run.reg.load_state_dict(legacy)
    assert run.reg.step == 3

    quiet = Run(RULES, "adamw", seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.reg.load_state_dict(legacy, strict=False)
    assert quiet.reg.step == 3
    with pytest.raises(regdsl.RegStateError, match="cannot be matched by name"):
        quiet.reg.remap_optimizer_state(first.opt.state_dict(), legacy)


def test_remap_refuses_an_optimizer_state_of_another_layout() -> None:
    first = Run(MOVE_BEFORE, "adamw")
    first.train(1)
    other = Run("all decay 0.05\nexclude bias", "adamw")
    other.train(1)
    run = Run(MOVE_AFTER, "adamw", seed=7)
    with pytest.raises(regdsl.RegStateError, match="not those of the saved layout"):
        run.reg.remap_optimizer_state(other.opt.state_dict(), first.reg.state_dict())
    with pytest.raises(regdsl.RegStateError, match="needs an optimizer's state_dict"):
        run.reg.remap_optimizer_state({"state": {}}, first.reg.state_dict())
    broken = {**first.reg.state_dict(), "groups": [{"name": "decay=0.1"}]}
    with pytest.raises(regdsl.RegStateError, match="not a group layout"):
        run.reg.load_state_dict(broken)
    with pytest.raises(regdsl.RegStateError, match="not a group layout"):
        run.reg.remap_optimizer_state(first.opt.state_dict(), broken)


def test_param_names_in_the_optimizer_state() -> None:
    """An optimizer built with named parameters saves 'param_names'; the layout decides, and the
    current optimizer keeps its own names (torch keeps them when the loaded groups have none)."""

    def named(reg: regdsl.Regularizer, model: nn.Module) -> list[dict]:
        names = {p: n for n, p in model.named_parameters()}
        return [{**g, "params": [(names[p], p) for p in g["params"]]} for g in reg.param_groups(lr=LR)]

    first = Run(MOVE_BEFORE, "adamw")
    first.opt = torch.optim.AdamW(named(first.reg, first.model))
    first.reg.detach()
    first.reg.attach(first.opt)
    first.train(2)
    own = first.per_param()
    saved_opt = first.opt.state_dict()
    assert saved_opt["param_groups"][0]["param_names"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]

    run = Run(MOVE_AFTER, "adamw", seed=7)
    run.opt = torch.optim.AdamW(named(run.reg, run.model))
    remapped = run.reg.remap_optimizer_state(saved_opt, first.reg.state_dict())
    assert all("param_names" not in g for g in remapped["param_groups"])
    run.opt.load_state_dict(remapped)
    assert run.opt.param_groups[0]["param_names"] == ["fc1.weight", "fc1.bias", "head.weight", "head.bias"]
    assert_own_state(run, own, list(own))


# ---------------------------------------------------------------- lr_mult under lr_scale (timm's schedulers)

BASE = 0.1


def _saved(rules: str, lr_scale: bool) -> tuple[dict, dict]:
    model = make_model()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=BASE, lr_scale=lr_scale))
    reg.attach(opt)
    x, y = data()
    opt.zero_grad()
    (F.mse_loss(model(x), y) + reg.penalty()).backward()
    opt.step()
    return opt.state_dict(), reg.state_dict()


def _resumed(rules: str, lr_scale: bool, saved: tuple[dict, dict]) -> list[tuple]:
    model = make_model()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=BASE, lr_scale=lr_scale))
    opt.load_state_dict(reg.remap_optimizer_state(*saved))
    return [(g["name"], g["lr"], g.get("lr_scale")) for g in opt.param_groups]


@pytest.mark.parametrize(
    ("saved_rules", "saved_scale", "scale", "expected"),
    [
        # lr_scale groups keep the base lr and carry the new multiplier, as param_groups(lr_scale=True) writes them.
        ("layer fc1 lr_mult 0.5", True, True, [("no_decay lr_mult=0.25", BASE, 0.25), ("no_decay", BASE, None)]),
        ("all l2 0.1", True, True, [("no_decay lr_mult=0.25", BASE, 0.25), ("no_decay", BASE, None)]),
        ("layer fc1 lr_mult 0.5", False, True, [("no_decay lr_mult=0.25", BASE, 0.25), ("no_decay", BASE, None)]),
        # Saved with lr_scale, resumed without it: the multiplier goes into the lr.
        ("layer fc1 lr_mult 0.5", True, False, [("no_decay lr_mult=0.25", BASE * 0.25, None), ("no_decay", BASE, None)]),
        ("layer fc1 lr_mult 0.5", False, False, [("no_decay lr_mult=0.25", BASE * 0.5 * (0.25 / 0.5), None), ("no_decay", BASE, None)]),
    ],
)
def test_a_changed_lr_mult_resumes_as_a_fresh_optimizer_of_the_same_kind_would_start(
    saved_rules: str, saved_scale: bool, scale: bool, expected: list[tuple]
) -> None:
    # Before, lr_scale was copied from the saved group and the lr scaled as if there were none:
    # saved 0.5, resumed 0.25 gave lr 0.05 with lr_scale 0.5, which timm's schedulers read as 0.5.
    saved = _saved(saved_rules, saved_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)  # a group split: fresh state, as it says
        got = _resumed("layer fc1 lr_mult 0.25", scale, saved)
    assert got == expected


def test_an_unchanged_file_under_lr_scale_resumes_the_lr_a_scheduler_wrote() -> None:
    opt_state, reg_state = _saved("layer fc1 lr_mult 0.5", True)
    for group in opt_state["param_groups"]:  # as timm's schedulers write it: base value times lr_scale
        group["lr"] = 0.04 * group.get("lr_scale", 1.0)
    got = _resumed("layer fc1 lr_mult 0.5", True, (opt_state, reg_state))
    assert got == [("no_decay lr_mult=0.5", 0.02, 0.5), ("no_decay", 0.04, None)]
    # A new multiplier takes the base rate from the group without one, times its scale as the scheduler
    # wrote the others: before, it held the bare base rate until the scheduler's next update (an epoch, for
    # a scheduler stepped per epoch), 4 times its rate here beside groups at theirs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)
        got = _resumed("layer fc1 lr_mult 0.25", True, (opt_state, reg_state))
    assert got == [("no_decay lr_mult=0.25", 0.04 * 0.25, 0.25), ("no_decay", 0.04, None)]


@pytest.mark.parametrize("stepped", [True, False], ids=["scheduler stepped", "not yet"])
def test_with_no_group_at_scale_1_the_base_rate_is_read_through_the_scales(stepped: bool) -> None:
    # Every group scaled (the deepest layer frozen, or an lr_mult on all): before, a remapped group took
    # another's lr as the base rate, times its scale where a timm scheduler had written it (0.02, not 0.04).
    opt_state, reg_state = _saved("all lr_mult 0.8\nlayer fc1 lr_mult 0.5", True)
    for group in opt_state["param_groups"]:  # a timm scheduler writes base times lr_scale; before its first step, the base
        group["lr"] = 0.04 * group["lr_scale"] if stepped else 0.04
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)
        got = _resumed("all lr_mult 0.8\nlayer fc1 lr_mult 0.25", True, (opt_state, reg_state))
    assert [(name, scale) for name, _, scale in got] == [("no_decay lr_mult=0.25", 0.25), ("no_decay lr_mult=0.8", 0.8)]
    # The new scale's group: as the saved groups hold their rates, the base times the scale once a scheduler
    # wrote them, the base before.
    assert got[0][1] == pytest.approx(0.04 * 0.25 if stepped else 0.04, rel=1e-12)
    assert got[1][1] == (0.04 * 0.8 if stepped else 0.04)  # unchanged: as saved, bit for bit


def test_a_base_rate_no_saved_group_holds_is_a_warning_not_a_silent_zero() -> None:
    saved = _saved("all lr_mult 0", False)
    with pytest.warns(regdsl.RegDslWarning, match="every saved group has lr_mult 0.*set its lr after loading"):
        got = _resumed("all l2 0.1", False, saved)
    assert got == [("no_decay", 0.0, None)]


# ---------------------------------------------------------------- references the rules gained or changed


def _trained(rules: str, reference: dict | None = None) -> tuple[nn.Module, dict]:
    run = Run.__new__(Run)
    run.model = make_model()
    run.reg = regdsl.parse(rules).compile(run.model, reference=reference)
    run.opt = make_optimizer("sgd", run.reg.param_groups(lr=LR))
    run.reg.attach(run.opt)
    run.train(3)
    return run.model, {"model": run.model.state_dict(), "reg": run.reg.state_dict()}


def _l2_value(reg: regdsl.Regularizer) -> float:
    return float(reg.penalty().detach())


@pytest.mark.parametrize(
    ("saved_rules", "rules", "reference", "why"),
    [
        ("all l2 0.01", "all l2 0.01\nlayer fc2.weight l2 0.1 to init", None, "new since"),
        ("layer fc2.weight l2 0.1 to init", "layer fc2.weight l2 0.1 to ref", "seven", "saved for the other of 'to init' and 'to ref'"),
    ],
)
def test_a_reference_the_rules_gained_or_changed_is_refused_strictly_and_kept_as_compiled_otherwise(
    saved_rules: str, rules: str, reference: str | None, why: str
) -> None:
    # Before: a rule gaining 'to init' could not be resumed at all ("no reference", with strict=False too),
    # and 'to init' turned 'to ref' silently took the saved init copy for the new pretrained w0.
    _, ckpt = _trained(saved_rules)
    model = make_model(5)
    model.load_state_dict(ckpt["model"])
    given = {"fc2.weight": torch.full((16, 16), 7.0)} if reference else None
    reg = regdsl.parse(rules).compile(model, reference=given)
    w = model.fc2.weight.detach().clone()
    w0 = given["fc2.weight"] if given else w  # 'to init' at compile: the weights as loaded
    before = _l2_value(reg)
    with pytest.raises(regdsl.RegStateError, match=f"no reference of the current rules for 'fc2.weight' \\({re.escape(why)}"):
        reg.load_state_dict(ckpt["reg"])
    assert reg.step == 0 and _l2_value(reg) == before  # nothing half-applied
    with pytest.warns(regdsl.RegDslWarning, match="keep the w0 compile\\(\\) made"):
        reg.load_state_dict(ckpt["reg"], strict=False)
    assert reg.step == 3
    others = 0.0 if saved_rules.startswith("layer") else 0.5 * 0.01 * sum(
        float((p.detach().double() ** 2).sum()) for n, p in model.named_parameters() if n != "fc2.weight"
    )
    expected = others + 0.5 * 0.1 * float(((w.double() - w0.double()) ** 2).sum())
    assert _l2_value(reg) == pytest.approx(expected, rel=1e-5)


def test_an_unchanged_reference_is_the_saved_one_and_an_old_state_without_kinds_still_loads() -> None:
    _, ckpt = _trained("layer fc2.weight l2 0.1 to init")
    saved_w0 = ckpt["reg"]["references"]["fc2.weight"]
    model = make_model(5)
    model.load_state_dict(ckpt["model"])
    reg = regdsl.parse("layer fc2.weight l2 0.1 to init").compile(model)
    old = {k: v for k, v in ckpt["reg"].items() if k != "reference_kinds"}  # saved before kinds were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.load_state_dict(old)
    w = model.fc2.weight.detach().double()
    assert _l2_value(reg) == pytest.approx(0.5 * 0.1 * float(((w - saved_w0.double()) ** 2).sum()), rel=1e-5)
