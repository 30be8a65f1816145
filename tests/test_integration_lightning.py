"""regdsl.integrations.lightning: a LightningModule fitted with RegularizationCallback gives the
weights of a plain loop written here (same global batches, SGD with momentum), with
accumulate_grad_batches 1 and 2, on the fold path and the loss path; a fit resumed from a
checkpoint continues its schedules; per-term values are logged; the state is in the checkpoint.
The same for a GAN-like module under manual optimization with two optimizers, each built from
self.reg.param_groups(of=its network): reg.step counts both, as trainer.global_step does.
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

    def __init__(self) -> None:
        super().__init__()
        self.net = net()

    def training_step(self, batch, index):
        x, y = batch
        return F.mse_loss(self.net(x), y) + self.reg.penalty()

    def configure_optimizers(self):
        return torch.optim.SGD(self.reg.param_groups(lr=LR, momentum=0.9))


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


def plain_loop(skipped: int | None = None, new_optimizer_at: int | None = None) -> dict[str, torch.Tensor]:
    """``skipped``: the batch of each epoch whose backward is left out (its optimizer step still runs).
    ``new_optimizer_at``: the step from which a new optimizer (momentum from zero) takes over."""
    model = net()
    reg = regdsl.compile(regdsl.parse(RULES.replace("net.", "")), model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR, momentum=0.9))
    reg.attach(opt)
    x, y = data().tensors
    for step in range(STEPS):
        if step == new_optimizer_at:
            reg.detach()
            opt = torch.optim.SGD(reg.param_groups(lr=LR, momentum=0.9))
            reg.attach(opt)
        at = (step % EPOCH) * GLOBAL_BATCH
        xs, ys = x[at : at + GLOBAL_BATCH], y[at : at + GLOBAL_BATCH]
        loss = F.mse_loss(model(xs), ys) + reg.penalty()
        opt.zero_grad()
        if step % EPOCH != skipped:
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


class Skipping(Regression):
    """A training_step that returns None for batch ``skipped``: Lightning skips its backward, yet steps the optimizer."""

    skipped = 1

    def training_step(self, batch, index):
        loss = super().training_step(batch, index)
        return None if index == self.skipped else loss


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")  # on purpose here
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])
def test_a_skipped_training_step_moves_nothing_on_either_path(tmp_path, fold: bool) -> None:
    # Before, the fold path added the terms to the empty gradients of the skipped step and moved every
    # regularized weight, where the loss path (and torch's update) moved none.
    module, callback = Skipping(), RegularizationCallback(regdsl.parse(RULES), fold=fold)
    trainer(1, tmp_path, callbacks=[callback]).fit(module, loader(1))
    assert module.reg.step == STEPS
    assert_same(module, plain_loop(skipped=1))  # batch 1 of each epoch: an optimizer step that moves nothing


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


# ------------------------------------------------------------------ two optimizers, manual optimization

GAN_RULES = """\
layer gen.** decay 0.02 warmup 3
exclude bias
layer gen.0.weight l1 0.01 warmup 2
layer disc.** l2 0.05
"""
LR_G, LR_D, GAN_BATCHES = 0.1, 0.05, 4
GAN_STEPS = 2 * GAN_BATCHES  # trainer.global_step: both optimizers' steps


def gan_nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    disc = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    return gen, disc


def gan_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH * EPOCH
    return TensorDataset(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64))


def d_loss(gen: nn.Module, disc: nn.Module, z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return F.softplus(-disc(real)).mean() + F.softplus(disc(gen(z).detach())).mean()


def g_loss(gen: nn.Module, disc: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return F.softplus(-disc(gen(z))).mean()


class GAN(pl.LightningModule):
    """What a user writes: one optimizer per network from self.reg.param_groups(network, ...),
    the discriminator stepped first; nothing else about the rules."""

    def __init__(self, share: bool = False) -> None:
        super().__init__()
        self.gen, self.disc = gan_nets()
        self.automatic_optimization = False  # Lightning steps several optimizers only manually
        self.share = share

    def training_step(self, batch, index):
        opt_g, opt_d = self.optimizers()
        z, real = batch
        opt_d.zero_grad()
        self.manual_backward(d_loss(self.gen, self.disc, z, real) + self.reg.penalty())
        opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(g_loss(self.gen, self.disc, z) + self.reg.penalty())
        opt_g.step()

    def configure_optimizers(self):
        disc = self.reg.param_groups(lr=LR_D, momentum=0.5) if self.share else self.reg.param_groups(self.disc, lr=LR_D, momentum=0.5)
        return [torch.optim.SGD(self.reg.param_groups(self.gen, lr=LR_G, momentum=0.9)), torch.optim.SGD(disc)]


def gan_plain_loop() -> dict[str, torch.Tensor]:
    """The rules written out, SGD with momentum by hand; t counts the steps of both optimizers."""
    gen, disc = gan_nets()
    nets = {"gen": gen, "disc": disc}
    buffers: dict[str, torch.Tensor] = {}
    z, real = gan_data().tensors

    def warm(lam: float, width: int, t: int) -> float:
        return lam * min(t, width) / width

    def sgd(part: str, loss: torch.Tensor, t: int, lr: float, momentum: float) -> None:
        named = dict(nets[part].named_parameters())
        grads = torch.autograd.grad(loss, list(named.values()))
        with torch.no_grad():
            for (n, w), g in zip(named.items(), grads):
                g = g.clone()
                if part == "gen" and n == "0.weight":
                    g += warm(0.01, 2, t) * torch.sign(w)
                if part == "gen" and n.endswith("weight"):
                    g += warm(0.02, 3, t) * w  # the group's weight_decay at step t
                if part == "disc" and n.endswith("weight"):
                    g += 0.05 * w
                key = f"{part}.{n}"
                buffers[key] = g if key not in buffers else momentum * buffers[key] + g
                w -= lr * buffers[key]

    t = 0
    for batch in range(GAN_BATCHES):
        at = (batch % EPOCH) * GLOBAL_BATCH
        zs, rs = z[at : at + GLOBAL_BATCH], real[at : at + GLOBAL_BATCH]
        sgd("disc", d_loss(gen, disc, zs, rs), t, LR_D, 0.5)
        t += 1
        sgd("gen", g_loss(gen, disc, zs), t, LR_G, 0.9)
        t += 1
    return {f"{part}.{n}": p.detach().clone() for part, m in nets.items() for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def gan_expected() -> dict[str, torch.Tensor]:
    weights = gan_plain_loop()
    start = {f"{part}.{n}": p for part, m in zip(("gen", "disc"), gan_nets()) for n, p in m.named_parameters()}
    assert all(not torch.equal(start[n], w) for n, w in weights.items())
    return weights


def gan_loader() -> DataLoader:
    return DataLoader(gan_data(), batch_size=GLOBAL_BATCH, shuffle=False)


def assert_close_gan(module: pl.LightningModule, want: dict[str, torch.Tensor]) -> None:
    got = dict(module.named_parameters())
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name].detach(), w, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])
def test_two_optimizers_match_the_plain_loop(tmp_path, gan_expected, fold: bool) -> None:
    module, callback = GAN(), RegularizationCallback(regdsl.parse(GAN_RULES), fold=fold)
    fitted = trainer(1, tmp_path, callbacks=[callback], max_steps=GAN_STEPS)
    fitted.fit(module, gan_loader())
    assert module.reg.step == fitted.global_step == GAN_STEPS
    assert_close_gan(module, gan_expected)
    opt_g, opt_d = fitted.optimizers
    assert [g["weight_decay"] for g in opt_g.param_groups] == [0.02, 0.0]
    assert [g["weight_decay"] for g in opt_d.param_groups] == [0.0]
    logged = fitted.callback_metrics
    assert {"reg/l1:3", "reg/l2:4"} <= set(logged), sorted(logged)
    assert logged["reg/l2:4"] > 0


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
# Lightning notes that a manual-optimization checkpoint holds the weights after the step: the ones to resume from.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
def test_two_optimizers_resume_from_a_checkpoint(tmp_path, gan_expected) -> None:
    half = GAN_STEPS // 2  # one epoch: two batches, two steps each
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=half, save_top_k=-1)
    first = trainer(1, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(GAN_RULES)), save], enable_checkpointing=True, max_steps=half)
    first.fit(GAN(), gan_loader())
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    states = torch.load(path, weights_only=False)["callbacks"]
    assert [s["reg"]["step"] for s in states.values() if "reg" in s] == [half]
    module = GAN()
    again = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "again", every_n_train_steps=half, save_top_k=-1)
    resumed = trainer(1, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(GAN_RULES)), again], enable_checkpointing=True, max_steps=GAN_STEPS)
    resumed.fit(module, gan_loader(), ckpt_path=str(path))
    assert module.reg.step == resumed.global_step == GAN_STEPS
    assert_close_gan(module, gan_expected)


def test_a_parameter_in_both_optimizers_is_refused(tmp_path) -> None:
    with pytest.raises(RegUsageError, match="in more than one of the 2 optimizers"):
        trainer(1, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(GAN_RULES))]).fit(GAN(share=True), gan_loader())


def test_an_optuna_trial_gives_the_search_spaces_their_values(tmp_path, expected) -> None:
    # The file's decay and l1 as search spaces; the trial picks exactly the numbers of RULES, so
    # the fit must land on the plain loop's weights.
    optuna = pytest.importorskip("optuna")
    spaced = RULES.replace("all decay 0.01", "all decay choice(0.01, 0.1) as wd").replace(
        "l1 1e-2 warmup 3", "l1 loguniform(1e-3, 1e-1) warmup 3"
    )
    assert set(regdsl.parse(spaced).spaces()) == {"wd", "l1:3"}
    trial = optuna.trial.FixedTrial({"wd": 0.01, "l1:3": 1e-2})
    module, callback = Regression(), RegularizationCallback(regdsl.parse(spaced), trial=trial)
    trainer(1, tmp_path, callbacks=[callback]).fit(module, loader(1))
    assert callback.reg.spec == regdsl.parse(RULES)
    assert_same(module, expected)
    with pytest.raises(regdsl.RegCompileError, match="'wd'.*has no value"):
        trainer(1, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(spaced))]).fit(Regression(), loader(1))


class FusedSGD(Regression):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def training_step(self, batch, index):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.reg.param_groups(lr=0.1), lr=0.1, fused=self.fused)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's notes on CPU autocast and the scaler
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_a_fused_optimizer_under_a_grad_scaler_gets_the_whole_folded_term(tmp_path, fused: bool) -> None:
    # A fused optimizer unscales its gradients itself: at on_before_optimizer_step they are still scaled,
    # and GradScaler sets optimizer.grad_scale only later. The fold added the unscaled term: 0.05/65536.
    from lightning.pytorch.plugins.precision import MixedPrecision

    def first_weights(rules: str) -> torch.Tensor:
        module = FusedSGD(fused)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        fitted = trainer(1, tmp_path, max_steps=1, plugins=[plugin], callbacks=[RegularizationCallback(regdsl.parse(rules))])
        fitted.fit(module, loader(1))
        return module.net.fc1.weight.detach().clone()

    without = first_weights("layer net.fc1.weight l1 0.0")
    start = net().fc1.weight.detach()
    with_l1 = first_weights("layer net.fc1.weight l1 0.5")
    torch.testing.assert_close(without - with_l1, 0.1 * 0.5 * start.sign(), rtol=0, atol=1e-5)  # lr · λ · sign(w)


def test_fitting_the_same_module_again_continues_its_schedules(tmp_path) -> None:
    # Before, the second fit compiled the rules afresh: reg.step back at 0 (trainer.global_step went on)
    # and the warmups restarted, 'to init' would pull toward the first fit's end.
    module, callback = Regression(), RegularizationCallback(regdsl.parse(RULES))
    fitted = trainer(2, tmp_path, callbacks=[callback], max_steps=EPOCH)
    fitted.fit(module, loader(2))
    first = module.reg
    fitted.fit_loop.epoch_loop.max_steps = STEPS
    fitted.fit(module, loader(2))
    assert module.reg is first and module.reg.step == fitted.global_step == STEPS
    assert_same(module, plain_loop(new_optimizer_at=EPOCH))  # the second fit builds its optimizer anew


class SkipsFirst(Skipping):
    skipped = 0


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")  # on purpose here
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])
def test_a_callback_used_again_folds_nothing_into_a_first_step_without_backward(tmp_path, fold: bool) -> None:
    # Its backward count carried over from the first fit made the new optimizer's skipped step look backed.
    callback = RegularizationCallback(regdsl.parse(RULES), fold=fold)
    trainer(1, tmp_path, callbacks=[callback]).fit(Regression(), loader(1))
    module = SkipsFirst()
    trainer(1, tmp_path, callbacks=[callback]).fit(module, loader(1))
    assert module.reg.step == STEPS
    assert_same(module, plain_loop(skipped=0))


def test_attach_hooks_the_optimizer_inside_a_lightning_optimizer() -> None:
    # What self.optimizers() returns in manual optimization: its step() runs the inner one's, with its hooks.
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    model, hand = nn.Linear(3, 2), nn.Linear(3, 2)
    hand.load_state_dict(model.state_dict())
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = regdsl.parse("all l2 0.5\n").compile(model)
    reg.attach(LightningOptimizer(inner), fold=True)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    inner.step()
    reference = torch.optim.SGD(hand.parameters(), lr=0.1, weight_decay=0.5)  # l2 λ: λ·w added to the gradient
    hand(x).sum().backward()
    reference.step()
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b)


def test_lbfgs_with_a_line_search_is_refused_on_the_fold_path(tmp_path) -> None:
    # Its line search compares the closure's losses, which hold no folded term: before, the fit ran
    # and its weights were 0.26 away from the same terms in the loss, with no word.
    class WithLBFGS(Regression):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.reg.param_groups(lr=0.5), max_iter=3, line_search_fn="strong_wolfe")

    rules = regdsl.parse("layer net.fc1.weight l1 0.05\nlayer net.fc2.weight l2 0.5\n")
    with pytest.raises(RegUsageError, match="LBFGS with a line search.*fold=False"):
        trainer(1, tmp_path, max_steps=1, callbacks=[RegularizationCallback(rules)]).fit(WithLBFGS(), loader(1))
    model = WithLBFGS()
    trainer(1, tmp_path, max_steps=1, callbacks=[RegularizationCallback(rules, fold=False)]).fit(model, loader(1))
    assert model.reg.step == 1


def test_validate_alone_gives_the_module_its_regularizer(tmp_path) -> None:
    # Before, a validation_step reading self.reg failed with a raw AttributeError: setup compiled for fit only.
    class Validated(Regression):
        def validation_step(self, batch, index):
            self.seen = self.reg.values()

    model = Validated()
    trainer(1, tmp_path, callbacks=[RegularizationCallback(regdsl.parse(RULES))]).validate(model, loader(1))
    assert set(model.seen) == {"l1:3", "group_lasso:4"}  # the loss terms; no activity value without gradients


def test_loss_backward_in_manual_optimization_warns_with_what_to_write(tmp_path) -> None:
    # Lightning sees no backward there, so nothing folds; the warning spoke of reg.fold() and
    # fold_hook=False, which the user never wrote.
    class Plain(GAN):
        def training_step(self, batch, index):
            opt_g, opt_d = self.optimizers()
            z, real = batch
            opt_d.zero_grad()
            d_loss(self.gen, self.disc, z, real).backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss(self.gen, self.disc, z).backward()
            opt_g.step()

    with pytest.warns(regdsl.RegDslWarning, match=r"self\.manual_backward\(loss\), not loss\.backward\(\)"):
        trainer(1, tmp_path, max_steps=2, callbacks=[RegularizationCallback(regdsl.parse(GAN_RULES))]).fit(Plain(), gan_loader())
