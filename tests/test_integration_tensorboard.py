"""regdsl.integrations.tensorboard.log writes reg/<term>:<line> scalars and per-group weight
histograms into real TensorBoard event files, read back here with tensorboard's own reader."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")

import torch
from models import MLP, seeded
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import regdsl
from regdsl.integrations.tensorboard import log

RULES = "all decay 0.01\nexclude bias\nlayer fc1.weight l1 0.1\nlayer fc2.weight l2 0.5 group_lasso 0.2"


def test_scalars_and_histograms_reach_the_event_file(tmp_path) -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=True)
    writer = SummaryWriter(log_dir=str(tmp_path))
    written = []
    for step in range(3):
        (model(torch.randn(4, 6)).square().mean() + reg.penalty()).backward()
        opt.step()
        opt.zero_grad()
        log(reg, writer, step, histograms=True)
        written.append({k: v.item() for k, v in reg.values().items()})
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"reg/l1:3", "reg/l2:4", "reg/group_lasso:4"}
    for tag in events.Tags()["scalars"]:
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [0, 1, 2]
        for (step, value), values in zip(got, written):
            assert value == pytest.approx(values[tag.removeprefix("reg/")], rel=1e-6)
    # Written out: fc1.weight's l1 at the last step is 0.1·Σ|w|.
    assert events.Scalars("reg/l1:3")[-1].value == pytest.approx(0.1 * model.fc1.weight.abs().sum().item(), rel=1e-5)
    names = {g["name"] for g in reg.param_groups(lr=0.1)}
    assert set(events.Tags()["histograms"]) == {f"weights/{n}" for n in names}
    sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in reg.param_groups(lr=0.1)}
    for name, size in sizes.items():
        assert events.Histograms(f"weights/{name}")[-1].histogram_value.num == size


def test_logging_histograms_leaves_how_the_groups_were_built_alone(tmp_path) -> None:
    # Before, the histograms called param_groups(lr=1.0), which recorded lr_scale=False: remap_optimizer_state
    # then folded the lr_mult into the lr and dropped the lr_scale a timm scheduler reads (10x too high there).
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all decay 0.05\nlayer fc1 lr_mult 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=1e-3, lr_scale=True))
    before = reg.remap_optimizer_state(opt.state_dict(), reg.state_dict())
    with SummaryWriter(str(tmp_path)) as writer:
        log(reg, writer, step=0, histograms=True)
    after = reg.remap_optimizer_state(opt.state_dict(), reg.state_dict())
    assert after["param_groups"] == before["param_groups"]
    assert sorted(g.get("lr_scale", 1.0) for g in after["param_groups"]) == [0.1, 1.0]
