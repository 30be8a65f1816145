"""reg.param_groups(of=part) and reg.attach([opt_a, opt_b]): one regularizer, several optimizers that
split the model (a GAN's generator and discriminator).

Checked against a plain loop written here: each step folds the terms of the stepping optimizer's
parameters only, runs its parameters' post-step terms only, and every step of either optimizer
counts one in reg.step (the schedules' t). Each part's optimizer state remaps by name after the rules
changed (remap_optimizer_state(..., of=part)). The refusals: a parameter in two optimizers, a
regularized parameter in none, an optimizer without the group a scheduled decay is written into.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import regdsl
from regdsl import RegDslWarning, RegUsageError

RULES = """\
layer gen.** decay 0.1 warmup 3
exclude bias
layer gen.0.weight l1 0.02 warmup 2
layer disc.** l2 0.05
layer disc.2.weight l1 0.05 prox
layer gen.2 lr_mult 0.5
layer gen.0 activity l2 0.01
"""
LR = 0.1
# Which optimizer steps, in order: the discriminator twice in a row too, as with n_critic > 1.
PATTERN = "dggddgd"


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.disc = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(self.gen(x))


def model() -> TwoPart:
    torch.manual_seed(0)
    return TwoPart().double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)) for _ in PATTERN]


def compiled(net: nn.Module, rules: str = RULES) -> regdsl.Regularizer:
    return regdsl.compile(regdsl.parse(rules), net)


def names_of(net: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in net.named_parameters()}


def warm(lam: float, width: int, t: int) -> float:
    return lam * min(t, width) / width


# ------------------------------------------------------------------ param_groups(of=...)


def test_groups_of_each_part() -> None:
    net = model()
    reg = compiled(net)
    names = names_of(net)

    def view(groups):
        return [([names[id(p)] for p in g["params"]], g["weight_decay"], g["lr"], g.get("lr_mult")) for g in groups]

    assert view(reg.param_groups(net.gen, lr=LR)) == [
        (["gen.0.weight"], 0.0, LR, None),  # the decay's warmup: 0 at step 0
        (["gen.0.bias"], 0.0, LR, None),
        (["gen.2.weight"], 0.0, LR * 0.5, 0.5),
        (["gen.2.bias"], 0.0, LR * 0.5, 0.5),  # exclude leaves lr_mult alone
    ]
    assert view(reg.param_groups(net.disc, lr=LR)) == [(["disc.0.weight", "disc.0.bias", "disc.2.weight", "disc.2.bias"], 0.0, LR, None)]
    assert view(reg.param_groups(net.gen[0].weight, lr=LR)) == [(["gen.0.weight"], 0.0, LR, None)]
    assert view(reg.param_groups(of=[net.gen[2].bias, net.gen[0].weight], lr=LR)) == [
        (["gen.0.weight"], 0.0, LR, None),
        (["gen.2.bias"], 0.0, LR * 0.5, 0.5),
    ]
    # The names are the full call's: a resume or a report sees the same group under the same name.
    full = {id(p): g["name"] for g in reg.param_groups(lr=LR) for p in g["params"]}
    assert all(g["name"] == full[id(p)] for g in reg.param_groups(net.gen, lr=LR) for p in g["params"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=8, max_size=8))
def test_parts_cut_the_full_groups(owner: list[int]) -> None:
    """Any split of the parameters into three parts: each part's groups are the full call's groups
    cut down to it (same settings, same order, the empty ones left out), and together they hold
    every trainable parameter once."""
    net = model()
    reg = compiled(net)
    params = list(net.parameters())
    full = reg.param_groups(lr=LR, momentum=0.9)
    seen: list[int] = []
    for part in range(3):
        mine = [p for p, o in zip(params, owner) if o == part]
        if not mine:
            continue
        ids = {id(p) for p in mine}
        want = [
            {**g, "params": [p for p in g["params"] if id(p) in ids]} for g in full if any(id(p) in ids for p in g["params"])
        ]
        got = reg.param_groups(of=mine, lr=LR, momentum=0.9)
        assert [{**g, "params": [id(p) for p in g["params"]]} for g in got] == [
            {**g, "params": [id(p) for p in g["params"]]} for g in want
        ]
        seen += [id(p) for g in got for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in params)


def test_groups_of_bad_parts() -> None:
    net = model()
    reg = compiled(net)
    with pytest.raises(RegUsageError, match="1 tensor that is no parameter of the model"):
        reg.param_groups(of=[net.gen[0].weight, nn.Parameter(torch.zeros(2))], lr=LR)
    with pytest.raises(RegUsageError, match="module or parameter tensors"):
        reg.param_groups(of=["gen.0.weight"], lr=LR)
    with pytest.raises(RegUsageError, match="module or parameter tensors"):
        reg.param_groups(of=3, lr=LR)
    with pytest.raises(RegUsageError, match=r"write param_groups\(lr_scale=True\)"):
        reg.param_groups(True)
    with pytest.raises(RegUsageError, match=r"param_groups\(of=\.\.\.\) builds the groups of a part"):
        reg.param_groups(params=[net.gen[0].weight], lr=LR)
    with pytest.raises(RegUsageError, match="needs the base learning rate"):
        reg.param_groups(net.gen)  # the generator has lr_mult groups
    assert reg.param_groups(net.disc)  # the discriminator has none: no lr needed
    net.gen[0].weight.requires_grad_(False)
    frozen = compiled(net, "layer gen.** decay 0.1\n")
    with pytest.raises(RegUsageError, match="holds no parameter the rules train"):
        frozen.param_groups(of=[net.gen[0].weight])


# ------------------------------------------------------------------ attach([a, b]): training


def plain_loop() -> dict[str, torch.Tensor]:
    """The rules written out: SGD by hand, t counting the steps of both optimizers."""
    net = model()
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen_names = [n for n in w if n.startswith("gen.")]
    disc_names = [n for n in w if n.startswith("disc.")]
    for t, (which, (x, y)) in enumerate(zip(PATTERN, batches())):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(w[n])
        a = net.gen[0](x)
        out = net.disc(net.gen[2](torch.tanh(a)))
        loss = ((out - y) ** 2).mean() + 0.01 / 2 * (a**2).sum() / x.shape[0]  # the activity term, by hand
        stepped = gen_names if which == "g" else disc_names
        grads = dict(zip(stepped, torch.autograd.grad(loss, [dict(net.named_parameters())[n] for n in stepped])))
        for n in stepped:
            g = grads[n].clone()
            lr = LR * 0.5 if n.startswith("gen.2.") else LR
            if n == "gen.0.weight":
                g += warm(0.02, 2, t) * torch.sign(w[n])
            if n in ("gen.0.weight", "gen.2.weight"):
                g += warm(0.1, 3, t) * w[n]  # SGD's weight_decay, written into the group at step t
            if n in ("disc.0.weight", "disc.2.weight"):
                g += 0.05 * w[n]
            w[n] = w[n] - lr * g
            if n == "disc.2.weight":  # the proximal l1, after the discriminator's steps only
                tau = LR * 0.05
                w[n] = torch.sign(w[n]) * torch.clamp(w[n].abs() - tau, min=0)
    return w


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    weights = plain_loop()
    start = dict(model().named_parameters())
    assert all(not torch.equal(start[n], v) for n, v in weights.items())
    return weights


def optimizers(reg: regdsl.Regularizer, net: TwoPart) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return torch.optim.SGD(reg.param_groups(net.gen, lr=LR)), torch.optim.SGD(reg.param_groups(net.disc, lr=LR))


@pytest.mark.parametrize("path", ["fold", "fold_by_hand", "loss"])
def test_two_optimizers_match_the_plain_loop(expected, path: str) -> None:
    net = model()
    reg = compiled(net)
    opt_g, opt_d = optimizers(reg, net)
    reg.attach([opt_g, opt_d], fold=path != "loss", fold_hook=path != "fold_by_hand")
    for which, (x, y) in zip(PATTERN, batches()):
        opt = opt_g if which == "g" else opt_d
        opt_g.zero_grad()
        opt_d.zero_grad()
        loss = ((net(x) - y) ** 2).mean() + reg.penalty()
        loss.backward()
        if path == "fold_by_hand":
            reg.fold(opt)
        opt.step()
    assert reg.step == len(PATTERN)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-12, msg=n)
    # The decay at the step reached, in the generator's decay groups; the discriminator has none.
    assert [g["weight_decay"] for g in opt_g.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert [g["weight_decay"] for g in opt_d.param_groups] == [0.0]


def test_penalty_counts_each_term_once() -> None:
    net = model()
    reg = compiled(net)
    x = batches()[0][0]
    opts = list(optimizers(reg, net))  # kept: an optimizer garbage-collected gives its folded terms back to penalty()
    reg.attach(opts, fold=True)
    a = net.gen[0](x)
    net.disc(net.gen[2](torch.tanh(a)))
    activity = 0.01 / 2 * (a**2).sum() / x.shape[0]
    torch.testing.assert_close(reg.penalty(), activity.detach(), rtol=1e-12, atol=0)  # every parameter term folds
    reg.detach()
    opts = list(optimizers(reg, net))
    reg.attach(opts)  # no fold: penalty() holds every term, once
    reg.load_state_dict({**reg.state_dict(), "step": 1})
    w = dict(net.named_parameters())
    terms = warm(0.02, 2, 1) * w["gen.0.weight"].abs().sum() + 0.05 / 2 * sum((w[n] ** 2).sum() for n in ("disc.0.weight", "disc.2.weight"))
    torch.testing.assert_close(reg.penalty(), terms.detach(), rtol=1e-12, atol=0)


def test_load_state_dict_writes_the_decay_into_each_optimizer() -> None:
    net = model()
    reg = compiled(net)
    opt_g, opt_d = optimizers(reg, net)
    reg.attach([opt_g, opt_d], fold=True)
    reg.load_state_dict({**reg.state_dict(), "step": 2})
    assert [g["weight_decay"] for g in opt_g.param_groups] == [pytest.approx(0.1 * 2 / 3), 0.0, pytest.approx(0.1 * 2 / 3), 0.0]
    assert reg.step == 2


# ------------------------------------------------------------------ attach([a, b]): refusals


def no_hooks(*opts: torch.optim.Optimizer) -> bool:
    return not any(o._optimizer_step_pre_hooks or o._optimizer_step_post_hooks for o in opts)


def test_a_parameter_in_two_optimizers_is_refused() -> None:
    net = model()
    reg = compiled(net)
    opt_g = torch.optim.SGD(reg.param_groups(net.gen, lr=LR))
    everything = torch.optim.SGD(reg.param_groups(lr=LR))
    with pytest.raises(RegUsageError, match=r"'gen.0.weight', 'gen.0.bias', 'gen.2.weight' and 1 more are in more than one of the 2"):
        reg.attach([opt_g, everything], fold=True)
    assert no_hooks(opt_g, everything)
    assert [g["weight_decay"] for g in opt_g.param_groups] == [0.0] * 4
    reg.attach([opt_g, torch.optim.SGD(reg.param_groups(net.disc, lr=LR))])  # nothing was half-applied


def test_a_regularized_parameter_in_no_optimizer_is_refused() -> None:
    net = model()
    reg = compiled(net)
    opt_g = torch.optim.SGD(reg.param_groups(net.gen, lr=LR))
    biases = torch.optim.SGD(reg.param_groups(of=[net.disc[0].bias, net.disc[2].bias], lr=LR))
    with pytest.raises(RegUsageError, match=r"the rules regularize 'disc.0.weight', 'disc.2.weight', which none of the 2"):
        reg.attach([opt_g, biases], fold=True)
    assert no_hooks(opt_g, biases)
    # Unregularized parameters (the biases: exclude bias) may stay out of every optimizer.
    weights = torch.optim.SGD(reg.param_groups(of=[net.disc[0].weight, net.disc[2].weight], lr=LR))
    assert reg.attach([opt_g, weights]) is reg


def test_a_missing_decay_group_is_refused() -> None:
    net = model()
    reg = compiled(net)
    plain = torch.optim.SGD(net.gen.parameters(), lr=LR)  # not from param_groups: no group for the scheduled decay
    with pytest.raises(RegUsageError, match=r"no group 'decay=.*': build it from reg.param_groups\(of=\.\.\.\)"):
        reg.attach([plain, torch.optim.SGD(reg.param_groups(net.disc, lr=LR))])


def test_bad_optimizer_lists() -> None:
    net = model()
    reg = compiled(net)
    opt_g, opt_d = optimizers(reg, net)
    with pytest.raises(RegUsageError, match="non-empty list of optimizers"):
        reg.attach([])
    with pytest.raises(RegUsageError, match="non-empty list of optimizers"):
        reg.attach([opt_g, "adam"])
    with pytest.raises(RegUsageError, match="the same optimizer twice"):
        reg.attach([opt_g, opt_g])
    reg.attach((opt_g, opt_d), fold=True, fold_hook=False)
    with pytest.raises(RegUsageError, match=r"2 optimizers are attached: pass the one about to step"):
        reg.fold()
    with pytest.raises(RegUsageError, match="not attached"):
        reg.fold(torch.optim.SGD(net.parameters(), lr=LR))
    with pytest.raises(RegUsageError, match="already attached"):
        reg.attach(opt_g)


def test_fold_by_hand_adds_only_that_optimizers_terms() -> None:
    net = model()
    reg = compiled(net, "layer gen.0.weight l2 0.5\nlayer disc.0.weight l2 0.25\n")
    opt_g, opt_d = (torch.optim.SGD(reg.param_groups(part, lr=LR)) for part in (net.gen, net.disc))
    reg.attach([opt_g, opt_d], fold=True, fold_hook=False)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    reg.fold(opt_d)
    grads = {n: p.grad for n, p in net.named_parameters()}
    torch.testing.assert_close(grads["disc.0.weight"], 0.25 * net.disc[0].weight.detach(), rtol=0, atol=0)
    assert all(not g.any() for n, g in grads.items() if n != "disc.0.weight")


def test_fold_by_hand_is_refused_where_the_step_folds() -> None:
    net = model()
    reg = compiled(net, "layer disc.0.weight l2 0.25\n")
    opt = torch.optim.SGD(reg.param_groups(lr=LR))
    reg.attach(opt, fold=True)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RegUsageError, match=r"would add them twice"):
        reg.fold()
    assert not net.disc[0].weight.grad.any()  # nothing added before the refusal


def test_a_step_without_fold_by_hand_warns_once() -> None:
    """fold_hook=False leaves the terms to reg.fold(opt): a step of an optimizer with terms to fold and
    no reg.fold() since its previous step applied none of them. Its first such step warns, once."""
    net = model()
    reg = compiled(net, "layer disc.0.weight l2 0.25\n")  # opt_g folds nothing: it never warns
    opt_g, opt_d = (torch.optim.SGD(reg.param_groups(part, lr=LR)) for part in (net.gen, net.disc))
    reg.attach([opt_g, opt_d], fold=True, fold_hook=False)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_g.step()
        reg.fold(opt_d)
        opt_d.zero_grad(set_to_none=False)  # a step a GradScaler skipped (no step hook ran), then the next batch
        reg.fold(opt_d)
        opt_d.step()
    with pytest.warns(RegDslWarning, match=r"no reg\.fold\(\) since the step before") as caught:
        opt_d.step()
    assert caught[0].filename == __file__  # the line of opt_d.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_d.step()  # once
        reg.fold(opt_d)
        opt_d.step()


def test_remap_each_optimizers_state_after_the_rules_changed() -> None:
    """Resuming with an edited file: each part's optimizer state follows its parameters by name."""
    net = model()
    reg = compiled(net)
    opts = {
        "gen": torch.optim.SGD(reg.param_groups(net.gen, lr=LR, momentum=0.9)),
        "disc": torch.optim.SGD(reg.param_groups(net.disc, lr=LR, momentum=0.9)),
    }
    reg.attach(list(opts.values()), fold=True)
    for which, (x, y) in zip(PATTERN, batches()):
        opt = opts["gen" if which == "g" else "disc"]
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    saved = {part: o.state_dict() for part, o in opts.items()}
    saved_reg = reg.state_dict()
    old = dict(net.named_parameters())

    edited = compiled(net := model(), RULES + "layer gen.2.weight decay 0.3\n")  # gen.2.weight: a group of its own
    with pytest.raises(regdsl.RegStateError):
        edited.load_state_dict(saved_reg)
    with pytest.raises(regdsl.RegStateError, match="not those of the saved layout"):
        edited.remap_optimizer_state(saved["gen"], saved_reg)  # the whole model's layout: not this optimizer's
    for part in ("gen", "disc"):
        module = getattr(net, part)
        new = torch.optim.SGD(edited.param_groups(module, lr=LR, momentum=0.9))
        new.load_state_dict(edited.remap_optimizer_state(saved[part], saved_reg, of=module))
        for n, p in module.named_parameters():
            want = opts[part].state[old[f"{part}.{n}"]]["momentum_buffer"]
            torch.testing.assert_close(new.state[p]["momentum_buffer"], want, rtol=0, atol=0, msg=n)
        if part == "gen":
            group = next(g for g in new.param_groups if any(q is net.gen[2].weight for q in g["params"]))
            assert (group["weight_decay"], group["lr"], [id(q) for q in group["params"]]) == (0.3, LR * 0.5, [id(net.gen[2].weight)])
    edited.load_state_dict(saved_reg, strict=False)
    assert edited.step == len(PATTERN)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])
