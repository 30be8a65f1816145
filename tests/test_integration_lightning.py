"""regdsl.integrations.lightning: a LightningModule fitted with RegularizationCallback gives the
weights of a plain loop written here (same global batches, SGD with momentum), with
accumulate_grad_batches 1 and 2, on the fold path and the loss path; a fit resumed from a
checkpoint continues its schedules; per-term values are logged; the state is in the checkpoint.
"""

from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regdsl
from regdsl import RegUsageError
from regdsl.integrations.lightning import RegularizationCallback

GLOBAL_BATCH, STEPS, LR = 8, 4, 0.1
# An epoch is two optimizer steps: a checkpoint after step 2 ends one, and Lightning resumes at the
# start of the next (mid-epoch, a plain DataLoader would restart its epoch from the first batch).
EPOCH = 2
RULES = """\
all decay 0.01 warmup 2
exclude bias
layer net.fc1.weight l1 1e-2 warmup 3
layer net.fc2.weight group_lasso 0.05
layer net.fc1 activity l2 0.01
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


class Regression(pl.LightningModule):
    """What a user writes: the optimizer from self.reg, the penalty added for the activity term."""

    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        self.net = net()
        self.optimizers_wanted = optimizers
        self.automatic_optimization = optimizers == 1  # Lightning steps several optimizers only manually

    def training_step(self, batch, index):
        x, y = batch
        return F.mse_loss(self.net(x), y) + self.reg.penalty()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.reg.param_groups(lr=LR, momentum=0.9))
        return optimizer if self.optimizers_wanted == 1 else [optimizer, torch.optim.SGD(self.net.head.parameters(), lr=LR)]


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(GLOBAL_BATCH * EPOCH, 5, generator=g), torch.randn(GLOBAL_BATCH * EPOCH, 2, generator=g))


def trainer(accumulate: int, tmp_path, **extra) -> pl.Trainer:
    settings = {
        "accelerator": "cpu", "devices": 1, "max_steps": STEPS, "accumulate_grad_batches": accumulate, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "default_root_dir": str(tmp_path), "num_sanity_val_steps": 0, "log_every_n_steps": 1,
    }  # fmt: skip
    return pl.Trainer(**{**settings, **extra})


def loader(accumulate: int) -> DataLoader:
    return DataLoader(data(), batch_size=GLOBAL_BATCH // accumulate, shuffle=False)


def plain_loop() -> dict[str, torch.Tensor]:
    model = net()
    reg = regdsl.compile(regdsl.parse(RULES.replace("net.", "")), model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR, momentum=0.9))
    reg.attach(opt)
    x, y = data().tensors
    for step in range(STEPS):
        at = (step % EPOCH) * GLOBAL_BATCH
        xs, ys = x[at : at + GLOBAL_BATCH], y[at : at + GLOBAL_BATCH]
        loss = F.mse_loss(model(xs), ys) + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {f"net.{n}": p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    weights = plain_loop()
    before = {f"net.{n}": p for n, p in net().named_parameters()}
    assert all(not torch.equal(before[n], w) for n, w in weights.items())
    return weights


def assert_same(module: pl.LightningModule, want: dict[str, torch.Tensor]) -> None:
    got = dict(module.named_parameters())
    for name, w in want.items():
        torch.testing.assert_close(got[name].detach(), w, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_matches_the_plain_loop(tmp_path, expected, accumulate: int, fold: bool) -> None:
    module, callback = Regression(), RegularizationCallback(regdsl.parse(RULES), fold=fold)
    fitted = trainer(accumulate, tmp_path, callbacks=[callback])
    fitted.fit(module, loader(accumulate))
    assert module.reg is callback.reg and module.reg.step == STEPS
    assert_same(module, expected)
    logged = fitted.callback_metrics
    assert {"reg/l1:3", "reg/group_lasso:4", "reg/activity_l2:5"} <= set(logged), sorted(logged)
    assert logged["reg/group_lasso:4"] > 0


# Lightning notes that the resumed run checkpoints elsewhere than the first: true, and on purpose.
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_from_a_checkpoint_continues_the_schedules(tmp_path, expected) -> None:
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = trainer(2, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(RULES)), save], enable_checkpointing=True, max_steps=2)
    first.fit(Regression(), loader(2))
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    states = torch.load(path, weights_only=False)["callbacks"]
    assert [s["reg"]["step"] for s in states.values() if "reg" in s] == [2]
    module = Regression()
    again = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "again", every_n_train_steps=2, save_top_k=-1)
    resumed = trainer(2, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(RULES)), again], enable_checkpointing=True)
    resumed.fit(module, loader(2), ckpt_path=str(path))
    assert module.reg.step == STEPS
    assert_same(module, expected)


def test_several_optimizers_are_refused(tmp_path) -> None:
    with pytest.raises(RegUsageError, match="attaches to one optimizer"):
        trainer(1, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(RULES))]).fit(Regression(optimizers=2), loader(1))