def test_constant_rules_count_every_step(fold: bool) -> None:
    """Nothing scheduled and nothing after a step: each optimizer's one hook still counts its steps."""
    net = model()
    reg = compiled(net, "layer gen.0.weight l2 0.5\nlayer disc.0.weight l2 0.25\n")
    opt_g, opt_d = (torch.optim.SGD(reg.param_groups(part, lr=LR)) for part in (net.gen, net.disc))
    reg.attach([opt_g, opt_d], fold=fold)
    start = net.gen[0].weight.detach().clone()
    for which in PATTERN:
        opt = opt_g if which == "g" else opt_d
        opt.zero_grad()
        for p in net.parameters():
            p.grad = torch.zeros_like(p)  # only the terms move the weights
        if not fold:
            reg.penalty().backward()
        opt.step()
    assert reg.step == len(PATTERN)
    torch.testing.assert_close(net.gen[0].weight.detach(), start * (1 - LR * 0.5) ** PATTERN.count("g"), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ activity values across two optimizers


def test_the_gan_loop_of_the_docs_keeps_the_generators_activity_term() -> None:
    """docs/fold.md's loop: parameter terms folded, fake = G(z), the discriminator's step on
    fake.detach(), then the generator's loss + penalty(). Before, the discriminator's step dropped every
    activity value collected since the last penalty(), the generator's too: its term never applied, with
    a warning to add the penalty() that was there. A step now drops only the values of the modules its
    optimizer steps (a module without parameters, this Tanh, goes with the network around it)."""
    rules = "layer gen.1 activity l2 0.5\nlayer gen.0.weight l2 0.1\nlayer disc.0.weight l1 0.01\n"
    net, hand = model(), model()
    reg = compiled(net, rules)
    opt_g, opt_d = (torch.optim.SGD(reg.param_groups(part, lr=LR)) for part in (net.gen, net.disc))
    reg.attach([opt_g, opt_d], fold=True)
    hand_g, hand_d = torch.optim.SGD(hand.gen.parameters(), lr=LR), torch.optim.SGD(hand.disc.parameters(), lr=LR)
    z, real = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def d_loss(m: TwoPart, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(m.disc(fake.detach())).mean() + F.softplus(-m.disc(real)).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "add reg.penalty()" warning: it is there
        for _ in range(3):
            fake = net.gen(z)
            opt_d.zero_grad()
            d_loss(net, fake).backward()
            opt_d.step()
            opt_g.zero_grad()
            (F.softplus(-net.disc(fake)).mean() + reg.penalty()).backward()
            opt_g.step()

            a = hand.gen[1](hand.gen[0](z))  # by hand: activity l2 is λ/2 · Σa² / B on the Tanh's output
            fake_h = hand.gen[2](a)
            hand_d.zero_grad()
            d_loss(hand, fake_h).backward()
            with torch.no_grad():
                hand.disc[0].weight.grad += 0.01 * hand.disc[0].weight.sign()
            hand_d.step()
            hand_g.zero_grad()
            g_loss = F.softplus(-hand.disc(fake_h)).mean() + 0.5 / 2 * a.square().sum() / 6
            (g_loss + 0.1 / 2 * hand.gen[0].weight.square().sum()).backward()
            hand_g.step()
    for (name, p), q in zip(net.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, msg=name)
